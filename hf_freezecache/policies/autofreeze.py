"""`autofreeze` (Liu et al. 2021, "AutoFreeze"), configured as in SmartFRZ's Appendix B."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import register_policy
from ._schedule import EvaluationClock
from .base import FreezePolicy, PolicyConfig, TrainingProgress


@dataclass
class AutoFreezeConfig(PolicyConfig):
    """Options of `autofreeze` (flags `--autofreeze_<field>`)."""

    evaluations_per_epoch: int = field(
        default=4, metadata={"help": "AutoFreeze: evaluations of the gradient-norm change rate per epoch (M)."}
    )
    percentile: float = field(
        default=50.0,
        metadata={
            "help": "AutoFreeze: blocks whose change rate is at or below this percentile (N) of the unfrozen blocks' "
            "rates are candidates; they freeze from the front only."
        },
    )

    def __post_init__(self) -> None:
        if self.evaluations_per_epoch < 1:
            raise ValueError(
                f"--autofreeze_evaluations_per_epoch must be at least 1, got {self.evaluations_per_epoch}."
            )
        if not 0.0 <= self.percentile <= 100.0:
            raise ValueError(f"--autofreeze_percentile must be in [0, 100], got {self.percentile}.")


@register_policy("autofreeze", config=AutoFreezeConfig)
class AutoFreeze(FreezePolicy):
    """Freezes front blocks whose gradient norm has stopped changing.

    Every optimizer step adds each unfrozen block's gradient L2 norm to a running sum (one fused norm over the
    gradients already there; no extra backward). `--autofreeze_evaluations_per_epoch` (M) times per epoch, the block's
    gradient norm g over the interval is that sum divided by the steps it saw, and its change rate is
    |g_prev - g| / g_prev. Blocks whose rate is at or below the `--autofreeze_percentile` (N) percentile of the rates
    of all unfrozen blocks are candidates; candidates freeze from the front, and a block freezes only when every
    block before it is frozen. The first evaluation only sets g_prev.
    """

    name = "autofreeze"
    config: AutoFreezeConfig

    def setup(self, adapter) -> None:
        super().setup(adapter)
        self.clock = EvaluationClock(self.config.evaluations_per_epoch)
        self._block_params = [adapter.block_parameters(index) for index in range(adapter.num_blocks)]
        self._norm_sums: torch.Tensor | None = None  # on the training device: no host sync per step
        self._steps = 0
        self.previous_norms: dict[int, float] = {}

    @torch.no_grad()
    def observe_gradients(self, progress: TrainingProgress) -> None:
        norms = []
        for params in self._block_params:
            grads = [p.grad for p in params if p.requires_grad and p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else None)
        if all(n is None for n in norms):
            return
        device = next(n for n in norms if n is not None).device
        stacked = torch.stack([n if n is not None else torch.zeros((), device=device) for n in norms]).float()
        self._norm_sums = stacked if self._norm_sums is None else self._norm_sums + stacked
        self._steps += 1

    def blocks_to_freeze(self, progress: TrainingProgress, frozen: frozenset[int]) -> set[int]:
        if not self.clock.due(progress) or self._norm_sums is None:
            return set()
        norms = (self._norm_sums / self._steps).tolist()
        self._norm_sums, self._steps = None, 0
        active = [index for index in range(self.adapter.num_blocks) if index not in frozen]
        current = {index: norms[index] for index in active}
        rates = {
            index: abs(self.previous_norms[index] - g) / self.previous_norms[index]
            for index, g in current.items()
            if self.previous_norms.get(index)
        }
        self.previous_norms = current
        if not rates:
            return set()
        threshold = float(np.percentile(list(rates.values()), self.config.percentile))
        self.evidence = {
            index: {"grad_norm": current[index], "change_rate": rate, "threshold": threshold}
            for index, rate in rates.items()
        }
        decided = set()
        position = active[0]  # the first unfrozen block: every block before it is frozen
        while position in rates and rates[position] <= threshold:
            decided.add(position)
            position += 1
            while position in frozen:
                position += 1
        return decided

    def state_dict(self) -> dict[str, Any]:
        sums = self._norm_sums.tolist() if self._norm_sums is not None else None
        return {
            "clock": self.clock.last,
            "norm_sums": sums,
            "steps": self._steps,
            "previous_norms": {str(k): v for k, v in self.previous_norms.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clock.last = state["clock"]
        device = next(self.adapter.model.parameters()).device
        sums = state["norm_sums"]
        self._norm_sums = torch.tensor(sums, device=device) if sums is not None else None
        self._steps = state["steps"]
        self.previous_norms = {int(k): v for k, v in state["previous_norms"].items()}

    def describe(self) -> str:
        cfg = self.config
        return f"autofreeze (M={cfg.evaluations_per_epoch}/epoch, N={cfg.percentile:g}%)"
