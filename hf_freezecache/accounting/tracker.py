"""`CostTracker`: splits a training run into freeze states and accounts for each one as training goes."""

from __future__ import annotations

import time
from typing import Any

import torch

from ..cache import ActivationCache
from ..model import FreezeCacheModel
from .measure import measure_step_cost
from .report import CostReport, FreezeStateRecord


class CostTracker:
    """Opens a `FreezeStateRecord` of the report whenever the freeze state changes and fills it as steps go by.

    Per state: the step cost (`measure_step_cost` on a true replica, at the state's first step once the optimizer
    has state, so training never sees it), training wall time (the clock is restarted after evaluation,
    checkpointing, cache builds and the measurement itself, so only steps and policy decisions count), the policy's
    time, cache decoding time in the training process, and the peak of GPU memory.

    Args:
        report (`CostReport`): The run's report; states are appended to it.
        measure (`bool`): Measure each state's step cost (`--cost_report`).
        autocast_dtype (`torch.dtype`, *optional*): The mixed precision of training, for the measurement.
        decode_in_workers (`bool`): DataLoader workers decode the cache, out of this process's counters.
    """

    def __init__(
        self,
        report: CostReport,
        measure: bool,
        autocast_dtype: torch.dtype | None = None,
        decode_in_workers: bool = False,
    ) -> None:
        self.report = report
        self.measure = measure
        self.autocast_dtype = autocast_dtype
        self.decode_in_workers = decode_in_workers
        #: The batch the current state is measured on: training images, or their activations after a discard.
        self.cost_batch: dict[str, torch.Tensor] | None = None
        self.pending = False
        self._clock = time.perf_counter()
        self._decode_seconds_at_open = 0.0

    @property
    def current(self) -> FreezeStateRecord:
        return self.report.states[-1]

    def restart_clock(self) -> None:
        """What happened since the last step (evaluation, checkpointing, a cache build) is not training time."""
        self._clock = time.perf_counter()

    def open(
        self,
        model: FreezeCacheModel,
        step: int,
        epoch: float,
        optimizer: torch.optim.Optimizer | None,
        cache: dict[str, Any] | None = None,
        reader: ActivationCache | None = None,
    ) -> FreezeStateRecord:
        """Starts the state the model is in now, at `step`; `cache` is the summary of the cache it reads, when a
        discard began it, and `reader` that cache (for its decode time)."""
        record = FreezeStateRecord(
            frozen_blocks=sorted(model.frozen_blocks),
            frozen_prefix=model.frozen_prefix,
            trainable_parameters=model.trainable_parameters(),
            start_step=step,
            start_epoch=epoch,
            end_step=step,
            end_epoch=epoch,
            discarded_prefix=model.discarded_position,
            cache=cache,
        )
        if cache is not None and not cache["reused"]:
            record.one_off_flops = (
                cache["prefix_forward_flops_per_sample"] * cache["num_samples"] * cache["build_prefix_passes"]
            )
        if reader is not None:
            self._decode_seconds_at_open = reader.decode_seconds
        self.report.states.append(record)
        # Optimizer state only exists after the first optimizer step: a state opened before it is measured then.
        self.pending = self.measure and self.cost_batch is not None
        if self.pending and step > 0:
            self._measure(model, optimizer)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return record

    def close(self, reader: ActivationCache | None = None) -> None:
        """Ends the current state: its peak GPU memory and the decoding time of the cache it read."""
        if not self.report.states:
            return
        record = self.current
        if torch.cuda.is_available():
            record.peak_cuda_bytes = int(torch.cuda.max_memory_allocated())
        if reader is not None and record.discarded_prefix:
            spent = reader.decode_seconds - self._decode_seconds_at_open
            record.decode_seconds = None if self.decode_in_workers else (record.decode_seconds or 0.0) + spent
            self._decode_seconds_at_open = reader.decode_seconds

    def decode_seconds(self, reader: ActivationCache | None) -> float | None:
        """Cache decoding time in this process so far, the current state's included (None when DataLoader workers
        decode, in their own processes)."""
        if self.decode_in_workers:
            return None
        current = reader.decode_seconds - self._decode_seconds_at_open if reader is not None else 0.0
        return sum(s.decode_seconds or 0.0 for s in self.report.states) + current

    def drop_if_empty(self) -> None:
        """Forgets the current state if it saw no step (a state that a discard replaced at once)."""
        if self.report.states and self.current.end_step == self.current.start_step:
            self.report.states.pop()

    def step_end(
        self, model: FreezeCacheModel, step: int, epoch: float, optimizer: torch.optim.Optimizer | None
    ) -> None:
        """After an optimizer step: the step's time, and the state's cost if it was waiting for this step."""
        record = self.current
        record.wall_time_s += time.perf_counter() - self._clock
        record.end_step, record.end_epoch = step, epoch
        if self.pending:
            self._measure(model, optimizer)

    def add_policy_time(self, seconds: float, *, outside_steps: bool) -> None:
        """Charges the policy's `seconds` to the current state; `outside_steps` when they were not inside a step's
        clock (deciding after the step, or setting up before the first)."""
        record = self.current
        record.policy_seconds += seconds
        if outside_steps:
            record.wall_time_s += seconds

    def _measure(self, model: FreezeCacheModel, optimizer: torch.optim.Optimizer | None) -> None:
        cost = measure_step_cost(
            model, self.cost_batch, optimizer, exclude=model.prefix_tensors(), autocast_dtype=self.autocast_dtype
        )
        self.current.cost = cost.to_dict()
        self.pending = False
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # the measurement's own replica is not training memory
        self.restart_clock()
