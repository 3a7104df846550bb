"""The Hub dataset-repo layout of a cache: its rows as parquet shards under `data/`, which `datasets.load_dataset`
reads, with the manifest and the card beside them (`export_cache` and `push_cache_to_hub` write it through here)."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets.utils.py_utils import convert_file_size_to_int
from tqdm.auto import tqdm

from .manifest import LAYOUT_PARQUET, SPLIT_NAME, CacheManifest, cache_features, file_sha256
from .manifest.integrity import bind_schema
from .reader import ActivationCache

logger = logging.getLogger(__name__)

# Parquet row groups of about this size: small enough for the dataset viewer, large enough to read fast.
_ROW_GROUP_BYTES = 100 << 20


def write_hub_layout(
    cache: ActivationCache, output_dir: str, *, split: str, max_shard_size: str | int, progress: bool
) -> CacheManifest:
    """Writes `cache` into the local folder `output_dir` in the Hub layout; returns the manifest written there.

    The rows, in order, go to `data/<split>-NNNNN-of-NNNNN.parquet` shards of at most about `max_shard_size` (a row
    is never split), each bound to the cache's fingerprint like the Arrow shards; the manifest (resealed, its `shards`
    the parquet files' sha256, its `layout` `"parquet"`) and the card follow. The folder is written under a temporary
    name and renamed once complete.

    Raises:
        ValueError: `split` or `max_shard_size` is invalid, or `output_dir` is the cache's own folder.
        FileExistsError: `output_dir` exists and is not empty.
    """
    if not isinstance(split, str) or not SPLIT_NAME.fullmatch(split):
        raise ValueError(f"Invalid split name {split!r}: use letters, digits and '_' (dot-separated), e.g. 'train'.")
    max_bytes = convert_file_size_to_int(max_shard_size)
    if max_bytes < 1:
        raise ValueError(f"max_shard_size must be a positive size (e.g. '500MB'), got {max_shard_size!r}.")
    if output_dir == os.path.abspath(cache.folder):
        raise ValueError(f"Cannot export the cache in {output_dir} onto itself: choose another output_dir.")
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise FileExistsError(f"{output_dir} exists and is not empty: export_cache writes into a new folder.")

    features = cache_features(cache.manifest)
    schema = bind_schema(features.arrow_schema, cache.manifest.fingerprint)
    table = cache.rows.data.table.select(list(features)).cast(schema)
    row_bytes = _row_bytes(table)
    bounds = _shard_bounds(row_bytes, max_bytes)
    staging = f"{output_dir}.partial-{uuid.uuid4().hex[:8]}"
    os.makedirs(os.path.join(staging, "data"))
    try:
        shards = {}
        bar = tqdm(bounds, desc="Exporting activation cache", unit="shard", disable=not progress)
        for index, (start, stop) in enumerate(bar):
            name = f"data/{split}-{index:05d}-of-{len(bounds):05d}.parquet"
            rows = table.slice(start, stop - start)
            row_group = max(1, _ROW_GROUP_BYTES * rows.num_rows // max(1, sum(row_bytes[start:stop])))
            pq.write_table(rows, os.path.join(staging, name), row_group_size=row_group)
            shards[name] = file_sha256(os.path.join(staging, name))
        manifest = dataclasses.replace(cache.manifest, shards=shards, layout=LAYOUT_PARQUET, split=split)
        manifest.save(staging)
        if os.path.isdir(output_dir):
            os.rmdir(output_dir)
        os.rename(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        "Exported the activation cache in %s to %s (%d parquet shards).", cache.folder, output_dir, len(bounds)
    )
    return manifest


def _row_bytes(table: pa.Table) -> list[int]:
    """Approximate stored bytes of each row: its binary payloads plus 8 bytes per label and index."""
    sizes = pc.multiply(pc.list_value_length(table["indices"]), 16)
    for name in table.column_names:
        if pa.types.is_binary(table.schema.field(name).type):
            sizes = pc.add(sizes, pc.binary_length(table[name]))
    return sizes.to_pylist()


def _shard_bounds(row_bytes: list[int], max_bytes: int) -> list[tuple[int, int]]:
    """Consecutive `(start, stop)` row ranges of at most `max_bytes` each (at least one row per shard)."""
    bounds, start, size = [], 0, 0
    for row, nbytes in enumerate(row_bytes):
        if row > start and size + nbytes > max_bytes:
            bounds.append((start, row))
            start, size = row, 0
        size += nbytes
    bounds.append((start, len(row_bytes)))
    return bounds
