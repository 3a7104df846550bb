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
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from .codecs import ActivationCodec, build_codec
from .manifest import (
    LAYOUT_ARROW,
    CacheManifest,
    CacheMismatchError,
    CorruptCacheError,
    cache_features,
    describe_mismatch,
    verify_shards,
)
from .sidecars import SIDECAR_COLUMN_PREFIX


class ActivationCache:
    """An activation cache on disk, checked against its manifest.

    Args:
        folder (`str`): A folder written by `build_activation_cache` (Arrow shards) or `export_cache` (the Hub
            parquet layout).
        manifest (`CacheManifest`): Its manifest.
        rows (`datasets.Dataset`): Its rows (`data`, `labels`, `indices`, and `sidecar.<name>` per sidecar array).

    Raises:
        CorruptCacheError: a column has nulls, or the rows do not hold samples `0..num_samples-1` in order,
            `chunk_size` per row.
    """

    def __init__(self, folder: str, manifest: CacheManifest, rows: datasets.Dataset) -> None:
        self.folder = folder
        self.manifest = manifest
        self.rows = rows
        self.codec: ActivationCodec = build_codec(manifest.codec)
        for column in cache_features(manifest):
            if rows.data.column(column).null_count:
                raise CorruptCacheError(f"{folder}: column {column!r} has empty (null) rows.")
        self._data = rows.data.column("data")
        self._sidecars = {name: rows.data.column(SIDECAR_COLUMN_PREFIX + name) for name in manifest.sidecar_arrays}
        # Row r must hold samples r*chunk_size.. in order, so that decode() knows each row's shape from the manifest.
        starts = np.arange(manifest.num_chunks) * manifest.chunk_size
        sizes = np.minimum(starts + manifest.chunk_size, manifest.num_samples) - starts
        for column in ("labels", "indices"):
            lengths = rows.data.column(column).combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
            if not np.array_equal(lengths, sizes):
                raise CorruptCacheError(
                    f"{folder}: the rows' {column} do not come {manifest.chunk_size} per row "
                    f"({manifest.num_samples} samples in all) as the manifest says."
                )
        self.labels = np.asarray(rows.data.column("labels").combine_chunks().flatten(), dtype=np.int64)
        indices = np.asarray(rows.data.column("indices").combine_chunks().flatten(), dtype=np.int64)
        if not np.array_equal(indices, np.arange(manifest.num_samples)):
            raise CorruptCacheError(f"{folder}: rows do not hold samples 0..{manifest.num_samples - 1} in order.")
        self._lock = threading.Lock()
        self.decode_calls = 0
        self.decode_seconds = 0.0

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike,
        expected_fingerprint: str | dict[str, str] | None = None,
        verify: bool = True,
    ) -> ActivationCache:
        """Opens the cache in `folder`, in either layout (the manifest says which), checking it before any decoding.

        In order: the manifest (`check_manifest`: types, ranges, codec), the fingerprint, the shards' sha256 (with
        `verify`), each shard's columns and types (from its header, before its rows are read) and the row count;
        then the rows are opened (Arrow shards memory-mapped; parquet shards converted once into the `datasets`
        cache, as `datasets.load_dataset` does) and their `indices` checked. Only JSON, Arrow and parquet are read.

        Args:
            folder (`str` or `os.PathLike`): The cache folder.
            expected_fingerprint (`str` or `dict[str, str]`, *optional*): Refuse the cache unless it has this
                fingerprint (`manifest.fingerprint`) or these fingerprint parts (`fingerprint_parts(...)`, which let
                the message say what differs).
            verify (`bool`, *optional*, defaults to `True`): Check the shards' sha256 against the manifest.

        Raises:
            FileNotFoundError: `folder` does not exist.
            CacheMismatchError: the cache does not have `expected_fingerprint`; the message names what differs.
            CorruptCacheError: the manifest is missing or invalid, or a shard is missing, fails its checksum, or has
                other columns or rows than the manifest says (named).
        """
        folder = os.fspath(folder)
        manifest = CacheManifest.load(folder)
        if isinstance(expected_fingerprint, str) and manifest.fingerprint != expected_fingerprint:
            raise CacheMismatchError(
                f"The activation cache in {folder} has fingerprint {manifest.fingerprint}, not the expected "
                f"{expected_fingerprint}; it will not be used."
            )
        if isinstance(expected_fingerprint, dict) and manifest.fingerprint_parts != expected_fingerprint:
            raise CacheMismatchError(
                f"The activation cache in {folder} was built for another configuration (differs in: "
                f"{describe_mismatch(expected_fingerprint, manifest.fingerprint_parts)}); it will not be used."
            )
        if verify:
            verify_shards(folder, manifest)
        return cls(folder, manifest, _open_rows(folder, manifest))

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

        Raises:
            CorruptCacheError: the row's payload does not decode to that shape (the codec checks the size it
                declares before decompressing).
        """
        start = time.perf_counter()
        shape = (len(self.chunk_samples(chunk)), *self.manifest.sample_shape)
        array = self._decode_payload(self._data[chunk].as_py(), shape, chunk, "data")
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
                arrays[name] = self._decode_payload(blob, shape, chunk, SIDECAR_COLUMN_PREFIX + name)
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

    def _decode_payload(self, blob: bytes, shape: tuple[int, ...], chunk: int, column: str) -> np.ndarray:
        try:
            return self.codec.decode(blob, shape)
        except ValueError as error:
            raise CorruptCacheError(f"{self.folder}: {column!r} of row {chunk} cannot be decoded: {error}") from error

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _open_rows(folder: str, manifest: CacheManifest) -> datasets.Dataset:
    """The rows of the manifest's shards, in order, once every shard's columns and the row count are as expected."""
    expected = cache_features(manifest).arrow_schema
    paths = [os.path.join(folder, name) for name in manifest.shards]
    num_rows = 0
    for path in paths:
        try:
            if manifest.layout == LAYOUT_ARROW:
                with pa.memory_map(path) as source:
                    reader = pa.ipc.open_stream(source)
                    schema = reader.schema
                    num_rows += sum(batch.num_rows for batch in reader)
            else:
                parquet = pq.ParquetFile(path)
                schema, rows = parquet.schema_arrow, parquet.metadata.num_rows
                num_rows += rows
        except (OSError, pa.ArrowException) as error:
            raise CorruptCacheError(f"Cache shard {path} cannot be read as {manifest.layout}: {error}") from error
        _check_schema(path, schema, expected)
    if num_rows != manifest.num_chunks:
        raise CorruptCacheError(f"{folder} has {num_rows} rows; its manifest says {manifest.num_chunks}.")
    if manifest.layout == LAYOUT_ARROW:
        return datasets.concatenate_datasets([datasets.Dataset.from_file(path) for path in paths])
    return datasets.Dataset.from_parquet(paths, features=cache_features(manifest), split=manifest.split)


def _check_schema(path: str, schema: pa.Schema, expected: pa.Schema) -> None:
    def same_type(found: pa.DataType, wanted: pa.DataType) -> bool:
        # list<item: int64> and list<element: int64> (parquet's name for the item) are the same column.
        if pa.types.is_list(wanted):
            return pa.types.is_list(found) and found.value_type == wanted.value_type
        return found == wanted

    names, wanted = schema.names, expected.names
    if sorted(names) != sorted(wanted):
        missing, unexpected = sorted(set(wanted) - set(names)), sorted(set(names) - set(wanted))
        raise CorruptCacheError(
            f"Cache shard {path} has columns {names}; expected exactly {wanted} (missing: {missing}, unexpected: "
            f"{unexpected})."
        )
    for field in expected:
        found = schema.field(field.name).type
        if not same_type(found, field.type):
            raise CorruptCacheError(f"Cache shard {path}: column {field.name!r} is {found}, expected {field.type}.")


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
