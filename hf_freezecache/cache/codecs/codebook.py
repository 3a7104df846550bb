"""`codebook`: per-channel codebooks of 2**bits levels fitted to each chunk (Lloyd-Max), codes bit-packed, decoded
on the training device with one gather."""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from . import register_codec
from ._affine import FLOAT_SLACK, channel_shape, chunk_channels, max_abs
from ._bitpack import pack_codes, packed_bytes, padded_codes, unpack_codes
from ._zstd import ZstdContexts, check_level
from .base import ActivationCodec, channel_axis, check_chunk, chunk_values

# Payload (one zstd frame with entropy="zstd"): magic, bits, number of channels, float32 levels[C, 2**bits]
# (ascending per channel), then the codes in chunk order packed 8 // bits to a byte.
_MAGIC = b"LCB\x01"
_HEADER = struct.Struct("<4sII")
_ENTROPY = ("none", "zstd")
# 256 fitted levels per channel would outweigh the codes of a chunk (a level for every few values) and fit slowly;
# at 8 bits `int8` and `lowbit` already err far less than training notices.
_BITS = (2, 4)


def _channel_rows(chunk: np.ndarray) -> np.ndarray:
    """The chunk's values as one row per channel, `(C, values per channel)`."""
    return np.moveaxis(chunk, channel_axis(chunk.ndim), 0).reshape(chunk.shape[channel_axis(chunk.ndim)], -1)


