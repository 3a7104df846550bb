"""`none`: plain training, the baseline every other policy is compared with."""

from __future__ import annotations

from dataclasses import dataclass

from . import register_policy
from .base import FreezePolicy, PolicyConfig, TrainingProgress


@dataclass
class NoFreezingConfig(PolicyConfig):
    """The `none` policy has no options."""


@register_policy("none", config=NoFreezingConfig)
class NoFreezing(FreezePolicy):
    """Never freezes anything."""

    name = "none"
    decides_from_progress = True

    def blocks_to_freeze(self, progress: TrainingProgress, frozen: frozenset[int]) -> set[int]:
        return set()
