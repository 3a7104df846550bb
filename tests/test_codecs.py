"""Activation codecs on real activations: pretrained CIFAR ResNet-20 feature maps and (random) ViT tokens."""

from __future__ import annotations

import json
import pickle
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import zfpy
import zstandard

from hf_freezecache.cache.codecs import CODECS, ActivationCodec, build_codec
from hf_freezecache.cache.codecs.codebook import CodebookCodec
from hf_freezecache.cache.codecs.int8 import Int8Codec
from hf_freezecache.cache.codecs.lowbit import LowBitCodec
from hf_freezecache.cache.codecs.zfp import ZfpCodec
from hf_freezecache.models import get_block_adapter, load_cifar_resnet


@pytest.fixture(scope="module")
def activations(resnet20_weights, cifar_batch) -> dict[str, np.ndarray]:
    return real_activations(resnet20_weights, cifar_batch)


def real_activations(resnet20_weights, cifar_batch) -> dict[str, np.ndarray]:
    """16 images' activations: ResNet-20 after blocks 3 (16x32x32) and 6 (32x16x16), ViT tokens after block 1."""
    import transformers

    pixels = cifar_batch["pixel_values"]
    resnet = load_cifar_resnet(resnet20_weights, num_classes=10).eval()
    adapter = get_block_adapter(resnet)
    torch.manual_seed(0)
    vit_config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=3,
        intermediate_size=96,
        num_labels=10,
    )
    vit = transformers.ViTForImageClassification(vit_config).eval()
    with torch.no_grad():
        result = {f"cnn{p}": adapter.prefix(pixels, p).numpy() for p in (3, 6)}
        result["tokens"] = get_block_adapter(vit).prefix(pixels, 1).numpy()
    assert result["cnn3"].shape == (16, 16, 32, 32) and result["cnn6"].shape == (16, 32, 16, 16)
    assert result["tokens"].shape == (16, 17, 48)
    return result


def _chunks(h: np.ndarray, k: int) -> list[np.ndarray]:
    return [np.ascontiguousarray(h[i : i + k]) for i in range(0, len(h), k)]


