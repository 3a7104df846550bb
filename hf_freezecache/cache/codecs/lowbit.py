"""`lowbit`: per-channel affine quantisation to 2, 4 or 8 bits with stochastic rounding, bit-packed, decoded on the
training device."""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from . import register_codec
from ._affine import FLOAT_SLACK, affine_params, channel_shape, chunk_channels, expand_affine, max_abs, read_params
from ._bitpack import BITS, pack_codes, packed_bytes, unpack_codes
from ._zstd import ZstdContexts, check_level
from .base import ActivationCodec, check_chunk, chunk_values

# Payload (one zstd frame with entropy="zstd"): magic, bits, number of channels, float32 offsets[C], float32
# scales[C], the codes packed 8 // bits to a byte.
_MAGIC = b"LBQ\x01"
_HEADER = struct.Struct("<4sII")
_ENTROPY = ("none", "zstd")


def _uniforms(seed: int, checksum: int, out: np.ndarray) -> None:
    """Fills the float32 array `out` with the uniforms in [0, 1) that numpy's
    `Generator(PCG64([seed, checksum])).random(dtype=np.float32)` draws, `(next 32 bits >> 8) * 2**-24`, computed
    from PCG64's raw 64-bit outputs (low half first, as numpy takes them) in half the time."""
    raw = np.random.PCG64([seed, checksum]).random_raw(-(-out.size // 2)).view(np.uint32)[: out.size]
    raw >>= 8
    out[...] = raw  # exact: < 2**24
    out *= np.float32(2**-24)


@register_codec("lowbit")
class LowBitCodec(ZstdContexts, ActivationCodec):
    """Per-channel affine quantisation to `bits` bits (2, 4 or 8) with stochastic rounding, packed several codes to
    a byte: `32 / bits` times smaller than float32, and decoded by the training device itself.

    Channels are C of CNN chunks `(k, C, H, W)` and the feature dimension D of token chunks `(k, T, D)` or flat chunks
    `(k, D)`; each channel's min and max are taken over the whole chunk. A channel maps onto the codes
    `0 .. 2**bits - 1` as `x ~ q * scale + offset`, with `offset` the channel's min, except `offset = 0` for a
    non-constant channel whose min is >= 0 (post-ReLU channels: their exact zeros decode to exact zeros), and
    `scale = (max - offset) / (2**bits - 1)` (rounded up by one float32 ulp where needed); a constant channel gets
    scale 0 and decodes exactly.

    Rounding is stochastic, as in ActNN (Chen et al., ICML 2021): `q = floor((x - offset) / scale + u)` with `u`
    uniform in [0, 1), so `q` is one of the two codes around `x` and `E[q * scale + offset] = x`: the decoded
    activations are unbiased (up to the float32 resolution of `u` and of the sum, about `2**(bits - 24)` of a step),
    and their errors average out over a batch instead of adding up to a systematic shift. The price is a larger
    worst case than round-to-nearest: up to one step instead of half (`max_abs_error`). The uniforms are drawn from
    numpy's PCG64 seeded with `seed` and the CRC-32 of the chunk's bytes, so a chunk encodes to the same bytes
    whatever the process, thread or batching, and different chunks get independent noise.

    Payload: a 12-byte header (magic, bits, channels), float32 offsets[C], float32 scales[C], then the codes in chunk
    order, `8 // bits` to a byte, value j of a byte in bits `[j * bits, (j + 1) * bits)`, the last byte padded with
    zeros; with `entropy="zstd"`, all of it as one zstd frame. `unpack` returns the fields `"codes"` (uint8, the
    packed bytes), `"offsets"` and `"scales"` (float32, one per channel); `expand` unpacks the bits with shifts and
    masks and computes `q * scale + offset` on whatever device holds the fields.

    Use it to keep a cache in GPU memory (4 bits: 8x smaller than float32, half of `int8` before zstd) when training
    tolerates quantisation noise; `entropy="zstd"` saves disk on sparse post-ReLU maps, at the cost of decompressing
    on the host. Encoding is single-threaded numpy.

    Args:
        bits (`int`, *optional*, defaults to 4): Bits per value: 2, 4 or 8.
        entropy (`str`, *optional*, defaults to `"none"`): Lossless coding of the payload: `"none"` or `"zstd"`.
        level (`int`, *optional*, defaults to 3): zstd level, 1..22; used only with `entropy="zstd"`.
        seed (`int`, *optional*, defaults to 0): Seed of the stochastic rounding (>= 0), mixed with each chunk's
            checksum.
    """

    name = "lowbit"
    device_decodable = True

    def __init__(self, bits: int = 4, entropy: str = "none", level: int = 3, seed: int = 0) -> None:
        if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits not in BITS:
            raise ValueError(f"lowbit codec: bits must be 2, 4 or 8, got {bits!r}.")
        if entropy not in _ENTROPY:
            raise ValueError(f"lowbit codec: entropy must be 'none' or 'zstd', got {entropy!r}.")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"lowbit codec: seed must be an integer >= 0, got {seed!r}.")
        self.bits = int(bits)
        self.entropy = entropy
        self.level = check_level("lowbit", level)
        self.seed = int(seed)
        self._init_contexts()

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.bits, "entropy": self.entropy, "level": self.level, "seed": self.seed}

    def _params(self, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return affine_params(chunk, (1 << self.bits) - 1, "lowbit", zero_offset=True)

    def encode(self, chunk: np.ndarray) -> bytes:
        chunk = check_chunk(chunk)
        offsets, scales = self._params(chunk)
        broadcast = channel_shape(chunk.ndim, offsets.size)
        per = 8 // self.bits
        levels = np.zeros(-(-chunk.size // per) * per, np.float32)  # zero codes pad the last byte
        # t = u + (x - offset) / scale, with u drawn straight into the output buffer.
        _uniforms(self.seed, zlib.crc32(memoryview(chunk).cast("B")), levels[: chunk.size])
        shifted = chunk - offsets.reshape(broadcast)
        # Scale-0 (constant) channels: dividing by 1 instead leaves t = u < 1, code 0, which decodes to the offset.
        shifted /= np.where(scales > 0, scales, np.float32(1)).reshape(broadcast)
        levels[: chunk.size] += shifted.reshape(-1)
        # t >= 0, so the cast's truncation is the floor; float32 rounding can push t to 2**bits at the top.
        np.minimum(levels, (1 << self.bits) - 1, out=levels)
        codes = levels.astype(np.uint8)
        packed = pack_codes(codes, self.bits)
        payload = b"".join(
            [_HEADER.pack(_MAGIC, self.bits, offsets.size), offsets.tobytes(), scales.tobytes(), packed.data]
        )
        return self._compressor().compress(payload) if self.entropy == "zstd" else payload

    def packed_fields(self, shape: tuple[int, ...]) -> dict[str, tuple[int, np.dtype]]:
        channels = chunk_channels(shape)
        return {
            "codes": (packed_bytes(chunk_values(self, shape), self.bits), np.dtype(np.uint8)),
            "offsets": (channels, np.dtype(np.float32)),
            "scales": (channels, np.dtype(np.float32)),
        }

    def unpack(self, data: bytes | memoryview, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        fields = self.packed_fields(shape)
        (code_bytes, _), (channels, _) = fields["codes"], fields["offsets"]
        expected = _HEADER.size + 8 * channels + code_bytes
        payload = self._stored(data, expected, shape, self.entropy)
        magic, bits, stored_channels = _HEADER.unpack_from(payload)
        if magic != _MAGIC:
            raise ValueError(f"{self!r}: not a lowbit-codec payload (magic {magic!r}).")
        if bits != self.bits:
            raise ValueError(f"{self!r}: the payload holds {bits}-bit codes, this codec decodes {self.bits}-bit ones.")
        offsets, scales = read_params(self, payload, _HEADER.size, shape, stored_channels)
        codes = np.frombuffer(payload, np.uint8, code_bytes, _HEADER.size + 8 * channels).copy()  # writeable
        return {"codes": codes, "offsets": offsets, "scales": scales}

    def expand(self, fields: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        codes = fields["codes"]
        codes = unpack_codes(codes, self.bits, math.prod(shape)).reshape(codes.shape[0], *shape)
        return expand_affine(codes, fields["offsets"], fields["scales"], shape)

    def max_abs_error(self, chunk: np.ndarray) -> float:
        """`max(scale) + 2**-20 * max|x|`: stochastic rounding picks one of the two codes around each value, so it
        errs by less than one step `scale` of the value's channel; the second term bounds float32 rounding."""
        chunk = check_chunk(chunk)
        _, scales = self._params(chunk)
        return float(scales.max()) + FLOAT_SLACK * max_abs(chunk)
