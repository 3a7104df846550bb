import json

import pytest
import torch
import torch.nn.functional as F

from hf_freezecache.augmentation import (
    AUGMENTATIONS,
    FeatureMapAugmentation,
    NoAugmentation,
    TokenAugmentation,
    build_feature_augmentation,
)


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def _maps(batch=256, channels=3, size=8):
    # Strictly positive values: a zero in the output can only come from the crop's padding.
    return torch.rand(batch, channels, size, size, generator=_generator(123)) + 0.5


def _shift(sample, dy, dx, pad=1):
    """The reference crop: the window of the zero-padded sample at offset (pad + dy, pad + dx)."""
    height, width = sample.shape[-2:]
    padded = F.pad(sample, (pad, pad, pad, pad))
    return padded[..., pad + dy : pad + dy + height, pad + dx : pad + dx + width]


def test_flip_only_gives_each_sample_or_its_mirror_about_half_the_time():
    maps = _maps()
    out = FeatureMapAugmentation(crop_padding=0.0)(maps, generator=_generator())
    assert out.shape == maps.shape and out.dtype == maps.dtype and out.device == maps.device
    same = (out == maps).flatten(1).all(1)
    mirrored = (out == maps.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 0.3 < mirrored.float().mean().item() < 0.7


def test_crop_shifts_each_sample_by_at_most_the_padding_with_zeros_filling_in():
    maps = _maps()
    out = FeatureMapAugmentation(flip_probability=0.0, crop_padding=0.125)(maps, generator=_generator())
    assert out.shape == maps.shape
    offsets = []
    for sample, result in zip(maps, out, strict=True):
        matches = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if torch.equal(_shift(sample, dy, dx), result)]
        assert len(matches) == 1
        offsets.append(matches[0])
    assert len(set(offsets)) == 9  # every offset in [-1, 1]^2 is drawn from a batch of 256
    assert bool((out == 0).flatten(1).any(1).any())


def test_crop_padding_scales_with_the_map_and_zero_disables_it():
    maps = _maps(batch=64, size=16)  # 0.125 * 16 = 2 rows and columns of padding
    out = FeatureMapAugmentation(flip_probability=0.0, crop_padding=0.125)(maps, generator=_generator())
    for sample, result in zip(maps, out, strict=True):
        assert any(torch.equal(_shift(sample, dy, dx, pad=2), result) for dy in range(-2, 3) for dx in range(-2, 3))
    assert not torch.equal(out, maps)
    identity = FeatureMapAugmentation(flip_probability=0.0, crop_padding=0.0)
    assert torch.equal(identity(maps, generator=_generator()), maps)


def test_all_options_off_is_the_exact_identity():
    maps = _maps(batch=8)
    augmentation = FeatureMapAugmentation(flip_probability=0.0, crop_padding=0.0, noise_std=0.0, blur_sigma=0.0)
    assert torch.equal(augmentation(maps), maps)
    assert NoAugmentation()(maps) is maps


def test_noise_has_the_requested_standard_deviation():
    maps = torch.randn(64, 16, 16, 16)
    out = FeatureMapAugmentation(flip_probability=0.0, crop_padding=0.0, noise_std=0.3)(maps, generator=_generator())
    difference = out - maps
    assert difference.std().item() == pytest.approx(0.3, rel=0.1)
    assert abs(difference.mean().item()) < 0.01


def test_blur_keeps_a_constant_map_constant_and_smooths_a_random_one():
    blur = FeatureMapAugmentation(flip_probability=0.0, crop_padding=0.0, blur_sigma=1.0, blur_probability=1.0)
    constant = torch.full((4, 3, 8, 8), 2.5)
    # Reflect padding: the borders stay constant too, not only the interior.
    torch.testing.assert_close(blur(constant, generator=_generator()), constant)
    noise = torch.randn(16, 3, 16, 16)
    assert blur(noise, generator=_generator()).var().item() < 0.5 * noise.var().item()
    never = FeatureMapAugmentation(flip_probability=0.0, crop_padding=0.0, blur_sigma=1.0, blur_probability=0.0)
    assert torch.equal(never(noise, generator=_generator()), noise)


def test_blur_probability_blurs_a_subset_of_the_samples():
    noise = torch.randn(256, 2, 8, 8)
    half = FeatureMapAugmentation(flip_probability=0.0, crop_padding=0.0, blur_sigma=0.5, blur_probability=0.5)
    changed = (half(noise, generator=_generator()) != noise).flatten(1).any(1)
    assert 0.3 < changed.float().mean().item() < 0.7


def test_blur_too_wide_for_the_map_is_rejected():
    blur = FeatureMapAugmentation(flip_probability=0.0, crop_padding=0.0, blur_sigma=2.0, blur_probability=1.0)
    with pytest.raises(ValueError, match="blur_sigma=2.0.*4 x 4"):
        blur(torch.randn(2, 3, 4, 4))


def test_generator_seeds_make_batches_reproducible():
    maps = _maps(batch=32)
    augmentation = FeatureMapAugmentation(noise_std=0.1, blur_sigma=0.5)
    first = augmentation(maps, generator=_generator(1))
    assert torch.equal(first, augmentation(maps, generator=_generator(1)))
    assert not torch.equal(first, augmentation(maps, generator=_generator(2)))
    torch.manual_seed(7)
    global_first = augmentation(maps)
    torch.manual_seed(7)
    assert torch.equal(global_first, augmentation(maps))


