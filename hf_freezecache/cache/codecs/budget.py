"""`budget`: a compression target, resolved per position to the most accurate codec setting that meets it."""

from __future__ import annotations

import logging
import math
from numbers import Real
from typing import Any

import numpy as np

from . import build_codec, register_codec
from .base import ActivationCodec, measure_codec_error

logger = logging.getLogger(__name__)

# What a budget chooses from; each is measured on the reference activations.
CANDIDATES: tuple[dict[str, Any], ...] = (
    {"name": "none"},
    {"name": "zfp", "tolerance": 0.01},
    {"name": "zfp", "tolerance": 0.05},
    {"name": "zfp", "tolerance": 0.25},
    {"name": "zfp", "tolerance": 1.0},
    {"name": "int8"},
    {"name": "lowbit", "bits": 8, "entropy": "zstd"},
    {"name": "codebook", "bits": 4, "entropy": "zstd"},
    {"name": "lowbit", "bits": 4, "entropy": "zstd"},
    {"name": "codebook", "bits": 2, "entropy": "zstd"},
    {"name": "lowbit", "bits": 2, "entropy": "zstd"},
)


@register_codec("budget")
class BudgetCodec(ActivationCodec):
    """A target compression ratio instead of a codec: `resolve` measures every setting of `CANDIDATES` on a sample
    of the position's activations and returns the one with the smallest RMS error (relative to the activations'
    std) among those whose ratio there reaches `ratio`; when none does, the one with the highest ratio, with a
    warning. The cache's manifest records the request (`codec_request`) next to the chosen codec and its measured
    error (`codec_error`), and the choice is made again, on the same samples, wherever the cache is rebuilt.

    The ratio measured on the sample is an estimate of the whole cache's: activations of other images compress
    a little differently (the frontier in docs/results.md compares both).

    Args:
        ratio (`float`): The target, float32 bytes over stored bytes (e.g. 16); at least 1.
        chunk_size (`int`, *optional*, defaults to 4): Samples per chunk when measuring, the cache's chunk size.
    """

    name = "budget"

    def __init__(self, ratio: float, chunk_size: int = 4) -> None:
        if isinstance(ratio, bool) or not isinstance(ratio, Real) or not (math.isfinite(ratio) and ratio >= 1):
            raise ValueError(
                f"budget codec: ratio must be a number >= 1 (float32 bytes / stored bytes), got {ratio!r}."
            )
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
            raise ValueError(f"budget codec: chunk_size must be an integer >= 1, got {chunk_size!r}.")
        self.ratio = float(ratio)
        self.chunk_size = int(chunk_size)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "ratio": self.ratio, "chunk_size": self.chunk_size}

    def resolve(self, reference: np.ndarray) -> ActivationCodec:
        """The chosen codec, resolved on `reference` (see the class docstring)."""
        measured = []
        for config in CANDIDATES:
            codec = build_codec(config).resolve(reference)
            measured.append((codec, measure_codec_error(codec, reference, self.chunk_size)))
        meeting = [(codec, error) for codec, error in measured if error["ratio"] >= self.ratio]
        if meeting:
            codec, error = min(meeting, key=lambda pair: pair[1]["rms_over_std"])
        else:
            codec, error = max(measured, key=lambda pair: pair[1]["ratio"])
            logger.warning(
                "No codec setting reaches a %.4gx smaller cache on these activations; using the smallest, %r (%.2fx).",
                self.ratio,
                codec,
                error["ratio"],
            )
        logger.info(
            "Cache budget %.4gx: %r (%.2fx, RMS error %.3f x std on %d samples).",
            self.ratio,
            codec,
            error["ratio"],
            error["rms_over_std"],
            error["samples"],
        )
        return codec

    def _unresolved(self) -> ValueError:
        return ValueError(
            f"{self!r} is a compression target, not a codec: call `codec = codec.resolve(reference)` on a sample of "
            "the activations to get the codec that meets it."
        )

    def encode(self, chunk: np.ndarray) -> bytes:
        raise self._unresolved()

    def packed_fields(self, shape: tuple[int, ...]) -> dict[str, tuple[int, np.dtype]]:
        raise self._unresolved()

    def unpack(self, data: bytes | memoryview, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        raise self._unresolved()
