"""`int8`: per-channel affine 8-bit quantisation, then zstd."""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from . import register_codec
from ._affine import FLOAT_SLACK, affine_params, channel_shape, chunk_channels, expand_affine, max_abs, read_params
from ._zstd import ZstdContexts, check_level
from .base import ActivationCodec, check_chunk, chunk_values

# Payload (before zstd): magic, number of channels, float32 mins[C], float32 scales[C], uint8 values (chunk order).
_MAGIC = b"AQ8\x01"
_HEADER = struct.Struct("<4sI")


@register_codec("int8")
class Int8Codec(ZstdContexts, ActivationCodec):
    """Per-channel affine quantisation to uint8 (4x smaller), then zstd on top.

    Channels are C of CNN chunks `(k, C, H, W)` (min and max over the k samples and all spatial positions) and the
    feature dimension D of token chunks `(k, T, D)` or flat chunks `(k, D)`. Each value is stored as
    `q = round((x - min) / scale)` with `scale = (max - min) / 255`, and decoded as `q * scale + min`: the error is
    at most `scale / 2` per channel, plus a few float32 roundings (`2**-20 * max|x|`, see `max_abs_error`). A
    constant channel (scale 0) decodes exactly to its value. Post-ReLU feature maps have many zeros, so zstd often
    shrinks the uint8 data further.

    `unpack` undoes zstd on the host; the fields `"codes"` (uint8, chunk order), `"mins"` and `"scales"` (float32,
    one per channel) go to the device, where `expand` computes `codes * scale + min` (`device_decodable`).

    Args:
        level (`int`, *optional*, defaults to 3): zstd compression level, 1 (fastest) to 22 (smallest). Decoding
            speed barely depends on it.
    """

    name = "int8"
    device_decodable = True

    def __init__(self, level: int = 3) -> None:
        self.level = check_level("int8", level)
        self._init_contexts()

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "level": self.level}

    def encode(self, chunk: np.ndarray) -> bytes:
        chunk = check_chunk(chunk)
        mins, scales = affine_params(chunk, 255, "int8", zero_offset=False)
        shape = channel_shape(chunk.ndim, mins.size)
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

    def packed_fields(self, shape: tuple[int, ...]) -> dict[str, tuple[int, np.dtype]]:
        channels = chunk_channels(shape)
        return {
            "codes": (chunk_values(self, shape), np.dtype(np.uint8)),
            "mins": (channels, np.dtype(np.float32)),
            "scales": (channels, np.dtype(np.float32)),
        }

    def unpack(self, data: bytes | memoryview, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        count = chunk_values(self, shape)
        channels = chunk_channels(shape)
        payload = self._decompress(data, _HEADER.size + 8 * channels + count, shape)
        magic, stored_channels = _HEADER.unpack_from(payload)
        if magic != _MAGIC:
            raise ValueError(f"{self!r}: not an int8-codec payload (magic {magic!r}).")
        mins, scales = read_params(self, payload, _HEADER.size, shape, stored_channels)
        codes = np.frombuffer(payload, np.uint8, count, _HEADER.size + 8 * channels).copy()  # writeable
        return {"codes": codes, "mins": mins, "scales": scales}

    def expand(self, fields: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        codes = fields["codes"]
        return expand_affine(codes.reshape(codes.shape[0], *shape), fields["mins"], fields["scales"], shape)

    def max_abs_error(self, chunk: np.ndarray) -> float:
        """`max(scale) / 2 + 2**-20 * max|x|`: half a quantisation step plus float32 rounding slack."""
        chunk = check_chunk(chunk)
        _, scales = affine_params(chunk, 255, "int8", zero_offset=False)
        return float(scales.max()) / 2 + FLOAT_SLACK * max_abs(chunk)
