"""Runs a frozen prefix once over a dataset and writes its encoded activations as `datasets` shards."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, default_collate
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from .._random import seeded
from ..models import BlockAdapter, model_source
from .codecs import ActivationCodec
from .manifest import CacheManifest, cache_fingerprint, file_sha256
from .sidecars import SIDECAR_COLUMN_PREFIX, Sidecar

logger = logging.getLogger(__name__)

#: Rows of a cache: one per chunk of consecutive samples.
CACHE_FEATURES = datasets.Features(
    {
        "data": datasets.Value("binary"),
        "labels": datasets.List(datasets.Value("int64")),
        "indices": datasets.List(datasets.Value("int64")),
    }
)
_PARTIAL = ".partial-"
_PART_STATS = "freezecache_part.json"
# Samples a relative codec tolerance is resolved on (the first ones of the dataset).
_RESOLVE_SAMPLES = 256
# Rows buffered in memory by the Arrow writer: about this many bytes at a time, whatever the activation size.
_WRITER_BUFFER_BYTES = 64 << 20


def check_destination(folder: str | os.PathLike, required_bytes: int) -> None:
    """Fails early, with a clear message, when a cache of `required_bytes` cannot be written under `folder`."""
    parent = os.path.dirname(os.path.abspath(folder))
    try:
        os.makedirs(parent, exist_ok=True)
        probe = os.path.join(parent, f".write-test-{uuid.uuid4().hex}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as error:
        raise OSError(
            f"Cannot write the activation cache under {parent!r} ({error.strerror or error}). "
            "Choose a writable folder with --cache_dir."
        ) from error
    free = shutil.disk_usage(parent).free
    if free < required_bytes:
        raise OSError(
            f"Not enough free disk for the activation cache under {parent!r}: it needs about "
            f"{required_bytes / 2**30:.2f} GiB (estimated, including a transient copy while writing), "
            f"{free / 2**30:.2f} GiB are free. Free space, choose another --cache_dir, or use a codec that "
            "compresses more (--cache_codec zfp with a larger --cache_tolerance)."
        )


def prefix_forward_flops(adapter: BlockAdapter, pixel_values: torch.Tensor, position: int) -> float:
    """FLOPs of one sample's forward pass through the stem and blocks `0..position-1`."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        adapter.prefix(pixel_values, position)
    return counter.get_total_flops() / pixel_values.shape[0]


