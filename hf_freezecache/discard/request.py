"""The cache a set of options asks for: its sidecars, fingerprint and augmentation, computed in one place for
training (both loops) and `build-cache`, so that a cache built by any of them is the one the others would build."""

from __future__ import annotations

from torch.utils.data import Dataset

from .._random import seeded
from ..augmentation import AUGMENTATIONS, FeatureAugmentation
from ..cache import CacheManifest, Sidecar, dataset_fingerprint, fingerprint_parts
from ..models import BlockAdapter
from .config import DiscardConfig


def requested_sidecars(config: DiscardConfig, adapter: BlockAdapter) -> list[Sidecar]:
    """The sidecars the options store with a training cache. Each checks the activations' layout itself when the
    cache is built (channel-flip needs feature maps, token replacement tokens) and names its flag when it does not
    fit."""
    return [sidecar.build(adapter) for sidecar in config.enabled_sidecars()]


def requested_augmentation(
    config: DiscardConfig, adapter: BlockAdapter, manifest: CacheManifest
) -> FeatureAugmentation | None:
    """The augmentation of batches read from the cache of `manifest` (with `augmentation="auto"`, chosen by the
    activations' layout), given what its sidecars store; None for `"none"`."""
    name = config.augmentation
    if name == "auto":
        name = "feature-maps" if len(manifest.sample_shape) == 3 else "tokens"
    if name == "none":
        return None
    options = config.augmentations.get(name)
    return options.build(adapter, manifest) if options is not None else AUGMENTATIONS.get(name)()


def requested_fingerprint(
    adapter: BlockAdapter,
    position: int,
    config: DiscardConfig,
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
        adapter, position, dataset_hash, config.cache.codec_config(), config.cache.chunk_size, extra
    )
