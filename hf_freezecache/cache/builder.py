"""Runs a frozen prefix once over a dataset and writes its encoded activations as `datasets` shards."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from ..models import BlockAdapter
from .codecs import ActivationCodec
from .manifest import CacheManifest, cache_fingerprint, file_sha256

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

    Returns:
        The `CacheManifest` written with the cache.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}.")
    folder = os.path.abspath(folder)
    device = torch.device(device) if device is not None else next(adapter.blocks[0].parameters()).device
    num_samples = len(dataset)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn, num_workers=num_workers)
    remove_partial_builds(folder)
    staging = f"{folder}{_PARTIAL}{uuid.uuid4().hex[:8]}"
    os.makedirs(staging)
    stats: dict[str, Any] = {"stored": 0, "sample_shape": None, "codec": codec, "flops": 0.0}
    start = time.perf_counter()

    def rows() -> Iterator[dict[str, Any]]:
        pending_acts: list[np.ndarray] = []
        pending_labels: list[np.ndarray] = []
        next_index = 0
        description = f"Caching activations at block {position}"
        bar = tqdm(total=num_samples, desc=description, unit="img", disable=not progress)
        with ThreadPoolExecutor(max_workers=max(1, encode_threads)) as pool, prefix_in_eval(adapter, position):
            for batch in loader:
                pixels = batch["pixel_values"].to(device)
                if stats["sample_shape"] is None:
                    stats["flops"] = prefix_forward_flops(adapter, pixels[:1], position)
                with torch.no_grad():
                    acts = adapter.prefix(pixels, position).float().cpu().numpy()
                if stats["sample_shape"] is None:
                    stats["sample_shape"] = list(acts.shape[1:])
                    stats["codec"] = codec.resolve(acts)
                pending_acts.append(acts)
                pending_labels.append(np.asarray(batch["labels"]).reshape(-1))
                bar.update(len(acts))
                ready = sum(len(a) for a in pending_acts)
                last = next_index + ready == num_samples
                take = ready if last else ready - ready % chunk_size
                if take == 0:
                    continue
                acts_all, labels_all = np.concatenate(pending_acts), np.concatenate(pending_labels)
                pending_acts, pending_labels = [acts_all[take:]], [labels_all[take:]]
                starts = range(0, take, chunk_size)
                chunks = [np.ascontiguousarray(acts_all[s : s + chunk_size]) for s in starts]
                for s, data in zip(starts, pool.map(stats["codec"].encode, chunks), strict=True):
                    stats["stored"] += len(data)
                    end = min(s + chunk_size, take)
                    yield {
                        "data": data,
                        "labels": labels_all[s:end].tolist(),
                        "indices": list(range(next_index + s, next_index + end)),
                    }
                next_index += take
        bar.close()

    try:
        with _quiet_datasets():
            row_bytes = _estimate_row_bytes(adapter, dataset, position, chunk_size, device)
            writer_rows = max(1, _WRITER_BUFFER_BYTES // max(1, row_bytes))
            generated = datasets.Dataset.from_generator(
                rows,
                features=CACHE_FEATURES,
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
        manifest = CacheManifest(
            fingerprint=cache_fingerprint(fingerprint_parts),
            fingerprint_parts=fingerprint_parts,
            model_family=adapter.family,
            model_class=type(adapter.model).__name__,
            position=position,
            sample_shape=stats["sample_shape"],
            dtype="float32",
            codec=resolved.config(),
            chunk_size=chunk_size,
            num_samples=num_samples,
            num_chunks=-(-num_samples // chunk_size),
            raw_bytes=int(num_samples * np.prod(stats["sample_shape"]) * 4),
            stored_bytes=int(stats["stored"]),
            build_seconds=time.perf_counter() - start,
            prefix_forward_flops_per_sample=float(stats["flops"]),
            source="images",
            shards=shards,
        )
        manifest.save(final)
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.rename(final, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        "Cached %d samples at block %d in %s: %.1f MB raw -> %.1f MB stored (%.1fx) in %.1f s.",
        num_samples,
        position,
        folder,
        manifest.raw_bytes / 2**20,
        manifest.stored_bytes / 2**20,
        manifest.compression_ratio,
        manifest.build_seconds,
    )
    return manifest


def _estimate_row_bytes(
    adapter: BlockAdapter, dataset: Dataset, position: int, chunk_size: int, device: torch.device
) -> int:
    # The raw size of a chunk bounds its encoded size for every codec but a pathological zfp tolerance.
    pixels = dataset[0]["pixel_values"].unsqueeze(0).to(device)
    with torch.no_grad(), prefix_in_eval(adapter, position):
        sample = adapter.prefix(pixels, position)
    return int(sample.numel() * 4 * chunk_size)
