"""Uncompressed codecs: the values themselves, as float32 (`none`), float16 (`fp16`) or bfloat16 (`bf16`)."""

from __future__ import annotations

import numpy as np
import torch

from . import register_codec
from .base import ActivationCodec, check_chunk, check_payload_bytes

#: Largest finite float16.
FP16_MAX = 65504.0


def _max_abs(chunk: np.ndarray) -> float:
    """max |x| without allocating |chunk|; NaN when the chunk holds a NaN."""
    return max(float(chunk.max()), -float(chunk.min()))


@register_codec("none")
class RawCodec(ActivationCodec):
    """`none`: the float32 bytes as they are. Lossless; the baseline the other codecs' ratios are measured against."""

    name = "none"
    lossless = True

    def encode(self, chunk: np.ndarray) -> bytes:
        return check_chunk(chunk).tobytes()

    def decode(self, data: bytes, shape: tuple[int, ...]) -> np.ndarray:
        check_payload_bytes(self, len(data), 4, shape)
        # frombuffer over `bytes` is read-only; the copy makes the result writeable like every other codec's.
        return np.frombuffer(data, dtype=np.float32).reshape(shape).copy()


@register_codec("fp16")
class Float16Codec(ActivationCodec):
    """`fp16`: IEEE half precision, 2x smaller, rounded to nearest.

    The error is at most half a float16 ulp: `|x| * 2**-11` for normal values plus the subnormal spacing `2**-24`
    (a bound for values below 2**-14, where the spacing no longer shrinks). Values beyond the float16 range
    (|x| > 65504) raise rather than silently becoming inf; use `bf16` or `zfp` for such activations.
    """

    name = "fp16"

    def encode(self, chunk: np.ndarray) -> bytes:
        chunk = check_chunk(chunk)
        peak = _max_abs(chunk)
        if not peak <= FP16_MAX:  # also catches NaN
            raise ValueError(
                f"fp16 codec: the chunk's max |value| is {peak:g}, beyond the float16 range (+-{FP16_MAX:g}); "
                "use the bf16 or zfp codec for these activations."
            )
        return chunk.astype(np.float16).tobytes()

    def decode(self, data: bytes, shape: tuple[int, ...]) -> np.ndarray:
        check_payload_bytes(self, len(data), 2, shape)
        return np.frombuffer(data, dtype=np.float16).astype(np.float32).reshape(shape)

    def max_abs_error(self, chunk: np.ndarray) -> float:
        return _max_abs(chunk) * 2.0**-11 + 2.0**-24


@register_codec("bf16")
class BFloat16Codec(ActivationCodec):
    """`bf16`: bfloat16 (the top 16 bits of float32, rounded to nearest even), 2x smaller, float32's range.

    The error is at most half a bfloat16 ulp, `|x| * 2**-8`, plus bfloat16's subnormal spacing `2**-133` for values
    that small. (Only |x| within 0.2% of float32's maximum would round to inf.)
    """

    name = "bf16"

    def encode(self, chunk: np.ndarray) -> bytes:
        chunk = check_chunk(chunk)
        if not chunk.flags.writeable:  # torch.from_numpy warns on read-only arrays
            chunk = chunk.copy()
        # torch implements the round-to-nearest-even float32 -> bfloat16 conversion (NaN kept NaN).
        return torch.from_numpy(chunk).to(torch.bfloat16).view(torch.int16).numpy().tobytes()

    def decode(self, data: bytes, shape: tuple[int, ...]) -> np.ndarray:
        # bfloat16 -> float32 is exact: the 16 bits become the top half of the float32 bit pattern.
        check_payload_bytes(self, len(data), 2, shape)
        bits = np.frombuffer(data, dtype=np.uint16)
        return (bits.astype(np.uint32) << 16).view(np.float32).reshape(shape)

    def max_abs_error(self, chunk: np.ndarray) -> float:
        return _max_abs(chunk) * 2.0**-8 + 2.0**-133
