"""Feature-space augmentation of training batches decoded from the activation cache, behind the `AUGMENTATIONS`
registry: `feature-maps` for CNN maps, `tokens` for transformer tokens, `none`."""

from __future__ import annotations

from .._registry import Registry
from .base import FeatureAugmentation

AUGMENTATIONS: Registry[FeatureAugmentation] = Registry("feature augmentation")
register_augmentation = AUGMENTATIONS.register

from .feature_maps import FeatureMapAugmentation, FeatureMapAugmentationConfig  # noqa: E402
from .none import NoAugmentation  # noqa: E402
from .tokens import TokenAugmentation, TokenAugmentationConfig  # noqa: E402


def build_feature_augmentation(name: str, **options: object) -> FeatureAugmentation:
    """Instantiates the augmentation registered as `name` with `options`; unknown names raise a `ValueError`."""
    return AUGMENTATIONS.get(name)(**options)


__all__ = [
    "AUGMENTATIONS",
    "FeatureAugmentation",
    "FeatureMapAugmentation",
    "FeatureMapAugmentationConfig",
    "NoAugmentation",
    "TokenAugmentation",
    "TokenAugmentationConfig",
    "build_feature_augmentation",
    "register_augmentation",
]
