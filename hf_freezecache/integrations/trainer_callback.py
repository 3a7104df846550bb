"""`FreezeCacheCallback`: progressive freezing and cost accounting inside `transformers.Trainer`.

It only maps Trainer events onto the pieces that do the work (`PolicyRunner`, `CostTracker`, `PrefixDiscarder`,
`_checkpoint`, `_log_values`); it is a little over 300 lines because its docstring is the reference of what it logs.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from accelerate import PartialState
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from ..accounting import CostReport, CostTracker, save_report_plots
from ..config import FreezeCacheArguments
from ..data.batches import probe_batch
from ..discard import CacheBuildSettings, PrefixDiscarder
from ..freezing import BlockUpdateScaler, FreezingEngine
from ..model import ACTIVATIONS_KEY, FreezeCacheModel
from ..models import check_block_split
from ..policies import BlockProbe, TrainingProgress, build_policy
from ..policies.runner import PolicyRunner
from ._checkpoint import resume_state, saved_resume_state
from ._log_values import freeze_log_values

logger = logging.getLogger(__name__)

#: Probe images `check_block_split` runs before training: enough to see a wrong split, few enough to cost nothing.
_SPLIT_CHECK_SAMPLES = 4


class FreezeCacheCallback(TrainerCallback, ExportableState):
    """Applies a freezing policy during `Trainer.train()` and measures what each freeze state costs.

    The Trainer's model must be a `FreezeCacheModel` (`FreezeCacheTrainer` wraps it for you; with a plain `Trainer`,
    pass `Trainer(model=FreezeCacheModel(model), ...)`). Every optimizer step the policy may freeze blocks (see
    `FreezingEngine` for what freezing does; under several processes, all take the main process's decision);
    FreezeOut-style per-block learning rates are applied around `optimizer.step()`. At the end, `cost_report.json`
    and `cost_report.md` are written to `args.output_dir`, with the plots of `accounting.save_report_plots`
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
      `cache_decode_seconds` (host decoding in the training process so far; absent when DataLoader workers
      decode; with `--cache_memory device` the rows are unpacked once, when the cache is loaded, and batches are
      decoded on the device, so it stays near 0).
    - The policy's evidence, `<policy>/<quantity>_<block>` (`FreezePolicy.log_values`).

    Args:
        freeze_args (`FreezeCacheArguments` or `dict`, *optional*): Options; defaults to `FreezeCacheArguments()`.
        model (`FreezeCacheModel`, *optional*): The model the Trainer will train. Giving it here checks the options
            against the model (block positions) before any training work; otherwise this happens when training
            begins.

    Example:

    ```python
    model = FreezeCacheModel(model)
    callback = FreezeCacheCallback(FreezeCacheArguments(freeze_policy="freezeout"), model=model)
    trainer = Trainer(model=model, args=training_args, train_dataset=train, callbacks=[callback])
    trainer.train()
    ```
    """

    def __init__(
        self, freeze_args: FreezeCacheArguments | dict | None = None, model: FreezeCacheModel | None = None
    ) -> None:
        if isinstance(freeze_args, dict):
            freeze_args = FreezeCacheArguments(**freeze_args)
        self.freeze_args = freeze_args or FreezeCacheArguments()
        self.policy = build_policy(self.freeze_args.policy_config())
        self.model: FreezeCacheModel | None = None
        self.engine: FreezingEngine | None = None
        self.scaler: BlockUpdateScaler | None = None
        self.runner: PolicyRunner | None = None
        self.tracker: CostTracker | None = None
        # Set by `FreezeCacheTrainer` when it discards: it owns the dataset and collator that a discard switches.
        self.discarder: PrefixDiscarder | None = None
        # Training images: for the cost of the states that read images, and for estimates.
        self._probe: dict[str, torch.Tensor] | None = None
        self._build: CacheBuildSettings | None = None
        self._offload_to: str | None = None
        self._cache_info: dict[str, Any] | None = None
        if model is not None:
            self._bind(model)

    @property
    def report(self) -> CostReport | None:
        return self.tracker.report if self.tracker is not None else None

    # -- Trainer events ------------------------------------------------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        model, optimizer, dataloader = kwargs["model"], kwargs.get("optimizer"), kwargs.get("train_dataloader")
        if self.freeze_args.discard and self.discarder is None:
            raise ValueError(
                "--discard true needs hf_freezecache.FreezeCacheTrainer: a callback cannot replace the Trainer's "
                "dataloader or sampler. Use FreezeCacheTrainer(..., freeze_args=...) instead of Trainer + callback."
            )
        self._bind(model)
        processes = PartialState() if args.world_size > 1 else None
        self.runner = PolicyRunner(self.policy, self.engine, processes)
        if optimizer is not None:
            self.engine.attach_optimizer(optimizer)
        self._build = CacheBuildSettings(
            device=args.device,
            batch_size=self.freeze_args.cache_batch_size or args.per_device_eval_batch_size,
            num_workers=args.dataloader_num_workers,
            seed=args.seed,
            progress=not args.disable_tqdm,
            processes=processes,
        )
        # DDP broadcasts every buffer before each forward and `nn.DataParallel` replicates every tensor: a discarded
        # prefix can only leave the device of a single-device run.
        self._offload_to = "cpu" if args.world_size == 1 and args.n_gpu <= 1 else None
        if dataloader is not None:
            self._probe = probe_batch(dataloader, args.per_device_train_batch_size, args.device)
        self._check_split()
        if self.policy.needs_probe:
            self._give_policy_probe(dataloader, args)
        # What accelerate runs training under: bf16 autocast, or fp16 autocast on accelerators (it has none for the
        # CPU, where an fp16 run is a float32 run).
        autocast_dtype = torch.bfloat16 if args.bf16 else None
        if args.fp16 and args.device.type != "cpu":
            autocast_dtype = torch.float16
        saved = saved_resume_state(self, state)
        if saved is not None:
            self.tracker = CostTracker(
                CostReport.from_dict(saved["report"]),
                self.freeze_args.cost_report,
                autocast_dtype,
                args.dataloader_num_workers > 0,
            )
            self._restore(saved)
        else:
            report = CostReport(
                model=f"{type(self.model.base_model).__name__} ({self.model.adapter.family})",
                policy=self.policy.describe(),
                num_blocks=self.model.num_blocks,
                train_samples=_dataset_size(dataloader, state, args),
                device=str(args.device),
            )
            self.tracker = CostTracker(
                report, self.freeze_args.cost_report, autocast_dtype, args.dataloader_num_workers > 0
            )
            self.tracker.cost_batch = self._probe if self.freeze_args.cost_report else None
            if self.discarder is not None:
                self.discarder.check_destination(self._probe_images())
            cache = self._start_from_pinned_cache(state)
            report.freeze_events += self.runner.decide(TrainingProgress.from_trainer_state(state))
            self.tracker.open(self.model, state.global_step, float(state.epoch or 0.0), optimizer, cache, self._reader)
        # The policy's setup (probe, reference) ran before the clock: charge it to the state it began in.
        self.tracker.add_policy_time(self.runner.take_seconds(), outside_steps=True)
        self.tracker.restart_clock()

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # The Trainer creates the epoch's data iterator after this event: the last point to switch its source.
        if self.discarder is None:
            return
        position = self.discarder.target_position(self.engine.frozen_prefix)
        if position is None:
            return
        self.tracker.close(self._reader)
        self.tracker.drop_if_empty()
        self._discard(position)
        epoch = float(state.epoch or 0.0)
        self.tracker.open(
            self.model, state.global_step, epoch, kwargs.get("optimizer"), self._cache_info, self._reader
        )
        self.tracker.restart_clock()  # the build is accounted as the cache's, not as training steps

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        progress = TrainingProgress.from_trainer_state(state, kwargs.get("lr_scheduler"))
        scales = self.runner.before_optimizer_step(progress)
        self.scaler.before_step(scales)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.scaler.after_step()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        optimizer = kwargs.get("optimizer")
        self.tracker.step_end(self.model, state.global_step, float(state.epoch or 0.0), optimizer)
        self.tracker.add_policy_time(self.runner.take_seconds(), outside_steps=False)  # within the step's clock
        events = self.runner.decide(TrainingProgress.from_trainer_state(state))
        self.tracker.add_policy_time(self.runner.take_seconds(), outside_steps=True)
        if events:
            self.report.freeze_events += events
            self.tracker.close(self._reader)
            logger.info(
                "Step %d (epoch %.2f): froze blocks %s; frozen prefix is now %d of %d blocks.",
                state.global_step,
                state.epoch or 0.0,
                [event["block"] for event in events],
                self.engine.frozen_prefix,
                self.model.num_blocks,
            )
            self.tracker.open(self.model, state.global_step, float(state.epoch or 0.0), optimizer, reader=self._reader)
        self.tracker.restart_clock()

    def on_evaluate(self, args, state, control, **kwargs):
        self.tracker.restart_clock()  # evaluation time is not training time

    def on_save(self, args, state, control, **kwargs):
        self.tracker.restart_clock()

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs):
        if logs is None or self.tracker is None:
            return
        decode_seconds = self.tracker.decode_seconds(self._reader)
        extra = freeze_log_values(self.engine, self.policy, self.report, self.discarder, state, decode_seconds)
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.tracker.close(self._reader)
        if self.freeze_args.cost_report and state.is_world_process_zero:
            self.report.save(args.output_dir)
            logger.info("Cost report written to %s/cost_report.{json,md}", args.output_dir)
            plots = save_report_plots(self.report, args.output_dir)
            logger.info("Cost report plots written: %s", ", ".join(plots))
            print(self.report.to_markdown())

    # -- checkpointing (transformers' ExportableState) -----------------------------------------------------------

    def state(self) -> dict[str, Any]:
        resume = resume_state(self.model, self.policy, self.tracker) if self.tracker is not None else None
        return {"args": {"freeze_args": self.freeze_args.to_dict()}, "attributes": {"resume_state": resume}}

    def _restore(self, saved: dict[str, Any]) -> None:
        self.engine.freeze(saved["frozen"])
        self.policy.load_state_dict(saved["policy"])
        self.policy.evidence = {int(k): v for k, v in saved.get("evidence", {}).items()}
        self.tracker.pending = saved["cost_pending"]
        self.tracker.cost_batch = self._probe if self.freeze_args.cost_report else None
        position = saved.get("discarded_prefix", 0)
        if position:
            if self.discarder is None:
                raise ValueError(
                    f"The checkpoint was taken after discarding blocks 0-{position - 1}; resume it with "
                    "FreezeCacheTrainer and --discard true."
                )
            self._discard(position)  # reuses the cache, or rebuilds it
        logger.info("Resumed with blocks %s frozen and %d discarded.", saved["frozen"], position)

    # -- internals -----------------------------------------------------------------------------------------------

    def _bind(self, model: FreezeCacheModel) -> None:
        if self.model is model:
            return
        if not isinstance(model, FreezeCacheModel):
            raise TypeError(
                f"FreezeCacheCallback trains a FreezeCacheModel, not a {type(model).__name__}: pass "
                "Trainer(model=FreezeCacheModel(model), ...), or use FreezeCacheTrainer, which wraps it for you."
            )
        self.policy.setup(model.adapter)
        self.model = model
        self.engine = FreezingEngine(model)
        self.scaler = BlockUpdateScaler(model.adapter)

    @property
    def _reader(self):
        return self.discarder.cache if self.discarder is not None and self.model.discarded_position else None

    def _probe_images(self, count: int | None = None) -> torch.Tensor | None:
        if self._probe is None or "pixel_values" not in self._probe:
            return None
        return self._probe["pixel_values"][:count]

    def _check_split(self) -> None:
        """Refuses, before any training work, a model whose block split does not reproduce its forward."""
        images = self._probe_images(_SPLIT_CHECK_SAMPLES)
        if images is None or self.freeze_args.freeze_policy == "none" and self.discarder is None:
            return
        with self.model.restored():
            check_block_split(self.model.adapter, images)

    def _discard(self, position: int) -> None:
        """Discards at `position` (reusing or building its cache); the states from now on are measured on the probe
        images' activations at `position`."""
        images = self._probe_images()
        if images is not None and self.freeze_args.cost_report:
            with torch.no_grad(), self.model.restored():
                activations = self.model.adapter.prefix(images, position)
            self.tracker.cost_batch = {ACTIVATIONS_KEY: activations, "labels": self._probe["labels"]}
        self._cache_info = self.discarder.discard(position, self._build, images, self._offload_to)

    def _start_from_pinned_cache(self, state: TrainerState) -> dict[str, Any] | None:
        """Training from a given cache: its prefix is frozen and discarded before the first step; returns the
        cache's summary for the first freeze state (None without a given cache)."""
        if self.discarder is None or self.discarder.pinned_cache is None:
            return None
        position = self.discarder.pinned_cache.manifest.position
        progress = TrainingProgress.from_trainer_state(state)
        self.report.freeze_events += self.runner.freeze(range(position), progress)
        self._discard(position)
        return self._cache_info

    def _give_policy_probe(self, dataloader, args: TrainingArguments) -> None:
        """Hands the policy its fixed probe batch: the first `probe_size` training images."""
        if dataloader is None:
            raise ValueError(f"--freeze_policy {self.policy.name} needs the training dataloader for its probe batch.")
        batch = probe_batch(dataloader, self.policy.config.probe_size, args.device)
        if "pixel_values" not in batch:
            raise ValueError(
                f"--freeze_policy {self.policy.name} evaluates blocks on training images, and training from a given "
                "activation cache has none: use the policy 'none', 'freezeout' or 'fixed'."
            )
        probe = BlockProbe(self.model.adapter, batch["pixel_values"], restore=self.model.restored)
        self.runner.timed(self.policy.set_probe, probe)


def _dataset_size(dataloader, state: TrainerState, args: TrainingArguments) -> int:
    try:
        return len(dataloader.dataset)
    except (AttributeError, TypeError):
        return state.train_batch_size * args.gradient_accumulation_steps * args.world_size * state.max_steps
