"""Chunks of consecutive samples, encoded on a thread pool into the rows of a cache."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..sidecars import SIDECAR_COLUMN_PREFIX
from .prepare import BuildPlan

_PART_STATS = "freezecache_part.json"


@dataclass
class PartStats:
    """What a process's rows hold, for the manifest: rows, stored bytes of `data` and of each sidecar array."""

    rows: int = 0
    stored: int = 0
    sidecar_bytes: dict[str, int] = field(default_factory=dict)

    def count(self, row: dict[str, Any]) -> None:
        self.rows += 1
        self.stored += len(row["data"])
        for column, value in row.items():
            if column.startswith(SIDECAR_COLUMN_PREFIX):
                name = column[len(SIDECAR_COLUMN_PREFIX) :]
                self.sidecar_bytes[name] = self.sidecar_bytes.get(name, 0) + len(value)

    def add(self, other: PartStats) -> None:
        self.rows += other.rows
        self.stored += other.stored
        for name, size in other.sidecar_bytes.items():
            self.sidecar_bytes[name] = self.sidecar_bytes.get(name, 0) + size

    def save(self, part: str) -> None:
        """Writes the statistics into the part folder `part`, where the main process reads them (`load`)."""
        with open(os.path.join(part, _PART_STATS), "w") as f:
            json.dump(asdict(self), f)

    @classmethod
    def load(cls, part: str) -> PartStats | None:
        """The statistics saved in `part`, or None when the part is not complete."""
        path = os.path.join(part, _PART_STATS)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return cls(**json.load(f))


def encoded_rows(
    batches: Iterable[dict[str, np.ndarray]],
    first_index: int,
    chunk_size: int,
    plan: BuildPlan,
    threads: int,
    stats: PartStats,
) -> Iterator[dict[str, Any]]:
    """Cuts consecutive batches (`prefix_batches`) into chunks of `chunk_size` samples and yields their rows.

    Rows are `data` and `sidecar.<name>` (the encoded chunks, encoded on `threads` threads: zfp and zstd release the
    GIL), `labels` and `indices` (sample indices from `first_index` on). A chunk may span batches; only the last
    one may be shorter. Every row is counted in `stats`.
    """
    arrays = ["data", *plan.arrays]
    columns = ["data", *(SIDECAR_COLUMN_PREFIX + name for name in plan.arrays)]

    def encode(name: str, chunk: np.ndarray) -> bytes:
        if name == "data" or plan.arrays[name].dtype == "float32":
            return plan.codec.encode(np.ascontiguousarray(chunk, dtype=np.float32))
        return np.ascontiguousarray(chunk, dtype="<i4").tobytes()

    def rows(
        pool: ThreadPoolExecutor, pending: dict[str, np.ndarray], take: int, start: int
    ) -> Iterator[dict[str, Any]]:
        starts = range(0, take, chunk_size)
        encoded = {
            name: pool.map(encode, itertools.repeat(name), [pending[name][s : s + chunk_size] for s in starts])
            for name in arrays
        }
        for s, *blobs in zip(starts, *encoded.values(), strict=True):
            end = min(s + chunk_size, take)
            row = dict(zip(columns, blobs, strict=True))
            row["labels"] = pending["labels"][s:end].tolist()
            row["indices"] = list(range(start + s, start + end))
            stats.count(row)
            yield row

    pending: dict[str, np.ndarray] | None = None
    start = first_index
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for batch in batches:
            pending = batch if pending is None else {k: np.concatenate([pending[k], v]) for k, v in batch.items()}
            ready = len(pending["data"])
            take = ready - ready % chunk_size
            if take:
                yield from rows(pool, pending, take, start)
                pending, start = {k: v[take:] for k, v in pending.items()}, start + take
        if pending is not None and len(pending["data"]):
            yield from rows(pool, pending, len(pending["data"]), start)
