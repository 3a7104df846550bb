"""Freezing policies: one file per policy, all behind the `POLICIES` registry."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._registry import Registry
from ._probe import BlockProbe, linear_cka
from .base import FreezePolicy, TrainingProgress

if TYPE_CHECKING:
    from ..config import FreezeCacheArguments

POLICIES: Registry[FreezePolicy] = Registry("freeze policy")
register_policy = POLICIES.register

from . import autofreeze, cka, egeria, fixed, freezeout, none, smartfrz  # noqa: E402, F401, I001


def build_policy(config: FreezeCacheArguments) -> FreezePolicy:
    """Instantiates the policy named by `config.freeze_policy`."""
    return POLICIES.get(config.freeze_policy)(config)


__all__ = [
    "POLICIES",
    "BlockProbe",
    "FreezePolicy",
    "TrainingProgress",
    "build_policy",
    "linear_cka",
    "register_policy",
]
