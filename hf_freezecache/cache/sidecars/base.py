"""The interface of a cache sidecar."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

if TYPE_CHECKING:
    from ...models import BlockAdapter

#: Cache column (and reader item key) of sidecar array `name`: `sidecar.<name>`.
SIDECAR_COLUMN_PREFIX = "sidecar."

#: Runs the frozen prefix (eval mode, no gradients) on a batch of preprocessed images.
Prefix = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SidecarArray:
    """One per-sample array a sidecar stores.

    Args:
        shape (`tuple[int, ...]`): Shape of one sample's array.
        dtype (`str`): `"float32"` arrays are encoded with the cache's codec (same tolerance and chunking as the
            activations); `"int32"` arrays are stored exactly, as little-endian bytes.
    """

    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "int32"):
            raise ValueError(f"Sidecar arrays are float32 or int32, not {self.dtype!r}.")


class SidecarConfig(Protocol):
    """What a sidecar's config dataclass (registered with `@register_sidecar(name, config=...)`) offers the discard
    mechanism: whether the options switch it on, what it stores, and the sidecar itself."""

    #: The activation layout the sidecar serves, which is the name of the augmentation that uses it.
    layout: ClassVar[str]
    #: The flag of the option that switches it on, for messages.
    flag: ClassVar[str]

    @property
    def enabled(self) -> bool: ...

    @property
    def stored_fraction(self) -> float:
        """About what the sidecar stores, as a fraction of the cached activations (for disk estimates)."""

    def build(self, adapter: BlockAdapter) -> Sidecar: ...


class Sidecar(ABC):
    """Computes, while the cache is built, extra per-sample arrays that a feature augmentation needs later.

    The builder calls `calibrate` once (on a seeded random subset of the training images, when
    `calibration_size > 0`), then `arrays` to learn what will be stored, then `compute` on every batch.
    Subclasses register themselves with `@register_sidecar("name")` in `hf_freezecache.cache.sidecars`; their
    `__init__` takes JSON-serialisable keyword options only (`config()` returns them, and they enter the cache's
    fingerprint, so a cache built with other options is not reused).
    """

    name: ClassVar[str] = ""
    #: Whether `compute` needs an augmented view of each image (the training set's own random augmentation).
    needs_augmented_view: ClassVar[bool] = False
    #: Prefix passes per sample that `compute` runs on top of the cached one (for the cost report).
    extra_prefix_passes: ClassVar[int] = 0
    #: Prefix passes per calibration image that `calibrate` runs.
    calibration_passes: ClassVar[int] = 0
    #: Training images `calibrate` wants (0: no calibration).
    calibration_size: int = 0

    def calibrate(self, prefix: Prefix, images: Iterable[torch.Tensor]) -> None:
        """Looks at `calibration_size` training images (batches of preprocessed pixels) before the build."""

    @abstractmethod
    def arrays(self, sample_shape: tuple[int, ...]) -> dict[str, SidecarArray]:
        """The arrays stored per sample, by name, for activations of `sample_shape`; empty to store nothing."""

    @abstractmethod
    def compute(
        self,
        prefix: Prefix,
        pixels: torch.Tensor,
        activations: torch.Tensor,
        augmented_pixels: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """The arrays of one batch: `(B, *array.shape)` tensors keyed like `arrays()`.

        Args:
            prefix (`Prefix`): Runs the frozen prefix.
            pixels (`torch.Tensor`): The batch's preprocessed, unaugmented images.
            activations (`torch.Tensor`): `prefix(pixels)`, float32, before encoding.
            augmented_pixels (`torch.Tensor`, *optional*): The same samples through the training augmentation (only
                when `needs_augmented_view`).
        """

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """The options this sidecar was built with (JSON-serialisable; part of the cache fingerprint)."""

    def summary(self) -> dict[str, Any]:
        """What calibration found, for the manifest (e.g. selected channels and their scores)."""
        return {}
