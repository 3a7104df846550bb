"""`fixed`: freeze the prefix up to given block positions at given epochs, as in the paper's ResNet-32 runs."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import register_policy
from .base import FreezePolicy, PolicyConfig, TrainingProgress


def parse_freeze_schedule(schedule: str) -> list[tuple[float, int]]:
    """Parses 'EPOCH:POSITION,...' into `[(epoch, position), ...]`, checking epochs and positions both increase."""
    entries = []
    for item in schedule.split(","):
        epoch_text, sep, position_text = item.strip().partition(":")
        try:
            if not sep:
                raise ValueError
            epoch, position = float(epoch_text), int(position_text)
        except ValueError:
            raise ValueError(
                f"--freeze_schedule entry {item.strip()!r} is not EPOCH:POSITION (e.g. '30:5,60:10')."
            ) from None
        if epoch < 0 or position < 1:
            raise ValueError(f"--freeze_schedule entry {item.strip()!r}: need epoch >= 0 and position >= 1.")
        entries.append((epoch, position))
    for (e0, p0), (e1, p1) in zip(entries[:-1], entries[1:], strict=True):
        if not (e1 > e0 and p1 > p0):
            raise ValueError(
                f"--freeze_schedule {schedule!r}: epochs and positions must both increase ({e0}:{p0} then {e1}:{p1})."
            )
    return entries


@dataclass
class FixedScheduleConfig(PolicyConfig):
    """Options of `fixed` (flag `--freeze_schedule`)."""

    schedule: str | None = field(
        default=None,
        metadata={
            "help": "Policy 'fixed': 'EPOCH:POSITION,...', e.g. '30:5,60:10' freezes blocks 0-4 at epoch 30 and "
            "blocks 0-9 at epoch 60. Epochs may be fractional."
        },
    )

    def __post_init__(self) -> None:
        if not self.schedule:
            raise ValueError("--freeze_policy fixed needs --freeze_schedule, e.g. '30:5,60:10'.")
        parse_freeze_schedule(self.schedule)


@register_policy("fixed", config=FixedScheduleConfig)
class FixedSchedule(FreezePolicy):
    """At each `epoch:position` of `--freeze_schedule`, freezes blocks `0..position-1` once `epoch` is reached."""

    name = "fixed"
    decides_from_progress = True
    config: FixedScheduleConfig

    def setup(self, adapter) -> None:
        super().setup(adapter)
        self.schedule = parse_freeze_schedule(self.config.schedule)
        last = self.schedule[-1][1]
        if last > adapter.num_blocks:
            raise ValueError(
                f"--freeze_schedule position {last} is beyond the model: this {adapter.family} model has "
                f"{adapter.num_blocks} blocks, so positions go from 1 to {adapter.num_blocks}."
            )

    def blocks_to_freeze(self, progress: TrainingProgress, frozen: frozenset[int]) -> set[int]:
        reached = [position for epoch, position in self.schedule if progress.epoch >= epoch - 1e-9]
        return set(range(max(reached))) if reached else set()

    def describe(self) -> str:
        return f"fixed ({self.config.schedule})"
