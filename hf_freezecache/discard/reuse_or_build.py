"""Getting the activation cache of a position: the one on disk when its fingerprint matches, else built anew, with
every process of a distributed run taking the same decision and failing together."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .._distributed import ProcessGroup, all_or_none, broadcast_from_main
from ..cache import (
    ActivationCache,
    CacheMismatchError,
    build_activation_cache,
    build_codec,
    check_destination,
    dataset_fingerprint,
    load_cache,
    prefix_in_eval,
)
from ..cache.store import CacheStore, is_url
from ..model import FreezeCacheModel
from .config import DiscardConfig
from .request import requested_fingerprint, requested_sidecars

logger = logging.getLogger(__name__)


@dataclass
class CacheBuildSettings:
    """Where and how the prefix pass of a cache build runs: the training loop's device and resources.

    Args:
        device (`torch.device`): Where the prefix runs.
        batch_size (`int`): Images per prefix batch (per process).
        num_workers (`int`): DataLoader workers reading images.
        seed (`int`): Seed of sidecar calibration and augmented views.
        progress (`bool`): Show a progress bar.
        processes (`ProcessGroup`, *optional*): The processes building together (accelerate's `PartialState`);
            None for one process.
    """

    device: torch.device
    batch_size: int
    num_workers: int = 0
    seed: int = 0
    progress: bool = True
    processes: ProcessGroup | None = None

    @property
    def is_main_process(self) -> bool:
        return self.processes is None or self.processes.process_index == 0


def estimate_cache_bytes(
    model: FreezeCacheModel, position: int, config: DiscardConfig, probe: torch.Tensor, num_samples: int
) -> int:
    """Bytes the cache at `position` will take on disk for `num_samples` samples, from encoding the activations of
    the `probe` images (with 20% margin, and each sidecar's `stored_fraction` more)."""
    # Eval mode: a probe pass in train mode would move the BatchNorm statistics of blocks still training.
    with torch.no_grad(), prefix_in_eval(model.adapter, position):
        activations = model.adapter.prefix(probe, position).float().cpu().numpy()
    codec = build_codec(config.cache.codec_config()).resolve(activations)
    k = config.cache.chunk_size
    stored = sum(len(codec.encode(np.ascontiguousarray(activations[s : s + k]))) for s in range(0, len(probe), k))
    sidecars = 1 + sum(sidecar.stored_fraction for sidecar in config.enabled_sidecars())
    return int(stored / len(probe) * num_samples * 1.2 * sidecars)


def reuse_or_build_cache(
    model: FreezeCacheModel,
    position: int,
    folder: str | os.PathLike,
    config: DiscardConfig,
    images: Dataset,
    settings: CacheBuildSettings,
    *,
    augmented_images: Dataset | None = None,
    collate_fn: Callable[[list[Any]], dict[str, torch.Tensor]] | None = None,
    with_sidecars: bool = True,
    probe: torch.Tensor | None = None,
) -> tuple[ActivationCache, bool]:
    """The activation cache of blocks `0..position-1` of `model` over `images`, and whether it was reused.

    Under several processes (every one calls this with the same arguments): the main process's prefix weights and
    buffers are given to all first (BatchNorm statistics are each process's own since the last forward, and a model
    built without pretrained weights differs between processes), then the main process decides whether the cache in
    `folder` matches (it verifies the shards once) and all follow, so that all build together or none does. An
    exception on any process while deciding, building or loading stops every process with its message
    (`all_or_none`). The prefix must be on its device (see `FreezeCacheModel.restored`).

    `folder` may be a URL (`config.cache_storage_options` opens its store): the main process reads the manifest
    there and compares its fingerprint parts before downloading anything; a cache without a manifest there (none,
    or an unfinished build) is built. Every process then reads a local copy (`load_cache`): the first process of each
    machine downloads it, the others of that machine find it (`config.cache_local_dir`).

    Args:
        model (`FreezeCacheModel`): The model whose prefix runs.
        position (`int`): Block position of the cache.
        folder (`str`): Where the cache is (or goes): a folder or a URL.
        config (`DiscardConfig`): The cache's options: codec, chunking, sidecars.
        images (`Dataset`): The images the prefix runs over, without random augmentation.
        settings (`CacheBuildSettings`): Where and how the prefix pass runs.
        augmented_images (`Dataset`, *optional*): The same samples through the training augmentation, for sidecars
            that store augmented views (token replacement).
        collate_fn (`Callable`, *optional*): Batches `images`.
        with_sidecars (`bool`): Store the sidecars the options ask for (a training cache) or none (an evaluation
            cache).
        probe (`torch.Tensor`, *optional*): A few images to estimate the cache's size from, so that a full disk is
            reported before the build instead of during it.
    """
    folder = os.fspath(folder)
    processes, main = settings.processes, settings.is_main_process
    options = config.storage_options()
    where = f"the activation cache at block {position} ({folder})"
    with all_or_none(processes, f"Checking {where}"):
        if processes is not None and processes.num_processes > 1:
            for tensor in model.prefix_tensors(position):
                torch.distributed.broadcast(tensor.data, src=0)
        sidecars = requested_sidecars(config, model.adapter) if with_sidecars else []
        parts = requested_fingerprint(
            model.adapter,
            position,
            config,
            dataset_fingerprint(images),
            sidecars,
            augmented_images,
            settings.seed,
        )
        reuse = False
        if main and (CacheStore(folder, options).has_manifest() if is_url(folder) else os.path.isdir(folder)):
            try:
                _load(folder, parts, config, verify=True, progress=settings.progress)
                reuse = True
            except CacheMismatchError as error:
                logger.warning("%s Rebuilding it.", error)
        if not reuse and main and probe is not None:
            needed = estimate_cache_bytes(model, position, config, probe, len(images))
            check_destination(folder, needed, options, config.cache_local_dir)
    reuse = broadcast_from_main(reuse, processes)
    if not reuse:
        build_activation_cache(
            model.adapter,
            position,
            images,
            folder,
            build_codec(config.cache.codec_config()),
            config.cache.chunk_size,
            parts,
            collate_fn=collate_fn,
            batch_size=settings.batch_size,
            device=settings.device,
            num_workers=settings.num_workers,
            encode_threads=config.cache.decode_threads,
            max_shard_size=config.cache.max_shard_size,
            progress=settings.progress,
            sidecars=sidecars,
            augmented_dataset=augmented_images if with_sidecars else None,
            seed=settings.seed,
            processes=processes,
            storage_options=options,
            local_dir=config.cache_local_dir,
        )
    if is_url(folder):
        # One download per machine: its first process fetches the copy that the others of the machine then open.
        with all_or_none(processes, f"Downloading {where}"):
            if getattr(processes, "local_process_index", 0) == 0:
                store = CacheStore(folder, options)
                store.download(config.cache_local_dir, expected_fingerprint=parts, progress=main and settings.progress)
    with all_or_none(processes, f"Loading {where}"):
        cache = _load(folder, parts, config, verify=main, progress=False)
    return cache, reuse


def _load(folder: str, parts: dict[str, str], config: DiscardConfig, verify: bool, progress: bool) -> ActivationCache:
    """The cache in `folder`, or the local copy of the one at the URL `folder`, checked against `parts`."""
    if not is_url(folder):
        return ActivationCache.load(folder, expected_fingerprint=parts, verify=verify)
    return load_cache(
        folder,
        expected_fingerprint=parts,
        verify=verify,
        storage_options=config.storage_options(),
        download_dir=config.cache_local_dir,
        progress=progress,
    )
