"""Chunks of consecutive samples, encoded on a thread pool into the rows of a cache."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

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

    def count(self, columns: dict[str, list]) -> None:
        """Counts rows given by column (`EncodedRows.columns`)."""
        self.rows += len(columns["data"])
        self.stored += sum(len(payload) for payload in columns["data"])
        for column, values in columns.items():
            if column.startswith(SIDECAR_COLUMN_PREFIX):
                name = column[len(SIDECAR_COLUMN_PREFIX) :]
                self.sidecar_bytes[name] = self.sidecar_bytes.get(name, 0) + sum(len(value) for value in values)

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


@dataclass
class EncodedRows:
    """Consecutive rows whose payloads may still be encoding on the pool.

    Args:
        payloads (`dict[str, list[Future]]`): Per column (`data`, `sidecar.<name>`), one encode per row.
        labels (`list[list[int]]`): Per row, the labels of its samples.
        indices (`list[list[int]]`): Per row, the indices of its samples.
    """

    payloads: dict[str, list[Future[bytes]]]
    labels: list[list[int]]
    indices: list[list[int]]

    def columns(self) -> dict[str, list]:
        """The rows by column, once their encodes are done; raises the first encode's error."""
        columns: dict[str, list] = {name: [f.result() for f in futures] for name, futures in self.payloads.items()}
        return {**columns, "labels": self.labels, "indices": self.indices}

    def cancel(self) -> None:
        """Cancels the encodes that have not started: the rows will not be written."""
        for futures in self.payloads.values():
            for future in futures:
                future.cancel()


def encoded_rows(
    batches: Iterable[dict[str, np.ndarray]],
    first_index: int,
    chunk_size: int,
    plan: BuildPlan,
    pool: ThreadPoolExecutor,
) -> Iterator[EncodedRows]:
    """Cuts consecutive batches (`prefix_batches`) into chunks of `chunk_size` samples, submits their encodes to
    `pool` and yields their rows, a batch's worth at a time, without waiting for the encodes.

    Rows are `data` and `sidecar.<name>` (the encoded chunks: zfp, zstd and numpy release the GIL, so the pool's
    threads run beside the prefix), `labels` and `indices` (sample indices from `first_index` on). A chunk may span
    batches; only the last one may be shorter.
    """
    arrays = {"data": "data", **{SIDECAR_COLUMN_PREFIX + name: name for name in plan.arrays}}

    def encode(name: str, chunk: np.ndarray) -> bytes:
        if name == "data" or plan.arrays[name].dtype == "float32":
            return plan.codec.encode(np.ascontiguousarray(chunk, dtype=np.float32))
        return np.ascontiguousarray(chunk, dtype="<i4").tobytes()

    def submit(pending: dict[str, np.ndarray], take: int, start: int) -> EncodedRows:
        bounds = [(s, min(s + chunk_size, take)) for s in range(0, take, chunk_size)]
        return EncodedRows(
            payloads={
                column: [pool.submit(encode, name, pending[name][s:end]) for s, end in bounds]
                for column, name in arrays.items()
            },
            labels=[pending["labels"][s:end].tolist() for s, end in bounds],
            indices=[list(range(start + s, start + end)) for s, end in bounds],
        )

    pending: dict[str, np.ndarray] | None = None
    start = first_index
    for batch in batches:
        pending = batch if pending is None else {k: np.concatenate([pending[k], v]) for k, v in batch.items()}
        ready = len(pending["data"])
        take = ready - ready % chunk_size
        if take:
            yield submit(pending, take, start)
            pending, start = {k: v[take:] for k, v in pending.items()}, start + take
    if pending is not None and len(pending["data"]):
        yield submit(pending, len(pending["data"]), start)