CODEC_CONFIGS = [
    {"name": "none"},
    {"name": "fp16"},
    {"name": "bf16"},
    {"name": "int8"},
    {"name": "int8", "level": 19},
    {"name": "zfp", "tolerance": 0.05, "relative": True},
    {"name": "zfp", "tolerance": 0.01, "relative": False},
    *({"name": "lowbit", "bits": bits, "entropy": entropy} for bits in (2, 4, 8) for entropy in ("none", "zstd")),
    *({"name": "codebook", "bits": bits, "entropy": entropy} for bits in (2, 4) for entropy in ("none", "zstd")),
    {"name": "budget", "ratio": 8.0},
]


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("source", ["cnn3", "cnn6", "tokens"])
@pytest.mark.parametrize("config", CODEC_CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_round_trip_within_stated_error(activations, config, source, k):
    h = activations[source]
    codec = build_codec(config).resolve(h)
    for chunk in _chunks(h, k):
        decoded = codec.decode(codec.encode(chunk), chunk.shape)
        assert decoded.shape == chunk.shape and decoded.dtype == np.float32
        assert decoded.flags.c_contiguous and decoded.flags.writeable
        error = float(np.abs(decoded - chunk).max())
        assert error <= codec.max_abs_error(chunk), (codec, error)
        if codec.lossless:
            assert np.array_equal(decoded, chunk)
        else:
            assert error > 0  # a lossy codec that loses nothing on real activations would not be doing its job
    assert codec.lossless == (config["name"] == "none")


@pytest.mark.parametrize("config", CODEC_CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_config_is_json_and_rebuilds_the_codec(activations, config):
    codec = build_codec(config).resolve(activations["cnn6"])
    config = codec.config()
    rebuilt = build_codec(json.loads(json.dumps(config)))
    assert type(rebuilt) is type(codec) and rebuilt.config() == config and rebuilt == codec
    assert config["name"] in CODECS and isinstance(rebuilt, ActivationCodec)
    chunk = activations["cnn6"][:2]
    data = codec.encode(chunk)
    assert rebuilt.encode(chunk) == data
    assert np.array_equal(rebuilt.decode(data, chunk.shape), codec.decode(data, chunk.shape))


def test_every_registered_codec_is_tested():
    assert {config["name"] for config in CODEC_CONFIGS} == set(CODECS.names())


def _stack(fields: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """The fields of several chunks as `(n, length)` tensors, as the reader hands them to `expand`."""
    return {name: torch.from_numpy(np.stack([f[name] for f in fields])) for name in fields[0]}


@pytest.mark.parametrize("source", ["cnn3", "cnn6", "tokens"])
@pytest.mark.parametrize("config", CODEC_CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_unpack_returns_the_declared_fields(activations, config, source):
    h = activations[source]
    codec = build_codec(config).resolve(h)
    for chunk in (h[:4], h[:3], h[:1]):
        data = codec.encode(chunk)
        declared = codec.packed_fields(chunk.shape)
        for fields in (codec.unpack(data, chunk.shape), codec.unpack(memoryview(data), chunk.shape)):
            assert list(fields) == list(declared)
            for name, array in fields.items():
                assert (len(array), array.dtype) == declared[name] and array.ndim == 1, name
                assert array.flags.c_contiguous and array.flags.writeable, name
        # Device-decodable codecs ship fewer bytes than the float32 values; the others ship the float32 values. (Not
        # always for one short sample: a codebook's C * 2**bits levels can outweigh its codes.)
        field_bytes = sum(length * dtype.itemsize for length, dtype in declared.values())
        if len(chunk) == 4 or not codec.device_decodable:
            assert (field_bytes < chunk.nbytes) == codec.device_decodable, (codec, field_bytes, chunk.nbytes)


@pytest.mark.parametrize("source", ["cnn3", "cnn6", "tokens"])
@pytest.mark.parametrize("config", CODEC_CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_expand_of_stacked_chunks_is_their_decode(activations, config, source):
    h = activations[source][:14]  # chunks of 4, 4, 4 and a short last one of 2
    codec = build_codec(config).resolve(h)
    chunks = _chunks(h, 4)
    payloads = [codec.encode(chunk) for chunk in chunks]
    decoded = [codec.decode(data, chunk.shape) for data, chunk in zip(payloads, chunks, strict=True)]
    full = chunks[0].shape
    fields = [codec.unpack(data, chunk.shape) for data, chunk in zip(payloads, chunks, strict=True)]
    # The short chunk's fields, zero-padded at the end to a full chunk's lengths.
    lengths = codec.packed_fields(full)
    fields[-1] = {name: np.pad(array, (0, lengths[name][0] - len(array))) for name, array in fields[-1].items()}
    expanded = codec.expand(_stack(fields), full)
    assert expanded.shape == (len(chunks), *full) and expanded.dtype == torch.float32
    for i, values in enumerate(decoded):
        assert np.array_equal(expanded[i, : len(values)].numpy(), values), i
    # decode is expand(unpack) on one chunk.
    assert np.array_equal(codec.expand(_stack(fields[:1]), full)[0].numpy(), decoded[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: run by recipes/gpu_check.sh")
@pytest.mark.parametrize("source", ["cnn3", "cnn6", "tokens"])
@pytest.mark.parametrize("config", CODEC_CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_expand_on_the_gpu_gives_the_cpu_values(activations, config, source):
    h = activations[source][:12]
    codec = build_codec(config).resolve(h)
    chunks = _chunks(h, 4)
    payloads = [codec.encode(chunk) for chunk in chunks]
    fields = [codec.unpack(data, chunk.shape) for data, chunk in zip(payloads, chunks, strict=True)]
    expanded = codec.expand({name: tensor.cuda() for name, tensor in _stack(fields).items()}, chunks[0].shape)
    assert expanded.is_cuda
    cpu = np.stack([codec.decode(data, chunk.shape) for data, chunk in zip(payloads, chunks, strict=True)])
    assert np.array_equal(expanded.cpu().numpy(), cpu)


@pytest.mark.parametrize("source", ["cnn3", "cnn6", "tokens"])
def test_int8_expand_gives_the_values_of_numpy_decoding(activations, source):
    codec = Int8Codec()
    chunk = activations[source][:4]
    fields = codec.unpack(codec.encode(chunk), chunk.shape)
    broadcast = [1] * chunk.ndim
    broadcast[1 if chunk.ndim == 4 else -1] = -1
    expected = fields["codes"].reshape(chunk.shape).astype(np.float32)
    expected *= fields["scales"].reshape(broadcast)
    expected += fields["mins"].reshape(broadcast)
    assert np.array_equal(codec.decode(codec.encode(chunk), chunk.shape).view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("source", ["cnn3", "cnn6", "tokens"])
def test_zfp_absolute_tolerance_is_a_guarantee_and_larger_ones_store_less(activations, source):
    chunk = activations[source][:4]
    sizes = []
    for tolerance in (1e-3, 1e-2, 1e-1):
        codec = ZfpCodec(tolerance, relative=False)
        data = codec.encode(chunk)
        decoded = codec.decode(data, chunk.shape)
        assert codec.max_abs_error(chunk) == tolerance
        assert np.abs(decoded - chunk).max() <= tolerance
        sizes.append(len(data))
    assert sizes[0] > sizes[1] > sizes[2], sizes


def test_zfp_folds_channels_and_tokens_into_the_leading_axis(activations):
    codec = ZfpCodec(0.01, relative=False)
    cnn, tokens = activations["cnn6"][:4], activations["tokens"][:4]
    assert zfpy.decompress_numpy(codec.encode(cnn)).shape == (4 * 32, 16, 16)
    assert zfpy.decompress_numpy(codec.encode(tokens)).shape == (4 * 17, 48)
    flat = np.ascontiguousarray(tokens[:, 0])  # (k, D), e.g. CLS features
    assert zfpy.decompress_numpy(codec.encode(flat)).shape == (4, 48)
    assert np.abs(codec.decode(codec.encode(flat), flat.shape) - flat).max() <= 0.01


def test_zfp_relative_tolerance_resolves_to_tolerance_times_std(activations):
    h = activations["cnn3"]
    relative = ZfpCodec(0.05)
    with pytest.raises(ValueError, match="resolve"):
        relative.encode(h[:1])
    with pytest.raises(ValueError, match="resolve"):
        relative.max_abs_error(h[:1])
    resolved = relative.resolve(h)
    std = float(h.std(dtype=np.float64))
    assert resolved.tolerance == pytest.approx(0.05 * std, rel=1e-12)
    assert resolved.config() == {
        "name": "zfp",
        "tolerance": resolved.tolerance,
        "relative": False,
        "requested_tolerance": 0.05,
        "requested_relative": True,
        "reference_std": pytest.approx(std, rel=1e-12),
    }
    assert resolved.resolve(h * 10) is resolved  # already absolute: resolving again changes nothing
    assert relative.resolve(h * 2).tolerance == pytest.approx(2 * resolved.tolerance)
    assert "0.05" in repr(relative) and "relative" in repr(relative)
    with pytest.raises(ValueError, match="standard deviation"):
        relative.resolve(np.ones((2, 3, 4, 4), np.float32))


def test_fp16_and_bf16_errors_follow_their_mantissas(activations):
    chunk = activations["cnn3"][:4]
    fp16, bf16 = build_codec({"name": "fp16"}), build_codec({"name": "bf16"})
    peak = float(np.abs(chunk).max())
    assert fp16.max_abs_error(chunk) == pytest.approx(peak * 2**-11 + 2**-24)
    assert bf16.max_abs_error(chunk) == pytest.approx(peak * 2**-8)
    fp16_error = np.abs(fp16.decode(fp16.encode(chunk), chunk.shape) - chunk)
    bf16_error = np.abs(bf16.decode(bf16.encode(chunk), chunk.shape) - chunk)
    # Element-wise: half an ulp of each value, not just of the largest.
    nonzero = chunk != 0
    assert (fp16_error[nonzero] <= np.abs(chunk[nonzero]) * 2**-11 + 2**-25).all()
    assert (bf16_error[nonzero] <= np.abs(chunk[nonzero]) * 2**-8).all()
    assert (fp16_error[~nonzero] == 0).all() and (bf16_error[~nonzero] == 0).all()
    # bf16 keeps 3 fewer mantissa bits than fp16 (its gain is range, not precision).
    assert bf16_error.max() > 4 * fp16_error.max()
    assert len(fp16.encode(chunk)) == len(bf16.encode(chunk)) == chunk.nbytes // 2


def test_fp16_rejects_values_beyond_its_range():
    chunk = np.zeros((2, 4, 3), np.float32)
    chunk[1, 2, 0] = -70000.0
    codec = build_codec({"name": "fp16"})
    with pytest.raises(ValueError, match="70000"):
        codec.encode(chunk)
    chunk[1, 2, 0] = 65504.0  # the largest float16 is fine
    assert codec.decode(codec.encode(chunk), chunk.shape)[1, 2, 0] == 65504
    chunk[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="nan"):
        codec.encode(chunk)


def test_int8_quantises_per_channel(activations):
    codec = Int8Codec()
    # CNN: a channel scaled 1000x does not coarsen the others (a global scale would).
    chunk = activations["cnn6"][:4].copy()
    chunk[:, 5] *= 1000
    decoded = codec.decode(codec.encode(chunk), chunk.shape)
    others = np.delete(np.arange(32), 5)
    other_range = float(chunk[:, others].max() - chunk[:, others].min())
    assert np.abs(decoded[:, others] - chunk[:, others]).max() <= other_range / 255 / 2 * 1.001
    # The big channel has its own, coarser step.
    assert np.abs(decoded[:, 5] - chunk[:, 5]).max() > 10 * other_range / 255 / 2
    assert codec.max_abs_error(chunk) == pytest.approx(float(np.ptp(chunk[:, 5])) / 510, rel=1e-3)
    # Tokens: per feature dimension (the last axis), not per token.
    tokens = activations["tokens"][:4].copy()
    tokens[..., 7] *= 1000
    decoded = codec.decode(codec.encode(tokens), tokens.shape)
    features = np.delete(np.arange(48), 7)
    feature_range = float(np.ptp(tokens[..., features]))
    assert np.abs(decoded[..., features] - tokens[..., features]).max() <= feature_range / 255 / 2 * 1.001


def test_int8_constant_channels_decode_exactly(activations):
    codec = Int8Codec()
    chunk = activations["cnn6"][:2].copy()
    chunk[:, 3] = 0.0  # a dead post-ReLU channel
    chunk[:, 4] = 0.7071  # any constant
    decoded = codec.decode(codec.encode(chunk), chunk.shape)
    assert np.array_equal(decoded[:, 3], chunk[:, 3]) and np.array_equal(decoded[:, 4], chunk[:, 4])
    constant = np.full((3, 5, 4), -2.5, np.float32)
    assert codec.max_abs_error(constant) <= 2.5 * 2**-20
    assert np.array_equal(codec.decode(codec.encode(constant), constant.shape), constant)


def test_int8_refuses_payloads_with_non_finite_or_negative_scales():
    codec = Int8Codec()
    chunk = np.random.default_rng(0).standard_normal((2, 3, 4, 4), dtype=np.float32)
    payload = zstandard.ZstdDecompressor().decompress(codec.encode(chunk))
    for at, value, message in [(8, np.nan, "offsets are not all finite"), (20, -1.0, "scales are not all finite")]:
        corrupt = payload[:at] + struct.pack("<f", value) + payload[at + 4 :]
        with pytest.raises(ValueError, match=message):
            codec.decode(zstandard.ZstdCompressor().compress(corrupt), chunk.shape)


def test_int8_and_zfp_reject_non_finite_values():
    chunk = np.zeros((2, 3, 4, 4), np.float32)
    chunk[1, 1, 1, 1] = np.inf
    with pytest.raises(ValueError, match="inf or NaN"):
        Int8Codec().encode(chunk)
    with pytest.raises(ValueError, match="inf or NaN"):
        ZfpCodec(0.1, relative=False).encode(chunk)


@pytest.mark.parametrize(
    "codec",
    [Int8Codec(), ZfpCodec(0.05), LowBitCodec(2), LowBitCodec(4, "zstd"), CodebookCodec(2)],
    ids=["int8", "zfp", "lb2", "lb4z", "cb2z"],
)
def test_one_codec_encodes_and_decodes_from_many_threads(activations, codec):
    h = activations["cnn3"]
    codec = codec.resolve(h)
    chunks = [chunk for _ in range(4) for chunk in _chunks(h, 1)] + _chunks(activations["tokens"], 2)
    serial_data = [codec.encode(chunk) for chunk in chunks]
    serial = [codec.decode(data, chunk.shape) for data, chunk in zip(serial_data, chunks, strict=True)]
    with ThreadPoolExecutor(4) as pool:
        data = list(pool.map(codec.encode, chunks))
        decoded = list(pool.map(codec.decode, serial_data, [chunk.shape for chunk in chunks]))
    assert data == serial_data
    assert all(np.array_equal(a, b) for a, b in zip(decoded, serial, strict=True))
    # Picklable (DataLoader workers), and the copy decodes the same.
    copy = pickle.loads(pickle.dumps(codec))
    assert copy == codec and np.array_equal(copy.decode(serial_data[0], chunks[0].shape), serial[0])


def test_invalid_configs_name_the_problem():
    with pytest.raises(ValueError, match="'nope'.*bf16, budget, codebook, fp16, int8, lowbit, none, zfp"):
        build_codec({"name": "nope"})
    with pytest.raises(ValueError, match="name"):
        build_codec({"tolerance": 0.1})
    with pytest.raises(ValueError, match="zfp.*levle"):
        build_codec({"name": "zfp", "levle": 3})
    for tolerance in (0, -0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"got {tolerance!r}"):
            ZfpCodec(tolerance)
    with pytest.raises(ValueError, match="got -0.5"):
        build_codec({"name": "zfp", "tolerance": -0.5, "relative": False})
    for level in (0, 23, 2.5):
        with pytest.raises(ValueError, match=f"got {level!r}"):
            Int8Codec(level)
    with pytest.raises(ValueError, match="got 23"):
        build_codec({"name": "int8", "level": 23})


def test_encode_checks_the_chunk():
    codec = build_codec({"name": "none"})
    with pytest.raises(TypeError, match="float64"):
        codec.encode(np.zeros((2, 3), np.float64))
    with pytest.raises(ValueError, match="5-D"):
        codec.encode(np.zeros((1, 2, 3, 4, 5), np.float32))
    with pytest.raises(ValueError, match="empty"):
        codec.encode(np.zeros((0, 3), np.float32))
    data = codec.encode(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="wrong shape"):
        codec.decode(data, (2, 4))
    # Non-contiguous input (a strided view) is encoded as its values.
    view = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]
    assert np.array_equal(codec.decode(codec.encode(view), view.shape), view)


@pytest.mark.parametrize("position", [3, 6])
@pytest.mark.parametrize("config", [{"name": "zfp", "tolerance": 0.05}, {"name": "int8"}], ids=["zfp", "int8"])
def test_lossy_codecs_compress_real_activations(activations, position, config):
    h = activations[f"cnn{position}"]
    codec = build_codec(config).resolve(h)
    stored = sum(len(codec.encode(chunk)) for chunk in _chunks(h, 4))
    assert stored < h.nbytes, (codec, h.nbytes / stored)
