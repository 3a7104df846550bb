"""`FreezeCacheCallback`: progressive freezing and cost accounting inside a plain `transformers.Trainer`."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from ..accounting import CostReport, FreezeStateRecord, measure_step_cost, save_report_plots
from ..config import FreezeCacheArguments
from ..data.batches import probe_batch
from ..freezing import ACTIVATIONS_KEY, BlockUpdateScaler, FreezingEngine
from ..models import get_block_adapter
from ..policies import BlockProbe, TrainingProgress, build_policy
from .discard import DiscardController

logger = logging.getLogger(__name__)


class FreezeCacheCallback(TrainerCallback, ExportableState):
    """Applies a freezing policy during `Trainer.train()` and measures what each freeze state costs.

    Every optimizer step the policy may freeze blocks (see `FreezingEngine` for what freezing does); FreezeOut-style
    per-block learning rates are applied around `optimizer.step()`. At the end, `cost_report.json` and
    `cost_report.md` are written to `args.output_dir`, with the plots of `accounting.save_report_plots`
    (`freeze_timeline.png`, `state_costs.png`, `compression.png`). The callback's state (frozen blocks, policy state,
    report so far) is saved in every Trainer checkpoint, and `trainer.train(resume_from_checkpoint=...)` resumes with
    the same blocks frozen.

    Every Trainer log (and so every `report_to` logger: TensorBoard, W&B, ...) gains these numbers:

    - `frozen_blocks`: how many blocks are frozen; `frozen_prefix`: length of the frozen run from block 0;
      `discarded_prefix`: blocks discarded (0 while training reads images); `trainable_parameters`.
    - `newly_frozen_blocks`: blocks frozen since the previous log, 0 otherwise: a spike marks each freeze event.
      `last_frozen_block`: index of the block frozen most recently (the highest, when several froze at once), from
      the first freeze on.
    - `training_flops`: training FLOPs so far (cost report totals, cache builds included);
      `training_flops_saved_fraction`: the fraction of FLOPs saved against training the same epochs with nothing
      frozen (`CostReport.training_flops_saved_fraction`; a cache build makes it dip, possibly below 0, just after
      a discard). Both are absent with `--cost_report false`, the fraction also when blocks froze before step 1.
    - While training reads an activation cache: `cache_compression_ratio` and `cache_stored_mb` (MB of encoded
      activations) of that cache, `cache_build_seconds` (caches built by this run; reused ones cost nothing) and
      `cache_decode_seconds` (decoding in the training process so far; absent when DataLoader workers decode).
    - The policy's evidence, `<policy>/<quantity>_<block>` (`FreezePolicy.log_values`).

    Args:
        freeze_args (`FreezeCacheArguments` or `dict`, *optional*): Options; defaults to `FreezeCacheArguments()`.
        model (`nn.Module`, *optional*): The model the Trainer will train. Giving it here checks the options against
            the model (block positions, supported family) before any training work; otherwise this happens when
            training begins.

    Example:

    ```python
    callback = FreezeCacheCallback(FreezeCacheArguments(freeze_policy="freezeout"), model=model)
    trainer = Trainer(model=model, args=training_args, train_dataset=train, callbacks=[callback])
    trainer.train()
    ```
    """

    def __init__(self, freeze_args: FreezeCacheArguments | dict | None = None, model: nn.Module | None = None):
        if isinstance(freeze_args, dict):
            freeze_args = FreezeCacheArguments(**freeze_args)
        self.freeze_args = freeze_args or FreezeCacheArguments()
        self.policy = build_policy(self.freeze_args)
        self.engine: FreezingEngine | None = None
        self.scaler: BlockUpdateScaler | None = None
        self.report: CostReport | None = None
        self._model: nn.Module | None = None
        # A training batch of images (for estimates and cost), and the batch the current state is measured on
        # (the same images, or their activations once the prefix is discarded).
        self._probe: dict[str, torch.Tensor] | None = None
        self._cost_batch: dict[str, torch.Tensor] | None = None
        self._cost_pending = False
        self._clock = 0.0
        self._decode_seconds_at_open = 0.0
        self._dataloader_workers = 0
        self._policy_seconds = 0.0  # policy time not yet charged to a freeze state
        # Set by `FreezeCacheTrainer` when --discard is on: it owns the dataset and collator that a discard switches.
        self.discard_controller: DiscardController | None = None
        if model is not None:
            self._bind(model)

    # -- Trainer events ------------------------------------------------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        model, optimizer, dataloader = kwargs["model"], kwargs.get("optimizer"), kwargs.get("train_dataloader")
        if self.freeze_args.discard and self.discard_controller is None:
            raise ValueError(
                "--discard true needs hf_freezecache.FreezeCacheTrainer: a callback cannot replace the Trainer's "
                "dataloader or sampler. Use FreezeCacheTrainer(..., freeze_args=...) instead of Trainer + callback."
            )
        self._bind(model)
        self._dataloader_workers = args.dataloader_num_workers
        if optimizer is not None:
            self.engine.attach_optimizer(optimizer)
        if self.freeze_args.cost_report and dataloader is not None:
            self._probe = probe_batch(dataloader, args.per_device_train_batch_size, args.device)
            self._cost_batch = self._probe
        if self.policy.needs_probe:
            self._give_policy_probe(dataloader, args)
        saved = self._saved_state(state)
        if saved is not None:
            self._restore(saved, args)
        else:
            if self.discard_controller is not None:
                self.discard_controller.check_destination(args, self._probe)
            self.report = CostReport(
                model=f"{type(model).__name__} ({self.engine.adapter.family})",
                policy=self.policy.describe(),
                num_blocks=self.engine.adapter.num_blocks,
                train_samples=_dataset_size(dataloader, state, args),
                device=str(args.device),
            )
            cache = self._start_from_pinned_cache(args, state)
            decided = self._timed(self.policy.blocks_to_freeze, self._progress(state), frozenset(self.engine.frozen))
            self._freeze(decided, state)
            self._open_state(state, kwargs.get("optimizer"), cache=cache)
        # The policy's setup (probe, reference) ran before the clock: charge it to the state it began in.
        record = self.report.states[-1]
        record.wall_time_s += self._policy_seconds
        record.policy_seconds += self._policy_seconds
        self._policy_seconds = 0.0
        self._clock = time.perf_counter()

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # The Trainer creates the epoch's data iterator after this event: the last point to switch its source.
        if self.discard_controller is None:
            return
        position = self.discard_controller.target_position(self.engine.frozen_prefix)
        if position is None:
            return
        self._close_state()
        if self.report.states and self.report.states[-1].end_step == self.report.states[-1].start_step:
            self.report.states.pop()  # a freeze state that saw no step before its discard
        self._cost_batch = self._cache_probe(position)
        info = self.discard_controller.discard(position, args, self._probe)
        self._open_state(state, kwargs.get("optimizer"), cache=info)
        self._clock = time.perf_counter()  # the build is accounted as the cache's, not as training steps

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        progress = self._progress(state)
        self._timed(self.policy.observe_gradients, progress)
        self.scaler.before_step(self._timed(self.policy.lr_scales, progress, frozenset(self.engine.frozen)))

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.scaler.after_step()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        record = self.report.states[-1]
        record.wall_time_s += time.perf_counter() - self._clock
        record.end_step, record.end_epoch = state.global_step, float(state.epoch or 0.0)
        if self._cost_pending:
            self._measure(record, kwargs.get("optimizer"))
        before = self._policy_seconds
        decided = self._timed(self.policy.blocks_to_freeze, self._progress(state), frozenset(self.engine.frozen))
        record.wall_time_s += self._policy_seconds - before  # deciding is training time (after the step's clock)
        record.policy_seconds += self._policy_seconds  # also what `observe_gradients` took inside the step
        self._policy_seconds = 0.0
        new = self._freeze(decided, state)
        if new:
            self._close_state()
            logger.info(
                "Step %d (epoch %.2f): froze blocks %s; frozen prefix is now %d of %d blocks.",
                state.global_step,
                state.epoch or 0.0,
                new,
                self.engine.frozen_prefix,
                self.engine.adapter.num_blocks,
            )
            self._open_state(state, kwargs.get("optimizer"))
        self._clock = time.perf_counter()

    def on_evaluate(self, args, state, control, **kwargs):
        self._clock = time.perf_counter()  # evaluation time is not training time

    def on_save(self, args, state, control, **kwargs):
        self._clock = time.perf_counter()

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs):
        if logs is None or self.engine is None:
            return
        extra = {
            "frozen_blocks": len(self.engine.frozen),
            "frozen_prefix": self.engine.frozen_prefix,
            "trainable_parameters": self.engine.trainable_parameters(),
        }
        if self.report.total_training_flops is not None:
            extra["training_flops"] = self.report.total_training_flops
        extra.update(self._savings_and_cache_values(state))
        extra.update(self.policy.log_values())
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._close_state()
        if self.freeze_args.cost_report and state.is_world_process_zero:
            self.report.save(args.output_dir)
            logger.info("Cost report written to %s/cost_report.{json,md}", args.output_dir)
            plots = save_report_plots(self.report, args.output_dir)
            logger.info("Cost report plots written: %s", ", ".join(plots))
            print(self.report.to_markdown())

    # -- checkpointing (transformers' ExportableState) -----------------------------------------------------------

    def state(self) -> dict[str, Any]:
        resume = None
        if self.engine is not None:
            resume = {
                "frozen": sorted(self.engine.frozen),
                "policy": self.policy.state_dict(),
                "evidence": {str(k): v for k, v in self.policy.evidence.items()},
                "report": self.report.to_dict() if self.report else None,
                "cost_pending": self._cost_pending,
                "discarded_prefix": self.discard_controller.position if self.discard_controller else 0,
            }
        return {"args": {"freeze_args": self.freeze_args.to_dict()}, "attributes": {"resume_state": resume}}

    # -- internals -----------------------------------------------------------------------------------------------

    def _bind(self, model: nn.Module) -> None:
        if self._model is model:
            return
        adapter = get_block_adapter(model, **self.freeze_args.adapter_modules())
        self.policy.setup(adapter)
        self._model = model
        self.engine = FreezingEngine(adapter)
        self.scaler = BlockUpdateScaler(adapter)

    def _savings_and_cache_values(self, state: TrainerState) -> dict[str, float | int]:
        """Log entries on what freezing saved so far, freeze events since the previous log, and the cache read."""
        values: dict[str, float | int] = {
            "discarded_prefix": self.discard_controller.position if self.discard_controller else 0
        }
        saved = self.report.training_flops_saved_fraction
        if saved is not None:
            values["training_flops_saved_fraction"] = float(saved)
        # The Trainer appends the entry being logged before calling on_log: the one before it is the previous log.
        previous_step = state.log_history[-2]["step"] if len(state.log_history) > 1 else -1
        events = self.report.freeze_events
        values["newly_frozen_blocks"] = sum(previous_step < e["step"] <= state.global_step for e in events)
        if events:
            values["last_frozen_block"] = int(events[-1]["block"])
        controller = self.discard_controller
        if controller is not None and controller.cache is not None and controller.position:
            manifest = controller.cache.manifest
            values["cache_compression_ratio"] = float(manifest.compression_ratio)
            values["cache_stored_mb"] = manifest.stored_bytes / 2**20
            values["cache_build_seconds"] = float(self.report.cache_build_seconds)
            if not self._dataloader_workers:  # workers decode in their own processes, out of this counter's sight
                unrecorded = controller.cache.decode_seconds - self._decode_seconds_at_open
                recorded = sum(s.decode_seconds or 0.0 for s in self.report.states)
                values["cache_decode_seconds"] = float(recorded + unrecorded)
        return values

    def _timed(self, call, *args):
        start = time.perf_counter()
        try:
            return call(*args)
        finally:
            self._policy_seconds += time.perf_counter() - start

    def _freeze(self, blocks: set[int], state: TrainerState) -> list[int]:
        """Freezes `blocks` and writes the newly frozen ones, with what the policy decided from, into the timeline."""
        new = self.engine.freeze(blocks)
        names = self.engine.adapter.block_names() if new else []
        for index in new:
            self.report.freeze_events.append(
                {
                    "block": index,
                    "name": names[index],
                    "step": state.global_step,
                    "epoch": float(state.epoch or 0.0),
                    "evidence": dict(self.policy.evidence.get(index, {})),
                }
            )
        return new

    def _start_from_pinned_cache(self, args: TrainingArguments, state: TrainerState) -> dict[str, Any] | None:
        """Training from a given cache: its prefix is frozen and discarded before the first step; returns the
        cache's summary for the first freeze state (None without a given cache)."""
        controller = self.discard_controller
        if controller is None or controller.pinned_cache is None:
            return None
        position = controller.pinned_cache.manifest.position
        self._freeze(set(range(position)), state)
        return controller.discard(position, args, self._probe)

    def _give_policy_probe(self, dataloader, args: TrainingArguments) -> None:
        """Hands the policy its fixed probe batch: the first `--policy_probe_size` training images."""
        if dataloader is None:
            raise ValueError(f"--freeze_policy {self.policy.name} needs the training dataloader for its probe batch.")
        size = self.freeze_args.policy_probe_size
        batch = probe_batch(dataloader, size, args.device)
        if "pixel_values" not in batch:
            raise ValueError(
                f"--freeze_policy {self.policy.name} evaluates blocks on training images, and training from a given "
                "activation cache has none: use the policy 'none', 'freezeout' or 'fixed'."
            )
        pixel_values = batch["pixel_values"]
        restore = self.discard_controller.prefix.restored if self.discard_controller is not None else None
        self._timed(self.policy.set_probe, BlockProbe(self.engine.adapter, pixel_values, restore=restore))

    def _saved_state(self, state: TrainerState) -> dict[str, Any] | None:
        restored = getattr(self, "resume_state", None)  # set by Trainer when restore_callback_states is on
        if restored is None and state.global_step > 0:
            entry = (state.stateful_callbacks or {}).get(type(self).__name__)
            entry = entry[0] if isinstance(entry, list) else entry
            restored = (entry or {}).get("attributes", {}).get("resume_state")
            if restored is None:
                raise ValueError(
                    f"Resuming at step {state.global_step} but the checkpoint holds no {type(self).__name__} state: "
                    "it was not written by a run using this callback, so the frozen blocks cannot be restored."
                )
        return restored

    def _restore(self, saved: dict[str, Any], args: TrainingArguments) -> None:
        self.engine.freeze(saved["frozen"])
        self.policy.load_state_dict(saved["policy"])
        self.policy.evidence = {int(k): v for k, v in saved.get("evidence", {}).items()}
        self.report = CostReport.from_dict(saved["report"])
        self._cost_pending = saved["cost_pending"]
        position = saved.get("discarded_prefix", 0)
        if position:
            if self.discard_controller is None:
                raise ValueError(
                    f"The checkpoint was taken after discarding blocks 0-{position - 1}; resume it with "
                    "FreezeCacheTrainer and --discard true."
                )
            if self.discard_controller.pinned_cache is None:
                self._cost_batch = self._cache_probe(position)
            self.discard_controller.discard(position, args, self._probe)  # reuses the cache, or rebuilds it
        logger.info("Resumed with blocks %s frozen and %d discarded.", saved["frozen"], position)

    def _progress(self, state: TrainerState) -> TrainingProgress:
        return TrainingProgress.from_trainer_state(state)

    def _open_state(
        self, state: TrainerState, optimizer: torch.optim.Optimizer | None, cache: dict[str, Any] | None = None
    ) -> None:
        epoch = float(state.epoch or 0.0)
        discarded = self.discard_controller.position if self.discard_controller else 0
        record = FreezeStateRecord(
            frozen_blocks=sorted(self.engine.frozen),
            frozen_prefix=self.engine.frozen_prefix,
            trainable_parameters=self.engine.trainable_parameters(),
            start_step=state.global_step,
            start_epoch=epoch,
            end_step=state.global_step,
            end_epoch=epoch,
            discarded_prefix=discarded,
            cache=cache,
        )
        if cache is not None and not cache["reused"]:
            record.one_off_flops = (
                cache["prefix_forward_flops_per_sample"] * cache["num_samples"] * cache["build_prefix_passes"]
            )
        if self.discard_controller is not None and self.discard_controller.cache is not None:
            self._decode_seconds_at_open = self.discard_controller.cache.decode_seconds
        self.report.states.append(record)
        # Optimizer state only exists after the first optimizer step: a state opened before it is measured then.
        self._cost_pending = self.freeze_args.cost_report and self._cost_batch is not None
        if self._cost_pending and state.global_step > 0:
            self._measure(record, optimizer)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def _measure(self, record: FreezeStateRecord, optimizer: torch.optim.Optimizer | None) -> None:
        discarded = self.discard_controller.prefix.prefix_tensors() if self.discard_controller else []
        record.cost = measure_step_cost(self._model, self._cost_batch, optimizer, exclude=discarded).to_dict()
        self._cost_pending = False
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # the measurement's own replica is not training memory

    def _close_state(self) -> None:
        if not (self.report and self.report.states):
            return
        record = self.report.states[-1]
        if torch.cuda.is_available():
            record.peak_cuda_bytes = int(torch.cuda.max_memory_allocated())
        controller = self.discard_controller
        if controller is not None and controller.cache is not None and record.discarded_prefix:
            # DataLoader workers decode in their own processes, out of this counter's sight.
            workers = self._dataloader_workers
            spent = controller.cache.decode_seconds - self._decode_seconds_at_open
            record.decode_seconds = None if workers else (record.decode_seconds or 0.0) + spent
            self._decode_seconds_at_open = controller.cache.decode_seconds

    def _cache_probe(self, position: int) -> dict[str, torch.Tensor] | None:
        """The probe batch as the model sees it after discarding at `position` (computed while the prefix is
        still on the training device)."""
        if self._probe is None:
            return None
        with torch.no_grad(), self.discard_controller.prefix.restored():
            activations = self.engine.adapter.prefix(self._probe["pixel_values"], position)
        return {ACTIVATIONS_KEY: activations, "labels": self._probe["labels"]}


def _dataset_size(dataloader, state: TrainerState, args: TrainingArguments) -> int:
    try:
        return len(dataloader.dataset)
    except (AttributeError, TypeError):
        return state.train_batch_size * args.gradient_accumulation_steps * args.world_size * state.max_steps
