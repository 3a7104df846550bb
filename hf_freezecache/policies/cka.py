"""`cka`: the representational-similarity oracle of SmartFRZ (Table 1): it needs a well-trained reference model."""

from __future__ import annotations

from typing import Any

from . import register_policy
from ._reference import ReferenceRepresentations, load_reference_state
from ._schedule import EvaluationClock, stabilised
from .base import FreezePolicy, TrainingProgress


@register_policy("cka")
class CKAFreezing(FreezePolicy):
    """Freezes a block once its linear CKA to the same block of a well-trained reference model has stabilised.

    `--cka_evaluations_per_epoch` times per epoch, every unfrozen block's output on the probe batch is compared, by
    linear CKA, with the reference model's output of that block on the same images. A block freezes when its last
    `--cka_window` CKA values lie within `--cka_tolerance` of each other (max - min). Blocks may freeze in any order,
    as in SmartFRZ; only the longest frozen prefix is discarded. The same rule labels the SmartFRZ predictor's
    training data (`smartfrz.training.label_freeze_points`).
    """

    name = "cka"
    needs_probe = True

    @classmethod
    def check_arguments(cls, config) -> None:
        if not config.cka_reference:
            raise ValueError(
                "--freeze_policy cka needs --cka_reference: the output_dir (or weights file) of the same model "
                "trained to the end on the same data."
            )
        if config.cka_evaluations_per_epoch < 1 or config.cka_window < 2:
            raise ValueError(
                f"--cka_evaluations_per_epoch must be >= 1 and --cka_window >= 2, got "
                f"{config.cka_evaluations_per_epoch} and {config.cka_window}."
            )
        if not config.cka_tolerance > 0:
            raise ValueError(f"--cka_tolerance must be > 0, got {config.cka_tolerance}.")

    def setup(self, adapter) -> None:
        super().setup(adapter)
        self.clock = EvaluationClock(self.config.cka_evaluations_per_epoch)
        self.history: dict[int, list[float]] = {}
        self.reference: ReferenceRepresentations | None = None
        self._reference_state = load_reference_state(self.config.cka_reference)  # fails early on a bad path

    def set_probe(self, probe) -> None:
        super().set_probe(probe)
        self.reference = ReferenceRepresentations(
            self.adapter, self._reference_state, probe.pixel_values, self.config.adapter_modules()
        )
        self._reference_state = None

    def blocks_to_freeze(self, progress: TrainingProgress, frozen: frozenset[int]) -> set[int]:
        if not self.clock.due(progress):
            return set()
        start = next((i for i in range(self.adapter.num_blocks) if i not in frozen), None)
        if start is None:
            return set()
        io = self.probe.run(start)
        scores = self.reference.cka({i: out for i, (_, out) in io.items() if i not in frozen})
        cfg = self.config
        decided = set()
        self.evidence = {}
        for index, value in scores.items():
            values = self.history.setdefault(index, [])
            values.append(value)
            recent = values[-cfg.cka_window :]
            self.evidence[index] = {"cka": value, "cka_range": max(recent) - min(recent)}
            if stabilised(values, cfg.cka_window, cfg.cka_tolerance):
                decided.add(index)
        return decided

    def state_dict(self) -> dict[str, Any]:
        return {"clock": self.clock.last, "history": {str(k): v for k, v in self.history.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clock.last = state["clock"]
        self.history = {int(k): v for k, v in state["history"].items()}

    def describe(self) -> str:
        cfg = self.config
        return f"cka (window {cfg.cka_window}, tolerance {cfg.cka_tolerance:g}, {cfg.cka_evaluations_per_epoch}/epoch)"
