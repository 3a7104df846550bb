"""Rows streamed into Arrow shards, written once, in the folder layout of `datasets.Dataset.save_to_disk`.

A folder holds `data-XXXXX-of-YYYYY.arrow` (Arrow IPC streams whose schema carries the features in its `huggingface`
metadata), `dataset_info.json` and `state.json` (the shard list and the fingerprint), so `datasets.load_from_disk`
and `datasets.Dataset.from_file` open it as they open what `save_to_disk` writes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from types import TracebackType

import datasets
import pyarrow as pa
from datasets.utils.py_utils import asdict, convert_file_size_to_int

from ..manifest.integrity import bind_schema

# The split `load_from_disk` reports, as `Dataset.from_generator` named it.
_SPLIT = "train"
# Rows of a record batch: about this many bytes of activations at most, whatever their size (the encodes are
# smaller), so the writer's buffer stays small and a binary column stays far below Arrow's 2 GB per array.
_WRITER_BUFFER_BYTES = 64 << 20


def shard_names(num_shards: int) -> list[str]:
    """The file names of `num_shards` shards, in row order, as `save_to_disk` names them."""
    return [f"data-{index:05d}-of-{num_shards:05d}.arrow" for index in range(num_shards)]


def write_dataset_files(
    folder: str, files: Sequence[str], features: datasets.Features, fingerprint: str, num_rows: int
) -> None:
    """Writes `state.json` and `dataset_info.json`, which make the shards `files` in `folder` one dataset.

    Besides the shard list, they hold nothing that depends on how the rows were cut into shards and record batches,
    so a cache built by several processes has the same `dataset_info.json` as a single process's.
    """
    state = {
        "_data_files": [{"filename": name} for name in files],
        "_fingerprint": fingerprint,
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": _SPLIT,
    }
    split = datasets.SplitInfo(name=_SPLIT, num_examples=num_rows)
    info = asdict(datasets.DatasetInfo(features=features, splits=datasets.SplitDict({_SPLIT: split})))
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump(state, f, indent=2, sort_keys=True)
    # As `save_to_disk` writes it: top-level keys sorted, the features in column order.
    with open(os.path.join(folder, "dataset_info.json"), "w") as f:
        json.dump({key: info[key] for key in sorted(info)}, f, indent=2)


class ShardWriter:
    """Appends rows to Arrow shards in `folder`, starting a new shard before one would grow past `max_shard_size`.

    Rows are buffered and written in record batches of a fixed number of rows (about 64 MB of activations, at most
    `max_shard_size`), so the shards' bytes depend on the rows alone, not on how many were given at a time. Used as
    a context manager: leaving it closes the open shard (after an error, what was written is left for the caller to
    remove); `finish` completes the folder.

    Args:
        folder (`str`): An existing, empty folder.
        features (`datasets.Features`): The rows' columns.
        max_shard_size (`str` or `int`): Largest shard, in bytes or as `save_to_disk` takes it (`"500MB"`).
        row_bytes (`int`): Bytes of a row's arrays before encoding.
        binding (`str`): The fingerprint of the cache the shards belong to, written into their schema metadata
            (`integrity.bind_schema`) so that a shard moved into another cache is refused.
    """

    def __init__(
        self, folder: str, features: datasets.Features, max_shard_size: str | int, row_bytes: int, binding: str
    ):
        self.folder = folder
        self.features = features
        self.schema = bind_schema(features.arrow_schema, binding)
        self.max_shard_bytes = convert_file_size_to_int(max_shard_size)
        self.rows_per_batch = max(1, min(_WRITER_BUFFER_BYTES, self.max_shard_bytes) // max(1, row_bytes))
        self.num_rows = 0
        self._buffer: dict[str, list] = {name: [] for name in self.schema.names}
        self._shards: list[str] = []
        self._sink: pa.OSFile | None = None
        self._stream: pa.ipc.RecordBatchStreamWriter | None = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = self._stream = None

    def write(self, columns: dict[str, list]) -> None:
        """Appends rows given by column (every column of the features, the same number of rows each)."""
        for name, values in self._buffer.items():
            values.extend(columns[name])
        while len(self._buffer["data"]) >= self.rows_per_batch:
            self._write_batch(self.rows_per_batch)

    def finish(self, fingerprint: str) -> list[str]:
        """Writes the buffered rows, ends the last shard, gives the shards their final names and writes the
        folder's `state.json` and `dataset_info.json` (with `fingerprint`). Returns the shards' names."""
        if self._buffer["data"]:
            self._write_batch(len(self._buffer["data"]))
        self._end_shard()
        files = shard_names(len(self._shards))
        for path, name in zip(self._shards, files, strict=True):
            os.rename(path, os.path.join(self.folder, name))
        write_dataset_files(self.folder, files, self.features, fingerprint, self.num_rows)
        return files

    def _write_batch(self, rows: int) -> None:
        batch = pa.RecordBatch.from_pydict({name: values[:rows] for name, values in self._buffer.items()}, self.schema)
        for values in self._buffer.values():
            del values[:rows]
        if self._stream is not None and self._sink.tell() + batch.nbytes > self.max_shard_bytes:
            self._end_shard()
        if self._stream is None:
            # Final names need the number of shards, known only at the end: `finish` renames them.
            self._shards.append(os.path.join(self.folder, f"shard-{len(self._shards):05d}.arrow.partial"))
            self._sink = pa.OSFile(self._shards[-1], "wb")
            self._stream = pa.ipc.new_stream(self._sink, self.schema)
        self._stream.write_batch(batch)
        self.num_rows += batch.num_rows

    def _end_shard(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._sink.close()
            self._sink = self._stream = None
