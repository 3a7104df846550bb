"""The training data source that a discard switches from images to an activation cache, and its collator."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers.data.data_collator import default_data_collator

from ..augmentation import FeatureAugmentation
from ..cache import CachedActivationDataset, PackedBatch, PackedSample
from ..cache.reader import DATA
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
    """Collates the training batches, images or cached activations, and finishes cached batches on the device.

    Image batches go to the user's collator. Cached batches come in two forms, decoded by the same code:
    - packed (`CachedActivationDataset(decode_on_device=True)`, what training uses): the collator gathers the
      samples' `PackedSample`s into one `PackedBatch`, which the training loop moves to its device still compressed
      and hands to `finish`, which decodes it there and applies the feature augmentation;
    - decoded on the host (`decode_on_device=False`): the collator stacks the tensors and augments them at once.
    The augmentation gets the batch's sidecar arrays; they do not reach the model. Evaluation batches are not
    augmented: turn `augment` off while evaluating (`FreezeCacheTrainer` does).

    Args:
        image_collator (`Callable`, *optional*): The collator of image batches (default: transformers'
            `default_data_collator`).

    Attributes:
        augmentation (`FeatureAugmentation`, *optional*): Applied to cached training batches (set at a discard).
        augment (`bool`): Whether to apply it (off during evaluation).
        generator (`torch.Generator`, *optional*): The augmentation's random numbers, on the device it runs on
            (default: torch's global generator of that device).
    """

    def __init__(self, image_collator: Callable[[list[Any]], dict[str, Any]] | None = None) -> None:
        self.image_collator = image_collator or default_data_collator
        self.augmentation: FeatureAugmentation | None = None
        self.augment = True
        self.generator: torch.Generator | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if ACTIVATIONS_KEY not in features[0]:
            return self.image_collator(features)
        labels = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        first = features[0][ACTIVATIONS_KEY]
        if isinstance(first, PackedSample):
            samples = [f[ACTIVATIONS_KEY] for f in features]
            if any(s.batch is not first.batch for s in samples):
                raise ValueError("A batch of packed samples must come from one CachedActivationDataset.__getitems__.")
            return {ACTIVATIONS_KEY: first.batch.select([s.position for s in samples]), "labels": labels}
        activations = torch.stack([f[ACTIVATIONS_KEY] for f in features])
        sidecar = {
            key.removeprefix(SIDECAR_COLUMN_PREFIX): torch.stack([f[key] for f in features])
            for key in features[0]
            if key.startswith(SIDECAR_COLUMN_PREFIX)
        }
        return {ACTIVATIONS_KEY: self._augmented(activations, sidecar), "labels": labels}

    def finish(self, batch: dict[str, Any], device: torch.device | str | None = None) -> dict[str, Any]:
        """Decodes a packed batch on `device` (default: where it is) and augments it; other batches are returned as
        they are. Call it on every batch the collator made, after the move to the training device."""
        packed = batch.get(ACTIVATIONS_KEY)
        if not isinstance(packed, PackedBatch):
            return batch
        if device is not None:
            packed = packed.to(device, non_blocking=True)
        arrays = packed.decode()
        activations = arrays.pop(DATA)
        labels = batch["labels"].to(packed.device, non_blocking=True)
        return {**batch, ACTIVATIONS_KEY: self._augmented(activations, arrays), "labels": labels}

    def _augmented(self, activations: torch.Tensor, sidecar: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.augmentation is None or not self.augment:
            return activations
        return self.augmentation(activations, sidecar or None, generator=self.generator)
