"""zstd frames for codecs: thread-local contexts and a decompression that allocates only the expected size."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import zstandard


def check_level(codec: str, level: object) -> int:
    """`level` as an int, or a `ValueError` unless it is an integer zstd level in 1..22."""
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not 1 <= level <= 22:
        raise ValueError(f"{codec} codec: level must be an integer zstd level in 1..22, got {level!r}.")
    return int(level)


class ZstdContexts:
    """Mixin of codecs whose payload is one zstd frame: compression at `self.level`, and safe decompression.

    zstd contexts are not thread-safe, so each thread that encodes or decodes gets its own; pickling (DataLoader
    workers, deepcopy) drops them. The codec sets `self.level` and calls `_init_contexts()` in its `__init__`.
    """

    level: int

    def _init_contexts(self) -> None:
        self._local = threading.local()

    def _compressor(self) -> zstandard.ZstdCompressor:
        compressor = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = self._local.compressor = zstandard.ZstdCompressor(level=self.level)
        return compressor

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        decompressor = getattr(self._local, "decompressor", None)
        if decompressor is None:
            decompressor = self._local.decompressor = zstandard.ZstdDecompressor()
        return decompressor

    def _decompress(self, data: bytes | memoryview, expected: int, shape: tuple[int, ...]) -> bytes:
        """The `expected` bytes in the frame `data`, or a `ValueError` before zstd allocates anything else."""
        # zstd allocates what the frame header declares: it must be this chunk's size before anything is allocated.
        # A frame that declares no size is capped at that size instead.
        try:
            declared = zstandard.frame_content_size(data)
        except zstandard.ZstdError as error:
            raise ValueError(f"{self!r}: the payload is not a zstd frame ({error}).") from error
        if declared not in (-1, expected):
            raise ValueError(
                f"{self!r}: the payload declares {declared} decompressed bytes but shape {tuple(shape)} needs "
                f"{expected}: wrong shape passed to decode, or corrupt data."
            )
        try:
            payload = self._decompressor().decompress(data, max_output_size=expected, allow_extra_data=False)
        except zstandard.ZstdError as error:
            raise ValueError(f"{self!r}: corrupt payload ({error}).") from error
        if len(payload) != expected:
            raise ValueError(f"{self!r}: the payload decompresses to {len(payload)} bytes, {expected} expected.")
        return payload

    def _stored(self, data: bytes | memoryview, expected: int, shape: tuple[int, ...], entropy: str) -> bytes:
        """The payload of `expected` bytes that `data` holds: zstd-decompressed with `entropy == "zstd"`, else as
        stored; a `ValueError` when its size is not `expected` (checked before anything is allocated)."""
        if entropy == "zstd":
            return self._decompress(data, expected, shape)
        if len(data) != expected:
            raise ValueError(
                f"{self!r}: the payload has {len(data)} bytes but shape {tuple(shape)} needs {expected}: wrong shape "
                "passed to decode, or corrupt data."
            )
        return data

    # threading.local cannot be pickled: drop it and start afresh.
    def __getstate__(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "_local"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_contexts()
