"""Compression targets (`--cache_budget`, the `budget` codec) and what a build measures of its codec: the choice per
position, its recorded request and error, and the refusal to use a target as a codec."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from test_codecs import real_activations

from hf_freezecache.cache import ActivationCache, build_activation_cache, dataset_fingerprint, fingerprint_parts
from hf_freezecache.cache.codecs import build_codec, measure_codec_error
from hf_freezecache.cache.codecs.budget import CANDIDATES, BudgetCodec
from hf_freezecache.cache.config import CacheConfig
from hf_freezecache.cache.manifest import CorruptCacheError
from hf_freezecache.data import collate_image_batch, load_image_classification
from hf_freezecache.models import get_block_adapter, load_cifar_resnet


@pytest.fixture(scope="module")
def activations(resnet20_weights, cifar_batch) -> dict[str, np.ndarray]:
    return real_activations(resnet20_weights, cifar_batch)


@pytest.mark.parametrize("source", ["cnn6", "tokens"])
def test_the_budget_keeps_the_most_accurate_setting_that_meets_it(activations, source):
    h = activations[source]
    measured = [
        (build_codec(config).resolve(h), measure_codec_error(build_codec(config).resolve(h), h, 4))
        for config in CANDIDATES
    ]
    for ratio in (3.0, 10.0):
        chosen = BudgetCodec(ratio).resolve(h)
        meeting = [(codec, error) for codec, error in measured if error["ratio"] >= ratio]
        assert meeting, ratio
        best = min(error["rms_over_std"] for _, error in meeting)
        error = measure_codec_error(chosen, h, 4)
        assert error["ratio"] >= ratio and error["rms_over_std"] == best, (ratio, chosen)
    assert BudgetCodec(1.0).resolve(h) == build_codec({"name": "none"})


def test_an_unreachable_budget_takes_the_smallest_setting_and_warns(activations, caplog):
    h = activations["cnn6"]
    with caplog.at_level(logging.WARNING, logger="hf_freezecache.cache.codecs.budget"):
        chosen = BudgetCodec(1000.0).resolve(h)
    ratios = {repr(c): measure_codec_error(build_codec(c).resolve(h), h, 4)["ratio"] for c in CANDIDATES}
    assert measure_codec_error(chosen, h, 4)["ratio"] == max(ratios.values())
    assert "No codec setting reaches a 1000x smaller cache" in caplog.text


def test_a_budget_is_not_a_codec():
    codec = BudgetCodec(16)
    chunk = np.ones((2, 3, 4, 4), np.float32)
    for call in (
        lambda: codec.encode(chunk),
        lambda: codec.unpack(b"", chunk.shape),
        lambda: codec.decode(b"", (1, 2)),
    ):
        with pytest.raises(ValueError, match=r"budget\(ratio=16, chunk_size=4\) is a compression target, not a codec"):
            call()
    for ratio in (0.5, math.inf, math.nan, True, "16"):
        with pytest.raises(ValueError, match="ratio must be a number >= 1"):
            BudgetCodec(ratio)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1, got 0"):
        BudgetCodec(16, chunk_size=0)


def test_cache_config_budget_flags():
    assert CacheConfig(budget=16, chunk_size=8).codec_config() == {"name": "budget", "ratio": 16.0, "chunk_size": 8}
    assert CacheConfig(codec="int8", budget=4).codec_config()["name"] == "budget"  # the budget overrides the codec
    with pytest.raises(ValueError, match=r"--cache_budget must be a ratio >= 1 .* got 0.5"):
        CacheConfig(budget=0.5)
    with pytest.raises(ValueError, match="--cache_codec budget needs --cache_budget"):
        CacheConfig(codec="budget")


@pytest.fixture(scope="module")
def images():
    return load_image_classification(max_train_samples=96, augment=False).train_unaugmented


@pytest.mark.parametrize("request_config", [{"name": "budget", "ratio": 12.0}, {"name": "zfp", "tolerance": 0.05}])
def test_the_manifest_records_the_request_the_choice_and_its_error(resnet20_weights, images, tmp_path, request_config):
    adapter = get_block_adapter(load_cifar_resnet(resnet20_weights, num_classes=10).eval())
    parts = fingerprint_parts(adapter, 3, dataset_fingerprint(images), request_config, 4)
    manifest = build_activation_cache(
        adapter, 3, images, tmp_path / "cache", build_codec(request_config), 4, parts,
        collate_fn=collate_image_batch, batch_size=32, progress=False,
    )  # fmt: skip
    assert manifest.codec_request == build_codec(request_config).config()
    assert manifest.codec["name"] != "budget"
    error = manifest.codec_error
    assert error["samples"] == 96
    # The error recorded is the cache's: every sample was among the first 256 the build measured.
    cache = ActivationCache.load(tmp_path / "cache")
    pixels = collate_image_batch([images[i] for i in range(96)])["pixel_values"]
    with torch.no_grad():
        exact = adapter.prefix(pixels, 3).numpy()
    decoded = np.concatenate([cache.decode(row) for row in range(cache.manifest.num_chunks)])
    difference = decoded.astype(np.float64) - exact
    assert error["max_abs"] == pytest.approx(np.abs(difference).max(), rel=1e-6)
    assert error["rms"] == pytest.approx(np.sqrt(np.square(difference).mean()), rel=1e-6)
    assert error["rms_over_std"] == pytest.approx(error["rms"] / exact.std(), rel=1e-5)
    assert error["ratio"] == pytest.approx(manifest.compression_ratio, rel=1e-9)
    if request_config["name"] == "budget":
        assert manifest.compression_ratio >= 12.0


def test_manifest_codec_error_is_validated(resnet20_weights, images, tmp_path):
    adapter = get_block_adapter(load_cifar_resnet(resnet20_weights, num_classes=10).eval())
    config = {"name": "int8"}
    parts = fingerprint_parts(adapter, 3, dataset_fingerprint(images), config, 4)
    manifest = build_activation_cache(
        adapter, 3, images, tmp_path / "cache", build_codec(config), 4, parts,
        collate_fn=collate_image_batch, batch_size=32, progress=False,
    )  # fmt: skip
    data = manifest.to_dict()
    error = data["codec_error"]
    for bad in ({**error, "rms": -1.0}, {**error, "rms": math.nan}, {**error, "rms": "small"}, [1, 2], {"rms": 0.1}):
        with pytest.raises(CorruptCacheError, match="invalid codec_error"):
            type(manifest).from_dict({**data, "codec_error": bad})
    with pytest.raises(CorruptCacheError, match="invalid codec_request"):
        type(manifest).from_dict({**data, "codec_request": "int8"})
