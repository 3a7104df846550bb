"""Codes of 2, 4 or 8 bits packed `8 // bits` to a byte (value j of a byte at bits `[j * bits, (j + 1) * bits)`),
shared by the `lowbit` and `codebook` codecs: packing on the host, unpacking on any device."""

from __future__ import annotations

import math

import numpy as np
import torch

BITS = (2, 4, 8)


def packed_bytes(values: int, bits: int) -> int:
    """Bytes that `values` codes of `bits` bits take packed (the last byte padded with zero codes)."""
    return math.ceil(values * bits / 8)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Packs uint8 codes < 2**bits (a multiple of `8 // bits` of them) into bytes."""
    if bits == 8:
        return codes
    # Each group of 8 // bits codes read as one little-endian word has code j at bit 8 j; shift-ors slide code j
    # down to bit bits * j (4 bits: 8 -> 4; 2 bits: 8, 16, 24 -> 2, 10, 18, then 16, 18 -> 4, 6) and the low byte
    # keeps the packed codes. A few whole-array passes, 5x faster than or-ing strided slices.
    words = codes.view(np.dtype("<u2") if bits == 4 else np.dtype("<u4"))
    words |= words >> (8 - bits)
    if bits == 2:
        words |= words >> 12
    return words.astype(np.uint8)


def padded_codes(values: int, bits: int) -> np.ndarray:
    """A zeroed uint8 buffer for `values` codes, rounded up to whole bytes of packed codes."""
    per = 8 // bits
    return np.zeros(-(-values // per) * per, np.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, values: int) -> torch.Tensor:
    """The first `values` codes of each row of `packed` (`(n, bytes)` uint8, any device) as `(n, values)` uint8."""
    n = packed.shape[0]
    if bits < 8:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        packed = ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(n, -1)
    return packed[:, :values]
