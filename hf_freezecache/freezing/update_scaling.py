"""Per-block learning-rate multipliers that work with whatever optimizer and scheduler `Trainer` built."""

from __future__ import annotations

import torch

from ..models import BlockAdapter


class BlockUpdateScaler:
    """Scales each block's optimizer update by a factor, which equals scaling that block's learning rate.

    `Trainer` puts all parameters in one or two param groups and its scheduler owns their learning rates, so a
    per-block learning rate cannot be set on the groups. Instead the parameters of scaled blocks are snapshotted
    before `optimizer.step()` and moved back to `old + scale * (new - old)` after it. For SGD (with momentum and
    weight decay), Adam and AdamW the update is proportional to the learning rate and their state does not depend
    on it, so this is exactly a per-block learning rate of `scale * lr` (checked by a test). Costs one copy of the
    scaled parameters per step.

    Args:
        adapter (`BlockAdapter`): The model's block view.
    """

    def __init__(self, adapter: BlockAdapter) -> None:
        self.adapter = adapter
        self._pending: list[tuple[float, list[torch.nn.Parameter], list[torch.Tensor]]] = []

    @torch.no_grad()
    def before_step(self, scales: dict[int, float]) -> None:
        """Snapshots the trainable parameters of every block whose scale is not 1."""
        self._pending = []
        for index, scale in scales.items():
            if scale == 1.0:
                continue
            params = [p for p in self.adapter.block_parameters(index) if p.requires_grad]
            self._pending.append((scale, params, [p.detach().clone() for p in params]))

    @torch.no_grad()
    def after_step(self) -> None:
        """Rescales the updates the optimizer just applied to the snapshotted blocks."""
        for scale, params, olds in self._pending:
            for param, old in zip(params, olds, strict=True):
                param.sub_(old).mul_(scale).add_(old)
        self._pending = []