def test_flipped_samples_take_the_stored_flipped_channels_and_the_others_stay_untouched():
    maps = _maps(batch=64, channels=4)
    stored = torch.full((64, 2, 8, 8), -1.0)
    augmentation = FeatureMapAugmentation(crop_padding=0.0, flipped_channels=[0, 2])
    out = augmentation(maps, sidecar={"flipped_channels": stored}, generator=_generator())
    flipped = (out[:, [1, 3]] == maps[:, [1, 3]].flip(-1)).flatten(1).all(1)
    assert bool(flipped.any()) and not bool(flipped.all())
    assert bool((out[flipped][:, [0, 2]] == -1).all())
    assert torch.equal(out[~flipped], maps[~flipped])
    with pytest.raises(ValueError, match=r"sidecar 'flipped_channels' of shape \(64, 2, 8, 8\), got none"):
        augmentation(maps, generator=_generator())


def test_feature_maps_reject_other_ranks_and_non_float_activations():
    with pytest.raises(ValueError, match=r"\(4, 5, 6\).*'tokens'"):
        FeatureMapAugmentation()(torch.randn(4, 5, 6))
    with pytest.raises(TypeError, match="torch.int64"):
        FeatureMapAugmentation()(torch.ones(2, 3, 8, 8, dtype=torch.long))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"crop_padding": 0.6}, r"crop_padding=0.6 .*\[0, 0.5\]"),
        ({"crop_padding": -0.1}, r"crop_padding=-0.1 "),
        ({"noise_std": -1.0}, r"noise_std=-1.0 .*>= 0"),
        ({"noise_std": float("nan")}, r"noise_std=nan"),
        ({"blur_sigma": -0.5}, r"blur_sigma=-0.5 .*>= 0"),
        ({"blur_probability": 1.5}, r"blur_probability=1.5 .*\[0, 1\]"),
        ({"flip_probability": 1.5}, r"flip_probability=1.5 .*\[0, 1\]"),
        ({"flipped_channels": []}, r"flipped_channels=\[\] must be a non-empty list"),
        ({"flipped_channels": [1, 1]}, r"lists a channel twice"),
    ],
)
def test_feature_map_options_are_validated(options, message):
    with pytest.raises(ValueError, match=message):
        FeatureMapAugmentation(**options)


def test_token_noise_has_the_requested_standard_deviation():
    tokens = torch.randn(64, 65, 192)
    out = TokenAugmentation(noise_std=0.2)(tokens, generator=_generator())
    assert out.shape == tokens.shape and out.dtype == tokens.dtype
    assert (out - tokens).std().item() == pytest.approx(0.2, rel=0.1)


@pytest.mark.parametrize(("num_special_tokens", "drop_rate"), [(1, 0.25), (2, 0.3), (0, 0.5)])
def test_token_dropout_keeps_special_tokens_and_the_order_of_the_rest(num_special_tokens, drop_rate):
    batch, num_tokens, dim = 16, num_special_tokens + 16, 4
    # Each token carries its position in feature 0, so the kept positions can be read back.
    tokens = torch.randn(batch, num_tokens, dim)
    tokens[:, :, 0] = torch.arange(num_tokens, dtype=torch.float32)
    augmentation = TokenAugmentation(drop_rate=drop_rate, num_special_tokens=num_special_tokens)
    out = augmentation(tokens, generator=_generator())
    assert out.shape == (batch, num_tokens - round(drop_rate * (num_tokens - num_special_tokens)), dim)
    assert torch.equal(out[:, :num_special_tokens], tokens[:, :num_special_tokens])
    positions = out[:, :, 0].long()
    assert bool((positions[:, 1:] > positions[:, :-1]).all())  # a subsequence, in the original order
    assert torch.equal(out, tokens.gather(1, positions[:, :, None].expand(-1, -1, dim)))
    assert len({tuple(row.tolist()) for row in positions}) > 1  # different tokens per sample


def test_tokens_with_nothing_enabled_are_the_identity():
    tokens = torch.randn(4, 17, 8)
    assert torch.equal(TokenAugmentation()(tokens, generator=_generator()), tokens)


def test_token_options_and_inputs_are_validated():
    with pytest.raises(ValueError, match=r"drop_rate=1.0 .*\[0, 1\)"):
        TokenAugmentation(drop_rate=1.0)
    with pytest.raises(ValueError, match=r"noise_std=-0.1 "):
        TokenAugmentation(noise_std=-0.1)
    with pytest.raises(ValueError, match=r"num_special_tokens=-1 "):
        TokenAugmentation(num_special_tokens=-1)
    with pytest.raises(ValueError, match=r"\(2, 3, 8, 8\).*'feature-maps'"):
        TokenAugmentation()(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="fewer than num_special_tokens=2"):
        TokenAugmentation(num_special_tokens=2)(torch.randn(2, 1, 8))


def test_registry_builds_by_name_and_round_trips_the_config():
    assert AUGMENTATIONS.names() == ["feature-maps", "none", "tokens"]
    with pytest.raises(ValueError, match="Unknown feature augmentation 'nope'.*feature-maps, none, tokens"):
        build_feature_augmentation("nope")
    built = build_feature_augmentation("feature-maps", flip_probability=0.0)
    assert isinstance(built, FeatureMapAugmentation) and built.flip_probability == 0
    for name, options in [("feature-maps", {"noise_std": 0.1, "blur_sigma": 1.0}), ("tokens", {"drop_rate": 0.1})]:
        augmentation = build_feature_augmentation(name, **options)
        config = json.loads(json.dumps(augmentation.config()))
        assert build_feature_augmentation(augmentation.name, **config).config() == augmentation.config()
    assert built.describe() == "feature-maps(flip 0, crop 0.125, noise 0)"
    assert (
        build_feature_augmentation("tokens", drop_rate=0.1).describe()
        == "tokens(noise 0, drop 0.1, replace 0.5, 1 special token)"
    )
    assert build_feature_augmentation("none").describe() == "none"
