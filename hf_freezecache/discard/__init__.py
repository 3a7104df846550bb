"""The one discard mechanism: where to discard, reusing or building the cache (every process together), and switching
training from images to the cache. `FreezeCacheTrainer`, the `no_trainer` loop and `build-cache` all use it."""

from .config import DiscardConfig
from .data import DiscardableTrainDataset, FreezeCacheCollator
from .discarder import PrefixDiscarder
from .request import requested_augmentation, requested_fingerprint, requested_sidecars
from .reuse_or_build import CacheBuildSettings, estimate_cache_bytes, reuse_or_build_cache

__all__ = [
    "CacheBuildSettings",
    "DiscardConfig",
    "DiscardableTrainDataset",
    "FreezeCacheCollator",
    "PrefixDiscarder",
    "estimate_cache_bytes",
    "requested_augmentation",
    "requested_fingerprint",
    "requested_sidecars",
    "reuse_or_build_cache",
]
