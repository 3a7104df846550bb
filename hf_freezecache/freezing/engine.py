"""Freezing blocks for real: no gradients, no updates, no optimizer state, no BN/Dropout drift, no prefix graph."""

from __future__ import annotations

import types
from collections.abc import Iterable

import torch
from torch import nn

from ..models import BlockAdapter


def _train_frozen(self: nn.Module, mode: bool = True) -> nn.Module:
    # Installed on frozen modules: `Trainer` calls `model.train()` every step, which would put BatchNorm back to
    # updating its running statistics and re-enable Dropout. A frozen module always answers with eval mode.
    return nn.Module.train(self, False)


def _forward_without_grad(self: nn.Module, *args, **kwargs):
    # Installed on modules of the frozen prefix: nothing upstream needs their gradients, so no graph is recorded
    # and no activation is saved for backward.
    with torch.no_grad():
        return type(self).forward(self, *args, **kwargs)


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's `AcceleratedOptimizer` (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


class FreezingEngine:
    """Freezes blocks of a model seen through its `BlockAdapter`, and keeps them frozen.

    Freezing block i (block 0 with the stem):
      - its parameters get `requires_grad=False` and lose their `.grad`, so their values never change again;
      - its modules stay in eval mode whatever `model.train()` says (BatchNorm statistics and Dropout stop);
      - its parameters leave the optimizer and their optimizer state is freed. Each one is replaced in its param
        group by an empty placeholder, so group sizes never change: the LR scheduler and Trainer checkpoints of
        the optimizer stay valid, and a checkpoint loads into a fresh optimizer before the freeze is re-applied;
      - once blocks 0..i are all frozen, their forward runs under `torch.no_grad()`.

    Args:
        adapter (`BlockAdapter`): The model's block view.
        optimizer (`torch.optim.Optimizer`, *optional*): The optimizer to release frozen parameters from; can be
            attached later with `attach_optimizer`.
    """

    def __init__(self, adapter: BlockAdapter, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.adapter = adapter
        self.frozen: set[int] = set()
        self._no_grad_prefix = 0
        self._optimizer: torch.optim.Optimizer | None = None
        if optimizer is not None:
            self.attach_optimizer(optimizer)

    @property
    def frozen_prefix(self) -> int:
        """Length of the contiguous run of frozen blocks starting at block 0."""
        position = 0
        while position in self.frozen:
            position += 1
        return position

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Uses `optimizer` from now on, releasing the parameters of blocks already frozen from it."""
        self._optimizer = unwrap_optimizer(optimizer)
        for index in sorted(self.frozen):
            self._release_from_optimizer(self.adapter.block_parameters(index))

    def freeze(self, indices: Iterable[int]) -> list[int]:
        """Freezes blocks `indices`; returns the ones that were not frozen before, sorted."""
        new = sorted(set(indices) - self.frozen)
        outside = [index for index in new if not 0 <= index < self.adapter.num_blocks]
        if outside:  # checked before anything changes, so a bad call leaves no half-frozen model
            raise ValueError(
                f"Block index {outside[0]} is outside the model: blocks go from 0 to {self.adapter.num_blocks - 1}."
            )
        for index in new:
            params = self.adapter.block_parameters(index)
            for param in params:
                param.requires_grad_(False)
                param.grad = None
            for module in self.adapter.block_modules(index):
                module.train = types.MethodType(_train_frozen, module)
                module.train(False)
            self._release_from_optimizer(params)
            self.frozen.add(index)
        self._extend_no_grad_prefix()
        return new

    def trainable_parameters(self) -> int:
        """Number of model parameters that still train."""
        return sum(p.numel() for p in self.adapter.model.parameters() if p.requires_grad)

    def _extend_no_grad_prefix(self) -> None:
        for index in range(self._no_grad_prefix, self.frozen_prefix):
            for module in self.adapter.block_modules(index):
                module.forward = types.MethodType(_forward_without_grad, module)
        self._no_grad_prefix = max(self._no_grad_prefix, self.frozen_prefix)

    def _release_from_optimizer(self, params: list[nn.Parameter]) -> None:
        if self._optimizer is None:
            return
        ids = {id(p) for p in params}
        for group in self._optimizer.param_groups:
            for slot, param in enumerate(group["params"]):
                if id(param) in ids:
                    self._optimizer.state.pop(param, None)
                    group["params"][slot] = torch.empty(0, dtype=param.dtype, device=param.device)
