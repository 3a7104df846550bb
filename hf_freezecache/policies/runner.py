"""Driving a freezing policy while training: its calls timed, one decision for every process, each freeze recorded
with the evidence it was taken from. Shared by the Trainer callback and the `no_trainer` loop."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from .._distributed import ProcessGroup, main_process_result
from ..freezing import FreezingEngine
from .base import FreezePolicy, TrainingProgress

T = TypeVar("T")


class PolicyRunner:
    """Asks a policy what to freeze and freezes it, the same way on every process.

    A policy that decides from training progress alone (`FreezePolicy.decides_from_progress`) takes the same
    decision everywhere by construction. Any other reads something of its own process (BatchNorm statistics on a
    probe batch, gradient norms, weights): every process asks it, and the main process's decision is applied on all
    of them, in one collective per step; an exception in the policy on any process stops all of them with its
    message instead of leaving the others waiting.

    Args:
        policy (`FreezePolicy`): The policy, set up for the engine's model.
        engine (`FreezingEngine`): Freezes what the policy decides.
        processes (`ProcessGroup`, *optional*): The processes training together; None for one process.
    """

    def __init__(self, policy: FreezePolicy, engine: FreezingEngine, processes: ProcessGroup | None = None) -> None:
        self.policy = policy
        self.engine = engine
        self.processes = None if policy.decides_from_progress else processes
        self._seconds = 0.0

    def take_seconds(self) -> float:
        """The policy's time since the last call (its share of the training time of a freeze state)."""
        seconds, self._seconds = self._seconds, 0.0
        return seconds

    def timed(self, call: Callable[..., T], *args: Any) -> T:
        """`call(*args)`, counted as the policy's time."""
        start = time.perf_counter()
        try:
            return call(*args)
        finally:
            self._seconds += time.perf_counter() - start

    def before_optimizer_step(self, progress: TrainingProgress) -> dict[int, float]:
        """Lets the policy observe the gradients; returns its per-block learning-rate scales for this step."""
        self.timed(self.policy.observe_gradients, progress)
        return self.timed(self.policy.lr_scales, progress, frozenset(self.engine.frozen))

    def decide(self, progress: TrainingProgress) -> list[dict[str, Any]]:
        """Asks the policy, freezes what it decided on every process, and returns a freeze event per new block:
        `{"block", "name", "step", "epoch", "evidence"}`."""
        frozen = frozenset(self.engine.frozen)

        def decision() -> list[int]:
            return sorted(self.timed(self.policy.blocks_to_freeze, progress, frozen))

        decided = main_process_result(decision, self.processes, f"The {self.policy.name} freezing policy")
        return self.freeze(decided, progress)

    def freeze(self, blocks, progress: TrainingProgress) -> list[dict[str, Any]]:
        """Freezes `blocks` and returns a freeze event per new one, with the policy's latest evidence for it:
        `{"block", "name", "step", "epoch", "evidence"}`."""
        new = self.engine.freeze(blocks)
        names = self.engine.adapter.block_names() if new else []
        return [
            {
                "block": index,
                "name": names[index],
                "step": progress.global_step,
                "epoch": progress.epoch,
                "evidence": dict(self.policy.evidence.get(index, {})),
            }
            for index in new
        ]
