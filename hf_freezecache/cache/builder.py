"""Runs a frozen prefix once over a dataset and writes its encoded activations as `datasets` shards."""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from .._random import seeded
from ..models import BlockAdapter
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
) -> CacheManifest:
    """Runs the prefix (stem and blocks `0..position-1`) over `dataset` and writes the activation cache to `folder`.

    Samples are taken in dataset order, without shuffling; `dataset` must give the preprocessed training images
    *without* random augmentation (the cache stores one version of each sample). Every `chunk_size` consecutive
    samples are encoded together into one row. Rows are streamed to disk (memory holds one batch of activations
    and a bounded writer buffer, never the whole cache), into `<folder>.partial-<id>`, which becomes `folder` only
    once the shards, their checksums and the manifest are complete: an interrupted build leaves no folder that
    looks like a cache. An existing `folder` is replaced.

    Args:
        adapter (`BlockAdapter`): Block view of the model whose prefix is run; prefix modules run in eval mode.
        position (`int`): Block position of the activations to cache.
        dataset (`Dataset`): Items `{"pixel_values": tensor, "labels": int}` (after `collate_fn`, a batch dict).
        folder (`str`): Destination.
        codec (`ActivationCodec`): How to encode; resolved on the first batch (relative tolerances).
        chunk_size (`int`): Samples per row.
        fingerprint_parts (`dict[str, str]`): From `manifest.fingerprint_parts`, recorded in the manifest.
        collate_fn (`Callable`, *optional*): Batches items; defaults to torch's default collate.
        batch_size (`int`): Prefix batch size.
        device: Where the prefix runs (default: where its parameters are).
        num_workers (`int`): DataLoader workers reading images.
        encode_threads (`int`): Threads encoding chunks (zfp and zstd release the GIL).
        max_shard_size (`str` or `int`): Largest Arrow shard (`Dataset.save_to_disk`).
        progress (`bool`): Show a progress bar.
        sidecars (`Sequence[Sidecar]`): Extra per-sample arrays to store (`cache.sidecars`), each in its own
            `sidecar.<name>` column, float arrays encoded with the same (resolved) codec and chunking.
        augmented_dataset (`Dataset`, *optional*): The same samples, in the same order, through the training set's
            random augmentation; needed by sidecars with `needs_augmented_view`.
        seed (`int`): Seeds the calibration subset and the random augmentation of `augmented_dataset`, so that a
            build is reproducible and leaves the caller's random state as it was.

    Returns:
        The `CacheManifest` written with the cache.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}.")
    if any(sidecar.needs_augmented_view for sidecar in sidecars):
        if augmented_dataset is None or len(augmented_dataset) != len(dataset):
            raise ValueError(
                "The token-replacement sidecar needs `augmented_dataset`: the training images through their random "
                "augmentation, the same samples in the same order as `dataset`."
            )
    else:
        augmented_dataset = None
    folder = os.path.abspath(folder)
    device = torch.device(device) if device is not None else next(adapter.blocks[0].parameters()).device
    num_samples = len(dataset)

    def loader(source: Dataset, worker_seed: int) -> DataLoader:
        generator = torch.Generator().manual_seed(worker_seed)  # seeds the workers' augmentation, if any
        return DataLoader(
            source, batch_size=batch_size, collate_fn=collate_fn, num_workers=num_workers, generator=generator
        )

    def run_prefix(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return adapter.prefix(pixels, position)

    stats: dict[str, Any] = {"stored": 0, "codec": codec, "flops": 0.0}
    start = time.perf_counter()
    with seeded(seed), prefix_in_eval(adapter, position):
        sample_shape = _sample_shape(adapter, dataset, position, device)
        for sidecar in sidecars:
            if sidecar.calibration_size > 0:
                subset = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
                subset = Subset(dataset, subset[: sidecar.calibration_size].sort().values.tolist())
                sidecar.calibrate(run_prefix, (b["pixel_values"].to(device) for b in loader(subset, seed)))
    arrays = {name: spec for sidecar in sidecars for name, spec in sidecar.arrays(sample_shape).items()}
    sidecar_bytes = dict.fromkeys(arrays, 0)
    remove_partial_builds(folder)
    staging = f"{folder}{_PARTIAL}{uuid.uuid4().hex[:8]}"
    os.makedirs(staging)

    def encode(name: str, chunk: np.ndarray) -> bytes:
        if name == "data" or arrays[name].dtype == "float32":
            return stats["codec"].encode(np.ascontiguousarray(chunk, dtype=np.float32))
        return np.ascontiguousarray(chunk, dtype="<i4").tobytes()

    def rows() -> Iterator[dict[str, Any]]:
        pending: dict[str, list[np.ndarray]] = {name: [] for name in ["data", "labels", *arrays]}
        next_index = 0
        description = f"Caching activations at block {position}"
        bar = tqdm(total=num_samples, desc=description, unit="img", disable=not progress)
        batches = loader(dataset, seed)
        views = loader(augmented_dataset, seed) if augmented_dataset is not None else itertools.repeat(None)
        with (
            ThreadPoolExecutor(max_workers=max(1, encode_threads)) as pool,
            seeded(seed),
            prefix_in_eval(adapter, position),
        ):
            for batch, view in zip(batches, views, strict=False):  # views repeats None forever without sidecars
                pixels = batch["pixel_values"].to(device)
                if not stats["flops"]:
                    stats["flops"] = prefix_forward_flops(adapter, pixels[:1], position)
                acts = run_prefix(pixels).float()
                if stats["codec"] is codec:
                    stats["codec"] = codec.resolve(acts.cpu().numpy())
                augmented = view["pixel_values"].to(device) if view is not None else None
                for sidecar in sidecars:
                    for name, value in sidecar.compute(run_prefix, pixels, acts, augmented).items():
                        pending[name].append(value.cpu().numpy())
                pending["data"].append(acts.cpu().numpy())
                pending["labels"].append(np.asarray(batch["labels"]).reshape(-1))
                bar.update(len(acts))
                ready = sum(len(a) for a in pending["data"])
                last = next_index + ready == num_samples
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
                    stats["stored"] += len(row["data"])
                    for name in arrays:
                        sidecar_bytes[name] += len(row[SIDECAR_COLUMN_PREFIX + name])
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
        with _quiet_datasets():
            raw_sample_bytes = 4 * (math.prod(sample_shape) + sum(math.prod(a.shape) for a in arrays.values()))
            writer_rows = max(1, _WRITER_BUFFER_BYTES // max(1, raw_sample_bytes * chunk_size))
            generated = datasets.Dataset.from_generator(
                rows,
                features=features,
                cache_dir=os.path.join(staging, "_generator"),
                fingerprint=cache_fingerprint(fingerprint_parts),
                writer_batch_size=writer_rows,
            )
            final = os.path.join(staging, "cache")
            generated.save_to_disk(final, max_shard_size=max_shard_size)
            del generated
        files = sorted(name for name in os.listdir(final) if name.endswith(".arrow"))
        shards = {name: file_sha256(os.path.join(final, name)) for name in files}
        resolved: ActivationCodec = stats["codec"]
        raw_bytes = int(num_samples * math.prod(sample_shape) * 4)
        manifest = CacheManifest(
            fingerprint=cache_fingerprint(fingerprint_parts),
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
            raw_bytes=raw_bytes,
            stored_bytes=int(stats["stored"]),
            build_seconds=time.perf_counter() - start,
            prefix_forward_flops_per_sample=float(stats["flops"]),
            build_prefix_passes=1
            + sum(s.extra_prefix_passes for s in sidecars)
            + sum(s.calibration_passes * min(s.calibration_size, num_samples) for s in sidecars) / num_samples,
            source="images",
            shards=shards,
            sidecars={
                sidecar.name: {
                    "config": sidecar.config(),
                    "summary": sidecar.summary(),
                    "arrays": {
                        name: {"shape": list(spec.shape), "dtype": spec.dtype, "stored_bytes": sidecar_bytes[name]}
                        for name, spec in sidecar.arrays(sample_shape).items()
                    },
                }
                for sidecar in sidecars
            },
        )
        manifest.save(final)
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.rename(final, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        "Cached %d samples at block %d in %s: %.1f MB raw -> %.1f MB stored (%.1fx)%s in %.1f s.",
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
    )
    return manifest


def _sample_shape(adapter: BlockAdapter, dataset: Dataset, position: int, device: torch.device) -> tuple[int, ...]:
    pixels = dataset[0]["pixel_values"].unsqueeze(0).to(device)
    with torch.no_grad():
        return tuple(adapter.prefix(pixels, position).shape[1:])
