"""SmartFRZ's layer tailoring: the same random subset of a block's weights, read at every record."""

from __future__ import annotations

import torch

from ...models import BlockAdapter


class WeightTailor:
    """Picks, once, `size` random weights of every block and reads them on demand.

    Weights are drawn from the block's weight matrices and kernels (parameters with two or more dimensions; all
    parameters for a block without any), uniformly over their elements, without replacement when the block has
    enough of them. The draw depends only on `seed` and the block's index, so a run and its resume read the same
    weights.

    Args:
        adapter (`BlockAdapter`): The model's block view.
        size (`int`): Weights per record (1024 in the paper).
        seed (`int`): Seed of the draw.
    """

    def __init__(self, adapter: BlockAdapter, size: int, seed: int = 0) -> None:
        self.adapter = adapter
        self.size = size
        self._picks: list[list[tuple[torch.nn.Parameter, torch.Tensor]]] = []
        for index in range(adapter.num_blocks):
            params = adapter.block_parameters(index)
            params = [p for p in params if p.dim() >= 2] or params
            total = sum(p.numel() for p in params)
            generator = torch.Generator().manual_seed(seed * 100_003 + index)
            if total >= size:
                flat = torch.randperm(total, generator=generator)[:size].sort().values
            else:
                flat = torch.randint(total, (size,), generator=generator).sort().values
            picks, offset = [], 0
            for param in params:
                chosen = flat[(flat >= offset) & (flat < offset + param.numel())] - offset
                if len(chosen):
                    picks.append((param, chosen))
                offset += param.numel()
            self._picks.append(picks)

    @torch.no_grad()
    def record(self, index: int) -> torch.Tensor:
        """The tailored weights of block `index` now, `(size,)` float32 on the CPU."""
        values = [param.detach().reshape(-1)[chosen.to(param.device)] for param, chosen in self._picks[index]]
        return torch.cat(values).float().cpu()
