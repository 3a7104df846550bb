"""`egeria` (Wang et al., EuroSys 2023): freeze front blocks whose plasticity has stopped decreasing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from . import register_policy
from ._probe import check_probe_size, eval_mode
from ._schedule import EvaluationClock, relative_slope
from .base import FreezePolicy, PolicyConfig, TrainingProgress


@dataclass
class EgeriaConfig(PolicyConfig):
    """Options of `egeria` (flags `--egeria_<field>`, and `--policy_probe_size`)."""

    evaluations_per_epoch: int = field(
        default=4, metadata={"help": "Egeria: plasticity evaluations (and reference refreshes) per epoch."}
    )
    window: int = field(default=5, metadata={"help": "Egeria: plasticity values the slope is fitted over."})
    slope_threshold: float = field(
        default=0.02,
        metadata={
            "help": "Egeria: the front block freezes when its plasticity's slope per evaluation, relative to its "
            "mean, is above minus this value (plasticity stopped decreasing)."
        },
    )
    probe_size: int = field(default=256, metadata={"help": "Egeria: training images in the fixed probe batch."})

    def __post_init__(self) -> None:
        if self.evaluations_per_epoch < 1 or self.window < 2:
            raise ValueError(
                f"--egeria_evaluations_per_epoch must be >= 1 and --egeria_window >= 2, got "
                f"{self.evaluations_per_epoch} and {self.window}."
            )
        if self.slope_threshold < 0:
            raise ValueError(f"--egeria_slope_threshold must be >= 0, got {self.slope_threshold}.")
        check_probe_size(self.probe_size)


@register_policy("egeria", config=EgeriaConfig)
class Egeria(FreezePolicy):
    """Plasticity-guided sequential freezing against a cheap, periodically refreshed reference copy.

    The reference is a copy of every unfrozen block's parameters and buffers in bfloat16, kept on the CPU (Egeria's
    quantised reference model: cheap to keep and to refresh). `--egeria_evaluations_per_epoch` times per epoch, for
    each unfrozen block i with input h_i on the probe batch (from the training model, eval mode):

        plasticity_i = ||B_i(h_i) - B_i^ref(h_i)||_F / ||B_i(h_i)||_F

    the relative change of the block's output since the reference was taken; then the reference is refreshed, so each
    value measures one evaluation interval. Rule: the first unfrozen block freezes when the least-squares slope of its
    last `--egeria_window` plasticity values, divided by their mean, is above `-egeria_slope_threshold` (plasticity
    has stopped decreasing); then the next block is tested the same way, so blocks freeze from the front only.

    The reference is not checkpointed (it is as large as the unfrozen model): after a resume the first evaluation only
    takes a new reference, so a resumed run decides one evaluation later than an uninterrupted one.
    """

    name = "egeria"
    needs_probe = True
    config: EgeriaConfig

    def setup(self, adapter) -> None:
        super().setup(adapter)
        self.clock = EvaluationClock(self.config.evaluations_per_epoch)
        self.history: dict[int, list[float]] = {}
        self.reference: dict[int, list[torch.Tensor]] = {}

    def set_probe(self, probe) -> None:
        super().set_probe(probe)
        self._refresh(frozenset())  # the first reference: training from here on is measured against it

    def blocks_to_freeze(self, progress: TrainingProgress, frozen: frozenset[int]) -> set[int]:
        if not self.clock.due(progress):
            return set()
        if not self.reference:  # resumed: this evaluation only takes the reference
            self._refresh(frozen)
            return set()
        start = next((i for i in range(self.adapter.num_blocks) if i not in frozen), None)
        if start is None:
            return set()
        io = self.probe.run(start)
        self.evidence = {}
        for index, (hidden, output) in io.items():
            if index in frozen or index not in self.reference:
                continue
            with torch.no_grad(), eval_mode(self.adapter.model), self._reference_weights(index):
                reference_output = self.adapter.run_block(index, hidden)
            value = float(torch.linalg.vector_norm(output - reference_output) / torch.linalg.vector_norm(output))
            values = self.history.setdefault(index, [])
            values.append(value)
            self.evidence[index] = {"plasticity": value}
            if len(values) >= self.config.window:
                self.evidence[index]["slope"] = relative_slope(values[-self.config.window :])
        self._refresh(frozen)
        slopes = {index: values["slope"] for index, values in self.evidence.items() if "slope" in values}
        return self.front_blocks_to_freeze(slopes, start, self.config.slope_threshold)

    @staticmethod
    def front_blocks_to_freeze(slopes: dict[int, float], start: int, threshold: float) -> set[int]:
        """Egeria's rule: from block `start` (the first unfrozen one) on, blocks whose plasticity slope is above
        `-threshold` freeze, up to the first block that is still improving or has no slope yet."""
        decided = set()
        position = start
        while position in slopes and slopes[position] > -threshold:
            decided.add(position)
            position += 1
        return decided

    def _tensors(self, index: int) -> list[torch.Tensor]:
        buffers = [b for m in self.adapter.block_modules(index) for b in m.buffers() if b.is_floating_point()]
        return self.adapter.block_parameters(index) + buffers

    def _refresh(self, frozen: frozenset[int]) -> None:
        self.reference = {
            index: [t.detach().to("cpu", torch.bfloat16, copy=True) for t in self._tensors(index)]
            for index in range(self.adapter.num_blocks)
            if index not in frozen
        }

    @contextlib.contextmanager
    def _reference_weights(self, index: int) -> Iterator[None]:
        tensors = self._tensors(index)
        current = [t.data for t in tensors]
        for tensor, saved in zip(tensors, self.reference[index], strict=True):
            tensor.data = saved.to(tensor.device, tensor.dtype)
        try:
            yield
        finally:
            for tensor, data in zip(tensors, current, strict=True):
                tensor.data = data

    def state_dict(self) -> dict[str, Any]:
        return {"clock": self.clock.last, "history": {str(k): v for k, v in self.history.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clock.last = state["clock"]
        self.history = {int(k): v for k, v in state["history"].items()}
        self.reference = {}

    def describe(self) -> str:
        cfg = self.config
        return (
            f"egeria (window {cfg.window}, slope threshold {cfg.slope_threshold:g}, {cfg.evaluations_per_epoch}/epoch)"
        )
