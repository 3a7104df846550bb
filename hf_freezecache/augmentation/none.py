"""`none`: no feature-space augmentation, the baseline the paper shows to lose accuracy after discarding."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from . import register_augmentation
from .base import FeatureAugmentation


@register_augmentation("none")
class NoAugmentation(FeatureAugmentation):
    """Returns the activations unchanged (the same tensor, not a copy)."""

    name = "none"

    def __call__(
        self,
        activations: torch.Tensor,
        sidecar: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        return activations

    def config(self) -> dict[str, Any]:
        return {}