def _cell_means(sums: np.ndarray, bounds: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """Mean of each cell `[bounds[c, j], bounds[c, j + 1])` of the sorted rows whose prefix sums are `sums`;
    `previous` where a cell is empty."""
    rows = np.arange(len(bounds))[:, None]
    totals = sums[rows, bounds[:, 1:]] - sums[rows, bounds[:, :-1]]
    counts = bounds[:, 1:] - bounds[:, :-1]
    return np.where(counts > 0, totals / np.maximum(counts, 1), previous)


def fit_codebook(chunk: np.ndarray, bits: int, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel levels and the chunk's codes: Lloyd's algorithm on each channel's values.

    Each channel gets `2**bits` levels that minimise its squared error (a local minimum after `iterations` steps
    from equal-count cells), and each value the code of its nearest level. A channel whose min is exactly 0 (after
    a ReLU, usually a large share of its values) keeps level 0 at exactly 0, so its zeros decode to exact zeros,
    and fits the other levels to the rest.

    Returns:
        `levels` float32 `(C, 2**bits)`, ascending per channel, and `codes` uint8 in the chunk's layout.
    """
    count = 1 << bits
    rows = _channel_rows(chunk)
    channels, n = rows.shape
    ordered = np.sort(rows, axis=1).astype(np.float64)
    sums = np.zeros((channels, n + 1))
    np.cumsum(ordered, axis=1, out=sums[:, 1:])
    # A channel with exact zeros and no negatives pins level 0 at 0; its other levels start as equal-count cells of
    # its positive values, every other channel's levels as equal-count cells of all of them.
    pinned = ordered[:, 0] == 0
    first = np.where(pinned, np.count_nonzero(ordered <= 0, axis=1), 0)
    free = count - pinned
    steps = np.arange(count + 1)
    start = np.where(
        pinned[:, None] & (steps >= 1), first[:, None] + ((n - first)[:, None] * (steps - 1)) // free[:, None], 0
    )
    bounds = np.where(pinned[:, None], start, (n * steps)[None, :] // count)
    bounds[:, -1] = n
    levels = _cell_means(sums, bounds, np.zeros((channels, count)))
    # Searches every channel's sorted row at once: keys offset by channel, each channel's span below the next one.
    span = float(ordered[:, -1].max() - ordered[:, 0].min()) + 1.0
    offsets = np.arange(channels)[:, None] * 2 * span
    keys = (ordered + offsets).ravel()
    for _ in range(iterations):
        levels[pinned, 0] = 0.0
        thresholds = (levels[:, 1:] + levels[:, :-1]) / 2
        inner = np.searchsorted(keys, (thresholds + offsets).ravel()).reshape(channels, count - 1)
        bounds[:, 1:-1] = np.maximum.accumulate(inner - np.arange(channels)[:, None] * n, axis=1)
        # An empty cell keeps its level, which may then sit out of order: sorting keeps the midpoints meaningful.
        levels = np.sort(_cell_means(sums, bounds, levels), axis=1)
    levels[pinned, 0] = 0.0
    levels = levels.astype(np.float32)
    # Each value gets its nearest level: the number of midpoints between levels below it (at most 15 comparisons a
    # value, cheaper than a per-channel search).
    midpoints = ((levels[:, 1:].astype(np.float64) + levels[:, :-1]) / 2).astype(np.float32)
    codes = np.zeros(rows.shape, np.uint8)
    for threshold in midpoints.T:
        codes += rows > threshold[:, None]
    axis = channel_axis(chunk.ndim)
    moved = (chunk.shape[axis], *(d for i, d in enumerate(chunk.shape) if i != axis))
    return levels, np.ascontiguousarray(np.moveaxis(codes.reshape(moved), 0, axis))


@register_codec("codebook")
class CodebookCodec(ZstdContexts, ActivationCodec):
    """Per-channel codebooks: each channel of a chunk is quantised to `2**bits` levels fitted to its values, so the
    levels sit where the values are instead of evenly between the extremes.

    `lowbit` spreads its codes evenly from a channel's min to its max; activations are far from uniform (post-ReLU
    maps are a spike of zeros and a long tail), so most codes land on a few levels and one outlier stretches every
    step. A codebook fitted by Lloyd's algorithm (the Lloyd-Max quantiser) minimises the squared error for the
    chunk's actual values: at 2 bits its RMS error on ResNet feature maps is several times lower than `lowbit`'s
    at the same size. Rounding is to the nearest level (deterministic: each chunk is encoded once, so stochastic
    rounding's unbiasedness over repeated draws would not apply). Exact zeros of post-ReLU channels stay exact.

    Channels are C of CNN chunks `(k, C, H, W)` and the feature dimension D of token chunks `(k, T, D)` or flat
    chunks `(k, D)`. Payload: a 12-byte header (magic, bits, channels), float32 `levels[C, 2**bits]`, then the codes
    in chunk order, packed as `lowbit` packs them; with `entropy="zstd"`, all of it as one zstd frame. `unpack`
    returns the fields `"codes"` (uint8, packed) and `"levels"` (float32, `C * 2**bits`); `expand` unpacks the bits
    and gathers the levels on whatever device holds the fields.

    Encoding fits the levels with a fixed number of Lloyd iterations on each channel's sorted values, single-threaded
    numpy, a few times slower than `lowbit`; decoding costs the same as `lowbit`'s.

    Args:
        bits (`int`, *optional*, defaults to 2): Bits per value: 2 or 4 (4 or 16 levels per channel).
        entropy (`str`, *optional*, defaults to `"zstd"`): Lossless coding of the payload: `"none"` or `"zstd"`.
        level (`int`, *optional*, defaults to 3): zstd level, 1..22; used only with `entropy="zstd"`.
        iterations (`int`, *optional*, defaults to 8): Lloyd iterations per chunk, 0..100 (0: equal-count cells).
    """

    name = "codebook"
    device_decodable = True

    def __init__(self, bits: int = 2, entropy: str = "zstd", level: int = 3, iterations: int = 8) -> None:
        if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits not in _BITS:
            raise ValueError(f"codebook codec: bits must be 2 or 4, got {bits!r}.")
        if entropy not in _ENTROPY:
            raise ValueError(f"codebook codec: entropy must be 'none' or 'zstd', got {entropy!r}.")
        if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or not 0 <= iterations <= 100:
            raise ValueError(f"codebook codec: iterations must be an integer in 0..100, got {iterations!r}.")
        self.bits = int(bits)
        self.entropy = entropy
        self.level = check_level("codebook", level)
        self.iterations = int(iterations)
        self._init_contexts()

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "bits": self.bits,
            "entropy": self.entropy,
            "level": self.level,
            "iterations": self.iterations,
        }

    def _fit(self, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        chunk = check_chunk(chunk)
        if not np.isfinite(chunk).all():
            raise ValueError("codebook codec: the chunk holds inf or NaN values, which cannot be quantised.")
        return fit_codebook(chunk, self.bits, self.iterations)

    def encode(self, chunk: np.ndarray) -> bytes:
        levels, codes = self._fit(chunk)
        padded = padded_codes(codes.size, self.bits)
        padded[: codes.size] = codes.reshape(-1)
        payload = b"".join(
            [_HEADER.pack(_MAGIC, self.bits, len(levels)), levels.tobytes(), pack_codes(padded, self.bits).data]
        )
        return self._compressor().compress(payload) if self.entropy == "zstd" else payload

    def packed_fields(self, shape: tuple[int, ...]) -> dict[str, tuple[int, np.dtype]]:
        return {
            "codes": (packed_bytes(chunk_values(self, shape), self.bits), np.dtype(np.uint8)),
            "levels": (chunk_channels(shape) << self.bits, np.dtype(np.float32)),
        }

    def unpack(self, data: bytes | memoryview, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        fields = self.packed_fields(shape)
        (code_bytes, _), (level_count, _) = fields["codes"], fields["levels"]
        expected = _HEADER.size + 4 * level_count + code_bytes
        payload = self._stored(data, expected, shape, self.entropy)
        magic, bits, channels = _HEADER.unpack_from(payload)
        if magic != _MAGIC:
            raise ValueError(f"{self!r}: not a codebook-codec payload (magic {magic!r}).")
        if bits != self.bits:
            raise ValueError(f"{self!r}: the payload holds {bits}-bit codes, this codec decodes {self.bits}-bit ones.")
        if channels != chunk_channels(shape):
            raise ValueError(
                f"{self!r}: the payload has {channels} channels, which does not fit shape {tuple(shape)}."
            )
        levels = np.frombuffer(payload, np.float32, level_count, _HEADER.size).copy()  # writeable
        if not np.isfinite(levels).all():
            raise ValueError(f"{self!r}: the payload's levels are not all finite (corrupt data).")
        codes = np.frombuffer(payload, np.uint8, code_bytes, _HEADER.size + 4 * level_count).copy()
        return {"codes": codes, "levels": levels}

    def expand(self, fields: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        codes, levels = fields["codes"], fields["levels"]
        n, channels = codes.shape[0], chunk_channels(shape)
        codes = unpack_codes(codes, self.bits, math.prod(shape)).reshape(n, *shape).long()
        # Level `code` of channel c is entry c * 2**bits + code of the chunk's levels.
        base = torch.arange(channels, device=codes.device).reshape(channel_shape(len(shape), channels)) << self.bits
        index = (codes + base).reshape(n, -1)
        return torch.gather(levels, 1, index).reshape(n, *shape)

    def max_abs_error(self, chunk: np.ndarray) -> float:
        """The largest distance from a value to the level it decodes to (the fit is deterministic, so this is the
        error `encode` makes, exactly), plus `2**-20 * max|x|` for float32 rounding."""
        levels, codes = self._fit(chunk)
        chunk = check_chunk(chunk)
        axis = channel_axis(chunk.ndim)
        moved = np.moveaxis(codes, axis, 0).reshape(len(levels), -1).astype(np.int64)
        decoded = np.take_along_axis(levels, moved, axis=1)
        return float(np.abs(decoded - _channel_rows(chunk)).max()) + FLOAT_SLACK * max_abs(chunk)
