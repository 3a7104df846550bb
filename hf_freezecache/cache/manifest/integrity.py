"""Whether a cache's files are the ones its manifest describes: the sha256 of every shard."""

from __future__ import annotations

import hashlib
import os

from .schema import MANIFEST_NAME, CacheManifest


class CorruptCacheError(OSError):
    """A cache file is missing, truncated or altered (its checksum does not match the manifest)."""


def file_sha256(path: str | os.PathLike, block_size: int = 1 << 20) -> str:
    """sha256 of the file at `path` (hex), read `block_size` bytes at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block_size):
            digest.update(chunk)
    return digest.hexdigest()


def verify_shards(folder: str | os.PathLike, manifest: CacheManifest) -> None:
    """Checks every data file of the cache against the manifest; raises `CorruptCacheError` naming the file."""
    for name, expected in manifest.shards.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise CorruptCacheError(f"Cache shard {path} is missing.")
        if file_sha256(path) != expected:
            raise CorruptCacheError(
                f"Cache shard {path} does not match its checksum in {MANIFEST_NAME}: it was truncated or altered. "
                "Delete the cache folder to rebuild (or download) it."
            )
