"""Trainer-side discarding: when to discard, getting the cache, and switching training from images to the cache."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from torch.utils.data import Dataset
from transformers import TrainingArguments
from transformers.data.data_collator import default_data_collator

from ..augmentation import FeatureAugmentation
from ..cache import (
    ActivationCache,
    CachedActivationDataset,
    CacheMismatchError,
    Sidecar,
    build_activation_cache,
    build_codec,
    check_cache_fits_model,
    check_destination,
    dataset_fingerprint,
    prefix_in_eval,
)
from ..cache.sidecars import SIDECAR_COLUMN_PREFIX
from ..config import FreezeCacheArguments
from ..freezing import ACTIVATIONS_KEY, DiscardedPrefix
from ..models import BlockAdapter
from .cache_request import requested_augmentation, requested_fingerprint, requested_sidecars

logger = logging.getLogger(__name__)


class DiscardableTrainDataset(Dataset):
    """The training dataset whose source switches from images to an activation cache at a discard.

    It keeps the length of the image dataset (samples, not chunks), so the Trainer's step counts, schedules and
    resumption stay valid. The Trainer builds its dataloader once; the switch happens between epochs, before the
    dataloader's iterator for the next epoch is created.

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
    augmented: `FreezeCacheTrainer` turns `augment` off while it evaluates.

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


