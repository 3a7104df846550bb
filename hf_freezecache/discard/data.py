"""The training data source that a discard switches from images to an activation cache, and its collator."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers.data.data_collator import default_data_collator

from ..augmentation import FeatureAugmentation
from ..cache import CachedActivationDataset
from ..cache.sidecars import SIDECAR_COLUMN_PREFIX
from ..model import ACTIVATIONS_KEY


class DiscardableTrainDataset(Dataset):
    """The training dataset whose source switches from images to an activation cache at a discard.

    It keeps the length of the image dataset (samples, not chunks), so step counts, schedules and resumption stay
    valid. A training loop builds its dataloader once; the switch happens between epochs, before the dataloader's
    iterator for the next epoch is created (DataLoader workers that persist across epochs would keep the old source).

    Args:
        images (`Dataset`, *optional*): The training dataset of preprocessed (and augmented) images; None when
            training reads a given cache from the start (`cached`).
        cached (`CachedActivationDataset`, *optional*): A cache to read from the start.
    """

    def __init__(self, images: Dataset | None, cached: CachedActivationDataset | None = None) -> None:
        if images is None and cached is None:
            raise ValueError("DiscardableTrainDataset needs training images, a cache, or both.")
        self.images = images
        self.cached = cached

    @property
    def chunk_size(self) -> int | None:
        """Chunk size of the cache being read, or None while reading images (read by `ChunkShuffleSampler`)."""
        return self.cached.chunk_size if self.cached is not None else None

    def __len__(self) -> int:
        return len(self.images if self.images is not None else self.cached)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return (self.cached if self.cached is not None else self.images)[index]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        if self.cached is not None:
            return self.cached.__getitems__(indices)
        if hasattr(self.images, "__getitems__"):
            return self.images.__getitems__(indices)
        return [self.images[i] for i in indices]


class FreezeCacheCollator:
    """Collates image batches with the user's collator, and cached-activation batches itself, then augments them
    (handing the augmentation the batch's sidecar arrays; they do not reach the model). Evaluation batches are not
    augmented: turn `augment` off while evaluating (`FreezeCacheTrainer` does).

    Args:
        image_collator (`Callable`, *optional*): The collator of image batches (default: transformers'
            `default_data_collator`).
    """

    def __init__(self, image_collator: Callable[[list[Any]], dict[str, Any]] | None = None) -> None:
        self.image_collator = image_collator or default_data_collator
        self.augmentation: FeatureAugmentation | None = None
        self.augment = True

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if ACTIVATIONS_KEY not in features[0]:
            return self.image_collator(features)
        activations = torch.stack([f[ACTIVATIONS_KEY] for f in features])
        if self.augmentation is not None and self.augment:
            sidecar = {
                key.removeprefix(SIDECAR_COLUMN_PREFIX): torch.stack([f[key] for f in features])
                for key in features[0]
                if key.startswith(SIDECAR_COLUMN_PREFIX)
            }
            activations = self.augmentation(activations, sidecar or None)
        labels = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        return {ACTIVATIONS_KEY: activations, "labels": labels}
