"""Coarse-grained chunk shuffling (the paper's Sec. 3.5): random order of chunks, each chunk's samples together."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ChunkShuffleSampler(Sampler[int]):
    """Yields every sample index once per epoch, in an order that a chunked cache decodes cheaply.

    While `dataset.chunk_size` is `None` (training from images) the order is a plain random permutation. Once the
    dataset reads a cache of chunks of k consecutive samples, chunks come in random order with their samples
    together, then samples are shuffled within each window of `batch_size` (so a batch holds whole chunks, in
    random order); the last, shorter chunk is always placed last so chunks never straddle batches when k divides
    the batch size. With k = 1 this is the same permutation as image mode, draw for draw.

    The order depends only on `seed` and the epoch (`set_epoch`, which `Trainer` and accelerate call), so every
    process of a distributed run and a resumed run see the same order.

    Args:
        dataset: A sized dataset with a `chunk_size` attribute (`None` or an int), read at the start of each epoch.
        batch_size (`int`): The per-device training batch size.
        seed (`int`): Base seed.
    """

    def __init__(self, dataset, batch_size: int, seed: int = 0) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[int]:
        rng = torch.Generator().manual_seed(self.seed + self.epoch)
        n = len(self.dataset)
        size = getattr(self.dataset, "chunk_size", None)
        if not size or size == 1:
            yield from torch.randperm(n, generator=rng).tolist()
            return
        full = n // size
        chunks = torch.randperm(full, generator=rng)
        order = (chunks[:, None] * size + torch.arange(size)).reshape(-1)
        order = torch.cat([order, torch.arange(full * size, n)])
        for start in range(0, n, self.batch_size):
            window = order[start : start + self.batch_size]
            yield from window[torch.randperm(len(window), generator=rng)].tolist()
