"""`PrefixDiscarder`: when to discard, getting the cache, and switching training from images to the cache."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch.utils.data import Dataset

from ..cache import ActivationCache, CachedActivationDataset, check_cache_fits_model, check_destination
from ..model import FreezeCacheModel
from .config import DiscardConfig
from .data import DiscardableTrainDataset, FreezeCacheCollator
from .request import requested_augmentation
from .reuse_or_build import CacheBuildSettings, estimate_cache_bytes, reuse_or_build_cache

logger = logging.getLogger(__name__)


class PrefixDiscarder:
    """The one discard mechanism, shared by `FreezeCacheTrainer` and the `no_trainer` loop.

    Discards happen at epoch boundaries: a prefix frozen mid-epoch keeps running (under `no_grad`) until the epoch
    ends, then its cache is obtained (`reuse_or_build_cache`) and the next epoch reads it. Each cache is built from
    images through the whole frozen prefix, never from a previous cache, so its error stays within the codec's bound
    of the true activations instead of compounding across discards.

    With `pinned_cache` (a downloaded cache: no images and no prefix weights), training reads that cache from the
    first step: its position is the only discard, and the discarded blocks' weights are never used.

    Args:
        model (`FreezeCacheModel`): The model being trained.
        config (`DiscardConfig`): Positions, cache folder, cache options, augmentation.
        train_dataset (`DiscardableTrainDataset`): The dataset the training dataloader reads.
        collator (`FreezeCacheCollator`): The training dataloader's collator.
        cache_images (`Dataset`, *optional*): The training images preprocessed *without* random augmentation, in the
            same order as `train_dataset`: what the prefix runs over. None with `pinned_cache`.
        cache_root (`str`): Folder of the caches (one `position-NN` subfolder each) when `config.cache_dir` is None.
        pinned_cache (`ActivationCache`, *optional*): The cache to train from, instead of building caches.
    """

    def __init__(
        self,
        model: FreezeCacheModel,
        config: DiscardConfig,
        train_dataset: DiscardableTrainDataset,
        collator: FreezeCacheCollator,
        cache_images: Dataset | None,
        cache_root: str,
        pinned_cache: ActivationCache | None = None,
    ) -> None:
        if pinned_cache is not None:
            check_cache_fits_model(pinned_cache, model.adapter)
        elif cache_images is None:
            raise ValueError("Discarding needs the un-augmented training images to build caches from.")
        elif len(cache_images) != len(train_dataset):
            raise ValueError(
                f"The cache images are {len(cache_images)} samples but the training dataset has {len(train_dataset)}: "
                "they must be the same samples in the same order, without random augmentation."
            )
        positions = config.parsed_positions()
        if positions and positions[-1] >= model.num_blocks:
            raise ValueError(
                f"--discard_positions {config.positions!r}: position {positions[-1]} leaves no block to train; this "
                f"model has {model.num_blocks} blocks, so positions go from 1 to {model.num_blocks - 1}."
            )
        self.model = model
        self.config = config
        self.train_dataset = train_dataset
        self.collator = collator
        self.cache_images = cache_images
        self.cache_root = config.cache_dir or cache_root
        self.pinned_cache = pinned_cache
        self.cache: ActivationCache | None = None
        self._positions = positions

    @property
    def position(self) -> int:
        """Blocks discarded so far (0: none)."""
        return self.model.discarded_position

    def target_position(self, frozen_prefix: int) -> int | None:
        """The position to discard at now, given the frozen prefix, or None to keep training as is: the deepest
        allowed position the frozen prefix has reached, leaving one block at least to train."""
        if self.pinned_cache is not None:
            return None  # without images there is nothing to build a deeper cache from
        reachable = min(frozen_prefix, self.model.num_blocks - 1)
        if self._positions is not None:
            reachable = max([p for p in self._positions if p <= reachable], default=0)
        return reachable if reachable > self.position else None

    def cache_folder(self, position: int) -> str:
        return os.path.join(self.cache_root, f"position-{position:02d}")

    def check_destination(self, probe: torch.Tensor | None) -> None:
        """Before any training work: the cache folder is writable and the disk can hold the caches to come.

        The size is estimated by encoding the probe images' activations at the candidate positions: the listed
        `--discard_positions` (all kept, so their sum), or else the largest single position (each build checks
        again).
        """
        if self.pinned_cache is not None:
            return
        positions = self._positions or list(range(1, self.model.num_blocks))
        estimates = [0]
        if probe is not None:
            count = len(self.cache_images)
            estimates = [estimate_cache_bytes(self.model, p, self.config, probe, count) for p in positions]
        needed = sum(estimates) if self._positions else max(estimates)
        # Each shard is written once, so a build needs the cache's size and no more.
        config = self.config
        check_destination(self.cache_folder(positions[0]), needed, config.storage_options(), config.cache_local_dir)

    def discard(
        self,
        position: int,
        settings: CacheBuildSettings | None,
        probe: torch.Tensor | None = None,
        offload_to: torch.device | str | None = None,
    ) -> dict[str, Any]:
        """Gets the cache for `position`, makes the model and the training data read it from the next batch on, and
        returns the cache's summary (for the cost report). `settings` may be None with a pinned cache.

        `offload_to` moves the discarded prefix off the training device (None keeps it there: under DDP, which
        broadcasts every buffer, and `nn.DataParallel`, which replicates every tensor).
        """
        if self.pinned_cache is not None:
            cache, reused = self.pinned_cache, True
        else:
            # A prefix discarded earlier may wait offloaded: the new cache is built from images through all of it.
            with self.model.restored():
                cache, reused = reuse_or_build_cache(
                    self.model,
                    position,
                    self.cache_folder(position),
                    self.config,
                    self.cache_images,
                    settings,
                    augmented_images=self.train_dataset.images,
                    collate_fn=self.collator.image_collator,
                    probe=probe,
                )
        self.cache = cache
        reading = CachedActivationDataset(
            cache,
            decode_threads=self.config.cache.decode_threads,
            memory=self.config.cache.memory,
            device=self.model.training_device,
            decode_on_device=True,
            progress=settings.progress if settings is not None else True,
        )
        self.train_dataset.cached = reading
        self.collator.augmentation = requested_augmentation(self.config, self.model.adapter, cache.manifest)
        self.model.discard(position, offload_to=offload_to)
        m = cache.manifest
        memory = reading.memory_summary()
        logger.info(
            "Discarded blocks 0-%d: training reads %s (%s, %.2fx, %s) from %s memory (%.1f MB held on %s).",
            position - 1,
            cache.folder,
            m.codec["name"],
            m.compression_ratio,
            "reused" if reused else f"built in {m.build_seconds:.1f} s",
            memory["memory"],
            memory["held_bytes"] / 2**20,
            memory["held_on"],
        )
        return {
            "position": position,
            "folder": cache.folder,
            "codec": repr(cache.codec),
            "chunk_size": m.chunk_size,
            "raw_bytes": m.raw_bytes,
            "stored_bytes": m.stored_bytes,
            "compression_ratio": m.compression_ratio,
            "build_seconds": m.build_seconds,
            "prefix_forward_flops_per_sample": m.prefix_forward_flops_per_sample,
            "build_prefix_passes": m.build_prefix_passes,
            "num_samples": m.num_samples,
            "reused": reused,
            "sidecar_bytes": m.sidecar_bytes,
            "sidecars": {name: sidecar["config"] for name, sidecar in m.sidecars.items()},
            **memory,
        }