@contextlib.contextmanager
def prefix_in_eval(adapter: BlockAdapter, position: int) -> Iterator[None]:
    """Within the block, the stem and blocks `0..position-1` are in eval mode (no BatchNorm statistics updates)."""
    modules = [m for index in range(position) for m in adapter.block_modules(index)]
    modes = [m.training for m in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.train(mode)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    # Our own progress bar covers the build; `datasets`' per-step bars would only add noise.
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def remove_partial_builds(folder: str | os.PathLike) -> None:
    """Deletes what interrupted builds of `folder` left behind (`<folder>.partial-*`)."""
    folder = os.path.abspath(folder)
    parent, name = os.path.split(folder)
    if os.path.isdir(parent):
        for entry in os.listdir(parent):
            if entry.startswith(name + _PARTIAL):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


class ProcessGroup(Protocol):
    """What a distributed build needs of accelerate's `PartialState` (or `Accelerator`): who this process is, how
    many there are, and a barrier."""

    process_index: int
    num_processes: int

    def wait_for_everyone(self) -> None: ...


def process_share(num_samples: int, unit: int, process_index: int, num_processes: int) -> range:
    """The samples process `process_index` of `num_processes` runs the prefix over in a distributed build.

    Shares are consecutive runs of whole `unit`s (the least common multiple of the chunk size and the batch size),
    so every process's chunks and prefix batches are exactly those of a single-process build, and the cache is the
    same bytes whatever the number of processes.
    """
    units = -(-num_samples // unit)
    first, last = units * process_index // num_processes, units * (process_index + 1) // num_processes
    return range(min(first * unit, num_samples), min(last * unit, num_samples))


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
) -> CacheManifest:
    """Runs the prefix (stem and blocks `0..position-1`) over `dataset` and writes the activation cache to `folder`.

    Samples are taken in dataset order, without shuffling; `dataset` must give the preprocessed training images
    *without* random augmentation (the cache stores one version of each sample). Every `chunk_size` consecutive
    samples are encoded together into one row. Rows are streamed to disk (memory holds one batch of activations
    and a bounded writer buffer, never the whole cache), into `<folder>.partial-<id>`, which becomes `folder` only
    once the shards, their checksums and the manifest are complete: an interrupted build leaves no folder that
    looks like a cache. An existing `folder` is replaced.

    With `processes` (e.g. `accelerate.PartialState()` under `accelerate launch`), every process must call this with
    the same arguments: each runs the prefix over its share of the samples (`process_share`) and writes its own
    shards; after `wait_for_everyone`, the main process gathers the shards and writes the manifest; the call returns
    on every process once the cache is complete. `folder` must be on a file system all processes see. The cache is
    the same as a single-process build's: same rows, same bytes.

    Args:
        adapter (`BlockAdapter`): Block view of the model whose prefix is run; prefix modules run in eval mode.
        position (`int`): Block position of the activations to cache.
        dataset (`Dataset`): Items `{"pixel_values": tensor, "labels": int}` (after `collate_fn`, a batch dict).
        folder (`str`): Destination.
        codec (`ActivationCodec`): How to encode; resolved on the first 256 samples of `dataset` (relative
            tolerances), whatever the batch size.
        chunk_size (`int`): Samples per row.
        fingerprint_parts (`dict[str, str]`): From `manifest.fingerprint_parts`, recorded in the manifest.
        collate_fn (`Callable`, *optional*): Batches items; defaults to torch's default collate.
        batch_size (`int`): Prefix batch size.
        device: Where the prefix runs (default: where its parameters are).
        num_workers (`int`): DataLoader workers reading images.
        encode_threads (`int`): Threads encoding chunks (zfp and zstd release the GIL).
        max_shard_size (`str` or `int`): Largest Arrow shard (`Dataset.save_to_disk`).
        progress (`bool`): Show a progress bar (on the main process).
        sidecars (`Sequence[Sidecar]`): Extra per-sample arrays to store (`cache.sidecars`), each in its own
            `sidecar.<name>` column, float arrays encoded with the same (resolved) codec and chunking.
        augmented_dataset (`Dataset`, *optional*): The same samples, in the same order, through the training set's
            random augmentation; needed by sidecars with `needs_augmented_view`. Each sample of it is drawn under a
            seed derived from `seed` and its index, so it depends neither on the batch size nor on the processes.
        seed (`int`): Seeds the calibration subset and the random augmentation of `augmented_dataset`, so that a
            build is reproducible and leaves the caller's random state as it was.
        processes (`ProcessGroup`, *optional*): The processes building the cache together; None for one process.

    Returns:
        The `CacheManifest` written with the cache.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if any(sidecar.needs_augmented_view for sidecar in sidecars):
        if augmented_dataset is None or len(augmented_dataset) != len(dataset):
            raise ValueError(
                "The token-replacement sidecar needs `augmented_dataset`: the training images through their random "
                "augmentation, the same samples in the same order as `dataset`."
            )
    else:
        augmented_dataset = None
    rank, world = (processes.process_index, processes.num_processes) if processes is not None else (0, 1)
    is_main = rank == 0
    barrier = processes.wait_for_everyone if processes is not None else (lambda: None)
    folder = os.path.abspath(folder)
    device = torch.device(device) if device is not None else next(adapter.blocks[0].parameters()).device
    num_samples = len(dataset)
    collate = collate_fn or default_collate

    def loader(source: Dataset, worker_seed: int) -> DataLoader:
        generator = torch.Generator().manual_seed(worker_seed)
        return DataLoader(
            source, batch_size=batch_size, collate_fn=collate, num_workers=num_workers, generator=generator
        )

    def run_prefix(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return adapter.prefix(pixels, position)

    start = time.perf_counter()
    with seeded(seed), prefix_in_eval(adapter, position):
        sample_shape = _sample_shape(adapter, dataset, position, device)
        for sidecar in sidecars:
            if sidecar.calibration_size > 0:
                subset = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
                subset = Subset(dataset, subset[: sidecar.calibration_size].sort().values.tolist())
                sidecar.calibrate(run_prefix, (b["pixel_values"].to(device) for b in loader(subset, seed)))
        # Every process resolves the codec on the same first samples, whatever the batch size, so that all shares
        # (and builds with other batch sizes) are encoded alike.
        reference = Subset(dataset, range(min(_RESOLVE_SAMPLES, num_samples)))
        references = [run_prefix(b["pixel_values"].to(device)).float().cpu() for b in loader(reference, seed)]
        resolved = codec.resolve(torch.cat(references).numpy())
        flops = prefix_forward_flops(adapter, collate([dataset[0]])["pixel_values"].to(device), position)
    arrays = {name: spec for sidecar in sidecars for name, spec in sidecar.arrays(sample_shape).items()}
    share = process_share(num_samples, math.lcm(chunk_size, batch_size), rank, world)
    fingerprint = cache_fingerprint(fingerprint_parts)
    # Every process derives the same staging folder, so the main process can gather their parts.
    staging = f"{folder}{_PARTIAL}{fingerprint[:12]}"
    if is_main:
        remove_partial_builds(folder)
        os.makedirs(staging)
    barrier()

    def encode(name: str, chunk: np.ndarray) -> bytes:
        if name == "data" or arrays[name].dtype == "float32":
            return resolved.encode(np.ascontiguousarray(chunk, dtype=np.float32))
        return np.ascontiguousarray(chunk, dtype="<i4").tobytes()

    def augmented_view(indices: range) -> torch.Tensor:
        # One seed per sample: a sample's view depends neither on the batch size nor on the number of processes.
        items = []
        for index in indices:
            with seeded(seed * 1_000_003 + index):
                items.append(augmented_dataset[index])
        return collate(items)["pixel_values"].to(device)

    part_stats = {"rows": 0, "stored": 0, "sidecar_bytes": dict.fromkeys(arrays, 0)}

    def rows() -> Iterator[dict[str, Any]]:
        pending: dict[str, list[np.ndarray]] = {name: [] for name in ["data", "labels", *arrays]}
        next_index = share.start
        description = f"Caching activations at block {position}" + (f" (process 0 of {world})" if world > 1 else "")
        bar = tqdm(total=len(share), desc=description, unit="img", disable=not (progress and is_main))
        with (
            ThreadPoolExecutor(max_workers=max(1, encode_threads)) as pool,
            seeded(seed),
            prefix_in_eval(adapter, position),
        ):
            for local, batch in enumerate(loader(Subset(dataset, share), seed)):
                pixels = batch["pixel_values"].to(device)
                batch_start = share.start + local * batch_size
                acts = run_prefix(pixels).float()
                if sidecars:
                    batch_indices = range(batch_start, batch_start + len(acts))
                    augmented = augmented_view(batch_indices) if augmented_dataset is not None else None
                    for sidecar in sidecars:
                        for name, value in sidecar.compute(run_prefix, pixels, acts, augmented).items():
                            pending[name].append(value.cpu().numpy())
                pending["data"].append(acts.cpu().numpy())
                pending["labels"].append(np.asarray(batch["labels"]).reshape(-1))
                bar.update(len(acts))
                ready = sum(len(a) for a in pending["data"])
                last = next_index + ready == share.stop
                take = ready if last else ready - ready % chunk_size
                if take == 0:
                    continue
                joined = {name: np.concatenate(parts) for name, parts in pending.items()}
                pending = {name: [array[take:]] for name, array in joined.items()}
                starts = range(0, take, chunk_size)
                encoded = {
                    name: pool.map(encode, itertools.repeat(name), [joined[name][s : s + chunk_size] for s in starts])
                    for name in ["data", *arrays]
                }
                for s, *blobs in zip(starts, *encoded.values(), strict=True):
                    row = dict(zip(["data", *(SIDECAR_COLUMN_PREFIX + name for name in arrays)], blobs, strict=True))
                    part_stats["rows"] += 1
                    part_stats["stored"] += len(row["data"])
                    for name in arrays:
                        part_stats["sidecar_bytes"][name] += len(row[SIDECAR_COLUMN_PREFIX + name])
                    end = min(s + chunk_size, take)
                    row["labels"] = joined["labels"][s:end].tolist()
                    row["indices"] = list(range(next_index + s, next_index + end))
                    yield row
                next_index += take
        bar.close()

    features = datasets.Features(
        {**CACHE_FEATURES, **{SIDECAR_COLUMN_PREFIX + name: datasets.Value("binary") for name in arrays}}
    )
    try:
        part = os.path.join(staging, f"part-{rank:05d}")
        if len(share):
            with _quiet_datasets():
                raw_sample_bytes = 4 * (math.prod(sample_shape) + sum(math.prod(a.shape) for a in arrays.values()))
                writer_rows = max(1, _WRITER_BUFFER_BYTES // max(1, raw_sample_bytes * chunk_size))
                generated = datasets.Dataset.from_generator(
                    rows,
                    features=features,
                    cache_dir=os.path.join(staging, f"_generator-{rank:05d}"),
                    fingerprint=f"{fingerprint}-{rank}",
                    writer_batch_size=writer_rows,
                )
                generated.save_to_disk(part, max_shard_size=max_shard_size)
                del generated
        else:
            os.makedirs(part)
        with open(os.path.join(part, _PART_STATS), "w") as f:
            json.dump(part_stats, f)
        barrier()
        if is_main:
            final = os.path.join(staging, "cache")
            source_model, source_revision = model_source(adapter.model)
            totals = _gather_parts(staging, world, final, fingerprint)
            manifest = CacheManifest(
                fingerprint=fingerprint,
                fingerprint_parts=fingerprint_parts,
                model_family=adapter.family,
                model_class=type(adapter.model).__name__,
                position=position,
                sample_shape=list(sample_shape),
                dtype="float32",
                codec=resolved.config(),
                chunk_size=chunk_size,
                num_samples=num_samples,
                num_chunks=-(-num_samples // chunk_size),
                raw_bytes=int(num_samples * math.prod(sample_shape) * 4),
                stored_bytes=totals["stored"],
                build_seconds=time.perf_counter() - start,
                prefix_forward_flops_per_sample=float(flops),
                build_prefix_passes=1
                + sum(s.extra_prefix_passes for s in sidecars)
                + sum(s.calibration_passes * min(s.calibration_size, num_samples) for s in sidecars) / num_samples,
                source="images",
                shards={name: file_sha256(os.path.join(final, name)) for name in totals["files"]},
                sidecars={
                    sidecar.name: {
                        "config": sidecar.config(),
                        "summary": sidecar.summary(),
                        "arrays": {
                            name: {
                                "shape": list(spec.shape),
                                "dtype": spec.dtype,
                                "stored_bytes": totals["sidecar_bytes"][name],
                            }
                            for name, spec in sidecar.arrays(sample_shape).items()
                        },
                    }
                    for sidecar in sidecars
                },
                source_model=source_model,
                source_revision=source_revision,
                num_processes=world,
                model_num_blocks=adapter.num_blocks,
            )
            if totals["rows"] != manifest.num_chunks:
                raise RuntimeError(
                    f"The processes wrote {totals['rows']} rows in all, {manifest.num_chunks} were expected: a "
                    "process built from another dataset or chunk size."
                )
            manifest.save(final)
            if os.path.exists(folder):
                shutil.rmtree(folder)
            os.rename(final, folder)
        barrier()
    finally:
        if is_main:
            shutil.rmtree(staging, ignore_errors=True)
    if not is_main:
        return CacheManifest.load(folder)
    logger.info(
        "Cached %d samples at block %d in %s: %.1f MB raw -> %.1f MB stored (%.1fx)%s in %.1f s%s.",
        num_samples,
        position,
        folder,
        manifest.raw_bytes / 2**20,
        manifest.stored_bytes / 2**20,
        manifest.compression_ratio,
        f", sidecars {manifest.sidecar_bytes / 2**20:.1f} MB ({manifest.sidecar_fraction:.1%} of the cache)"
        if sidecars
        else "",
        manifest.build_seconds,
        f" by {world} processes" if world > 1 else "",
    )
    return manifest


def _gather_parts(staging: str, num_parts: int, final: str, fingerprint: str) -> dict[str, Any]:
    """Moves the processes' shards, in process order, into one `save_to_disk` folder `final`; returns the totals
    of their statistics and the shard file names."""
    parts = [os.path.join(staging, f"part-{rank:05d}") for rank in range(num_parts)]
    totals: dict[str, Any] = {"rows": 0, "stored": 0, "sidecar_bytes": {}}
    sources, state, info = [], None, None
    for rank, part in enumerate(parts):
        if not os.path.isfile(os.path.join(part, _PART_STATS)):
            raise RuntimeError(
                f"Process {rank} wrote no part of the cache in {staging}: the processes disagree on what they build "
                "(their prefix weights, dataset or options differ), or the folder is not on a file system they share."
            )
        with open(os.path.join(part, _PART_STATS)) as f:
            stats = json.load(f)
        totals["rows"] += stats["rows"]
        totals["stored"] += stats["stored"]
        for name, size in stats["sidecar_bytes"].items():
            totals["sidecar_bytes"][name] = totals["sidecar_bytes"].get(name, 0) + size
        if not stats["rows"]:
            continue
        with open(os.path.join(part, "state.json")) as f:
            part_state = json.load(f)
        sources += [os.path.join(part, entry["filename"]) for entry in part_state["_data_files"]]
        state = state or part_state
        info = info or os.path.join(part, "dataset_info.json")
    os.makedirs(final)
    files = [f"data-{index:05d}-of-{len(sources):05d}.arrow" for index in range(len(sources))]
    for source, name in zip(sources, files, strict=True):
        os.rename(source, os.path.join(final, name))
    shutil.copy(info, os.path.join(final, "dataset_info.json"))
    # `datasets.load_from_disk` reads the shard list from state.json: rewritten for the gathered shards.
    state.update(_data_files=[{"filename": name} for name in files], _fingerprint=fingerprint)
    with open(os.path.join(final, "state.json"), "w") as f:
        json.dump(state, f, indent=2)
    totals["files"] = files
    return totals


def _sample_shape(adapter: BlockAdapter, dataset: Dataset, position: int, device: torch.device) -> tuple[int, ...]:
    pixels = dataset[0]["pixel_values"].unsqueeze(0).to(device)
    with torch.no_grad():
        return tuple(adapter.prefix(pixels, position).shape[1:])
