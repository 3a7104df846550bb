"""`freezeout` (Brock et al. 2017, "FreezeOut"; the "Linear Freezing" baseline of SmartFRZ, Appendix B)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import register_policy
from .base import FreezePolicy, PolicyConfig, TrainingProgress

ANNEAL_MODES = ("replace", "multiply")


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
            "help": "FreezeOut: cosine-anneal each block's learning rate to zero at its freeze time (see "
            "--freezeout_anneal_mode). False keeps the global schedule and only freezes at t_i."
        },
    )
    anneal_mode: str = field(
        default="replace",
        metadata={
            "help": "FreezeOut: 'replace' (as published, SmartFRZ Appendix B Eq. 6): block i's learning rate is "
            "0.5 lr (1 + cos(pi t / t_i)) whatever the Trainer's schedule, which still drives the head; "
            "'multiply': the per-block cosine multiplies the Trainer's schedule (each block annealed twice)."
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
        if self.anneal_mode not in ANNEAL_MODES:
            raise ValueError(
                f"--freezeout_anneal_mode must be {' or '.join(map(repr, ANNEAL_MODES))}, got {self.anneal_mode!r}."
            )


@register_policy("freezeout", config=FreezeOutConfig)
class FreezeOut(FreezePolicy):
    """Block i freezes at fraction t_i of training; its learning rate is cosine-annealed to zero by then.

    With n blocks, t_i = s(t_0 + (1 - t_0) * i / n) where s is the identity ("linear") or the cube ("cubic"), as in
    FreezeOut's code; position n is the head, which trains to the end (t = 1) on the Trainer's schedule. Block i's
    learning rate is lr * 0.5 * (1 + cos(pi * t / t_i)) (t = fraction of training done, lr the initial one), times
    1/t_i with `--freezeout_scale_lr`: the per-block cosine replaces the Trainer's schedule for the blocks it anneals,
    as published (anneal mode `replace`; the scale divides out `TrainingProgress.schedule_factor`). With anneal mode
    `multiply` it multiplies the scheduled rate instead, so under a cosine schedule each block is annealed twice.
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
        # Replacing the schedule divides it out; where it is 0 (warmup's first step) no rate can be set by scaling.
        replaced = self.config.anneal_lr and self.config.anneal_mode == "replace" and progress.schedule_factor > 0
        scales = {}
        for i, t_i in enumerate(self.freeze_times):
            if i in frozen:
                continue
            scale = 1.0 / t_i if self.config.scale_lr else 1.0
            if self.config.anneal_lr:
                scale *= 0.5 * (1.0 + math.cos(math.pi * min(progress.fraction / t_i, 1.0)))
            scales[i] = scale / progress.schedule_factor if replaced else scale
        return scales

    def describe(self) -> str:
        cfg = self.config
        anneal = cfg.anneal_mode if cfg.anneal_lr else "off"
        return f"freezeout (t0={cfg.t0}, {cfg.scaling}, anneal={anneal})"
