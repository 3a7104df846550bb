"""The `lowbit` codec on real activations: error bound, unbiased stochastic rounding, layout, determinism, and the
payload checks that refuse a corrupt or hostile chunk before allocating anything."""

from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import pytest
import zstandard
from test_codecs import _chunks, real_activations

from hf_freezecache.cache.codecs import build_codec
from hf_freezecache.cache.codecs.lowbit import _HEADER, LowBitCodec, _uniforms
from hf_freezecache.cache.config import CacheConfig

SOURCES = ["cnn3", "cnn6", "tokens"]


@pytest.fixture(scope="module")
def activations(resnet20_weights, cifar_batch) -> dict[str, np.ndarray]:
    return real_activations(resnet20_weights, cifar_batch)


def _per_channel(chunk: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per-channel `values` broadcast to the chunk's shape (channels: C of (k, C, H, W), else the last axis)."""
    shape = [1] * chunk.ndim
    shape[1 if chunk.ndim == 4 else -1] = -1
    return np.broadcast_to(values.reshape(shape), chunk.shape)


def _steps(codec: LowBitCodec, chunk: np.ndarray) -> np.ndarray:
    """Each value's quantisation step, its channel's scale."""
    return _per_channel(chunk, codec.unpack(codec.encode(chunk), chunk.shape)["scales"])


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_error_is_below_one_step_per_channel(activations, bits, source):
    codec = LowBitCodec(bits)
    for chunk in _chunks(activations[source], 4):
        error = np.abs(codec.decode(codec.encode(chunk), chunk.shape) - chunk)
        step = _steps(codec, chunk)
        assert (error < step + 2**-20 * float(np.abs(chunk).max())).all()
        assert error.max() <= codec.max_abs_error(chunk)
        # Stochastic, not nearest: some values land more than half a step away.
        assert (error > 0.5 * step).any()


@pytest.mark.parametrize("source", ["cnn6", "tokens"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_stochastic_rounding_is_unbiased(activations, bits, source):
    chunk = activations[source][:2]
    seeds = 200
    mean = np.zeros(chunk.shape, np.float64)
    for seed in range(seeds):
        codec = LowBitCodec(bits, seed=seed)
        mean += codec.decode(codec.encode(chunk), chunk.shape)
    mean_error = mean / seeds - chunk
    step = _steps(codec, chunk)  # the grid does not depend on the seed
    # Each decoded value is x + e with E[e] = 0 and |e| < step, so std(e) <= step / 2: a 5-sigma bound per value
    # (and float32 rounding).
    assert (np.abs(mean_error) <= 5 * step / (2 * np.sqrt(seeds)) + 2**-20 * np.abs(chunk).max()).all()
    assert abs(mean_error.mean()) <= 5 * step.mean() / (2 * np.sqrt(seeds * chunk.size))
    # Round-to-nearest on the same grid errs by a fixed amount, which no number of draws averages away.
    offsets = _per_channel(chunk, codec.unpack(codec.encode(chunk), chunk.shape)["offsets"])
    nearest = np.rint((chunk - offsets) / np.where(step > 0, step, 1)) * step + offsets
    assert np.abs(mean_error).mean() < np.abs(nearest - chunk).mean() / 5


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_post_relu_zeros_decode_to_exact_zeros(activations, bits):
    codec = LowBitCodec(bits)
    for source in ("cnn3", "cnn6"):
        chunk = activations[source][:4]
        assert chunk.min() >= 0 and (chunk == 0).mean() > 0.1  # ResNet blocks end with a ReLU
        decoded = codec.decode(codec.encode(chunk), chunk.shape)
        assert (decoded[chunk == 0] == 0).all()
        assert (codec.unpack(codec.encode(chunk), chunk.shape)["offsets"] == 0).all()
    tokens = activations["tokens"][:4]  # mixed signs: offsets are the minima
    offsets = codec.unpack(codec.encode(tokens), tokens.shape)["offsets"]
    assert np.array_equal(offsets, tokens.min(axis=(0, 1)))


def test_constant_channels_decode_exactly(activations):
    chunk = activations["cnn6"][:2].copy()
    chunk[:, 3], chunk[:, 4], chunk[:, 5] = 0.0, 0.7071, -2.5
    codec = LowBitCodec(2)
    fields = codec.unpack(codec.encode(chunk), chunk.shape)
    assert (fields["scales"][3:6] == 0).all() and np.array_equal(
        fields["offsets"][3:6], np.float32([0.0, 0.7071, -2.5])
    )
    decoded = codec.decode(codec.encode(chunk), chunk.shape)
    assert np.array_equal(decoded[:, 3:6], chunk[:, 3:6])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_are_packed_least_significant_first(bits):
    # One channel holding 0, 1, 2, ...: offset 0, scale 1, so every value is a code and rounds to itself.
    top = (1 << bits) - 1
    values = np.arange(7, dtype=np.float32) % (top + 1)
    values[-1] = top
    chunk = values.reshape(7, 1)
    codec = LowBitCodec(bits)
    data = codec.encode(chunk)
    codes = np.frombuffer(data, np.uint8, offset=_HEADER.size + 8)
    per = 8 // bits
    padded = np.pad(values.astype(np.uint8), (0, -len(values) % per)).reshape(-1, per)
    assert np.array_equal(codes, (padded << (np.arange(per) * bits).astype(np.uint8)).sum(axis=1, dtype=np.uint8))
    assert np.array_equal(codec.decode(data, chunk.shape), chunk)
    assert len(data) == _HEADER.size + 8 + -(-7 * bits // 8)


def test_same_chunk_and_seed_give_the_same_bytes(activations, tmp_path):
    chunks = _chunks(activations["cnn6"], 4)
    codec = LowBitCodec(4)
    first = [codec.encode(chunk) for chunk in chunks]
    # Whatever was encoded before, by whichever codec object, from whichever copy of the chunk.
    assert [LowBitCodec(4).encode(chunk.copy()) for chunk in reversed(chunks)] == first[::-1]
    assert LowBitCodec(4, seed=1).encode(chunks[0]) != first[0]
    assert LowBitCodec(4, "zstd").decode(LowBitCodec(4, "zstd").encode(chunks[0]), chunks[0].shape).tobytes() == (
        codec.decode(first[0], chunks[0].shape).tobytes()
    )
    # Chunks that differ in one value draw different noise: elsewhere, other values round the other way.
    changed = chunks[0].copy()
    changed.flat[np.flatnonzero((changed > 0) & (changed < changed.max()))[0]] *= np.float32(0.5)
    assert changed.min() == chunks[0].min() and changed.max() == chunks[0].max()
    same = changed == chunks[0]
    assert (
        codec.decode(codec.encode(changed), changed.shape)[same] != codec.decode(first[0], changed.shape)[same]
    ).any()
    # And in another process (another hash seed, another numpy state).
    np.save(tmp_path / "chunk.npy", chunks[0])
    script = (
        "import sys, numpy as np; from hf_freezecache.cache.codecs.lowbit import LowBitCodec; "
        "sys.stdout.write(LowBitCodec(4).encode(np.load(sys.argv[1])).hex())"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "chunk.npy")], capture_output=True, text=True, check=True
    )
    assert bytes.fromhex(result.stdout) == first[0]


def test_uniforms_are_numpy_generators_float32_uniforms():
    for size in (1, 7, 4096):
        out = np.empty(size, np.float32)
        _uniforms(3, 12345, out)
        assert np.array_equal(out, np.random.Generator(np.random.PCG64([3, 12345])).random(size, dtype=np.float32))


@pytest.mark.parametrize("position", [3, 6])
def test_compression_ratio_is_about_32_over_bits(activations, position):
    h = activations[f"cnn{position}"]
    for bits in (2, 4, 8):
        plain = h.nbytes / sum(len(LowBitCodec(bits).encode(chunk)) for chunk in _chunks(h, 4))
        packed = h.nbytes / sum(len(LowBitCodec(bits, "zstd").encode(chunk)) for chunk in _chunks(h, 4))
        assert 0.95 * 32 / bits < plain < 32 / bits, (bits, plain)
        assert packed > 1.1 * plain, (bits, plain, packed)  # post-ReLU maps: many zero codes


def test_non_finite_values_are_refused():
    chunk = np.zeros((2, 3, 4, 4), np.float32)
    for bad in (np.nan, np.inf, -np.inf):
        chunk[1, 2, 0, 0] = bad
        with pytest.raises(ValueError, match="lowbit codec: the chunk holds inf or NaN"):
            LowBitCodec().encode(chunk)


def test_invalid_configs_name_the_problem():
    for bits in (1, 3, 16, True, "4", 4.0):
        with pytest.raises(ValueError, match=f"bits must be 2, 4 or 8, got {bits!r}"):
            LowBitCodec(bits)
    with pytest.raises(ValueError, match="entropy must be 'none' or 'zstd', got 'lz4'"):
        LowBitCodec(entropy="lz4")
    for level in (0, 23, 2.5):
        with pytest.raises(ValueError, match=f"level must be an integer zstd level in 1..22, got {level!r}"):
            LowBitCodec(level=level)
    for seed in (-1, 1.5, None):
        with pytest.raises(ValueError, match=f"seed must be an integer >= 0, got {seed!r}"):
            LowBitCodec(seed=seed)
    with pytest.raises(ValueError, match="bits must be"):
        build_codec({"name": "lowbit", "bits": 3})


def test_cache_config_builds_the_codec():
    codec = build_codec(CacheConfig(codec="lowbit", bits=2, entropy="zstd").codec_config())
    assert codec == LowBitCodec(2, "zstd") and codec.config() == {
        "name": "lowbit",
        "bits": 2,
        "entropy": "zstd",
        "level": 3,
        "seed": 0,
    }
    assert repr(codec) == "lowbit(bits=2, entropy='zstd', level=3, seed=0)"


def _patched(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


@pytest.mark.parametrize("entropy", ["none", "zstd"])
def test_hostile_payloads_are_refused(activations, entropy):
    codec = LowBitCodec(4, entropy)
    chunk = activations["cnn6"][:2]
    shape = chunk.shape
    data = codec.encode(chunk)
    payload = zstandard.ZstdDecompressor().decompress(data) if entropy == "zstd" else data
    seal = zstandard.ZstdCompressor().compress if entropy == "zstd" else bytes
    needs = len(payload)
    scales_at = _HEADER.size + 4 * 32

    def refused(body: bytes, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            codec.decode(seal(body), shape)

    refused(_patched(payload, 0, b"ZFP\x01"), r"not a lowbit-codec payload \(magic b'ZFP\\x01'\)")
    refused(_patched(payload, 4, struct.pack("<I", 2)), "holds 2-bit codes, this codec decodes 4-bit ones")
    refused(
        _patched(payload, 8, struct.pack("<I", 31)), r"has 31 channels, which does not fit shape \(2, 32, 16, 16\)"
    )
    refused(_patched(payload, _HEADER.size, struct.pack("<f", np.inf)), "offsets are not all finite")
    refused(_patched(payload, scales_at + 8, struct.pack("<f", np.nan)), "scales are not all finite and >= 0")
    refused(_patched(payload, scales_at, struct.pack("<f", -0.5)), "scales are not all finite and >= 0")
    size = "declares {} decompressed bytes" if entropy == "zstd" else "has {} bytes"
    refused(payload[:-1], f"{size.format(needs - 1)} but shape \\(2, 32, 16, 16\\) needs {needs}")
    refused(payload + b"\x00", f"{size.format(needs + 1)} but shape \\(2, 32, 16, 16\\) needs {needs}")
    with pytest.raises(ValueError, match=f"needs {_HEADER.size + 8 * 31 + 2 * 31 * 16 * 16 // 2}"):  # wrong shape
        codec.decode(data, (2, 31, 16, 16))
    if entropy == "zstd":
        with pytest.raises(ValueError, match="corrupt payload"):
            codec.decode(data + b"\x00", shape)  # bytes after the frame
    assert np.array_equal(codec.decode(data, shape), codec.decode(seal(payload), shape))


def test_zstd_frame_declaring_a_huge_size_is_refused_before_decompressing(monkeypatch):
    codec = LowBitCodec(2, "zstd")
    # A single-segment frame header whose 8-byte content size says 1 TiB.
    huge = struct.pack("<IB", 0xFD2FB528, 0xE0) + (1 << 40).to_bytes(8, "little") + b"\x01\x00\x00"
    assert zstandard.frame_content_size(huge) == 1 << 40
    monkeypatch.setattr(LowBitCodec, "_decompressor", lambda self: pytest.fail("zstd was asked to decompress"))
    with pytest.raises(
        ValueError, match=r"declares 1099511627776 decompressed bytes but shape \(2, 3, 4, 4\) needs 60"
    ):
        codec.decode(huge, (2, 3, 4, 4))
    with pytest.raises(ValueError, match="not a zstd frame"):
        codec.decode(b"nope", (2, 3, 4, 4))
    # Without zstd, a payload of the wrong size is refused before anything is read from it.
    with pytest.raises(ValueError, match=r"has 3 bytes but shape \(2, 3, 4, 4\) needs 60"):
        LowBitCodec(2).decode(b"LBQ", (2, 3, 4, 4))
