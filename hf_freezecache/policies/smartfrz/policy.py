"""`smartfrz` (Li et al. 2024, "SmartFRZ"): an attention predictor decides from each block's weight history."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import register_policy
from .._schedule import EvaluationClock, decode_array, encode_array
from ..base import FreezePolicy, PolicyConfig, TrainingProgress
from .predictor import FreezePredictor
from .tailoring import WeightTailor


@dataclass
class SmartFRZConfig(PolicyConfig):
    """Options of `smartfrz` (flags `--smartfrz_<field>`)."""

    predictor: str | None = field(
        default=None,
        metadata={"help": "SmartFRZ: predictor file (FreezePredictor.save); default: the one shipped in the package."},
    )
    records_per_epoch: int = field(
        default=4,
        metadata={"help": "SmartFRZ: freezing stages per epoch; each records the tailored weights and decides."},
    )
    window: int = field(default=30, metadata={"help": "SmartFRZ: attention window, in records."})
    min_records: int = field(
        default=8, metadata={"help": "SmartFRZ: records a block needs before the predictor decides for it."}
    )
    threshold: float = field(
        default=0.5, metadata={"help": "SmartFRZ: freeze when the predicted freeze probability exceeds this."}
    )
    seed: int = field(default=0, metadata={"help": "SmartFRZ: seed of the tailored weights' selection."})

    def __post_init__(self) -> None:
        for name in ("records_per_epoch", "window", "min_records"):
            if getattr(self, name) < 1:
                raise ValueError(f"--smartfrz_{name} must be at least 1, got {getattr(self, name)}.")
        if self.min_records > self.window:
            raise ValueError(
                f"--smartfrz_min_records ({self.min_records}) cannot exceed --smartfrz_window ({self.window})."
            )
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"--smartfrz_threshold must be in (0, 1), got {self.threshold}.")


@register_policy("smartfrz", config=SmartFRZConfig)
class SmartFRZ(FreezePolicy):
    """Freezes each block the moment the predictor says its weight history has converged.

    `--smartfrz_records_per_epoch` times per epoch (one "freezing stage"), the tailored weights of every unfrozen block
    are recorded (`WeightTailor`: a fixed random selection of 1024 weights, the predictor's input). Once a block has
    `--smartfrz_min_records` records, the predictor reads its last `--smartfrz_window` records (with the fraction of
    training done at each, and the block's relative depth, when it was fitted with them) and the block freezes when
    P(freeze) > `--smartfrz_threshold` (0.5: the paper's argmax). Blocks may freeze in any order; only the
    longest frozen prefix is discarded. A frozen block's history is dropped. The predictor is the one shipped with
    hf_freezecache unless `--smartfrz_predictor` names another file written by `FreezePredictor.save`.
    """

    name = "smartfrz"
    config: SmartFRZConfig

    def setup(self, adapter) -> None:
        super().setup(adapter)
        cfg = self.config
        self.predictor = FreezePredictor.from_file(cfg.predictor)
        self.tailor = WeightTailor(adapter, self.predictor.input_size, seed=cfg.seed)
        self.clock = EvaluationClock(cfg.records_per_epoch)
        # Per unfrozen block: its tailored weights and the fraction of training done at each record of the window.
        self.history: dict[int, list[torch.Tensor]] = {}
        self.fractions: dict[int, list[float]] = {}

    def blocks_to_freeze(self, progress: TrainingProgress, frozen: frozenset[int]) -> set[int]:
        if not self.clock.due(progress):
            return set()
        cfg = self.config
        decided = set()
        self.evidence = {}
        depth_scale = max(1, self.adapter.num_blocks - 1)
        for index in range(self.adapter.num_blocks):
            if index in frozen:
                self.history.pop(index, None)
                self.fractions.pop(index, None)
                continue
            records = self.history.setdefault(index, [])
            fractions = self.fractions.setdefault(index, [])
            records.append(self.tailor.record(index))
            fractions.append(progress.fraction)
            del records[: -cfg.window], fractions[: -cfg.window]
            if len(records) < cfg.min_records:
                continue
            probability = self.predictor.freeze_probability(
                torch.stack(records), torch.tensor(fractions), index / depth_scale
            )
            self.evidence[index] = {"freeze_probability": probability, "records": float(len(records))}
            if probability > cfg.threshold:
                decided.add(index)
        return decided

    def state_dict(self) -> dict[str, Any]:
        return {
            "clock": self.clock.last,
            "history": {str(k): encode_array(torch.stack(v).numpy()) for k, v in self.history.items() if v},
            "fractions": {str(k): v for k, v in self.fractions.items() if v},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clock.last = state["clock"]
        self.history = {
            int(k): list(torch.from_numpy(np.asarray(decode_array(v)))) for k, v in state["history"].items()
        }
        # Checkpoints of an earlier hf_freezecache have no fractions: training fraction is unknown, so the
        # history restarts rather than feeding the predictor made-up inputs.
        fractions = state.get("fractions")
        if fractions is None:
            self.history = {}
        self.fractions = {int(k): list(v) for k, v in (fractions or {}).items()}

    def describe(self) -> str:
        cfg = self.config
        source = cfg.predictor or "shipped predictor"
        return f"smartfrz ({source}, window {cfg.window}, {cfg.records_per_epoch} records/epoch)"