class DiscardController:
    """Decides when to discard, gets the cache (reused when its fingerprint matches, built otherwise) and switches.

    Discards happen at epoch boundaries: a prefix frozen mid-epoch keeps running (under `no_grad`) until the epoch
    ends, then the cache is built and the next epoch reads it. Each cache is built from images through the whole
    frozen prefix, never from a previous cache, so its error stays within the codec's bound of the true
    activations instead of compounding across discards; the cost report counts the full prefix pass.

    Under distributed training (`world_size > 1`) every process runs the prefix over its share of the training set
    and writes its own shards (`build_activation_cache` with `processes`); all then read the whole cache, each
    decoding only its sampler's batches. The discarded prefix then stays on the training device: DDP broadcasts the
    model's buffers from the main process before every forward, and a prefix moved to the CPU would break that
    broadcast on GPUs.

    With `pinned_cache` (a downloaded cache, no images and no prefix weights), training reads that cache from the
    first step: its position is the only discard, and the discarded blocks' weights are never used.

    Args:
        model (`nn.Module`): The model the Trainer trains.
        adapter (`BlockAdapter`): Its block view.
        freeze_args (`FreezeCacheArguments`): Options (`discard_positions`, `cache_*`, `feature_*`).
        train_dataset (`DiscardableTrainDataset`): The dataset the Trainer's dataloader reads.
        collator (`FreezeCacheCollator`): The Trainer's data collator.
        cache_dataset (`Dataset`, *optional*): The training images preprocessed *without* random augmentation, in
            the same order as `train_dataset`: what the prefix runs over. None with `pinned_cache`.
        pinned_cache (`ActivationCache`, *optional*): The cache to train from, instead of building caches.
    """

    def __init__(
        self,
        model,
        adapter: BlockAdapter,
        freeze_args: FreezeCacheArguments,
        train_dataset: DiscardableTrainDataset,
        collator: FreezeCacheCollator,
        cache_dataset: Dataset | None,
        pinned_cache: ActivationCache | None = None,
    ) -> None:
        if pinned_cache is not None:
            check_cache_fits_model(pinned_cache, adapter)
        elif cache_dataset is None:
            raise ValueError("DiscardController needs `cache_dataset` (the un-augmented training images).")
        elif len(cache_dataset) != len(train_dataset):
            raise ValueError(
                f"cache_dataset has {len(cache_dataset)} samples but the training dataset has {len(train_dataset)}: "
                "it must be the same samples in the same order, without random augmentation."
            )
        self.adapter = adapter
        self.freeze_args = freeze_args
        self.train_dataset = train_dataset
        self.collator = collator
        self.cache_dataset = cache_dataset
        self.prefix = DiscardedPrefix(model, adapter)
        self.pinned_cache = pinned_cache
        self.cache: ActivationCache | None = None
        self._positions = freeze_args.parsed_discard_positions()
        self._dataset_hash: str | None = None
        if self._positions and self._positions[-1] >= adapter.num_blocks:
            raise ValueError(
                f"--discard_positions {freeze_args.discard_positions!r}: position {self._positions[-1]} leaves no "
                f"block to train; this model has {adapter.num_blocks} blocks, so positions go from 1 to "
                f"{adapter.num_blocks - 1}."
            )

    @property
    def position(self) -> int:
        return self.prefix.position

    def target_position(self, frozen_prefix: int) -> int | None:
        """The position to discard at now, given the frozen prefix, or None to keep training as is."""
        if self.pinned_cache is not None:
            return None  # without images there is nothing to build a deeper cache from
        reachable = min(frozen_prefix, self.adapter.num_blocks - 1)
        if self._positions is not None:
            reachable = max([p for p in self._positions if p <= reachable], default=0)
        return reachable if reachable > self.position else None

    def cache_folder(self, args: TrainingArguments, position: int) -> str:
        root = self.freeze_args.cache_dir or os.path.join(args.output_dir, "activation_cache")
        return os.path.join(root, f"position-{position:02d}")

    def check_destination(self, args: TrainingArguments, probe: dict[str, torch.Tensor] | None) -> None:
        """Before any training work: the cache folder is writable and the disk can hold the caches to come.

        The size is estimated by encoding the probe batch's activations at the candidate positions: the listed
        `--discard_positions` (all kept, so their sum), or else the largest single position (later builds check
        again).
        """
        if self.pinned_cache is not None:
            return
        positions = self._positions or list(range(1, self.adapter.num_blocks))
        estimates = [self._estimate_bytes(p, probe) for p in positions] if probe is not None else [0]
        needed = sum(estimates) if self._positions else max(estimates)
        # The build writes an Arrow file and then its shards: twice the cache for a while.
        check_destination(self.cache_folder(args, positions[0]), 2 * needed + max(estimates))

    def _estimate_bytes(self, position: int, probe: dict[str, torch.Tensor]) -> int:
        # Eval mode: a probe pass in train mode would move the BatchNorm statistics of blocks still training.
        with torch.no_grad(), prefix_in_eval(self.adapter, position):
            acts = self.adapter.prefix(probe["pixel_values"], position).float().cpu().numpy()
        codec = build_codec(self.freeze_args.codec_config()).resolve(acts)
        k = self.freeze_args.cache_chunk_size
        stored = sum(len(codec.encode(np.ascontiguousarray(acts[s : s + k]))) for s in range(0, len(acts), k))
        # Sidecars store about gamma (alpha) of the channels (tokens) with the same codec.
        sidecars = 1 + self.freeze_args.channel_aug_gamma + self.freeze_args.token_aug_alpha
        return int(stored / len(acts) * len(self.cache_dataset) * 1.2 * sidecars)

    def discard(self, position: int, args: TrainingArguments, probe: dict[str, torch.Tensor] | None) -> dict:
        """Gets the cache for `position` and trains from it from the next batch on; returns the cache's summary."""
        if self.pinned_cache is not None:
            folder, cache, reused = self.pinned_cache.folder, self.pinned_cache, True
        else:
            folder = self.cache_folder(args, position)
            # The prefix may sit offloaded from an earlier discard: the new cache is built from images through it.
            with self.prefix.restored():
                cache, reused = self._reuse_or_build(position, folder, args, probe)
        self.cache = cache
        threads = self.freeze_args.cache_decode_threads
        self.train_dataset.cached = CachedActivationDataset(cache, decode_threads=threads)
        self.collator.augmentation = requested_augmentation(self.freeze_args, self.adapter, cache.manifest)
        self.prefix.discard(position, offload=args.world_size == 1)
        m = cache.manifest
        logger.info(
            "Discarded blocks 0-%d: training reads %s (%s, %.2fx, %s).",
            position - 1,
            folder,
            m.codec["name"],
            m.compression_ratio,
            "reused" if reused else f"built in {m.build_seconds:.1f} s",
        )
        return {
            "position": position,
            "folder": folder,
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
        }

    def _fingerprint(self, position: int, sidecars: list[Sidecar], seed: int) -> dict[str, str]:
        if self._dataset_hash is None:
            self._dataset_hash = dataset_fingerprint(self.cache_dataset)
        images = self.train_dataset.images
        return requested_fingerprint(
            self.adapter, position, self.freeze_args, self._dataset_hash, sidecars, images, seed
        )

    def _reuse_or_build(
        self, position: int, folder: str, args: TrainingArguments, probe: dict[str, torch.Tensor] | None
    ) -> tuple[ActivationCache, bool]:
        processes = PartialState() if args.world_size > 1 else None
        if processes is not None:
            self.prefix.broadcast_from_main(position)
        sidecars = requested_sidecars(self.freeze_args, self.adapter)
        parts = self._fingerprint(position, sidecars, args.seed)
        main = processes is None or processes.is_main_process
        # The main process decides whether the cache on disk can be reused (it verifies the shards once), and the
        # others follow, so that all build together or none does.
        reuse = [False]
        if main and os.path.isdir(folder):
            try:
                ActivationCache.load(folder, expected_fingerprint=parts)
                reuse = [True]
            except CacheMismatchError as error:
                logger.warning("%s Rebuilding it.", error)
        if processes is not None:
            broadcast_object_list(reuse, from_process=0)
        if reuse[0]:
            return ActivationCache.load(folder, expected_fingerprint=parts, verify=False), True
        if probe is not None and main:
            check_destination(folder, 2 * self._estimate_bytes(position, probe))
        build_activation_cache(
            self.adapter,
            position,
            self.cache_dataset,
            folder,
            build_codec(self.freeze_args.codec_config()),
            self.freeze_args.cache_chunk_size,
            parts,
            collate_fn=self.collator.image_collator,
            batch_size=self.freeze_args.cache_batch_size or args.per_device_eval_batch_size,
            device=args.device,
            num_workers=args.dataloader_num_workers,
            encode_threads=self.freeze_args.cache_decode_threads,
            max_shard_size=self.freeze_args.cache_max_shard_size,
            progress=not args.disable_tqdm,
            sidecars=sidecars,
            augmented_dataset=self.train_dataset.images,
            seed=args.seed,
            processes=processes,
        )
        return ActivationCache.load(folder, expected_fingerprint=parts, verify=main), False
