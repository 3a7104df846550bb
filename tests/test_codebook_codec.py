"""The `codebook` codec on real activations: nearest-level rounding and its exact error, fitted levels against the
even grid of `lowbit`, exact zeros, determinism, and the payload checks that refuse a corrupt or hostile chunk
before allocating anything."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import zstandard
from test_codecs import _chunks, real_activations
from test_lowbit_codec import _patched

from hf_freezecache.cache.codecs import build_codec
from hf_freezecache.cache.codecs.codebook import _HEADER, CodebookCodec, fit_codebook
from hf_freezecache.cache.codecs.lowbit import LowBitCodec
from hf_freezecache.cache.config import CacheConfig

SOURCES = ["cnn3", "cnn6", "tokens"]


@pytest.fixture(scope="module")
def activations(resnet20_weights, cifar_batch) -> dict[str, np.ndarray]:
    return real_activations(resnet20_weights, cifar_batch)


def _levels(codec: CodebookCodec, chunk: np.ndarray) -> np.ndarray:
    """The chunk's per-channel levels as stored, `(C, 2**bits)`."""
    return codec.unpack(codec.encode(chunk), chunk.shape)["levels"].reshape(-1, 1 << codec.bits)


def _channel_last(chunk: np.ndarray) -> np.ndarray:
    return np.moveaxis(chunk, 1, -1) if chunk.ndim == 4 else chunk


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("bits", [2, 4])
def test_every_value_decodes_to_its_nearest_level(activations, bits, source):
    codec = CodebookCodec(bits)
    for chunk in _chunks(activations[source], 4):
        decoded = codec.decode(codec.encode(chunk), chunk.shape)
        levels = _levels(codec, chunk)
        assert (np.diff(levels, axis=1) >= 0).all()  # ascending per channel
        values, got = _channel_last(chunk), _channel_last(decoded)
        # Every decoded value is one of its channel's levels, and no level of that channel is nearer.
        distance = np.abs(values[..., None] - levels)  # (..., C, levels)
        assert np.isin(got[..., 0], levels[0]).all()
        tie = 1e-6 * (1 + np.abs(values))
        assert (np.abs(values - got) <= distance.min(axis=-1) + tie).all()
        assert np.abs(decoded - chunk).max() <= codec.max_abs_error(chunk)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("bits", [2, 4])
def test_fitted_levels_err_less_than_lowbits_even_grid(activations, bits, source):
    h = activations[source]
    squares = {}
    for codec in (CodebookCodec(bits, "none"), LowBitCodec(bits)):
        squares[codec.name] = sum(
            float(np.square(codec.decode(codec.encode(c), c.shape) - c).sum()) for c in _chunks(h, 4)
        )
    # Lloyd-Max against stochastic rounding on an even grid, on these maps: at most a quarter of the squared error
    # at 2 bits, 75% at 4 bits (measured 0.54-0.66).
    assert squares["codebook"] < {2: 0.25, 4: 0.75}[bits] * squares["lowbit"], squares


@pytest.mark.parametrize("bits", [2, 4])
def test_lloyd_iterations_lower_the_squared_error(activations, bits):
    chunk = activations["cnn6"][:4]
    errors = []
    for iterations in (0, 2, 8):
        codec = CodebookCodec(bits, iterations=iterations)
        errors.append(float(np.square(codec.decode(codec.encode(chunk), chunk.shape) - chunk).sum()))
    assert errors[0] >= errors[1] >= errors[2] and errors[2] < errors[0], errors


@pytest.mark.parametrize("bits", [2, 4])
def test_post_relu_zeros_decode_to_exact_zeros(activations, bits):
    codec = CodebookCodec(bits)
    for source in ("cnn3", "cnn6"):
        chunk = activations[source][:4]
        assert chunk.min() >= 0 and (chunk == 0).mean() > 0.1
        decoded = codec.decode(codec.encode(chunk), chunk.shape)
        assert (decoded[chunk == 0] == 0).all()
        with_zeros = (chunk == 0).any(axis=(0, 2, 3))
        assert (_levels(codec, chunk)[with_zeros, 0] == 0).all() and with_zeros.mean() > 0.5


def test_a_channel_with_few_distinct_values_decodes_exactly():
    chunk = np.zeros((2, 3, 4, 4), np.float32)
    chunk[:, 1] = 0.7071
    chunk[:, 2, :2] = -2.5  # two values
    chunk[:, 2, 2:] = 3.0
    for bits in (2, 4):
        codec = CodebookCodec(bits)
        assert np.array_equal(codec.decode(codec.encode(chunk), chunk.shape), chunk)
        assert codec.max_abs_error(chunk) == 2**-20 * 3.0


