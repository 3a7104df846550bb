"""The interface every feature-space augmentation implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch


class FeatureAugmentation(ABC):
    """Augments a training batch of activations decoded from the cache.

    Once the frozen prefix is discarded the images never reach the model again, so image augmentation is impossible
    and the training batches are augmented in feature space instead. Apply it to training batches only.

    Randomness: every random number is drawn from the `generator` passed to `__call__` when there is one (it must
    live on the activations' device), else from torch's global RNG, so a seeded generator makes a batch reproducible.

    Subclasses implement `__call__` and `config`, and register themselves with `@register_augmentation("name")` in
    `hf_freezecache.augmentation`; their `__init__` takes only JSON-serialisable keyword options so that
    `build_feature_augmentation(aug.name, **aug.config())` rebuilds them.
    """

    name: ClassVar[str] = ""

    @abstractmethod
    def __call__(
        self,
        activations: torch.Tensor,
        sidecar: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Returns an augmented copy of `activations`.

        Args:
            activations (`torch.Tensor`): A `(B, *sample_shape)` floating-point batch.
            sidecar (`Mapping[str, torch.Tensor]`, *optional*): Extra per-sample tensors stored next to the
                activations in the cache (e.g. activations of flipped inputs): `feature-maps` uses the channel-flip
                sidecar, `tokens` the token-replacement one.
            generator (`torch.Generator`, *optional*): Source of every random number, on the activations' device.

        Returns:
            `torch.Tensor`: Same shape, dtype and device as `activations` (token dropout shortens the token axis).
        """

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """The options this augmentation was built with, JSON-serialisable."""

    def describe(self) -> str:
        """One line for logs and the cost report."""
        options = ", ".join(f"{key}={value}" for key, value in self.config().items())
        return f"{self.name}({options})" if options else self.name


def check_range(
    name: str, value: float, low: float, high: float | None = None, *, high_inclusive: bool = True
) -> float:
    """Returns `value` as a float, or raises a `ValueError` naming it and the allowed range."""
    value = float(value)
    above_low = value >= low
    below_high = high is None or (value <= high if high_inclusive else value < high)
    # Written so that NaN fails both comparisons and is rejected.
    if not (above_low and below_high):
        if high is None:
            allowed = f">= {low:g}"
        else:
            allowed = f"in [{low:g}, {high:g}{']' if high_inclusive else ')'}"
        raise ValueError(f"{name}={value!r} is out of range: it must be {allowed}.")
    return value


def check_activations(activations: torch.Tensor, ndim: int, layout: str, alternative: str) -> None:
    """Raises a `ValueError` (wrong rank) or `TypeError` (not floating point) for a batch an augmentation can't use."""
    if activations.ndim != ndim:
        raise ValueError(
            f"This augmentation expects {layout} activations ({ndim}-D), got shape {tuple(activations.shape)}. "
            f"Use the {alternative!r} augmentation for this cache."
        )
    if not activations.is_floating_point():
        raise TypeError(f"Feature augmentation needs floating-point activations, got {activations.dtype}.")
