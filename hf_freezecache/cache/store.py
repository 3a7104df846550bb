"""Activation caches on any fsspec store (`s3://`, `gs://`, `hf://`, `file://`, `memory://`...): `CacheStore`.

A cache at a URL is never read in place: `CacheStore.download` copies it into a local folder (manifest first and
checked, then the shards it lists, each checked as it arrives), which `ActivationCache.load` opens. Writing goes the
other way: a cache built or exported locally is `publish`ed, its manifest last, so a cache at a URL is complete
exactly when its manifest exists. Every fsspec call of the package is in this module.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from typing import IO, Any

from fsspec.core import url_to_fs
from huggingface_hub import constants
from tqdm.auto import tqdm

from .manifest import (
    CARD_NAME,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    CacheManifest,
    CacheMismatchError,
    CorruptCacheError,
    describe_mismatch,
)

_BLOCK = 8 << 20


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names a location on an fsspec store (`protocol://...`) rather than a local folder."""
    return "://" in os.fspath(path)


def default_local_dir() -> str:
    """Where caches at URLs are downloaded, and builds to URLs staged, by default: `$HF_HOME/hf_freezecache`."""
    return os.path.join(constants.HF_HOME, "hf_freezecache")


def local_scratch(local_dir: str | os.PathLike | None, prefix: str) -> str:
    """A new private folder under `local_dir` (default `default_local_dir()`), for the caller to remove."""
    root = os.fspath(local_dir or default_local_dir())
    os.makedirs(root, exist_ok=True)
    return tempfile.mkdtemp(prefix=prefix, dir=root)