def test_encoding_is_deterministic_and_zstd_only_changes_the_size(activations):
    chunks = _chunks(activations["cnn6"], 4)
    first = [CodebookCodec(2, "none").encode(chunk) for chunk in chunks]
    assert [CodebookCodec(2, "none").encode(chunk.copy()) for chunk in reversed(chunks)] == first[::-1]
    packed = CodebookCodec(2, "zstd")
    for chunk, data in zip(chunks, first, strict=True):
        assert zstandard.ZstdDecompressor().decompress(packed.encode(chunk)) == data
        assert packed.decode(packed.encode(chunk), chunk.shape).tobytes() == (
            CodebookCodec(2, "none").decode(data, chunk.shape).tobytes()
        )


@pytest.mark.parametrize("position", [3, 6])
def test_compression_ratio(activations, position):
    h = activations[f"cnn{position}"]
    for bits in (2, 4):
        plain = h.nbytes / sum(len(CodebookCodec(bits, "none").encode(chunk)) for chunk in _chunks(h, 4))
        packed = h.nbytes / sum(len(CodebookCodec(bits, "zstd").encode(chunk)) for chunk in _chunks(h, 4))
        assert 0.85 * 32 / bits < plain < 32 / bits, (bits, plain)
        assert packed > plain, (bits, plain, packed)


def test_fit_matches_the_codes_it_returns(activations):
    chunk = activations["tokens"][:4]
    levels, codes = fit_codebook(chunk, 2, 8)
    assert levels.shape == (chunk.shape[-1], 4) and codes.shape == chunk.shape and codes.max() <= 3
    rebuilt = levels[np.arange(chunk.shape[-1]), codes]
    codec = CodebookCodec(2, iterations=8)
    assert np.array_equal(codec.decode(codec.encode(chunk), chunk.shape), rebuilt)


def test_invalid_configs_name_the_problem():
    for bits in (1, 3, 8, True, "4", 4.0):
        with pytest.raises(ValueError, match=f"bits must be 2 or 4, got {bits!r}"):
            CodebookCodec(bits)
    with pytest.raises(ValueError, match="entropy must be 'none' or 'zstd', got 'lz4'"):
        CodebookCodec(entropy="lz4")
    for iterations in (-1, 101, 2.0, None):
        with pytest.raises(ValueError, match=f"iterations must be an integer in 0..100, got {iterations!r}"):
            CodebookCodec(iterations=iterations)
    with pytest.raises(ValueError, match="level must be an integer zstd level"):
        CodebookCodec(level=0)
    chunk = np.zeros((2, 3, 4, 4), np.float32)
    chunk[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="codebook codec: the chunk holds inf or NaN"):
        CodebookCodec().encode(chunk)


def test_cache_config_builds_the_codec():
    codec = build_codec(CacheConfig(codec="codebook", bits=2, entropy="zstd").codec_config())
    assert codec == CodebookCodec(2, "zstd") and codec.config() == {
        "name": "codebook",
        "bits": 2,
        "entropy": "zstd",
        "level": 3,
        "iterations": 8,
    }


@pytest.mark.parametrize("entropy", ["none", "zstd"])
def test_hostile_payloads_are_refused(activations, entropy):
    codec = CodebookCodec(4, entropy)
    chunk = activations["cnn6"][:2]
    shape = chunk.shape
    data = codec.encode(chunk)
    payload = zstandard.ZstdDecompressor().decompress(data) if entropy == "zstd" else data
    seal = zstandard.ZstdCompressor().compress if entropy == "zstd" else bytes
    needs = len(payload)

    def refused(body: bytes, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            codec.decode(seal(body), shape)

    refused(_patched(payload, 0, b"LBQ\x01"), r"not a codebook-codec payload \(magic b'LBQ\\x01'\)")
    refused(_patched(payload, 4, struct.pack("<I", 2)), "holds 2-bit codes, this codec decodes 4-bit ones")
    refused(
        _patched(payload, 8, struct.pack("<I", 31)), r"has 31 channels, which does not fit shape \(2, 32, 16, 16\)"
    )
    refused(_patched(payload, _HEADER.size + 4 * 17, struct.pack("<f", np.inf)), "levels are not all finite")
    refused(_patched(payload, _HEADER.size, struct.pack("<f", np.nan)), "levels are not all finite")
    size = "declares {} decompressed bytes" if entropy == "zstd" else "has {} bytes"
    refused(payload[:-1], f"{size.format(needs - 1)} but shape \\(2, 32, 16, 16\\) needs {needs}")
    refused(payload + b"\x00", f"{size.format(needs + 1)} but shape \\(2, 32, 16, 16\\) needs {needs}")
    with pytest.raises(ValueError, match=f"needs {_HEADER.size + 4 * 16 * 31 + 2 * 31 * 16 * 16 // 2}"):
        codec.decode(data, (2, 31, 16, 16))  # wrong shape
    huge = struct.pack("<IB", 0xFD2FB528, 0xE0) + (1 << 40).to_bytes(8, "little") + b"\x01\x00\x00"
    with pytest.raises(ValueError, match="declares 1099511627776 decompressed bytes|has 16 bytes"):
        codec.decode(huge, shape)
