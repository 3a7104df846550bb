"""Per-channel affine quantisation shared by the `int8` and `lowbit` codecs: parameters on the host, expansion on
any device."""

from __future__ import annotations

import numpy as np
import torch

from .base import channel_axis

# Rounding slack of the float32 arithmetic, relative to the chunk's max |x| (float32 eps is 2**-23): a value is
# quantised from (x - offset) / scale and decoded as q * scale + offset, a few roundings of values <= 2 max|x| each.
FLOAT_SLACK = 2.0**-20


def reduce_axes(ndim: int) -> tuple[int, ...]:
    """The axes a per-channel statistic reduces over: all but `channel_axis(ndim)`."""
    axis = channel_axis(ndim)
    return tuple(i for i in range(ndim) if i != axis)


def channel_shape(ndim: int, channels: int) -> tuple[int, ...]:
    """Shape that broadcasts per-channel values against a chunk: (1, C, 1, 1), (1, 1, D) or (1, D)."""
    shape = [1] * ndim
    shape[channel_axis(ndim)] = channels
    return tuple(shape)


def max_abs(chunk: np.ndarray) -> float:
    """max |x| without allocating |chunk|; NaN when the chunk holds a NaN."""
    return max(float(chunk.max()), -float(chunk.min()))


def affine_params(chunk: np.ndarray, levels: int, codec: str, zero_offset: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel float32 `(offsets, scales)` mapping each channel's values onto codes `0..levels`.

    The offset is the channel's min, or 0 with `zero_offset` for a non-constant channel whose min is >= 0 (post-ReLU
    channels, whose zeros then decode to exact zeros). `scale = (max - offset) / levels`, rounded one float32 ulp up
    where float32 rounding would land below it, so that no value quantises past `levels`; 0 for a constant channel.

    Raises:
        `ValueError`: when the chunk holds inf or NaN (`codec` names the codec in the message).
    """
    axes = reduce_axes(chunk.ndim)
    mins = chunk.min(axis=axes)
    maxs = chunk.max(axis=axes)
    if not (np.isfinite(mins).all() and np.isfinite(maxs).all()):
        raise ValueError(f"{codec} codec: the chunk holds inf or NaN values, which cannot be quantised.")
    offsets = np.where((mins >= 0) & (maxs > mins), np.float32(0), mins) if zero_offset else mins
    exact = (maxs.astype(np.float64) - offsets.astype(np.float64)) / levels
    scales = exact.astype(np.float32)
    scales = np.where(scales < exact, np.nextafter(scales, np.float32(np.inf)), scales).astype(np.float32)
    return offsets.astype(np.float32), scales


def chunk_channels(shape: tuple[int, ...]) -> int:
    """The number of channels of a chunk of `shape` (its size along `channel_axis`)."""
    return int(shape[channel_axis(len(shape))])


def read_params(
    codec: object, payload: bytes | memoryview, at: int, shape: tuple[int, ...], stored: int
) -> tuple[np.ndarray, np.ndarray]:
    """The float32 per-channel `(offsets, scales)` stored at byte `at` of `payload`, checked.

    Raises:
        `ValueError` (naming `codec`): when the payload's channel count `stored` does not fit `shape`, an offset is
            not finite, or a scale is not finite and >= 0.
    """
    channels = chunk_channels(shape)
    if stored != channels:
        raise ValueError(f"{codec!r}: the payload has {stored} channels, which does not fit shape {tuple(shape)}.")
    # Copies: the payload is immutable bytes (or the caller's buffer), and fields must be writeable.
    offsets = np.frombuffer(payload, np.float32, channels, at).copy()
    scales = np.frombuffer(payload, np.float32, channels, at + 4 * channels).copy()
    if not np.isfinite(offsets).all():
        raise ValueError(f"{codec!r}: the payload's per-channel offsets are not all finite (corrupt data).")
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise ValueError(f"{codec!r}: the payload's per-channel scales are not all finite and >= 0 (corrupt data).")
    return offsets, scales


def expand_affine(
    codes: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor, shape: tuple[int, ...]
) -> torch.Tensor:
    """`codes * scale + offset` per channel: `codes` `(n, *shape)` integers, `offsets`/`scales` `(n, C)` float32.

    Two float32 operations, each rounded (no fused multiply-add), so the CPU and the GPU give the same values as
    numpy's `q.astype(float32) * scale + offset`.
    """
    broadcast = (codes.shape[0], *channel_shape(len(shape), shape[channel_axis(len(shape))]))
    return codes.float() * scales.reshape(broadcast) + offsets.reshape(broadcast)
