"""`none`: plain training, the baseline every other policy is compared with."""

from __future__ import annotations

from . import register_policy
from .base import FreezePolicy, TrainingProgress


@register_policy("none")
class NoFreezing(FreezePolicy):
    """Never freezes anything."""

    name = "none"

    def blocks_to_freeze(self, progress: TrainingProgress, frozen: frozenset[int]) -> set[int]:
        return set()
