"""The interface every freezing policy implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from ..config import FreezeCacheArguments
    from ..models import BlockAdapter


@dataclass(frozen=True)
class TrainingProgress:
    """Where training stands when a policy is asked for a decision.

    Args:
        global_step (`int`): Optimizer steps taken so far.
        max_steps (`int`): Optimizer steps of the whole run.
        epoch (`float`): Epochs completed so far, fractional.
        num_train_epochs (`float`): Epochs of the whole run.
    """

    global_step: int
    max_steps: int
    epoch: float
    num_train_epochs: float

    @property
    def fraction(self) -> float:
        """Fraction of training done, in [0, 1]."""
        return self.global_step / self.max_steps if self.max_steps else 0.0


class FreezePolicy(ABC):
    """Decides which blocks to freeze, from training progress and whatever it observes of the model.

    The callback calls, every optimizer step: `observe_gradients` and `lr_scales` before the optimizer step (gradients
    are present), then `blocks_to_freeze` after it. Policies that keep history return it from `state_dict` so it is
    saved in Trainer checkpoints and restored on resume. Blocks never unfreeze.

    Args:
        config (`FreezeCacheArguments`): The run's options; a policy reads its own `<policy>_*` fields.
    """

    name: ClassVar[str] = ""

    def __init__(self, config: FreezeCacheArguments) -> None:
        self.config = config
        self.adapter: BlockAdapter | None = None

    @classmethod
    def check_arguments(cls, config: FreezeCacheArguments) -> None:
        """Rejects option values this policy cannot use; called when the arguments are parsed."""

    def setup(self, adapter: BlockAdapter) -> None:
        """Binds the policy to a model; raises `ValueError` when the options do not fit it (e.g. a block index)."""
        self.adapter = adapter

    @abstractmethod
    def blocks_to_freeze(self, progress: TrainingProgress, frozen: frozenset[int]) -> set[int]:
        """Blocks that should be frozen now, after the optimizer step at `progress` (may include frozen ones)."""

    def observe_gradients(self, progress: TrainingProgress) -> None:
        """Called before each optimizer step, while gradients are present."""

    def lr_scales(self, progress: TrainingProgress, frozen: frozenset[int]) -> dict[int, float]:
        """Per-block multipliers of the learning rate for the coming optimizer step; missing blocks use 1."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state needed to resume."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what `state_dict` returned."""

    def describe(self) -> str:
        """One line for reports."""
        return self.name
