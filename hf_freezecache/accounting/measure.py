"""Measures what one training step of a model costs in its current freeze state: FLOPs and memory."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class StepCost:
    """Cost of one training step (forward + backward) in one freeze state.

    Bytes are those training holds: the model (parameters and buffers), gradients of trainable parameters,
    optimizer state, and the tensors autograd saves for backward at the measured batch size.
    """

    flops_per_sample: float
    forward_flops_per_sample: float
    model_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    batch_size: int

    @property
    def memory_bytes(self) -> int:
        return self.model_bytes + self.gradient_bytes + self.optimizer_bytes + self.activation_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "memory_bytes": self.memory_bytes}


def _unique_tensors(tensors) -> list[torch.Tensor]:
    seen: set[int] = set()
    return [t for t in tensors if not (id(t) in seen or seen.add(id(t)))]


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of tensors held in `optimizer.state` (momentum buffers, Adam moments, step counters)."""
    if optimizer is None:
        return 0
    optimizer = getattr(optimizer, "optimizer", optimizer)
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


def true_replica(model: nn.Module) -> nn.Module:
    """A deep copy of `model` that shares nothing with it and runs its modules' class-defined `forward`s.

    Instance attributes named `forward` are dropped from the copy: `copy.deepcopy` copies a closure as it is, and a
    closure over the live model (accelerate's autocast wrapper of a callable without `__func__`) would run the live
    model instead of the copy.
    """
    replica = copy.deepcopy(model)
    for module in replica.modules():
        vars(module).pop("forward", None)
    live = {t.data_ptr() for t in [*model.parameters(), *model.buffers()] if t.numel()}
    if any(t.data_ptr() in live for t in [*replica.parameters(), *replica.buffers()] if t.numel()):
        raise RuntimeError(f"A copy of {type(model).__name__} shares tensors with the model: it cannot be measured.")
    return replica


def measure_step_cost(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    exclude: Iterable[torch.Tensor] = (),
    autocast_dtype: torch.dtype | None = None,
) -> StepCost:
    """Runs one real forward+backward of `model` on `batch` and measures it, without touching `model`.

    FLOPs come from `torch.utils.flop_counter.FlopCounterMode`; the bytes saved for backward are counted with
    saved-tensor hooks (each storage once, parameters and buffers excluded since they are counted as the model).
    The step runs on a true replica under a forked RNG, so the model's weights, gradients, BatchNorm statistics and
    the random stream of training are exactly as they were: a deep copy whose modules run their classes' own
    `forward`. An instance-level `forward` (accelerate's mixed-precision wrapper puts one on the model it prepares)
    may be a closure over the live model, which `copy.deepcopy` keeps as it is, so the replica drops it and applies
    the same mixed precision itself (`autocast_dtype`).

    Args:
        model (`nn.Module`): A model with the `Trainer` calling convention (`model(**batch).loss`), in the freeze
            state to measure.
        batch (`dict[str, torch.Tensor]`): A training batch, on the model's device; its first dimension is the
            batch size.
        optimizer (`torch.optim.Optimizer`, *optional*): The live optimizer, whose state bytes are read as they are.
        exclude (`Iterable[torch.Tensor]`): Parameters and buffers outside training memory (a discarded prefix),
            left out of the model bytes.
        autocast_dtype (`torch.dtype`, *optional*): The mixed precision training runs under (`torch.bfloat16` for
            `--bf16`, `torch.float16` for `--fp16`); None for full precision.
    """
    batch_size = int(next(iter(batch.values())).shape[0])
    device = next(iter(batch.values())).device  # the prefix of a model may wait offloaded on another device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        replica = true_replica(model)
        replica.train()
        model_storages = {
            t.untyped_storage().data_ptr() for t in [*replica.parameters(), *replica.buffers()] if t.numel()
        }
        saved: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in model_storages:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        precision = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
        with FlopCounterMode(display=False) as forward_counter, precision:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                loss = replica(**batch).loss
        forward_flops = forward_counter.get_total_flops()
        with FlopCounterMode(display=False) as backward_counter:
            if loss.requires_grad:
                loss.backward()
        total_flops = forward_flops + backward_counter.get_total_flops()

    excluded = {id(t) for t in exclude}
    params = [p for p in _unique_tensors(model.parameters()) if id(p) not in excluded]
    buffers = [b for b in _unique_tensors(model.buffers()) if id(b) not in excluded]
    return StepCost(
        flops_per_sample=total_flops / batch_size,
        forward_flops_per_sample=forward_flops / batch_size,
        model_bytes=sum(t.numel() * t.element_size() for t in [*params, *buffers]),
        gradient_bytes=sum(p.numel() * p.element_size() for p in params if p.requires_grad),
        optimizer_bytes=optimizer_state_bytes(optimizer),
        activation_bytes=sum(saved.values()),
        batch_size=batch_size,
    )
