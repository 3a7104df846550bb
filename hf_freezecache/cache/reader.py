"""Reads an activation cache back: verified on load, decoded a chunk at a time on a thread pool."""

from __future__ import annotations

import math
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
from .sidecars import SIDECAR_COLUMN_PREFIX


class ActivationCache:
    """An activation cache on disk, checked against its manifest.

    Args:
        folder (`str`): A folder written by `build_activation_cache`.
        manifest (`CacheManifest`): Its manifest.
        rows (`datasets.Dataset`): Its rows (`data`, `labels`, `indices`, and `sidecar.<name>` per sidecar array).
    """

    def __init__(self, folder: str, manifest: CacheManifest, rows: datasets.Dataset) -> None:
        self.folder = folder
        self.manifest = manifest
        self.codec: ActivationCodec = build_codec(manifest.codec)
        self._data = rows.data.column("data")
        self._sidecars = {}
        for name in manifest.sidecar_arrays:
            column = SIDECAR_COLUMN_PREFIX + name
            if column not in rows.column_names:
                raise CorruptCacheError(f"{folder}: its manifest lists sidecar column {column!r}, the rows lack it.")
            self._sidecars[name] = rows.data.column(column)
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

    def decode_sidecars(self, chunk: int) -> dict[str, np.ndarray]:
        """The sidecar arrays of the samples of row `chunk`, by name, each `(samples, *array_shape)` (empty when the
        cache has no sidecar). Float arrays are decoded with the codec; int32 arrays are checked for their size."""
        if not self._sidecars:
            return {}
        start = time.perf_counter()
        samples = len(self.chunk_samples(chunk))
        arrays = {}
        for name, spec in self.manifest.sidecar_arrays.items():
            shape = (samples, *spec["shape"])
            blob = self._sidecars[name][chunk].as_py()
            if spec["dtype"] == "float32":
                arrays[name] = self.codec.decode(blob, shape)
                continue
            if len(blob) != 4 * math.prod(shape):
                raise CorruptCacheError(
                    f"{self.folder}: sidecar {name!r} of row {chunk} holds {len(blob)} bytes, {4 * math.prod(shape)} "
                    "expected."
                )
            arrays[name] = np.frombuffer(blob, dtype="<i4").reshape(shape).astype(np.int64)
        elapsed = time.perf_counter() - start
        with self._lock:
            self.decode_seconds += elapsed
        return arrays

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class CachedActivationDataset(Dataset):
    """Samples of an `ActivationCache` as a map-style dataset of the training set's length.

    Item `i` is sample `i` of the training split: `{"prefix_activations": float32 tensor, "labels": int}`, plus
    `"sidecar.<name>"` tensors when the cache stores sidecar arrays.
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
        self._recent: OrderedDict[int, tuple[np.ndarray, dict[str, np.ndarray]]] = OrderedDict()

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
            activations, sidecars = decoded[chunk]
            item = {
                "prefix_activations": torch.from_numpy(activations[offset]),
                "labels": int(self.cache.labels[index]),
            }
            for name, array in sidecars.items():
                item[SIDECAR_COLUMN_PREFIX + name] = torch.from_numpy(array[offset])
            items.append(item)
        return items

    def _decode(self, chunk: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return self.cache.decode(chunk), self.cache.decode_sidecars(chunk)

    def _decode_many(self, chunks: list[int]) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
        if len(chunks) <= 1 or self.decode_threads <= 1:
            return [self._decode(c) for c in chunks]
        if self._pool is None or self._pool_pid != os.getpid():  # a DataLoader worker needs its own threads
            self._pool = ThreadPoolExecutor(max_workers=self.decode_threads)
            self._pool_pid = os.getpid()
        return list(self._pool.map(self._decode, chunks))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_pool=None, _pool_pid=None, _recent=OrderedDict())
        return state
