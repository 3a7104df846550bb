"""Where a build writes: a checked destination, a staging folder, and the step that publishes the cache.

A build to a local folder writes into `<folder>.partial-<id>`, which becomes `folder` only once the shards, their
checksums and the manifest are complete: an interrupted build leaves no folder that looks like a cache. A build to a
URL (`RemoteStaging`) stages each process's part in a private local folder and uploads it to the store; the cache at
the URL gets its manifest last. Both give the pipeline the same steps: `begin`, `part`, `submit`, `publish`, `end`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from typing import Any

from ..manifest import CARD_NAME, MANIFEST_NAME, CacheManifest
from ..store import CacheStore, default_local_dir, is_url, local_scratch

logger = logging.getLogger(__name__)

_PARTIAL = ".partial-"
# Written last into an uploaded part, so the main process knows the part is complete: its shards' sha256, in row
# order, and its other (small) files.
_UPLOADED = "freezecache_uploaded_part.json"


def check_destination(
    folder: str | os.PathLike,
    required_bytes: int,
    storage_options: dict[str, Any] | None = None,
    local_dir: str | os.PathLike | None = None,
) -> None:
    """Fails early, with a clear message, when a cache of `required_bytes` cannot be written under `folder`.

    For a URL, the store must accept a small file beside the cache and the local folder each process stages its
    share in (`local_dir`) must be writable; the free space is not checked (a store's is unknown, and each process
    stages only its share).
    """
    if is_url(folder):
        CacheStore(os.fspath(folder), storage_options).check_writable()
        _check_writable(os.fspath(local_dir or default_local_dir()), "--cache_local_dir")
        return
    parent = os.path.dirname(os.path.abspath(folder))
    _check_writable(parent, "--cache_dir")
    free = shutil.disk_usage(parent).free
    if free < required_bytes:
        raise OSError(
            f"Not enough free disk for the activation cache under {parent!r}: it needs about "
            f"{required_bytes / 2**30:.2f} GiB (estimated), "
            f"{free / 2**30:.2f} GiB are free. Free space, choose another --cache_dir, or use a codec that "
            "compresses more (--cache_codec zfp with a larger --cache_tolerance)."
        )


def _check_writable(parent: str, flag: str) -> None:
    try:
        os.makedirs(parent, exist_ok=True)
        probe = os.path.join(parent, f".write-test-{uuid.uuid4().hex}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as error:
        raise OSError(
            f"Cannot write the activation cache under {parent!r} ({error.strerror or error}). "
            f"Choose a writable folder with {flag}."
        ) from error


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

    def begin(self, is_main: bool) -> None:
        """The main process creates the staging folder (every process writes its part there)."""
        if is_main:
            self.create()

    def submit(self, rank: int) -> None:
        """Nothing to do: the part is already where the main process gathers it."""

    def end(self, is_main: bool) -> None:
        """Removes the staging folder (after the cache is published, or after a failure)."""
        if is_main:
            self.remove()

    def published_manifest(self) -> CacheManifest:
        return CacheManifest.load(self.folder)


class RemoteStaging:
    """The staging of a build of the cache at URL `url`, whose processes need not share a file system.

    Every process writes its part in a private local folder under `local_dir` (default `default_local_dir()`), then
    uploads it to `<url>.partial-<fingerprint12>/part-<rank>` (`submit`): shards first, then a record of their
    sha256 (computed as they are read) last. The main process gathers the records (`gather.gather_parts`), never the
    shards, and `publish`es: the shards are moved into `url` on the store's side, in process order, under the names
    a local build gives them, and the manifest is uploaded last.

    Args:
        url (`str`): Where the cache goes.
        fingerprint (`str`): The cache's fingerprint.
        storage_options (`dict`, *optional*): The store's options (credentials...).
        local_dir (`str`, *optional*): Parent of the private local staging folders.
        progress (`bool`): Show progress bars of the uploads.
    """

    def __init__(
        self,
        url: str,
        fingerprint: str,
        storage_options: dict[str, Any] | None = None,
        local_dir: str | os.PathLike | None = None,
        progress: bool = False,
    ) -> None:
        self.store = CacheStore(url, storage_options)
        self.uploads = self.store.sibling(f"{_PARTIAL}{fingerprint[:12]}")
        self.folder = self.store.url
        self.fingerprint = fingerprint
        self.local_dir = local_dir
        self.progress = progress
        self.path: str | None = None
        #: `(part folder on the store, shard name there, name in the cache)`, in row order: set by the gather.
        self.moves: list[tuple[CacheStore, str, str]] = []

    @property
    def final(self) -> str:
        """The local folder of the cache's small files (dataset files, card, manifest) before they are uploaded."""
        return os.path.join(self.path, "cache")

    def part(self, rank: int) -> str:
        return os.path.join(self.path, f"part-{rank:05d}")

    def begin(self, is_main: bool) -> None:
        """Every process creates its private local folder; the main process removes what interrupted builds of the
        cache left on the store."""
        self.path = local_scratch(self.local_dir, "build-")
        if is_main:
            self.store.remove_partial_builds(_PARTIAL)

    def submit(self, rank: int) -> None:
        """Uploads process `rank`'s part: its shards, then its other files, then the record that it is complete."""
        part, prefix = self.part(rank), f"part-{rank:05d}/"
        with open(os.path.join(part, "state.json")) as f:
            shards = [entry["filename"] for entry in json.load(f)["_data_files"]]
        others = sorted(name for name in os.listdir(part) if name not in shards)
        digests = self.uploads.upload(part, shards, prefix=prefix, progress=self.progress)
        self.uploads.upload(part, others, prefix=prefix)
        with open(os.path.join(part, _UPLOADED), "w") as f:
            json.dump({"shards": digests, "files": others}, f)
        self.uploads.upload(part, [_UPLOADED], prefix=prefix)

    def fetch_part(self, rank: int) -> dict[str, str] | None:
        """Downloads the small files of process `rank`'s uploaded part into `part(rank)`; returns its shards' sha256
        by name, in row order, or None when the part is not complete on the store."""
        prefix = f"part-{rank:05d}/"
        record = self.uploads.read_json(prefix + _UPLOADED)
        if record is None:
            return None
        os.makedirs(self.part(rank), exist_ok=True)
        for name in record["files"]:
            with open(os.path.join(self.part(rank), name), "w") as f:
                json.dump(self.uploads.read_json(prefix + name), f)
        return record["shards"]

    def publish(self) -> None:
        """Publishes the cache at the URL: the shards moved in, the dataset files, then the card and the manifest."""
        files = sorted(set(os.listdir(self.final)) - {CARD_NAME, MANIFEST_NAME})
        self.store.publish(self.final, files, moves=self.moves, progress=self.progress)

    def end(self, is_main: bool) -> None:
        """Removes this process's local folder, and on the main process the uploads left on the store."""
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        if is_main:
            try:
                self.uploads.remove()
            except Exception as error:  # never in place of the error that ended the build
                logger.warning("Could not remove %s (%s); the next build removes it.", self.uploads.url, error)

    def published_manifest(self) -> CacheManifest:
        manifest = self.store.manifest()
        if manifest is None:
            raise FileNotFoundError(
                f"The main process published no cache at {self.folder}, or this process cannot see it."
            )
        return manifest


def open_staging(
    folder: str | os.PathLike,
    fingerprint: str,
    storage_options: dict[str, Any] | None = None,
    local_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> Staging | RemoteStaging:
    """The staging of a build of `folder` (a local folder or a URL)."""
    if is_url(folder):
        return RemoteStaging(os.fspath(folder), fingerprint, storage_options, local_dir, progress)
    return Staging(os.path.abspath(folder), fingerprint)
