"""Reads an activation cache back: verified on load, then unpacked (or decoded) a row at a time."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ._payloads import PayloadColumn
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
from .manifest.integrity import check_binding
from .packed import ArrayLayout, Int32Values
from .sidecars import SIDECAR_COLUMN_PREFIX

#: The array of the activations themselves, next to the sidecar arrays (named by the manifest).
DATA = "data"


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
        columns = {DATA: DATA, **{name: SIDECAR_COLUMN_PREFIX + name for name in manifest.sidecar_arrays}}
        self._payloads = {name: PayloadColumn(rows.data.column(column)) for name, column in columns.items()}
        full = min(manifest.chunk_size, manifest.num_samples)
        self.layouts: dict[str, ArrayLayout] = {DATA: ArrayLayout(self.codec, (full, *manifest.sample_shape))}
        for name, spec in manifest.sidecar_arrays.items():
            decoder = self.codec if spec["dtype"] == "float32" else Int32Values()
            self.layouts[name] = ArrayLayout(decoder, (full, *spec["shape"]))
        self.in_memory = False
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

        In order: the manifest (`check_manifest`: types, ranges, codec, its seal), the fingerprint, the shards'
        sha256 (with `verify`), each shard's columns, types and binding to this cache (from its header, before its
        rows are read) and the row count;
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

    def field_lengths(self) -> dict[str, dict[str, tuple[int, np.dtype]]]:
        """Per array (`"data"`, then the sidecar arrays), the fields `unpack` gives for a full row: (length, dtype)."""
        return {name: layout.decoder.packed_fields(layout.chunk_shape) for name, layout in self.layouts.items()}

    def unpack(self, chunk: int) -> dict[str, dict[str, np.ndarray]]:
        """The fields of every array of row `chunk` (`ActivationCodec.unpack`), for decoding on any device.

        Thread-safe: codecs keep per-thread (de)compressor state.

        Raises:
            CorruptCacheError: a payload does not fit the row's shape (checked before anything is allocated from it).
        """
        start = time.perf_counter()
        fields = {name: self._unpack_array(name, chunk) for name in self.layouts}
        self._count(time.perf_counter() - start)
        return fields

    def _unpack_array(self, name: str, chunk: int) -> dict[str, np.ndarray]:
        layout = self.layouts[name]
        shape = (len(self.chunk_samples(chunk)), *layout.chunk_shape[1:])
        try:
            return layout.decoder.unpack(self._payloads[name][chunk], shape)
        except ValueError as error:
            column = DATA if name == DATA else SIDECAR_COLUMN_PREFIX + name
            raise CorruptCacheError(f"{self.folder}: {column!r} of row {chunk} cannot be decoded: {error}") from error

    def decode(self, chunk: int) -> np.ndarray:
        """Activations of the samples of row `chunk`, float32, shape `(len(chunk_samples(chunk)), *sample_shape)`.

        Raises:
            CorruptCacheError: the row's payload does not decode to that shape.
        """
        start = time.perf_counter()
        shape = (len(self.chunk_samples(chunk)), *self.manifest.sample_shape)
        try:
            array = self.codec.decode(self._payloads[DATA][chunk], shape)
        except ValueError as error:
            raise CorruptCacheError(f"{self.folder}: 'data' of row {chunk} cannot be decoded: {error}") from error
        self._count(time.perf_counter() - start)
        return array

    def decode_sidecars(self, chunk: int) -> dict[str, np.ndarray]:
        """The sidecar arrays of the samples of row `chunk`, by name, each `(samples, *array_shape)` (empty when the
        cache has no sidecar): float arrays float32 (decoded with the codec), int arrays int64."""
        arrays = {}
        for name, layout in self.layouts.items():
            if name != DATA:
                fields = {key: torch.from_numpy(value)[None] for key, value in self._unpack_array(name, chunk).items()}
                shape = (len(self.chunk_samples(chunk)), *layout.chunk_shape[1:])
                arrays[name] = layout.decoder.expand(fields, shape)[0].numpy()
        return arrays

    def load_into_memory(self) -> int:
        """Copies every row's payload from the memory-mapped shards into process memory, so that reading a row no
        longer touches the files; returns the bytes now held."""
        for column in self._payloads.values():
            column.load_into_memory()
        self.in_memory = True
        return self.memory_bytes

    @property
    def memory_bytes(self) -> int:
        """Payload bytes held in process memory (0 while the rows are read from the memory-mapped shards)."""
        return sum(column.memory_bytes for column in self._payloads.values())

    def _count(self, seconds: float) -> None:
        with self._lock:
            self.decode_calls += 1
            self.decode_seconds += seconds

    def __reduce__(self) -> tuple[Any, ...]:
        # A copy (a DataLoader worker started with spawn or forkserver, or `copy.deepcopy`) reopens the folder:
        # pickling the rows and payloads would copy the whole cache into every worker.
        return type(self)._reopen, (self.folder, self.manifest, self.decode_calls, self.decode_seconds)

    @classmethod
    def _reopen(
        cls, folder: str, manifest: CacheManifest, decode_calls: int, decode_seconds: float
    ) -> ActivationCache:
        """The cache with `manifest` opened again from `folder`, rows memory-mapped, for a copy in another process.

        Payloads that the original held in memory (`load_into_memory`) are read from the memory-mapped shards here:
        the OS page cache shares them between processes. The shards' sha256 are not verified again (the process that
        opened the cache did), but the manifest on disk must still have the fingerprint and shards of `manifest`.

        Raises:
            CacheMismatchError: `folder` now holds another cache, or a rebuild of it (other shard checksums).
        """
        found = CacheManifest.load(folder)
        copy_note = "a copy of it (e.g. in a DataLoader worker) reads only the cache that was opened; restart the run"
        if found.fingerprint != manifest.fingerprint:
            differs = describe_mismatch(manifest.fingerprint_parts, found.fingerprint_parts)
            raise CacheMismatchError(
                f"The activation cache in {folder} was replaced after it was opened (differs in: {differs}); "
                f"{copy_note}."
            )
        if found.shards != manifest.shards:
            raise CacheMismatchError(
                f"The activation cache in {folder} was rebuilt after it was opened (its shards' sha256 changed); "
                f"{copy_note}."
            )
        cache = cls(folder, manifest, _open_rows(folder, manifest))
        cache.decode_calls, cache.decode_seconds = decode_calls, decode_seconds
        return cache


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
        check_binding(path, schema, manifest.fingerprint)
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
