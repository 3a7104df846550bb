"""Augmentation that survives caching: SSIM, channel selection, channel-flip and token-replacement sidecars."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_TIMM_VIT, TINY_VIT, build_cache
from skimage.metrics import structural_similarity
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from transformers import DeiTConfig, DeiTForImageClassification, ViTConfig, ViTForImageClassification

from hf_freezecache import FreezeCacheArguments
from hf_freezecache.augmentation import FeatureMapAugmentation, TokenAugmentation
from hf_freezecache.cache import (
    ActivationCache,
    CachedActivationDataset,
    CacheMismatchError,
    build_codec,
    build_sidecar,
    dataset_fingerprint,
    fingerprint_parts,
)
from hf_freezecache.cache.sidecars import (
    FLIPPED_CHANNELS,
    REPLACEMENT_POSITIONS,
    REPLACEMENT_TOKENS,
    ChannelFlipSidecar,
    TokenReplacementSidecar,
    channel_ssim,
)
from hf_freezecache.data import collate_image_batch, load_image_classification
from hf_freezecache.discard import FreezeCacheCollator
from hf_freezecache.models import get_block_adapter, load_cifar_resnet

SAMPLES = 48


@pytest.fixture(scope="module")
def data():
    return load_image_classification(max_train_samples=SAMPLES, max_eval_samples=16, augment=True)


@pytest.fixture(scope="module")
def pretrained(resnet20_weights):
    return get_block_adapter(load_cifar_resnet(str(resnet20_weights), num_classes=10).eval())


def _prefix(adapter, position):
    def run(pixels):
        with torch.no_grad():
            return adapter.prefix(pixels, position)

    return run


def _build(adapter, position, data, folder, sidecars=(), codec="none", chunk_size=4, seed=0):
    config = {"name": codec} if codec != "zfp" else {"name": "zfp", "tolerance": 0.05, "relative": True}
    return build_cache(
        adapter, position, data.train_unaugmented, folder, config, chunk_size=chunk_size, sidecars=sidecars,
        augmented=data.train, batch_size=20, seed=seed,
    )  # fmt: skip


# SSIM


@pytest.mark.parametrize("position", [3, 6, 8])
def test_channel_ssim_agrees_with_scikit_image_on_real_feature_maps(pretrained, cifar_batch, position):
    pixels = cifar_batch["pixel_values"][:6]
    prefix = _prefix(pretrained, position)
    mirrored, of_mirror = prefix(pixels).flip(-1), prefix(pixels.flip(-1))
    both = torch.cat([mirrored, of_mirror]).transpose(0, 1).flatten(1)
    data_range = (both.amax(1) - both.amin(1)).double()
    ours = channel_ssim(mirrored, of_mirror, data_range)
    for n in range(len(pixels)):
        for c in range(mirrored.shape[1]):
            if data_range[c] == 0:
                assert ours[n, c] == 1  # a dead channel: constant in both views
                continue
            reference = structural_similarity(
                mirrored[n, c].double().numpy(), of_mirror[n, c].double().numpy(), data_range=float(data_range[c])
            )
            assert abs(float(ours[n, c]) - reference) < 1e-4, (n, c)


def test_channel_ssim_uses_a_smaller_odd_window_on_small_maps_like_scikit_image():
    a, b = torch.rand(2, 3, 5, 6), torch.rand(2, 3, 5, 6)
    ours = channel_ssim(a, b, torch.ones(3))
    reference = structural_similarity(a[1, 2].double().numpy(), b[1, 2].double().numpy(), data_range=1.0, win_size=5)
    assert abs(float(ours[1, 2]) - reference) < 1e-6
    with pytest.raises(ValueError, match="at least 3 x 3"):
        channel_ssim(torch.rand(1, 1, 2, 8), torch.rand(1, 1, 2, 8), torch.ones(1))


def test_calibration_scores_do_not_depend_on_a_channels_scale(cifar_batch):
    # Each channel's SSIM data range is its own, so scaling a channel leaves its score unchanged; with one fixed
    # range for all channels (the paper's code: 1.0) the small-valued copy scores differently (the SSIM constants
    # swamp it) and the ranking would follow the scales. A constant channel scores 1.
    def prefix(pixels):
        cumulative = pixels.mean(1, keepdim=True).cumsum(-1)
        return torch.cat([cumulative / 1000, cumulative, torch.zeros_like(cumulative)], dim=1)

    sidecar = ChannelFlipSidecar(gamma=0.3, calibration_size=16)
    sidecar.calibrate(prefix, [cifar_batch["pixel_values"]])
    assert sidecar.scores[0] == pytest.approx(sidecar.scores[1], abs=1e-6)  # float32 maps
    assert sidecar.scores[0] < 0.9 and sidecar.scores[2] == 1.0
    pixels = cifar_batch["pixel_values"]
    fixed_range = channel_ssim(prefix(pixels).flip(-1), prefix(pixels.flip(-1)), torch.ones(3)).mean(0)
    assert abs(float(fixed_range[0] - fixed_range[1])) > 1e-3


# Channel selection


def _half_equivariant_prefix(pixels):
    # Channels 0-1: the image itself (a flip of the input flips the output exactly, SSIM 1). Channels 2-3: a running
    # sum along W, which a flip does not commute with. Channel 4: a symmetric blur, equivariant again.
    gray = pixels.mean(1, keepdim=True)
    cumulative = gray.cumsum(-1)
    blurred = torch.nn.functional.avg_pool2d(gray, 3, stride=1, padding=1)
    return torch.cat([gray, 2 * gray, cumulative, -cumulative, blurred], dim=1)


def test_channel_flip_selects_the_channels_a_flip_does_not_commute_with(cifar_batch):
    sidecar = ChannelFlipSidecar(gamma=0.4, calibration_size=16)
    sidecar.calibrate(_half_equivariant_prefix, [cifar_batch["pixel_values"][:8], cifar_batch["pixel_values"][8:]])
    assert sidecar.channels == [2, 3]
    assert all(sidecar.scores[c] == pytest.approx(1.0, abs=1e-12) for c in (0, 1, 4))
    assert max(sidecar.scores[2], sidecar.scores[3]) < 0.9
    assert sidecar.summary()["selected_ssim"] == [sidecar.scores[2], sidecar.scores[3]]
    one = ChannelFlipSidecar(gamma=0.01, calibration_size=16)
    one.calibrate(_half_equivariant_prefix, [cifar_batch["pixel_values"]])
    assert len(one.channels) == 1 and one.channels[0] in (2, 3)  # gamma > 0 stores at least one channel


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"gamma": 0.0}, r"gamma=0.0 must be in \(0, 1\]"),
        ({"gamma": 1.5}, r"gamma=1.5"),
        ({"gamma": 0.1, "calibration_size": 0}, r"calibration_size=0"),
    ],
)
def test_channel_flip_options_are_validated(options, message):
    with pytest.raises(ValueError, match=message):
        ChannelFlipSidecar(**options)


def test_channel_flip_refuses_token_activations():
    sidecar = ChannelFlipSidecar(gamma=0.5, calibration_size=4)
    with pytest.raises(ValueError, match=r"needs \(C, H, W\) feature maps.*--token_aug_alpha"):
        sidecar.calibrate(lambda x: x.flatten(2).transpose(1, 2), [torch.rand(2, 3, 8, 8)])


# The channel-flip cache, end to end


def test_a_flipped_cached_sample_is_the_activation_of_the_flipped_image_on_the_selected_channels(
    pretrained, data, tmp_path
):
    sidecar = ChannelFlipSidecar(gamma=0.25, calibration_size=32)
    cache, _ = _build(pretrained, 3, data, tmp_path / "c", [sidecar])
    channels = cache.manifest.sidecars["channel-flip"]["summary"]["channels"]
    assert channels == sidecar.channels and len(channels) == 4  # round(0.25 * 16)
    dataset = CachedActivationDataset(cache)
    collator = FreezeCacheCollator()
    collator.augmentation = FeatureMapAugmentation(flip_probability=1.0, crop_padding=0.0, flipped_channels=channels)
    indices = list(range(5, 17))
    batch = collator(dataset.__getitems__(indices))
    assert set(batch) == {"prefix_activations", "labels"}  # the sidecar does not reach the model
    pixels = collate_image_batch([data.train_unaugmented[i] for i in indices])["pixel_values"]
    prefix = _prefix(pretrained, 3)
    of_flipped, flipped_map = prefix(pixels.flip(-1)), prefix(pixels).flip(-1)
    others = [c for c in range(16) if c not in channels]
    assert torch.equal(batch["prefix_activations"][:, channels], of_flipped[:, channels])
    assert torch.equal(batch["prefix_activations"][:, others], flipped_map[:, others])
    assert not torch.equal(of_flipped[:, channels], flipped_map[:, channels])


def test_sidecars_survive_save_load_and_another_gamma_is_not_reused(pretrained, data, tmp_path):
    cache, parts = _build(pretrained, 3, data, tmp_path / "c", [ChannelFlipSidecar(0.25, 16)], codec="zfp")
    reloaded = ActivationCache.load(tmp_path / "c", expected_fingerprint=parts)
    manifest = reloaded.manifest
    spec = manifest.sidecar_arrays[FLIPPED_CHANNELS]
    assert spec["shape"] == [4, 32, 32] and spec["dtype"] == "float32"
    assert 0.15 < manifest.sidecar_fraction < 0.4  # 4 of 16 channels, same codec
    assert "flip-sensitive channels" in (tmp_path / "c" / "README.md").read_text()
    codec = build_codec(manifest.codec)
    pixels = collate_image_batch([data.train_unaugmented[i] for i in range(4)])["pixel_values"]
    truth = _prefix(pretrained, 3)(pixels.flip(-1))[:, manifest.sidecars["channel-flip"]["summary"]["channels"]]
    stored = reloaded.decode_sidecars(0)[FLIPPED_CHANNELS]
    assert np.abs(stored - truth.numpy()).max() <= codec.max_abs_error(truth.numpy()) * (1 + 1e-6)
    other = fingerprint_parts(
        pretrained,
        3,
        dataset_fingerprint(data.train_unaugmented),
        {"name": "zfp", "tolerance": 0.05, "relative": True},
        4,
        {"sidecars": {"channel-flip": ChannelFlipSidecar(0.1, 16).config()}},
    )
    with pytest.raises(CacheMismatchError, match="sidecar configuration"):
        ActivationCache.load(tmp_path / "c", expected_fingerprint=other)
    plain = {k: v for k, v in parts.items() if k != "extra"}
    with pytest.raises(CacheMismatchError, match="sidecar configuration"):
        ActivationCache.load(tmp_path / "c", expected_fingerprint=plain)


def test_gamma_and_alpha_zero_are_plain_discard(pretrained, data, tmp_path):
    from hf_freezecache.discard import requested_augmentation, requested_fingerprint, requested_sidecars

    def options(**flags):
        return FreezeCacheArguments(discard=True, cache_codec="zfp", **flags).discard_config()

    def fingerprint(config):
        sidecars = requested_sidecars(config, pretrained)
        return requested_fingerprint(pretrained, 3, config, "dataset", sidecars, data.train, 0)

    plain, zero = options(), options(channel_aug_gamma=0.0, token_aug_alpha=0.0)
    assert requested_sidecars(zero, pretrained) == []
    # Same fingerprint, so the same cache is reused; same augmentation, so the same batches.
    assert fingerprint(zero) == fingerprint(plain)
    cache, _ = _build(pretrained, 3, data, tmp_path / "plain", codec="zfp")
    augmentations = [requested_augmentation(c, pretrained, cache.manifest) for c in (zero, plain)]
    assert augmentations[0].config() == augmentations[1].config()
    # A sidecar is added next to the activations and leaves them bit-identical.
    with_sidecar, _ = _build(pretrained, 3, data, tmp_path / "side", [ChannelFlipSidecar(0.25, 16)], codec="zfp")
    assert with_sidecar.manifest.stored_bytes == cache.manifest.stored_bytes
    assert all(np.array_equal(with_sidecar.decode(c), cache.decode(c)) for c in range(cache.num_chunks))
    assert cache.decode_sidecars(0) == {}


def test_a_sidecar_that_does_not_fit_the_layout_is_refused_before_anything_is_written(pretrained, data, tmp_path):
    sidecar = TokenReplacementSidecar(alpha=0.25)
    with pytest.raises(ValueError, match=r"needs \(T, D\) token activations.*--channel_aug_gamma"):
        _build(pretrained, 3, data, tmp_path / "c", [sidecar])
    assert list(tmp_path.iterdir()) == []


def test_the_trainer_trains_with_channel_flip_and_counts_the_sidecar_cost(tmp_path):
    from test_discard import SAMPLES as TRAIN_SAMPLES
    from test_discard import _trainer

    data = load_image_classification(max_train_samples=TRAIN_SAMPLES, max_eval_samples=64, augment=True)
    options = dict(discard=True, feature_augmentation="auto", channel_aug_gamma=0.25, channel_aug_calibration_size=32)
    trainer = _trainer(data, tmp_path, **options)
    trainer.train()
    manifest = trainer.discarder.cache.manifest
    channels = manifest.sidecars["channel-flip"]["summary"]["channels"]
    assert len(channels) == 4 and trainer.data_collator.augmentation.flipped_channels == channels
    state = trainer.freeze_callback.report.states[1]
    assert state.cache["sidecar_bytes"] == manifest.sidecar_bytes > 0
    # The build ran the prefix on the images and on their mirrors, and 4 passes per calibration image.
    passes = 2 + 4 * 32 / TRAIN_SAMPLES
    assert manifest.build_prefix_passes == pytest.approx(passes)
    assert state.one_off_flops == pytest.approx(manifest.prefix_forward_flops_per_sample * TRAIN_SAMPLES * passes)


def test_sidecar_options_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="--channel_aug_gamma augments cached activations: it needs --discard true"):
        FreezeCacheArguments(channel_aug_gamma=0.1)
    with pytest.raises(ValueError, match=r"--token_aug_alpha must be in \[0, 1\], got 1.5"):
        FreezeCacheArguments(discard=True, token_aug_alpha=1.5)
    with pytest.raises(ValueError, match="--feature_augmentation is 'none'"):
        FreezeCacheArguments(discard=True, channel_aug_gamma=0.1, feature_augmentation="none")
    with pytest.raises(ValueError, match="--token_aug_matching must be 'max' or 'min'"):
        FreezeCacheArguments(discard=True, token_aug_alpha=0.1, token_aug_matching="mean")
    with pytest.raises(ValueError, match="needs --feature_flip_probability > 0"):
        FreezeCacheArguments(discard=True, channel_aug_gamma=0.1, feature_flip_probability=0.0)


# Token replacement


def test_token_matching_is_by_content_and_keeps_the_least_similar_pairs():
    torch.manual_seed(0)
    special, patches, dim = 2, 10, 16
    original = torch.randn(1, special + patches, dim)
    permutation = torch.randperm(patches)
    augmented = original.clone()
    augmented[:, special:] = original[:, special:][:, permutation]  # the same content, moved
    changed = [3, 7]  # two patches whose content the augmentation changed (indices into the original's patches)
    where = [int((permutation == i).nonzero()) for i in changed]
    augmented[0, [special + w for w in where]] = torch.randn(2, dim)
    tokens, positions = TokenReplacementSidecar(alpha=0.2, num_special_tokens=special).select(original, augmented)
    assert sorted(positions[0].tolist()) == [special + i for i in changed]
    matched = (
        torch.nn.functional.normalize(original[0, positions[0].long()], dim=-1)
        @ torch.nn.functional.normalize(augmented[0, special:], dim=-1).T
    )
    for k in range(2):  # each stored token is the augmented token of highest similarity to the original one
        assert torch.equal(tokens[0, k], augmented[0, special + int(matched[k].argmax())])
    # Algorithm 1's literal reading: the least similar partner of each token, then the lowest of those.
    _, low = TokenReplacementSidecar(alpha=0.2, matching="min", num_special_tokens=special).select(original, augmented)
    assert low.shape == (1, 2) and bool((low >= special).all())


def test_token_replacement_puts_the_stored_tokens_at_the_stored_positions_only():
    tokens = torch.randn(6, 9, 4)
    stored = torch.randn(6, 2, 4)
    positions = torch.tensor([[1, 5]] * 3 + [[8, 2]] * 3)
    always = TokenAugmentation(num_special_tokens=1, replace_probability=1.0)
    out = always(tokens, {REPLACEMENT_TOKENS: stored, REPLACEMENT_POSITIONS: positions})
    for b in range(6):
        kept = [t for t in range(9) if t not in positions[b].tolist()]
        assert torch.equal(out[b, positions[b]], stored[b])
        assert torch.equal(out[b, kept], tokens[b, kept])
    half = TokenAugmentation(num_special_tokens=1, replace_probability=0.5)
    generator = torch.Generator().manual_seed(0)
    mixed = half(
        tokens.repeat(20, 1, 1),
        {REPLACEMENT_TOKENS: stored.repeat(20, 1, 1), REPLACEMENT_POSITIONS: positions.repeat(20, 1)},
        generator,
    )
    replaced = ~(mixed == tokens.repeat(20, 1, 1)).flatten(1).all(1)
    assert 30 < int(replaced.sum()) < 90
    with pytest.raises(ValueError, match=r"must be patch tokens, in \[1, 9\)"):
        always(tokens, {REPLACEMENT_TOKENS: stored, REPLACEMENT_POSITIONS: torch.zeros(6, 2, dtype=torch.long)})
    state = torch.get_rng_state()
    assert torch.equal(always(tokens), tokens)  # no sidecar: nothing replaced, and no random number drawn
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize(
    ("build", "special"),
    [
        (lambda: ViTForImageClassification(ViTConfig(**TINY_VIT, num_labels=10)), 1),
        (lambda: DeiTForImageClassification(DeiTConfig(**TINY_VIT, num_labels=10)), 2),
        (lambda: VisionTransformer(**TINY_TIMM_VIT), 1),
        (lambda: VisionTransformerDistilled(**TINY_TIMM_VIT), 2),
    ],
    ids=["hf-vit", "hf-deit", "timm-vit", "timm-deit-distilled"],
)
def test_token_replacement_cache_for_transformers_and_timm_vits(build, special, data, tmp_path):
    torch.manual_seed(0)
    adapter = get_block_adapter(build().eval())
    assert adapter.num_special_tokens == special
    sidecar = build_sidecar("token-replacement", alpha=0.25, num_special_tokens=special)
    cache, parts = _build(adapter, 2, data, tmp_path / "c", [sidecar], seed=5)
    arrays = cache.manifest.sidecar_arrays
    assert arrays[REPLACEMENT_TOKENS]["shape"] == [4, 32] and arrays[REPLACEMENT_POSITIONS]["shape"] == [4]
    item = CachedActivationDataset(cache)[13]
    positions = item["sidecar." + REPLACEMENT_POSITIONS]
    assert positions.dtype == torch.int64 and bool((positions >= special).all()) and len(set(positions.tolist())) == 4
    # The stored tokens are those of the training augmentation's view under the build seed: rebuilding reproduces
    # them, and another seed draws other views.
    again, _ = _build(adapter, 2, data, tmp_path / "again", [sidecar], seed=5)
    assert again.manifest.shards == cache.manifest.shards
    other, _ = _build(adapter, 2, data, tmp_path / "other", [sidecar], seed=6)
    assert other.manifest.shards != cache.manifest.shards
    assert all(np.array_equal(other.decode(c), cache.decode(c)) for c in range(cache.num_chunks))
