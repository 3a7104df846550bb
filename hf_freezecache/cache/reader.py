"""Reads an activation cache back: verified on load, decoded a chunk at a time on a thread pool."""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import Dataset

from .codecs import ActivationCodec, build_codec
from .manifest import CacheManifest, CacheMismatchError, CorruptCacheError, describe_mismatch, verify_shards


class ActivationCache:
    """An activation cache on disk, checked against its manifest.

    Args:
        folder (`str`): A folder written by `build_activation_cache`.
        manifest (`CacheManifest`): Its manifest.
        rows (`datasets.Dataset`): Its rows (`data`, `labels`, `indices`).
    """

    def __init__(self, folder: str, manifest: CacheManifest, rows: datasets.Dataset) -> None:
        self.folder = folder
        self.manifest = manifest
        self.codec: ActivationCodec = build_codec(manifest.codec)
        self._data = rows.data.column("data")
        self.labels = np.asarray(rows.data.column("labels").combine_chunks().flatten(), dtype=np.int64)
        indices = np.asarray(rows.data.column("indices").combine_chunks().flatten(), dtype=np.int64)
        if not np.array_equal(indices, np.arange(manifest.num_samples)):
            raise CorruptCacheError(f"{folder}: rows do not hold samples 0..{manifest.num_samples - 1} in order.")
        self._lock = threading.Lock()
        self.decode_calls = 0
        self.decode_seconds = 0.0

    @classmethod
    def load(
        cls, folder: str | os.PathLike, expected_fingerprint: dict[str, str] | None = None, verify: bool = True
    ) -> ActivationCache:
        """Opens the cache in `folder`.

        Raises:
            CacheMismatchError: `expected_fingerprint` (fingerprint parts) is given and the cache was built from
                something else; the message names what differs.
            CorruptCacheError: the manifest or a shard is missing, or a shard fails its checksum (named).
        """
        folder = os.fspath(folder)
        manifest = CacheManifest.load(folder)
        if expected_fingerprint is not None and manifest.fingerprint_parts != expected_fingerprint:
            raise CacheMismatchError(
                f"The activation cache in {folder} was built for another configuration (differs in: "
                f"{describe_mismatch(expected_fingerprint, manifest.fingerprint_parts)}); it will not be used."
            )
        if verify:
            verify_shards(folder, manifest)
        rows = datasets.load_from_disk(folder)
        if rows.num_rows != manifest.num_chunks:
            raise CorruptCacheError(f"{folder} has {rows.num_rows} rows; its manifest says {manifest.num_chunks}.")
        return cls(folder, manifest, rows)

    @property
    def chunk_size(self) -> int:
        return self.manifest.chunk_size

    @property
    def num_samples(self) -> int:
        return self.manifest.num_samples

    @property
    def num_chunks(self) -> int:
        return self.manifest.num_chunks

    def chunk_samples(self, chunk: int) -> range:
        """Sample indices held by row `chunk`."""
        start = chunk * self.chunk_size
        return range(start, min(start + self.chunk_size, self.num_samples))

    def decode(self, chunk: int) -> np.ndarray:
        """Activations of the samples of row `chunk`, float32, shape `(len(chunk_samples(chunk)), *sample_shape)`.

        Thread-safe: codecs keep per-thread (de)compressor state.
        """
        start = time.perf_counter()
        shape = (len(self.chunk_samples(chunk)), *self.manifest.sample_shape)
        array = self.codec.decode(self._data[chunk].as_py(), shape)
        elapsed = time.perf_counter() - start
        with self._lock:
            self.decode_calls += 1
            self.decode_seconds += elapsed
        return array

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class CachedActivationDataset(Dataset):
    """Samples of an `ActivationCache` as a map-style dataset of the training set's length.

    Item `i` is sample `i` of the training split: `{"prefix_activations": float32 tensor, "labels": int}`.
    `__getitems__` (used by `DataLoader` for a whole batch) decodes each chunk the batch needs once, on a thread
    pool, and keeps the chunks of the previous batch so a chunk split across two consecutive batches is not
    decoded twice. With the `ChunkShuffleSampler` every chunk is then decoded once per epoch.

    Args:
        cache (`ActivationCache`): The cache.
        decode_threads (`int`): Threads decoding chunks of one batch in parallel.
    """

    def __init__(self, cache: ActivationCache, decode_threads: int = 2) -> None:
        self.cache = cache
        self.decode_threads = decode_threads
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid: int | None = None
        self._recent: OrderedDict[int, np.ndarray] = OrderedDict()

    @property
    def chunk_size(self) -> int:
        return self.cache.chunk_size

    def __len__(self) -> int:
        return self.cache.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        size = self.chunk_size
        needed = list(dict.fromkeys(int(i) // size for i in indices))
        missing = [c for c in needed if c not in self._recent]
        decoded = dict(zip(missing, self._decode_many(missing), strict=True))
        decoded.update({c: self._recent[c] for c in needed if c in self._recent})
        self._recent = OrderedDict((c, decoded[c]) for c in needed)
        items = []
        for index in indices:
            chunk, offset = divmod(int(index), size)
            items.append(
                {
                    "prefix_activations": torch.from_numpy(decoded[chunk][offset]),
                    "labels": int(self.cache.labels[index]),
                }
            )
        return items

    def _decode_many(self, chunks: list[int]) -> list[np.ndarray]:
        if len(chunks) <= 1 or self.decode_threads <= 1:
            return [self.cache.decode(c) for c in chunks]
        if self._pool is None or self._pool_pid != os.getpid():  # a DataLoader worker needs its own threads
            self._pool = ThreadPoolExecutor(max_workers=self.decode_threads)
            self._pool_pid = os.getpid()
        return list(self._pool.map(self.cache.decode, chunks))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_pool=None, _pool_pid=None, _recent=OrderedDict())
        return state
