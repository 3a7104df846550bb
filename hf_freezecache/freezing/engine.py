"""Freezing blocks for real: no gradients, no updates, no optimizer state, no BatchNorm/Dropout drift."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..model import FreezeCacheModel


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's `AcceleratedOptimizer` (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


class FreezingEngine:
    """Freezes blocks of a `FreezeCacheModel` and releases them from the optimizer.

    Freezing block i (block 0 with the stem):
      - its parameters get `requires_grad=False` and lose their `.grad`, so their values never change again, and its
        modules stay in eval mode (`FreezeCacheModel.freeze_blocks`, `FreezeCacheModel.train`);
      - its parameters leave the optimizer and their optimizer state is freed. Each one is replaced in its param
        group by an empty placeholder, so group sizes never change: the LR scheduler and Trainer checkpoints of
        the optimizer stay valid, and a checkpoint loads into a fresh optimizer before the freeze is re-applied;
      - once blocks 0..i are all frozen, the model runs them under `torch.no_grad()`.

    Args:
        model (`FreezeCacheModel`): The model.
        optimizer (`torch.optim.Optimizer`, *optional*): The optimizer to release frozen parameters from; can be
            attached later with `attach_optimizer`.
    """

    def __init__(self, model: FreezeCacheModel, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.model = model
        self._optimizer: torch.optim.Optimizer | None = None
        if optimizer is not None:
            self.attach_optimizer(optimizer)

    @property
    def adapter(self):
        return self.model.adapter

    @property
    def frozen(self) -> set[int]:
        """Indices of the frozen blocks."""
        return self.model.frozen_blocks

    @property
    def frozen_prefix(self) -> int:
        """Length of the contiguous run of frozen blocks starting at block 0."""
        return self.model.frozen_prefix

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Uses `optimizer` from now on, releasing the parameters of blocks already frozen from it."""
        self._optimizer = unwrap_optimizer(optimizer)
        for index in sorted(self.frozen):
            self._release_from_optimizer(self.adapter.block_parameters(index))

    def freeze(self, indices: Iterable[int]) -> list[int]:
        """Freezes blocks `indices`; returns the ones that were not frozen before, sorted."""
        new = self.model.freeze_blocks(indices)
        for index in new:
            self._release_from_optimizer(self.adapter.block_parameters(index))
        return new

    def trainable_parameters(self) -> int:
        """Number of model parameters that still train."""
        return self.model.trainable_parameters()

    def _release_from_optimizer(self, params: list[nn.Parameter]) -> None:
        if self._optimizer is None:
            return
        ids = {id(p) for p in params}
        for group in self._optimizer.param_groups:
            for slot, param in enumerate(group["params"]):
                if id(param) in ids:
                    self._optimizer.state.pop(param, None)
                    group["params"][slot] = torch.empty(0, dtype=param.dtype, device=param.device)
