"""`freezeout` (Brock et al. 2017, "FreezeOut"; the "Linear Freezing" baseline of SmartFRZ, Appendix B)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import register_policy
from .base import FreezePolicy, PolicyConfig, TrainingProgress


@dataclass
class FreezeOutConfig(PolicyConfig):
    """Options of `freezeout` (flags `--freezeout_<field>`)."""

    t0: float = field(
        default=0.5,
        metadata={
            "help": "FreezeOut: fraction of training, in (0, 1], at which block 0 freezes; the other blocks are "
            "spaced from there to the end of training."
        },
    )
    scaling: str = field(
        default="linear",
        metadata={
            "help": "FreezeOut: spacing of the freeze times, 'linear' or 'cubic' (t_i = (t_0 + (1-t_0) i/n)^3)."
        },
    )
    anneal_lr: bool = field(
        default=True,
        metadata={
            "help": "FreezeOut: cosine-anneal each block's learning rate to zero at its freeze time, on top of the "
            "Trainer's schedule. False keeps the global schedule and only freezes at t_i."
        },
    )
    scale_lr: bool = field(
        default=False,
        metadata={"help": "FreezeOut: multiply block i's learning rate by 1/t_i (FreezeOut's scale_lr option)."},
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.t0 <= 1.0:
            raise ValueError(f"--freezeout_t0 must be in (0, 1], got {self.t0}.")
        if self.scaling not in ("linear", "cubic"):
            raise ValueError(f"--freezeout_scaling must be 'linear' or 'cubic', got {self.scaling!r}.")


@register_policy("freezeout", config=FreezeOutConfig)
class FreezeOut(FreezePolicy):
    """Block i freezes at fraction t_i of training; its learning rate is cosine-annealed to zero by then.

    With n blocks, t_i = s(t_0 + (1 - t_0) * i / n) where s is the identity ("linear") or the cube ("cubic"), as in
    FreezeOut's code; position n is the head, which trains to the end (t = 1). The annealing multiplies the
    Trainer's scheduled learning rate of block i by 0.5 * (1 + cos(pi * t / t_i)) (t = fraction of training done), and
    by 1/t_i with `--freezeout_scale_lr`. Combine with `--lr_scheduler_type constant` for FreezeOut exactly as
    published, where the per-block cosine replaces the global schedule.
    """

    name = "freezeout"
    decides_from_progress = True
    config: FreezeOutConfig

    def setup(self, adapter) -> None:
        super().setup(adapter)
        n = adapter.num_blocks
        cube = self.config.scaling == "cubic"
        t0 = self.config.t0
        self.freeze_times = [(t0 + (1 - t0) * i / n) ** (3 if cube else 1) for i in range(n)]

    def blocks_to_freeze(self, progress: TrainingProgress, frozen: frozenset[int]) -> set[int]:
        return {i for i, t_i in enumerate(self.freeze_times) if progress.fraction >= t_i - 1e-12}

    def lr_scales(self, progress: TrainingProgress, frozen: frozenset[int]) -> dict[int, float]:
        if not (self.config.anneal_lr or self.config.scale_lr):
            return {}
        scales = {}
        for i, t_i in enumerate(self.freeze_times):
            if i in frozen:
                continue
            scale = 1.0 / t_i if self.config.scale_lr else 1.0
            if self.config.anneal_lr:
                scale *= 0.5 * (1.0 + math.cos(math.pi * min(progress.fraction / t_i, 1.0)))
            scales[i] = scale
        return scales

    def describe(self) -> str:
        cfg = self.config
        return f"freezeout (t0={cfg.t0}, {cfg.scaling}, anneal_lr={cfg.anneal_lr})"
