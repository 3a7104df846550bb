"""`build_activation_cache`: the stages of a build in order, on one process or on several together."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from ..._distributed import ProcessGroup, all_or_none
from ...models import BlockAdapter
from ..codecs import ActivationCodec
from ..manifest import CacheManifest, cache_fingerprint
from ..sidecars import Sidecar
from .batches import prefix_batches, process_share
from .encode import PartStats
from .gather import cache_manifest, gather_parts
from .overlap import write_part
from .prepare import PrefixRun, check_build_options, prepare_build
from .staging import open_staging

logger = logging.getLogger(__name__)


def build_activation_cache(
    adapter: BlockAdapter,
    position: int,
    dataset: Dataset,
    folder: str | os.PathLike,
    codec: ActivationCodec,
    chunk_size: int,
    fingerprint_parts: dict[str, str],
    collate_fn: Callable[[list[Any]], dict[str, torch.Tensor]] | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    encode_threads: int = 2,
    max_shard_size: str | int = "500MB",
    progress: bool = True,
    sidecars: Sequence[Sidecar] = (),
    augmented_dataset: Dataset | None = None,
    seed: int = 0,
    processes: ProcessGroup | None = None,
    storage_options: dict[str, Any] | None = None,
    local_dir: str | os.PathLike | None = None,
) -> CacheManifest:
    """Runs the prefix (stem and blocks `0..position-1`) over `dataset` and writes the activation cache to `folder`.

    Samples are taken in dataset order, without shuffling; `dataset` must give the preprocessed training images
    *without* random augmentation (the cache stores one version of each sample). Every `chunk_size` consecutive
    samples are encoded together into one row. The prefix runs while the previous batches are encoded (on
    `encode_threads` threads) and written (on a writer thread), so a build costs little more than the prefix pass.
    Rows are streamed to disk, each shard written once (memory holds a few batches of activations and a bounded
    writer buffer, never the whole cache), into `<folder>.partial-<id>`, which becomes `folder` only once the
    shards, their checksums and the manifest are complete: an interrupted build leaves no folder that looks like a
    cache. An existing `folder` is replaced.

    `folder` may be a URL on any fsspec store (`s3://bucket/path`, `gs://`, `hf://`, `file://`, `memory://`),
    opened with `storage_options`: each process then stages its part in a private folder under `local_dir`
    and uploads it beside the destination (`<folder>.partial-<id>/part-<rank>`); the main process reads only the
    parts' records (statistics and checksums), moves the shards into `folder` on the store's side and uploads the
    manifest last, after removing the manifest of a cache it replaces. The cache at `folder` is complete exactly when
    its manifest exists: an interrupted build or upload leaves nothing loadable there.

    With `processes` (e.g. `accelerate.PartialState()` under `accelerate launch`), every process must call this with
    the same arguments: each runs the prefix over its share of the samples (`process_share`) and writes its own
    shards; then the main process gathers the shards and writes the manifest; the call returns on every process
    once the cache is complete. A local `folder` must be on a file system all processes see; a URL needs only the
    store. The cache is the same as a single-process build's: same rows, same bytes. The processes fail together:
    an error on any of them (an unreadable image, a full disk) is raised on every one by the end of the stage it
    happened in, and the staging folder is removed.

    Args:
        adapter (`BlockAdapter`): Block view of the model whose prefix is run; prefix modules run in eval mode.
        position (`int`): Block position of the activations to cache.
        dataset (`Dataset`): Items `{"pixel_values": tensor, "labels": int}` (after `collate_fn`, a batch dict).
        folder (`str`): Destination: a local folder or a URL.
        codec (`ActivationCodec`): How to encode; resolved on the first 256 samples of `dataset` (relative
            tolerances), whatever the batch size.
        chunk_size (`int`): Samples per row.
        fingerprint_parts (`dict[str, str]`): From `manifest.fingerprint_parts`, recorded in the manifest.
        collate_fn (`Callable`, *optional*): Batches items; defaults to torch's default collate.
        batch_size (`int`): Prefix batch size.
        device: Where the prefix runs (default: where its parameters are).
        num_workers (`int`): DataLoader workers reading images.
        encode_threads (`int`): Threads encoding chunks (zfp and zstd release the GIL).
        max_shard_size (`str` or `int`): Largest Arrow shard, in bytes or as `Dataset.save_to_disk` takes it
            (`"500MB"`).
        progress (`bool`): Show a progress bar (on the main process).
        sidecars (`Sequence[Sidecar]`): Extra per-sample arrays to store (`cache.sidecars`), each in its own
            `sidecar.<name>` column, float arrays encoded with the same (resolved) codec and chunking.
        augmented_dataset (`Dataset`, *optional*): The same samples, in the same order, through the training set's
            random augmentation; needed by sidecars with `needs_augmented_view`. Each sample of it is drawn under a
            seed derived from `seed` and its index, so it depends neither on the batch size nor on the processes.
        seed (`int`): Seeds the calibration subset and the random augmentation of `augmented_dataset`, so that a
            build is reproducible and leaves the caller's random state as it was.
        processes (`ProcessGroup`, *optional*): The processes building the cache together; None for one process.
        storage_options (`dict`, *optional*): Options of the store of a URL `folder` (credentials, endpoint...), as
            `fsspec.filesystem` takes them.
        local_dir (`str`, *optional*): With a URL `folder`: where each process stages its part before uploading it
            (default `$HF_HOME/hf_freezecache`).

    Returns:
        The `CacheManifest` written with the cache.

    Raises:
        ProcessFailure: on the other processes, when a stage failed on one (naming it, with its error).
    """
    rank, world = (processes.process_index, processes.num_processes) if processes is not None else (0, 1)
    is_main = rank == 0
    # Every stage ends in one `all_or_none` on every process, in the same order: a process that fails stops the
    # others there, instead of leaving them in the next collective until the launcher's timeout.
    stage = f"building the activation cache at block {position}"
    start = time.perf_counter()
    staging = None
    try:
        with all_or_none(processes, stage):
            augmented_dataset = check_build_options(dataset, chunk_size, batch_size, sidecars, augmented_dataset)
            device = torch.device(device) if device is not None else next(adapter.blocks[0].parameters()).device
            collate = collate_fn or default_collate
            run = PrefixRun(adapter, position, dataset, collate, batch_size, num_workers, device, seed)
            plan, first_batches = prepare_build(run, codec, sidecars, chunk_size)
            fingerprint = cache_fingerprint(fingerprint_parts)
            staging = open_staging(folder, fingerprint, storage_options, local_dir, progress=progress and is_main)
            staging.begin(is_main)

        with all_or_none(processes, stage):
            share = process_share(len(dataset), math.lcm(chunk_size, batch_size), rank, world)
            shown = f"Caching activations at block {position}" + (f" (process 0 of {world})" if world > 1 else "")
            bar = shown if progress and is_main else None
            stats = PartStats(sidecar_bytes=dict.fromkeys(plan.arrays, 0))
            batches = prefix_batches(run, share, sidecars, augmented_dataset, bar, first_batches)
            write_part(batches, share.start, stats, plan, chunk_size, encode_threads, staging, rank, max_shard_size)
            staging.submit(rank)

        with all_or_none(processes, stage):
            if is_main:
                totals, shards = gather_parts(staging, world, plan)
                manifest = cache_manifest(
                    run,
                    plan,
                    sidecars,
                    fingerprint_parts=fingerprint_parts,
                    chunk_size=chunk_size,
                    totals=totals,
                    shards=shards,
                    build_seconds=time.perf_counter() - start,
                    num_processes=world,
                )
                manifest.save(staging.final)
                staging.publish()
    finally:
        if staging is not None:
            staging.end(is_main)
    # The others read what the main process wrote, which also checks they see the cache it published.
    with all_or_none(processes, stage):
        if not is_main:
            manifest = staging.published_manifest()
    if is_main:
        _log_build(manifest, staging.folder)
    return manifest


def _log_build(manifest: CacheManifest, folder: str) -> None:
    logger.info(
        "Cached %d samples at block %d in %s: %.1f MB raw -> %.1f MB stored (%.1fx)%s in %.1f s%s.",
        manifest.num_samples,
        manifest.position,
        folder,
        manifest.raw_bytes / 2**20,
        manifest.stored_bytes / 2**20,
        manifest.compression_ratio,
        f", sidecars {manifest.sidecar_bytes / 2**20:.1f} MB ({manifest.sidecar_fraction:.1%} of the cache)"
        if manifest.sidecars
        else "",
        manifest.build_seconds,
        f" by {manifest.num_processes} processes" if manifest.num_processes > 1 else "",
    )
