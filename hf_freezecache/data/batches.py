"""Fixed batches taken from a training dataloader (cost measurement, policy probes) without touching training."""

from __future__ import annotations

import torch


def probe_batch(dataloader, size: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    """The first `size` samples of the dataloader's dataset, collated and on `device`, taken without advancing
    training's RNG (the whole first batch when the dataset cannot be indexed)."""
    # accelerate's prepared dataloader batches through a sampler and reports `batch_size=None`: size it explicitly.
    with torch.random.fork_rng(devices=[]):
        dataset = dataloader.dataset
        if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
            batch = dataloader.collate_fn([dataset[i] for i in range(min(size, len(dataset)))])
        else:
            batch = next(iter(dataloader))
    return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
