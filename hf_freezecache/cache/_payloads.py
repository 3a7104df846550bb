"""Row payloads of a cache's binary column, read without copying (used by `ActivationCache`)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


class PayloadColumn:
    """Row payloads of a binary Arrow column, as zero-copy `memoryview`s (of the memory-mapped shard, or of a copy in
    process memory after `load_into_memory`): `as_py` would copy every payload into a new `bytes`."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        self._pieces = [self._views(piece) for piece in column.chunks if len(piece)]
        self._starts = np.cumsum([0] + [len(offsets) - 1 for offsets, _ in self._pieces])
        self.memory_bytes = 0

    @staticmethod
    def _views(piece: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        _, offsets, values = piece.buffers()
        offsets = np.frombuffer(offsets, dtype=np.int32)[piece.offset : piece.offset + len(piece) + 1]
        return offsets.astype(np.int64), np.frombuffer(values, dtype=np.uint8) if values is not None else np.zeros(
            0, np.uint8
        )

    def load_into_memory(self) -> None:
        pieces = []
        for offsets, values in self._pieces:
            held = values[offsets[0] : offsets[-1]].copy()
            pieces.append((offsets - offsets[0], held))
        self._pieces = pieces
        self.memory_bytes = sum(values.nbytes for _, values in pieces)

    def __getitem__(self, row: int) -> memoryview:
        piece = int(np.searchsorted(self._starts, row, side="right")) - 1
        offsets, values = self._pieces[piece]
        local = row - int(self._starts[piece])
        return memoryview(values[offsets[local] : offsets[local + 1]])
