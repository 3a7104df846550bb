"""`cka`: the representational-similarity oracle of SmartFRZ (Table 1): it needs a well-trained reference model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import register_policy
from ._probe import check_probe_size
from ._reference import ReferenceRepresentations, load_reference_state
from ._schedule import EvaluationClock, stabilised
from .base import FreezePolicy, PolicyConfig, TrainingProgress


@dataclass
class CKAConfig(PolicyConfig):
    """Options of `cka` (flags `--cka_<field>`, and `--policy_probe_size`)."""

    reference: str | None = field(
        default=None,
        metadata={
            "help": "Policy 'cka': output_dir or weights file of the same model trained to the end on the same data."
        },
    )
    evaluations_per_epoch: int = field(
        default=4, metadata={"help": "CKA: evaluations of every unfrozen block's CKA to the reference per epoch."}
    )
    window: int = field(
        default=4,
        metadata={"help": "CKA: a block freezes when its last this-many CKA values lie within --cka_tolerance."},
    )
    tolerance: float = field(
        default=0.02,
        metadata={"help": "CKA: largest range (max - min) of the last --cka_window values of a stable block."},
    )
    probe_size: int = field(default=256, metadata={"help": "CKA: training images in the fixed probe batch."})

    def __post_init__(self) -> None:
        if not self.reference:
            raise ValueError(
                "--freeze_policy cka needs --cka_reference: the output_dir (or weights file) of the same model "
                "trained to the end on the same data."
            )
        if self.evaluations_per_epoch < 1 or self.window < 2:
            raise ValueError(
                f"--cka_evaluations_per_epoch must be >= 1 and --cka_window >= 2, got "
                f"{self.evaluations_per_epoch} and {self.window}."
            )
        if not self.tolerance > 0:
            raise ValueError(f"--cka_tolerance must be > 0, got {self.tolerance}.")
        check_probe_size(self.probe_size)


@register_policy("cka", config=CKAConfig)
class CKAFreezing(FreezePolicy):
    """Freezes a block once its linear CKA to the same block of a well-trained reference model has stabilised.

    `--cka_evaluations_per_epoch` times per epoch, every unfrozen block's output on the probe batch is compared, by
    linear CKA, with the reference model's output of that block on the same images. A block freezes when its last
    `--cka_window` CKA values lie within `--cka_tolerance` of each other (max - min). Blocks may freeze in any order,
    as in SmartFRZ; only the longest frozen prefix is discarded. The SmartFRZ predictor's training data are
    labelled offline instead, once a block's CKA stays settled to the end (`smartfrz.recording.label_freeze_points`).
    """

    name = "cka"
    needs_probe = True
    config: CKAConfig

    def setup(self, adapter) -> None:
        super().setup(adapter)
        self.clock = EvaluationClock(self.config.evaluations_per_epoch)
        self.history: dict[int, list[float]] = {}
        self.reference: ReferenceRepresentations | None = None
        self._reference_state = load_reference_state(self.config.reference)  # fails early on a bad path

    def set_probe(self, probe) -> None:
        super().set_probe(probe)
        self.reference = ReferenceRepresentations(self.adapter, self._reference_state, probe.pixel_values)
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
            recent = values[-cfg.window :]
            self.evidence[index] = {"cka": value, "cka_range": max(recent) - min(recent)}
            if stabilised(values, cfg.window, cfg.tolerance):
                decided.add(index)
        return decided

    def state_dict(self) -> dict[str, Any]:
        return {"clock": self.clock.last, "history": {str(k): v for k, v in self.history.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clock.last = state["clock"]
        self.history = {int(k): v for k, v in state["history"].items()}

    def describe(self) -> str:
        cfg = self.config
        return f"cka (window {cfg.window}, tolerance {cfg.tolerance:g}, {cfg.evaluations_per_epoch}/epoch)"
