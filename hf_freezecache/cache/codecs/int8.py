"""`int8`: per-channel affine 8-bit quantisation, then zstd."""

from __future__ import annotations

import struct
import threading
from typing import Any

import numpy as np
import zstandard

from . import register_codec
from .base import ActivationCodec, channel_axis, check_chunk, chunk_values

# Payload (before zstd): magic, number of channels, float32 mins[C], float32 scales[C], uint8 values (chunk order).
_MAGIC = b"AQ8\x01"
_HEADER = struct.Struct("<4sI")

# Rounding slack of the float32 arithmetic, relative to the chunk's max |x| (float32 eps is 2**-23): the quantised
# value is computed as (x - min) / scale and decoded as q * scale + min, a few roundings of values <= 2 max|x| each.
_FLOAT_SLACK = 2.0**-20


def _reduce_axes(ndim: int) -> tuple[int, ...]:
    axis = channel_axis(ndim)
    return tuple(i for i in range(ndim) if i != axis)


def _channel_shape(ndim: int, channels: int) -> tuple[int, ...]:
    """Shape that broadcasts per-channel values against a chunk: (1, C, 1, 1), (1, 1, D) or (1, D)."""
    shape = [1] * ndim
    shape[channel_axis(ndim)] = channels
    return tuple(shape)


def _affine_params(chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel float32 (mins, scales), with scale = (max - min) / 255 rounded up so no value quantises past 255."""
    axes = _reduce_axes(chunk.ndim)
    mins = chunk.min(axis=axes)
    maxs = chunk.max(axis=axes)
    if not (np.isfinite(mins).all() and np.isfinite(maxs).all()):
        raise ValueError("int8 codec: the chunk holds inf or NaN values, which cannot be quantised.")
    exact = (maxs.astype(np.float64) - mins.astype(np.float64)) / 255.0
    scales = exact.astype(np.float32)
    # float32 rounding may land just below (max - min) / 255; one ulp up keeps (max - min) / scale <= 255.
    scales = np.where(scales < exact, np.nextafter(scales, np.float32(np.inf)), scales).astype(np.float32)
    return mins, scales


@register_codec("int8")
class Int8Codec(ActivationCodec):
    """Per-channel affine quantisation to uint8 (4x smaller), then zstd on top.

    Channels are C of CNN chunks `(k, C, H, W)` (min and max over the k samples and all spatial positions) and the
    feature dimension D of token chunks `(k, T, D)` or flat chunks `(k, D)`. Each value is stored as
    `q = round((x - min) / scale)` with `scale = (max - min) / 255`, and decoded as `q * scale + min`: the error is
    at most `scale / 2` per channel, plus a few float32 roundings (`2**-20 * max|x|`, see `max_abs_error`). A
    constant channel (scale 0) decodes exactly to its value. Post-ReLU feature maps have many zeros, so zstd often
    shrinks the uint8 data further.

    Args:
        level (`int`, *optional*, defaults to 3): zstd compression level, 1 (fastest) to 22 (smallest). Decoding
            speed barely depends on it.
    """

    name = "int8"

    def __init__(self, level: int = 3) -> None:
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not 1 <= level <= 22:
            raise ValueError(f"int8 codec: level must be an integer zstd level in 1..22, got {level!r}.")
        self.level = int(level)
        # zstd contexts are not thread-safe: each thread that encodes or decodes gets its own.
        self._local = threading.local()

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "level": self.level}

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

    def encode(self, chunk: np.ndarray) -> bytes:
        chunk = check_chunk(chunk)
        mins, scales = _affine_params(chunk)
        shape = _channel_shape(chunk.ndim, mins.size)
        # Scale-0 channels hold only their min: dividing by 1 instead quantises them to 0, which decodes to min.
        safe_scales = np.where(scales > 0, scales, np.float32(1.0))
        values = chunk - mins.reshape(shape)
        values /= safe_scales.reshape(shape)
        np.rint(values, out=values)
        np.clip(values, 0, 255, out=values)
        quantised = values.astype(np.uint8)
        payload = b"".join(
            [_HEADER.pack(_MAGIC, mins.size), mins.tobytes(), scales.tobytes(), memoryview(quantised).cast("B")]
        )
        return self._compressor().compress(payload)

    def decode(self, data: bytes, shape: tuple[int, ...]) -> np.ndarray:
        count = chunk_values(self, shape)
        ndim = len(shape)
        channels = shape[channel_axis(ndim)]
        expected = _HEADER.size + 8 * channels + count
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
        magic, stored_channels = _HEADER.unpack_from(payload)
        if magic != _MAGIC:
            raise ValueError(f"{self!r}: not an int8-codec payload (magic {magic!r}).")
        if stored_channels != channels:
            raise ValueError(
                f"{self!r}: the payload has {stored_channels} channels, which does not fit shape {shape}."
            )
        offset = _HEADER.size
        mins = np.frombuffer(payload, dtype=np.float32, count=channels, offset=offset)
        scales = np.frombuffer(payload, dtype=np.float32, count=channels, offset=offset + 4 * channels)
        quantised = np.frombuffer(payload, dtype=np.uint8, offset=offset + 8 * channels)
        broadcast = _channel_shape(ndim, channels)
        values = quantised.reshape(shape).astype(np.float32)
        values *= scales.reshape(broadcast)
        values += mins.reshape(broadcast)
        return values

    def max_abs_error(self, chunk: np.ndarray) -> float:
        """`max(scale) / 2 + 2**-20 * max|x|`: half a quantisation step plus float32 rounding slack."""
        chunk = check_chunk(chunk)
        _, scales = _affine_params(chunk)
        peak = max(float(chunk.max()), -float(chunk.min()))
        return float(scales.max()) / 2 + _FLOAT_SLACK * peak

    # threading.local cannot be pickled (DataLoader workers, deepcopy): drop it and start afresh.
    def __getstate__(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "_local"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
