"""`zfp`: lossy floating-point compression with a guaranteed absolute error (zfp's fixed-accuracy mode)."""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import numpy as np
import zfpy

from . import register_codec
from .base import ActivationCodec, check_chunk, check_decoded_size, chunk_values

# The zfp stream header (`zfp_write_header`): 32 bits of magic ("zfp" and the codec version), then 52 bits of field
# metadata: 2 bits scalar type (zfp_type - 1), 2 bits dimensionality - 1, then the sizes - 1, fastest axis first, in
# 48, 24, 16 or 12 bits each for 1 to 4 dimensions. zfp writes bits least significant first, in little-endian 64-bit
# words, so the header is the low bits of the stream's first bytes read as one little-endian integer.
_ZFP_MAGIC = b"zfp"
_ZFP_HEADER_BYTES = 11  # 84 bits
_ZFP_TYPE_FLOAT = 3
_ZFP_SIZE_BITS = {1: 48, 2: 24, 3: 16, 4: 12}


def zfp_header(data: bytes) -> tuple[int, tuple[int, ...]]:
    """The scalar type (`zfp_type`: 3 is float32) and the array shape (C order) a zfp stream declares.

    Parsed in Python from the documented header, so a corrupt or hostile payload is judged before zfp reads it.

    Raises:
        `ValueError`: when `data` does not start with a zfp header.
    """
    if len(data) < _ZFP_HEADER_BYTES or bytes(data[:3]) != _ZFP_MAGIC:
        raise ValueError(f"not a zfp stream (it starts with {bytes(data[:4])!r}, not a {_ZFP_MAGIC!r} header).")
    meta = int.from_bytes(data[:_ZFP_HEADER_BYTES], "little") >> 32
    scalar_type, dims = (meta & 0x3) + 1, ((meta >> 2) & 0x3) + 1
    bits, sizes = _ZFP_SIZE_BITS[dims], meta >> 4
    fastest_first = [((sizes >> (bits * axis)) & ((1 << bits) - 1)) + 1 for axis in range(dims)]
    return scalar_type, tuple(reversed(fastest_first))


