"""The cache a set of options asks for: its sidecars and fingerprint, shared by training and `build-cache`, so a cache
built ahead of training is the one training would build (and is reused by it)."""

from __future__ import annotations

from torch.utils.data import Dataset

from .._random import seeded
from ..augmentation import FeatureAugmentation, build_feature_augmentation
from ..cache import CacheManifest, Sidecar, build_sidecar, dataset_fingerprint, fingerprint_parts
from ..config import FreezeCacheArguments
from ..models import BlockAdapter


def requested_sidecars(freeze_args: FreezeCacheArguments, adapter: BlockAdapter) -> list[Sidecar]:
    """The sidecars the options ask for. Each checks the activations' layout itself when the cache is built
    (channel-flip needs feature maps, token replacement tokens) and names the right flag when it does not fit."""
    sidecars = []
    if freeze_args.channel_aug_gamma > 0:
        options = {
            "gamma": freeze_args.channel_aug_gamma,
            "calibration_size": freeze_args.channel_aug_calibration_size,
        }
        sidecars.append(build_sidecar("channel-flip", **options))
    if freeze_args.token_aug_alpha > 0:
        options = {
            "alpha": freeze_args.token_aug_alpha,
            "matching": freeze_args.token_aug_matching,
            "num_special_tokens": adapter.num_special_tokens,
        }
        sidecars.append(build_sidecar("token-replacement", **options))
    return sidecars


def requested_augmentation(
    freeze_args: FreezeCacheArguments, adapter: BlockAdapter, manifest: CacheManifest
) -> FeatureAugmentation | None:
    """The augmentation of batches read from the cache described by `manifest` that the options ask for (with
    `--feature_augmentation auto`, by the activations' layout), given the channels its channel-flip sidecar stores."""
    name = freeze_args.feature_augmentation
    if name == "auto":
        name = "feature-maps" if len(manifest.sample_shape) == 3 else "tokens"
    if name == "none":
        return None
    options = freeze_args.augmentation_options(name)
    if name == "tokens":
        options["num_special_tokens"] = adapter.num_special_tokens
    if "channel-flip" in manifest.sidecars:
        options["flipped_channels"] = manifest.sidecars["channel-flip"]["summary"]["channels"]
    return build_feature_augmentation(name, **options)


def requested_fingerprint(
    adapter: BlockAdapter,
    position: int,
    freeze_args: FreezeCacheArguments,
    dataset_hash: str,
    sidecars: list[Sidecar],
    augmented_images: Dataset | None = None,
    seed: int = 0,
) -> dict[str, str]:
    """The fingerprint parts of the cache at `position` for these options and this dataset (`dataset_hash`, from
    `dataset_fingerprint` of the un-augmented images). `augmented_images` (the training images with their random
    augmentation) and `seed` matter only to sidecars that store views of them."""
    extra = {"sidecars": {s.name: s.config() for s in sidecars}} if sidecars else None
    if any(s.needs_augmented_view for s in sidecars):
        # The augmented view is the training transform under the build's seed: hash a few such views so a changed
        # image augmentation invalidates the cache (a transform that ignores the seeded generators rebuilds every
        # time, which is slow but never wrong).
        with seeded(seed):
            extra["augmented_view"] = dataset_fingerprint(augmented_images, probes=4)
    return fingerprint_parts(
        adapter, position, dataset_hash, freeze_args.codec_config(), freeze_args.cache_chunk_size, extra
    )
