"""Uncompressed codecs: the values themselves, as float32 (`none`), float16 (`fp16`) or bfloat16 (`bf16`)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from . import register_codec
from ._affine import max_abs
from .base import ActivationCodec, check_chunk, check_payload_bytes, chunk_values

#: Largest finite float16.
FP16_MAX = 65504.0


class _ValuesCodec(ActivationCodec):
    """A codec whose payload is one array of `field_dtype` values in chunk order, stored as field `field`."""

    field: str = "values"
    field_dtype: np.dtype

    def packed_fields(self, shape: tuple[int, ...]) -> dict[str, tuple[int, np.dtype]]:
        return {self.field: (chunk_values(self, shape), self.field_dtype)}

    def unpack(self, data: bytes | memoryview, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        check_payload_bytes(self, len(data), self.field_dtype.itemsize, shape)
        # frombuffer over `bytes` is read-only; the copy makes the field writeable, as torch.from_numpy wants.
        return {self.field: np.frombuffer(data, dtype=self.field_dtype).copy()}


@register_codec("none")
class RawCodec(_ValuesCodec):
    """`none`: the float32 bytes as they are. Lossless; the baseline the other codecs' ratios are measured against."""

    name = "none"
    lossless = True
    # Not device-decodable: the field already is the float32 activations, so shipping it to the device saves nothing.
    field_dtype = np.dtype(np.float32)

    def encode(self, chunk: np.ndarray) -> bytes:
        return check_chunk(chunk).tobytes()


@register_codec("fp16")
class Float16Codec(_ValuesCodec):
    """`fp16`: IEEE half precision, 2x smaller, rounded to nearest.

    The error is at most half a float16 ulp: `|x| * 2**-11` for normal values plus the subnormal spacing `2**-24`
    (a bound for values below 2**-14, where the spacing no longer shrinks). Values beyond the float16 range
    (|x| > 65504) raise rather than silently becoming inf; use `bf16` or `zfp` for such activations. The field
    `"values"` (float16) is converted to float32 on the device.
    """

    name = "fp16"
    device_decodable = True
    field_dtype = np.dtype(np.float16)

    def encode(self, chunk: np.ndarray) -> bytes:
        chunk = check_chunk(chunk)
        peak = max_abs(chunk)
        if not peak <= FP16_MAX:  # also catches NaN
            raise ValueError(
                f"fp16 codec: the chunk's max |value| is {peak:g}, beyond the float16 range (+-{FP16_MAX:g}); "
                "use the bf16 or zfp codec for these activations."
            )
        return chunk.astype(np.float16).tobytes()

    def max_abs_error(self, chunk: np.ndarray) -> float:
        return max_abs(chunk) * 2.0**-11 + 2.0**-24


@register_codec("bf16")
class BFloat16Codec(_ValuesCodec):
    """`bf16`: bfloat16 (the top 16 bits of float32, rounded to nearest even), 2x smaller, float32's range.

    The error is at most half a bfloat16 ulp, `|x| * 2**-8`, plus bfloat16's subnormal spacing `2**-133` for values
    that small. (Only |x| within 0.2% of float32's maximum would round to inf.) The field `"bits"` holds the bfloat16
    bit patterns as int16 (numpy has no bfloat16), reinterpreted and converted to float32 on the device.
    """

    name = "bf16"
    device_decodable = True
    field = "bits"
    field_dtype = np.dtype(np.int16)

    def encode(self, chunk: np.ndarray) -> bytes:
        chunk = check_chunk(chunk)
        if not chunk.flags.writeable:  # torch.from_numpy warns on read-only arrays
            chunk = chunk.copy()
        # torch implements the round-to-nearest-even float32 -> bfloat16 conversion (NaN kept NaN).
        return torch.from_numpy(chunk).to(torch.bfloat16).view(torch.int16).numpy().tobytes()

    def expand(self, fields: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        # bfloat16 -> float32 is exact: the 16 bits become the top half of the float32 bit pattern.
        bits = fields["bits"]
        return bits.reshape(bits.shape[0], *shape).view(torch.bfloat16).float()

    def max_abs_error(self, chunk: np.ndarray) -> float:
        return max_abs(chunk) * 2.0**-8 + 2.0**-133
