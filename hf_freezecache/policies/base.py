"""The interface every freezing policy implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from transformers import TrainerState

    from ..models import BlockAdapter
    from ._probe import BlockProbe


@dataclass
class PolicyConfig:
    """Base of a policy's options: one dataclass per policy, in the policy's file, registered with it
    (`@register_policy(name, config=...)`), as peft registers each method with its config.

    Every field has a default and a `metadata={"help": ...}`; `__post_init__` rejects bad values with a one-line
    `ValueError` naming the flag, the value and what is allowed. `FreezeCacheArguments` declares one flag per field
    (`freezeout_t0` feeds `FreezeOutConfig.t0`) and builds the config of `--freeze_policy` when it is created. The
    config of a policy that sets `needs_probe` has a `probe_size` field: the training images in its probe batch.
    """


def schedule_factor(lr_scheduler: Any | None) -> float:
    """The learning rate `lr_scheduler` sets for the coming step over its initial one (1 without a scheduler).

    Accepts a torch scheduler or accelerate's `AcceleratedScheduler` around one; the first param group speaks for all
    (transformers' schedules scale every group by the same factor).
    """
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
    base = getattr(scheduler, "base_lrs", None)
    if not base or not base[0]:
        return 1.0
    return float(scheduler.get_last_lr()[0]) / float(base[0])


@dataclass(frozen=True)
class TrainingProgress:
    """Where training stands when a policy is asked for a decision.

    Args:
        global_step (`int`): Optimizer steps taken so far.
        max_steps (`int`): Optimizer steps of the whole run.
        epoch (`float`): Epochs completed so far, fractional.
        num_train_epochs (`float`): Epochs of the whole run.
        schedule_factor (`float`, *optional*, defaults to 1): The training loop's learning rate for the coming step
            over its initial one (`schedule_factor(lr_scheduler)`): what the global schedule multiplies the learning
            rate by now, so a policy can replace it for some blocks (FreezeOut).
    """

    global_step: int
    max_steps: int
    epoch: float
    num_train_epochs: float
    schedule_factor: float = 1.0

    @classmethod
    def from_trainer_state(cls, state: TrainerState, lr_scheduler: Any | None = None) -> TrainingProgress:
        """Where `Trainer` stands, from its `TrainerState` and (for `schedule_factor`) its learning-rate scheduler."""
        return cls(
            state.global_step,
            state.max_steps,
            float(state.epoch or 0.0),
            float(state.num_train_epochs),
            schedule_factor(lr_scheduler),
        )

    @property
    def fraction(self) -> float:
        """Fraction of training done, in [0, 1]."""
        return self.global_step / self.max_steps if self.max_steps else 0.0


class FreezePolicy(ABC):
    """Decides which blocks to freeze, from training progress and whatever it observes of the model.

    The callback calls, every optimizer step: `observe_gradients` and `lr_scales` before the optimizer step (gradients
    are present), then `blocks_to_freeze` after it. Policies that keep history return it from `state_dict` so it is
    saved in Trainer checkpoints and restored on resume. Blocks never unfreeze. A policy may freeze blocks in any
    order; only the longest frozen prefix runs without gradients and can be discarded.

    Policies that watch representations set `needs_probe`: the callback then hands them a `BlockProbe` (a fixed batch
    of `config.probe_size` training images) before the first step. What a policy decided from is kept in
    `evidence` (per block, the numbers of its latest evaluation): the callback logs it with the Trainer's logs and
    writes it into the freeze timeline of the cost report when the block freezes.

    Args:
        config (`PolicyConfig`): The policy's options, an instance of the config class it is registered with.
    """

    name: ClassVar[str] = ""
    needs_probe: ClassVar[bool] = False
    #: Whether decisions depend on training progress alone, so that every process takes the same one without
    #: communicating (`PolicyRunner` otherwise applies the main process's decision everywhere, one collective a step).
    decides_from_progress: ClassVar[bool] = False

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self.adapter: BlockAdapter | None = None
        self.probe: BlockProbe | None = None
        self.evidence: dict[int, dict[str, float]] = {}

    def setup(self, adapter: BlockAdapter) -> None:
        """Binds the policy to a model; raises `ValueError` when the options do not fit it (e.g. a block index)."""
        self.adapter = adapter

    def set_probe(self, probe: BlockProbe) -> None:
        """Receives the probe batch (only called when `needs_probe`), after `setup` and before the first step."""
        self.probe = probe

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

    def log_values(self) -> dict[str, float]:
        """The latest evidence as flat Trainer log entries, `<policy>/<quantity>_<block>`."""
        return {
            f"{self.name}/{key}_{block}": value
            for block, values in sorted(self.evidence.items())
            for key, value in values.items()
        }

    def describe(self) -> str:
        """One line for reports."""
        return self.name
