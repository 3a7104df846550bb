"""The cost report: per freeze state and in total, as in the paper's Appendix A.1."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class FreezeStateRecord:
    """One freeze state of a run: which blocks were frozen, what a step cost, and how much training it saw.

    Args:
        frozen_blocks (`list[int]`): Frozen block indices.
        frozen_prefix (`int`): Length of the contiguous frozen run from block 0.
        trainable_parameters (`int`): Parameters that still trained.
        start_step (`int`): Global step at which the state began.
        start_epoch (`float`): Epoch at which the state began.
        end_step, end_epoch: Where it ended (updated while it lasts).
        wall_time_s (`float`): Training time spent in the state (evaluation and checkpointing excluded).
        cost (`dict`): `StepCost.to_dict()` measured at the state's first step, or None when measuring is off.
        peak_cuda_bytes (`int`, *optional*): `torch.cuda.max_memory_allocated` over the state, on GPU.
        discarded_prefix (`int`): Blocks discarded (training reads activations cached at this position; 0: none).
        one_off_flops (`float`): FLOPs paid once when the state began: the prefix pass that built its cache.
        cache (`dict`, *optional*): The cache the state trained from: position, codec, chunk size, raw and stored
            bytes, compression ratio, build seconds, whether an existing cache was reused.
        decode_seconds (`float`, *optional*): Time spent decoding cache chunks in the training process (None when
            DataLoader workers decoded).
        policy_seconds (`float`): Time the freezing policy spent observing and deciding (part of `wall_time_s`).
    """

    frozen_blocks: list[int]
    frozen_prefix: int
    trainable_parameters: int
    start_step: int
    start_epoch: float
    end_step: int = 0
    end_epoch: float = 0.0
    wall_time_s: float = 0.0
    cost: dict[str, Any] | None = None
    peak_cuda_bytes: int | None = None
    discarded_prefix: int = 0
    one_off_flops: float = 0.0
    cache: dict[str, Any] | None = None
    decode_seconds: float | None = None
    policy_seconds: float = 0.0

    @property
    def epochs(self) -> float:
        return max(self.end_epoch - self.start_epoch, 0.0)

    @property
    def memory_bytes(self) -> int | None:
        if self.peak_cuda_bytes is not None:
            return self.peak_cuda_bytes
        return self.cost["memory_bytes"] if self.cost else None


@dataclass
class CostReport:
    """Costs of a whole run. Totals follow the paper's Appendix A.1:

    - training FLOPs = sum over states of (FLOPs per sample x samples per epoch x epochs in the state), plus the
      one-off prefix passes that built activation caches;
    - average memory = mean of the states' memory weighted by their epochs;
    - minimum memory = memory of the final state.

    Args:
        model (`str`): Model class and family.
        policy (`str`): The policy's description.
        num_blocks (`int`): Freezable blocks of the model.
        train_samples (`int`): Samples per epoch.
        device (`str`): Where training ran.
        states (`list[FreezeStateRecord]`): In order.
        freeze_events (`list[dict]`): The freeze timeline: per block frozen, `block`, `name`, `step`, `epoch` and the
            `evidence` the policy decided from.
    """

    model: str
    policy: str
    num_blocks: int
    train_samples: int
    device: str
    states: list[FreezeStateRecord] = field(default_factory=list)
    freeze_events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total_training_flops(self) -> float | None:
        if any(s.cost is None for s in self.states):
            return None
        return sum(s.cost["flops_per_sample"] * self.train_samples * s.epochs + s.one_off_flops for s in self.states)

    @property
    def baseline_training_flops(self) -> float | None:
        """FLOPs of training the same epochs with nothing frozen: the first state's per-sample FLOPs over all of them.

        None unless the first state had nothing frozen and was measured.
        """
        if not self.states or self.states[0].frozen_blocks or self.states[0].cost is None:
            return None
        return self.states[0].cost["flops_per_sample"] * self.train_samples * sum(s.epochs for s in self.states)

    @property
    def training_flops_saved_fraction(self) -> float | None:
        """Fraction of `baseline_training_flops` saved by freezing and discarding. Cache builds count against it, so
        it can be negative just after a discard."""
        total, baseline = self.total_training_flops, self.baseline_training_flops
        if total is None or not baseline:
            return None
        return 1.0 - total / baseline

    @property
    def average_memory_bytes(self) -> float | None:
        weighted = [(s.memory_bytes, s.epochs) for s in self.states if s.epochs > 0]
        if not weighted or any(m is None for m, _ in weighted):
            return None
        return sum(m * e for m, e in weighted) / sum(e for _, e in weighted)

    @property
    def minimum_memory_bytes(self) -> int | None:
        return self.states[-1].memory_bytes if self.states else None

    @property
    def cache_build_seconds(self) -> float:
        """Time spent building activation caches in this run (reused caches cost nothing)."""
        return sum(s.cache["build_seconds"] for s in self.states if s.cache and not s.cache["reused"])

    @property
    def wall_time_s(self) -> float:
        """Training time of all states plus cache builds (evaluation and checkpointing excluded)."""
        return sum(s.wall_time_s for s in self.states) + self.cache_build_seconds

    @property
    def policy_seconds(self) -> float:
        """Time the policy spent observing and deciding, over the run."""
        return sum(s.policy_seconds for s in self.states)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "policy": self.policy,
            "num_blocks": self.num_blocks,
            "train_samples": self.train_samples,
            "device": self.device,
            "totals": {
                "training_flops": self.total_training_flops,
                "baseline_training_flops": self.baseline_training_flops,
                "training_flops_saved_fraction": self.training_flops_saved_fraction,
                "average_memory_bytes": self.average_memory_bytes,
                "minimum_memory_bytes": self.minimum_memory_bytes,
                "wall_time_s": self.wall_time_s,
                "cache_build_seconds": self.cache_build_seconds,
                "policy_seconds": self.policy_seconds,
            },
            "states": [asdict(s) for s in self.states],
            "freeze_events": self.freeze_events,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CostReport:
        states = [FreezeStateRecord(**s) for s in data["states"]]
        fields = ("model", "policy", "num_blocks", "train_samples", "device")
        return cls(**{k: data[k] for k in fields}, states=states, freeze_events=data.get("freeze_events", []))

    def to_markdown(self) -> str:
        """The report as markdown: one row per freeze state, then the totals."""
        lines = [
            f"Cost report: {self.model}, policy {self.policy}, {self.train_samples} training samples per epoch, "
            f"on {self.device}.",
            "",
            "| frozen blocks | discarded | epochs | steps | trainable params | GFLOPs/sample (train) | memory (MB) | "
            "activations (MB) | wall time (s) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for s in self.states:
            cost = s.cost or {}
            lines.append(
                f"| {_blocks(s.frozen_blocks)} | {_blocks(list(range(s.discarded_prefix)))} | {s.epochs:.2f} |"
                f" {s.end_step - s.start_step} | "
                f"{s.trainable_parameters:,} | {_fmt(cost.get('flops_per_sample'), 1e9, 4)} | "
                f"{_fmt(s.memory_bytes, 2**20, 1)} | {_fmt(cost.get('activation_bytes'), 2**20, 1)} | "
                f"{s.wall_time_s:.1f} |"
            )
        lines += [
            "",
            f"- total training FLOPs: {_fmt(self.total_training_flops, 1e12, 3)} TFLOPs{self._saved_note()}",
            f"- average memory: {_fmt(self.average_memory_bytes, 2**20, 1)} MB; "
            f"minimum memory: {_fmt(self.minimum_memory_bytes, 2**20, 1)} MB",
            f"- training wall time: {self.wall_time_s:.1f} s (of which building caches: "
            f"{self.cache_build_seconds:.1f} s; the policy observing and deciding: {self.policy_seconds:.1f} s, "
            f"{self.policy_seconds / max(self.wall_time_s, 1e-9):.1%})",
        ]
        if self.freeze_events:
            lines += [
                "",
                "Freeze timeline:",
                "",
                "| block | name | step | epoch | decided from |",
                "|---|---|---|---|---|",
            ]
            for event in self.freeze_events:
                evidence = ", ".join(f"{k} {v:.4g}" for k, v in event.get("evidence", {}).items()) or "-"
                lines.append(
                    f"| {event['block']} | {event.get('name', '')} | {event['step']} | {event['epoch']:.2f} | "
                    f"{evidence} |"
                )
        caches = [s for s in self.states if s.cache]
        if caches:
            lines += [
                "",
                "| cache position | codec | chunk | raw (MB) | stored (MB) | ratio | sidecars (MB) | build (s) | "
                "one-off GFLOPs | decode (s) | read from (MB held) |",
                "|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for s in caches:
                c = s.cache
                reused = " (reused)" if c.get("reused") else ""
                decode = "n/a" if s.decode_seconds is None else f"{s.decode_seconds:.1f}"
                sidecar = c.get("sidecar_bytes", 0)
                sidecars = f"{sidecar / 2**20:.1f} ({sidecar / max(c['stored_bytes'], 1):.0%})" if sidecar else "-"
                lines.append(
                    f"| {c['position']} | {c['codec']} | {c['chunk_size']} | {c['raw_bytes'] / 2**20:.1f} | "
                    f"{c['stored_bytes'] / 2**20:.1f} | {c['compression_ratio']:.2f}x | {sidecars} | "
                    f"{c['build_seconds']:.1f}"
                    f"{reused} | {s.one_off_flops / 1e9:.1f} | {decode} | {_held(c)} |"
                )
        return "\n".join(lines) + "\n"

    def _saved_note(self) -> str:
        saved = self.training_flops_saved_fraction
        if saved is None:
            return ""
        baseline = _fmt(self.baseline_training_flops, 1e12, 3)
        fewer = "fewer" if saved >= 0 else "more"
        return f" ({abs(saved):.1%} {fewer} than the {baseline} TFLOPs of the same epochs with nothing frozen)"

    def save(self, output_dir: str | os.PathLike) -> None:
        """Writes `cost_report.json` and `cost_report.md` into `output_dir`."""
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "cost_report.json"), "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        with open(os.path.join(output_dir, "cost_report.md"), "w") as f:
            f.write(self.to_markdown())


def _fmt(value: float | None, unit: float, digits: int) -> str:
    return "n/a" if value is None else f"{value / unit:.{digits}f}"


def _blocks(blocks: list[int]) -> str:
    if not blocks:
        return "none"
    if blocks == list(range(blocks[0], blocks[-1] + 1)):
        return f"{blocks[0]}-{blocks[-1]}" if len(blocks) > 1 else str(blocks[0])
    return ",".join(map(str, blocks))


def _held(cache: dict[str, Any]) -> str:
    """Where training read a cache from, and the bytes held there (caches summarised before memory modes: disk)."""
    memory = cache.get("memory", "disk")
    if memory == "disk":
        return "disk"
    return f"{cache['held_on']} ({cache['held_bytes'] / 2**20:.1f})"