def _folded_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The array zfp compresses for a chunk of `shape`: (k*C, H, W) for feature maps, (k*T, D) for tokens."""
    if len(shape) == 4:
        return (shape[0] * shape[1], shape[2], shape[3])
    if len(shape) == 3:
        return (shape[0] * shape[1], shape[2])
    return tuple(shape)


@register_codec("zfp")
class ZfpCodec(ActivationCodec):
    """zfp in fixed-accuracy mode: every decoded value is within `tolerance` of the original.

    zfp compresses blocks of 4^d neighbouring values, so the layout matters. A CNN chunk `(k, C, H, W)` is compressed
    as a 3-D array `(k * C, H, W)` and a token chunk `(k, T, D)` as a 2-D array `(k * T, D)` (`(k, D)` as it is):
    neighbouring channels or tokens are not smooth, and treating them as one more dimension both compresses worse
    and decodes 4-6x slower than folding them into the leading axis, as measured by the paper's authors.

    `unpack` decodes on the host into the field `"values"` (float32): no released zfp decodes fixed-accuracy streams
    on a GPU, so zfp is not `device_decodable`.

    zfp's tolerance is absolute. Activations' scale differs a lot between positions and models, so by default the
    tolerance is relative to the activations' standard deviation: such a codec must be `resolve`d on a sample of
    the activations it will encode, which returns a codec with the absolute tolerance `tolerance * std`. The resolved
    codec's `config()` records the requested tolerance and the measured std alongside the absolute tolerance.

    Args:
        tolerance (`float`, *optional*, defaults to 0.05): The maximum absolute error, or with `relative=True` that
            error as a fraction of the activations' standard deviation. Must be > 0.
        relative (`bool`, *optional*, defaults to `True`): Whether `tolerance` is relative (see above).
        requested_tolerance, requested_relative, reference_std (*optional*): Set by `resolve` (and read back from a
            resolved codec's config); they document how the absolute tolerance was obtained and do not change
            encoding.
    """

    name = "zfp"

    def __init__(
        self,
        tolerance: float = 0.05,
        relative: bool = True,
        *,
        requested_tolerance: float | None = None,
        requested_relative: bool | None = None,
        reference_std: float | None = None,
    ) -> None:
        if isinstance(tolerance, bool) or not isinstance(tolerance, Real) or not tolerance > 0:
            raise ValueError(f"zfp codec: tolerance must be a number > 0, got {tolerance!r}.")
        if not math.isfinite(tolerance):
            raise ValueError(f"zfp codec: tolerance must be finite, got {tolerance!r}.")
        if not isinstance(relative, bool):
            raise ValueError(f"zfp codec: relative must be True or False, got {relative!r}.")
        self.tolerance = float(tolerance)
        self.relative = relative
        self.requested_tolerance = requested_tolerance
        self.requested_relative = requested_relative
        self.reference_std = reference_std

    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"name": self.name, "tolerance": self.tolerance, "relative": self.relative}
        if self.reference_std is not None:
            config.update(
                requested_tolerance=self.requested_tolerance,
                requested_relative=self.requested_relative,
                reference_std=self.reference_std,
            )
        return config

    def resolve(self, reference: np.ndarray) -> ZfpCodec:
        """With a relative tolerance: a codec with absolute tolerance `tolerance * reference.std()`; else `self`."""
        if not self.relative:
            return self
        std = float(np.asarray(reference).std(dtype=np.float64))
        if not (math.isfinite(std) and std > 0):
            raise ValueError(
                f"zfp codec: cannot resolve a relative tolerance on a reference with standard deviation {std:g} "
                "(constant or non-finite activations); use an absolute tolerance (relative=False)."
            )
        return ZfpCodec(
            self.tolerance * std,
            relative=False,
            requested_tolerance=self.tolerance,
            requested_relative=True,
            reference_std=std,
        )

    def _absolute_tolerance(self) -> float:
        if self.relative:
            raise ValueError(
                f"{self!r} has a tolerance relative to the activations' std: call `codec = codec.resolve(reference)` "
                "on a sample of the activations before encoding."
            )
        return self.tolerance

    def encode(self, chunk: np.ndarray) -> bytes:
        tolerance = self._absolute_tolerance()
        chunk = check_chunk(chunk)
        # zfp's error bound is meaningless for inf/NaN (they do not survive compression).
        if not np.isfinite(chunk).all():
            raise ValueError("zfp codec: the chunk holds inf or NaN values, which zfp cannot encode.")
        return zfpy.compress_numpy(chunk.reshape(_folded_shape(chunk.shape)), tolerance=tolerance)

    def packed_fields(self, shape: tuple[int, ...]) -> dict[str, tuple[int, np.dtype]]:
        return {"values": (chunk_values(self, shape), np.dtype(np.float32))}

    def unpack(self, data: bytes | memoryview, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        chunk_values(self, shape)
        # zfp allocates the array its header declares: the header must declare this chunk before zfp reads it. (The
        # header also carries the mode, so decoding needs no parameter of the codec.)
        scalar_type, declared = zfp_header(data)
        if scalar_type != _ZFP_TYPE_FLOAT or declared != _folded_shape(shape):
            raise ValueError(
                f"{self!r}: the payload declares a {declared} array of zfp type {scalar_type} but shape "
                f"{tuple(shape)} needs float32 (type {_ZFP_TYPE_FLOAT}) {_folded_shape(shape)}: wrong shape passed to "
                "decode, or corrupt data."
            )
        values = zfpy.decompress_numpy(data)
        check_decoded_size(self, values.size, shape)
        return {"values": np.ascontiguousarray(values, dtype=np.float32).reshape(-1)}

    def max_abs_error(self, chunk: np.ndarray) -> float:
        return self._absolute_tolerance()

    def __repr__(self) -> str:
        if self.relative:
            return f"zfp(tolerance={self.tolerance:.4g}, relative=True)"
        if self.reference_std is not None:
            return (
                f"zfp(tolerance={self.tolerance:.4g}, requested_tolerance={self.requested_tolerance:.4g}, "
                f"reference_std={self.reference_std:.4g})"
            )
        return f"zfp(tolerance={self.tolerance:.4g})"
