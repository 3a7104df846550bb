"""Where a build writes: a checked destination, a staging folder beside it, and the rename that publishes the cache.

A build writes into `<folder>.partial-<id>`, which becomes `folder` only once the shards, their checksums and the
manifest are complete: an interrupted build leaves no folder that looks like a cache.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass

_PARTIAL = ".partial-"


def check_destination(folder: str | os.PathLike, required_bytes: int) -> None:
    """Fails early, with a clear message, when a cache of `required_bytes` cannot be written under `folder`."""
    parent = os.path.dirname(os.path.abspath(folder))
    try:
        os.makedirs(parent, exist_ok=True)
        probe = os.path.join(parent, f".write-test-{uuid.uuid4().hex}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as error:
        raise OSError(
            f"Cannot write the activation cache under {parent!r} ({error.strerror or error}). "
            "Choose a writable folder with --cache_dir."
        ) from error
    free = shutil.disk_usage(parent).free
    if free < required_bytes:
        raise OSError(
            f"Not enough free disk for the activation cache under {parent!r}: it needs about "
            f"{required_bytes / 2**30:.2f} GiB (estimated), "
            f"{free / 2**30:.2f} GiB are free. Free space, choose another --cache_dir, or use a codec that "
            "compresses more (--cache_codec zfp with a larger --cache_tolerance)."
        )


def remove_partial_builds(folder: str | os.PathLike) -> None:
    """Deletes what interrupted builds of `folder` left behind (`<folder>.partial-*`)."""
    folder = os.path.abspath(folder)
    parent, name = os.path.split(folder)
    if os.path.isdir(parent):
        for entry in os.listdir(parent):
            if entry.startswith(name + _PARTIAL):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


@dataclass(frozen=True)
class Staging:
    """The staging folder of a build of the cache `folder` (absolute) with fingerprint `fingerprint`.

    Every process derives the same path from the fingerprint, so the main process can gather their parts. Each
    process writes its part into `part(rank)`; the main process gathers them into `final`, then `publish`es it.
    """

    folder: str
    fingerprint: str

    @property
    def path(self) -> str:
        return f"{self.folder}{_PARTIAL}{self.fingerprint[:12]}"

    @property
    def final(self) -> str:
        """The complete cache, before it is renamed to `folder`."""
        return os.path.join(self.path, "cache")

    def part(self, rank: int) -> str:
        """The `save_to_disk` folder of process `rank`'s shards."""
        return os.path.join(self.path, f"part-{rank:05d}")

    def create(self) -> None:
        """Creates the staging folder, once what earlier builds of `folder` left behind is removed."""
        remove_partial_builds(self.folder)
        os.makedirs(self.path)

    def publish(self) -> None:
        """Renames the complete cache `final` to `folder`, replacing a cache already there."""
        if os.path.exists(self.folder):
            shutil.rmtree(self.folder)
        os.rename(self.final, self.folder)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