class CacheStore:
    """The cache folder at `url` on an fsspec store, opened with `storage_options` (what `fsspec.filesystem` takes for
    the protocol, as `datasets` and `huggingface_hub` take them: credentials, endpoint...).

    Raises:
        ValueError: the protocol is unknown, its fsspec backend is not installed (e.g. `s3fs` for `s3://`), or it
            refuses the storage options.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        try:
            self.fs, path = url_to_fs(self.url, **(storage_options or {}))
        except (ImportError, ValueError, TypeError) as error:
            raise ValueError(
                f"Cannot open {url!r} with storage options {sorted(storage_options or {})}: {error}"
            ) from error
        self.path = path.rstrip("/")
        self._folders: set[str] = set()

    def sibling(self, suffix: str) -> CacheStore:
        """The folder `<url><suffix>` on the same store (e.g. a build's uploads, `<url>.partial-<id>`).

        Raises:
            ValueError: the URL is a bucket (or the store's root), which has no place beside it.
        """
        if not posixpath.dirname(self.path).strip("/"):
            raise ValueError(
                f"{self.url!r} is a bucket or a root: write caches into a folder in it, e.g. {self.url}/caches."
            )
        other = copy.copy(self)
        other.url, other.path, other._folders = self.url + suffix, self.path + suffix, set()
        return other

    def _path(self, name: str) -> str:
        return f"{self.path}/{name}"

    def read_json(self, name: str) -> Any | None:
        """The parsed JSON file `name`, or None when it does not exist.

        Raises:
            CorruptCacheError: the file has more than `MAX_MANIFEST_BYTES` or is not JSON.
        """
        raw = self._read(name)
        return None if raw is None else _parse(raw, f"{self.url}/{name}")

    def _read(self, name: str) -> bytes | None:
        try:
            with self.fs.open(self._path(name), "rb") as f:
                raw = f.read(MAX_MANIFEST_BYTES + 1)  # a manifest's limit, not what the store says the size is
        except FileNotFoundError:
            return None
        if len(raw) > MAX_MANIFEST_BYTES:
            raise CorruptCacheError(f"{self.url}/{name} has more than {MAX_MANIFEST_BYTES:,} bytes: not a manifest.")
        return raw

    def has_manifest(self) -> bool:
        """Whether a complete cache is at the URL (its manifest, written last, exists)."""
        return self.fs.exists(self._path(MANIFEST_NAME))

    def manifest(self) -> CacheManifest | None:
        """The checked manifest at the URL; None when there is none (no cache, or an unfinished build or upload)."""
        data = self.read_json(MANIFEST_NAME)
        return None if data is None else CacheManifest.from_dict(data, source=f"{self.url}/{MANIFEST_NAME}")

    def download(
        self,
        download_dir: str | os.PathLike | None = None,
        *,
        expected_fingerprint: str | dict[str, str] | None = None,
        progress: bool = True,
    ) -> str:
        """Copies the cache at the URL into a local folder and returns that folder.

        The folder is `<download_dir>/<url>-<fingerprint>-<manifest digest>`: a later call finds it while the manifest
        at the URL is the same. Concurrent calls each download into a folder of their own; the first complete wins.

        Args:
            download_dir (`str`, *optional*): Parent of the copies; default `<default_local_dir()>/downloads`.
            expected_fingerprint (`str` or `dict[str, str]`, *optional*): Refuse, before fetching any shard, a
                cache without this fingerprint or these fingerprint parts.
            progress (`bool`): Show a progress bar over the bytes downloaded.

        Raises:
            FileNotFoundError: there is no manifest at the URL.
            CacheMismatchError: the cache does not have `expected_fingerprint`.
            CorruptCacheError: the manifest is invalid, or a shard is missing or fails its checksum.
        """
        raw = self._read(MANIFEST_NAME)
        if raw is None:
            raise FileNotFoundError(
                f"No activation cache at {self.url}: it has no {MANIFEST_NAME} (nothing is there, or a build or "
                "upload did not finish)."
            )
        source = f"{self.url}/{MANIFEST_NAME}"
        manifest = CacheManifest.from_dict(_parse(raw, source), source=source)
        _check_expected(manifest, expected_fingerprint, self.url)
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", self.url)[-80:].strip("._")
        name = f"{slug}-{manifest.fingerprint[:12]}-{hashlib.sha256(raw).hexdigest()[:8]}"
        folder = os.path.join(os.fspath(download_dir or os.path.join(default_local_dir(), "downloads")), name)
        if os.path.isfile(os.path.join(folder, MANIFEST_NAME)):
            return folder
        partial = f"{folder}.partial-{uuid.uuid4().hex[:8]}"
        try:
            os.makedirs(partial)
            sizes = {}
            for shard in manifest.shards:
                try:
                    sizes[shard] = self.fs.size(self._path(shard)) or 0
                except FileNotFoundError:
                    raise CorruptCacheError(f"Cache shard {self.url}/{shard} is missing.") from None
            with tqdm(total=sum(sizes.values()), desc=f"Downloading {self.url}", unit="B", unit_scale=True,
                      disable=not progress) as bar:  # fmt: skip
                for shard, expected in manifest.shards.items():
                    target = os.path.join(partial, *shard.split("/"))
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    with self.fs.open(self._path(shard), "rb") as source_file, open(target, "wb") as sink:
                        digest = _copy(source_file, sink, bar)
                    if digest != expected:
                        raise CorruptCacheError(
                            f"Cache shard {self.url}/{shard} does not match its checksum in {MANIFEST_NAME}: it was "
                            "truncated or altered on the store. Rebuild the cache, or upload it again."
                        )
            # The manifest's bytes as read, last: a folder with a manifest is complete.
            with open(os.path.join(partial, MANIFEST_NAME), "wb") as f:
                f.write(raw)
            _place(partial, folder)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return folder

    def upload(self, local_folder: str, names: Sequence[str], *, prefix: str = "", progress: bool = False) -> dict:
        """Sends the files `names` of `local_folder`, in that order, to `<url>/<prefix><name>`; returns their sha256
        by name, computed as they are read."""
        paths = [os.path.join(local_folder, *name.split("/")) for name in names]
        digests = {}
        with tqdm(total=sum(map(os.path.getsize, paths)), desc=f"Uploading to {self.url}", unit="B", unit_scale=True,
                  disable=not progress) as bar:  # fmt: skip
            for name, path in zip(names, paths, strict=True):
                target = self._path(prefix + name)
                self._make_parent(target)
                with open(path, "rb") as source, self.fs.open(target, "wb") as sink:
                    digests[name] = _copy(source, sink, bar)
        return digests

    def move_in(self, source: CacheStore, name: str, target: str) -> None:
        """Moves the file `name` of `source` (on the same store) to `<url>/<target>`, on the store's side: object
        stores copy it server-side (S3 `CopyObject`, GCS rewrite), nothing goes through this machine."""
        self._make_parent(self._path(target))
        self.fs.mv(source._path(name), self._path(target))

    def publish(self, local_folder: str, names: Sequence[str], *, moves: Sequence = (), progress: bool = True) -> None:
        """Makes the complete cache of `local_folder` the cache at the URL.

        In order: the cache already at the URL is removed, its manifest first (from then on nothing loadable is
        there); `moves` (`(store, name, target)`: shards already uploaded elsewhere on the store) are moved in; the
        files `names` are uploaded; then the card, and the manifest last.
        """
        self.remove()
        for source, name, target in moves:
            self.move_in(source, name, target)
        self.upload(local_folder, [*names, CARD_NAME, MANIFEST_NAME], progress=progress)

    def remove(self) -> None:
        """Deletes the cache at the URL, manifest first, so that an interrupted removal leaves nothing loadable."""
        if self.fs.exists(self._path(MANIFEST_NAME)):
            self.fs.rm(self._path(MANIFEST_NAME))
        if self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)
        self.fs.invalidate_cache()
        self._folders.clear()

    def remove_partial_builds(self, marker: str) -> None:
        """Deletes what interrupted builds left beside the cache (`<url><marker>*`)."""
        parent, name = posixpath.split(self.path)
        try:
            entries = self.fs.ls(parent, detail=False)
        except FileNotFoundError:
            return
        for entry in entries:
            if posixpath.basename(entry.rstrip("/")).startswith(name + marker):
                self.fs.rm(entry, recursive=True)

    def is_empty(self) -> bool:
        """Whether nothing is at the URL (or an empty folder)."""
        return not self.fs.exists(self.path) or (self.fs.isdir(self.path) and not self.fs.ls(self.path))

    def check_writable(self) -> None:
        """Writes and deletes a small file beside the cache, so that a wrong URL or missing credentials fail before
        any work.

        Raises:
            OSError: the store refused (the message names the URL and the store's error).
        """
        probe = self.sibling(f".write-test-{uuid.uuid4().hex}")
        try:
            probe._make_parent(probe.path)
            with self.fs.open(probe.path, "wb") as f:
                f.write(b"ok")
            self.fs.rm(probe.path)
        except Exception as error:  # each store has its own errors (botocore, google.api_core, HTTP)
            raise OSError(
                f"Cannot write the activation cache at {self.url} ({type(error).__name__}: {error}). Check the URL "
                "and the storage options (credentials, endpoint)."
            ) from error

    def _make_parent(self, path: str) -> None:
        # Local and memory file systems need the folders; object stores ignore them (asked once per folder).
        parent = posixpath.dirname(path)
        if parent not in self._folders:
            self.fs.makedirs(parent, exist_ok=True)
            self._folders.add(parent)


def _copy(source: IO[bytes], sink: IO[bytes], bar: tqdm) -> str:
    """Copies `source` to `sink` a block at a time; returns the sha256 of what was copied."""
    digest = hashlib.sha256()
    while block := source.read(_BLOCK):
        digest.update(block)
        sink.write(block)
        bar.update(len(block))
    return digest.hexdigest()


def _parse(raw: bytes, source: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError, absurd nesting
        raise CorruptCacheError(f"{source} is not JSON ({type(error).__name__}).") from error


def _place(partial: str, folder: str) -> None:
    """Renames the complete download `partial` to `folder`, unless another process placed the same cache first."""
    if os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, MANIFEST_NAME)):
        shutil.rmtree(folder, ignore_errors=True)  # not a copy `download` made: those have their manifest
    try:
        os.rename(partial, folder)
    except OSError:
        if not os.path.isfile(os.path.join(folder, MANIFEST_NAME)):
            raise


def _check_expected(manifest: CacheManifest, expected: str | dict[str, str] | None, url: str) -> None:
    if isinstance(expected, str) and manifest.fingerprint != expected:
        differs = f"has fingerprint {manifest.fingerprint}, not the expected {expected}"
    elif isinstance(expected, dict) and manifest.fingerprint_parts != expected:
        parts = describe_mismatch(expected, manifest.fingerprint_parts)
        differs = f"was built for another configuration (differs in: {parts})"
    else:
        return
    raise CacheMismatchError(f"The activation cache at {url} {differs}; it will not be used.")
