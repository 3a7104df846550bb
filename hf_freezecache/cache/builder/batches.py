"""The prefix over one process's share of the samples: batches of activations, labels and sidecar arrays."""

from __future__ import annotations

import itertools
from collections.abc import Generator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..._random import seeded
from ...data.sample_ids import check_same_labels
from ..sidecars import Sidecar
from .prepare import ComputedBatch, PrefixRun, prefix_in_eval


def process_share(num_samples: int, unit: int, process_index: int, num_processes: int) -> range:
    """The samples process `process_index` of `num_processes` runs the prefix over in a distributed build.

    Shares are consecutive runs of whole `unit`s (the least common multiple of the chunk size and the batch size),
    so every process's chunks and prefix batches are exactly those of a single-process build, and the cache is the
    same bytes whatever the number of processes.
    """
    units = -(-num_samples // unit)
    first, last = units * process_index // num_processes, units * (process_index + 1) // num_processes
    return range(min(first * unit, num_samples), min(last * unit, num_samples))


def prefix_batches(
    run: PrefixRun,
    share: range,
    sidecars: Sequence[Sidecar] = (),
    augmented_dataset: Dataset | None = None,
    progress: str | None = None,
    computed: Sequence[ComputedBatch] = (),
) -> Generator[dict[str, np.ndarray], None, None]:
    """Runs the prefix over the samples `share`, a batch at a time, in order.

    Yields, per batch, `"data"` (float32 activations), `"labels"`, and every sidecar array by name.

    Args:
        run (`PrefixRun`): The prefix and the dataset.
        share (`range`): The samples, from `process_share`.
        sidecars (`Sequence[Sidecar]`): Calibrated sidecars whose arrays to compute.
        augmented_dataset (`Dataset`, *optional*): The same samples through the training augmentation, for sidecars
            with `needs_augmented_view`; sample `i` is drawn under a seed derived from the build seed and `i`, so it
            depends neither on the batch size nor on the processes.
        progress (`str`, *optional*): Description of a progress bar over the samples; None for no bar.
        computed (`Sequence[ComputedBatch]`): The dataset's first batches and their activations, already computed
            (by `prepare_build`): those that are whole batches of the share are neither read nor run through the
            prefix again.
    """
    reused = computed[: len(share) // run.batch_size] if share.start == 0 else ()
    bar = tqdm(total=len(share), desc=progress, unit="img", disable=progress is None)
    with seeded(run.seed), prefix_in_eval(run.adapter, run.position):
        rest = run.loader(share[len(reused) * run.batch_size :])
        for local, (batch, activations) in enumerate(itertools.chain(reused, ((b, None) for b in rest))):
            pixels = batch["pixel_values"].to(run.device)
            activations = run(pixels).float() if activations is None else activations
            labels = np.asarray(batch["labels"]).reshape(-1)
            arrays: dict[str, np.ndarray] = {}
            if sidecars:
                first = share.start + local * run.batch_size
                indices = range(first, first + len(activations))
                augmented = None
                if augmented_dataset is not None:
                    augmented = _augmented_view(run, augmented_dataset, indices, labels)
                for sidecar in sidecars:
                    for name, value in sidecar.compute(run, pixels, activations, augmented).items():
                        arrays[name] = value.cpu().numpy()
            bar.update(len(activations))
            yield {
                "data": _to_host(activations),
                "labels": labels,
                **arrays,
            }
    bar.close()


def _to_host(tensor: torch.Tensor) -> np.ndarray:
    """`tensor` as a numpy array; from a GPU, copied through pinned memory (a direct DMA, faster than pageable)."""
    if tensor.device.type != "cuda":
        return tensor.cpu().numpy()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    # The encodes read the array on other threads, which do not wait on this stream: it must be complete here.
    torch.cuda.current_stream(tensor.device).synchronize()
    return host.numpy()


def _augmented_view(run: PrefixRun, augmented_dataset: Dataset, indices: range, labels: np.ndarray) -> torch.Tensor:
    # One seed per sample: a sample's view depends neither on the batch size nor on the number of processes.
    items = []
    for index in indices:
        with seeded(run.seed * 1_000_003 + index):
            items.append(augmented_dataset[index])
    batch = run.collate(items)
    # Datasets without stored rows to compare (`check_same_samples`) are at least matched label by label.
    check_same_labels(labels, np.asarray(batch["labels"]), indices.start, "`augmented_dataset`")
    return batch["pixel_values"].to(run.device)
