"""Trains an image classifier with progressive freezing in a plain `accelerate` loop: no `Trainer` involved.

    python recipes/train_image_classifier_no_trainer.py --model resnet20 --freeze_policy freezeout --output_dir out
    python recipes/train_image_classifier_no_trainer.py my_config.yaml --discard true
    accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml recipes/train_image_classifier_no_trainer.py \\
        --model resnet20 --freeze_policy fixed --freeze_schedule 3:3,6:6 --discard true --cpu true --output_dir out

The `train_image_classifier.py` recipe (`FreezeCacheTrainer`) written out as a training loop, in the style of
transformers' `examples/pytorch/image-classification/run_image_classification_no_trainer.py`, from the same library
pieces: a freezing policy decides after every optimizer step, `FreezingEngine` freezes, `BlockUpdateScaler` applies
the policy's per-block learning rates (FreezeOut), and with `--discard true` the frozen prefix is discarded at the
next epoch boundary: `build_activation_cache` runs it once over the un-augmented training images (every process
its share), and training goes on from a `CachedActivationDataset` with the cache (reused when its fingerprint
matches), sample order and feature augmentation of `FreezeCacheTrainer`. Each epoch ends with an evaluation of the
whole model on raw images.

Arguments are `ModelArguments`, `DataTrainingArguments`, `FreezeCacheArguments` and this recipe's
`NoTrainerArguments` (`--help` lists them all); a `.yaml`/`.json` config file of these options may come first, and
flags after it override it. `--cost_report true` logs the cost of each freeze state (`measure_step_cost`); the full
cost report, checkpoints and resumption, `--train_from_cache` and `report_to` loggers are the Trainer recipe's.
`output_dir` receives `model.safetensors` (the whole model) and `eval_results.json`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, set_seed
from safetensors.torch import save_model
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import HfArgumentParser, PreTrainedModel, SchedulerType, get_scheduler
from transformers.trainer_pt_utils import get_parameter_names

from hf_freezecache.accounting import measure_step_cost
from hf_freezecache.cache import (
    ActivationCache,
    CachedActivationDataset,
    CacheMismatchError,
    ChunkShuffleSampler,
    build_activation_cache,
    build_codec,
    dataset_fingerprint,
)
from hf_freezecache.config import FreezeCacheArguments
from hf_freezecache.data import ImageClassificationData, collate_image_batch, probe_batch
from hf_freezecache.freezing import BlockUpdateScaler, DiscardedPrefix, FreezingEngine
from hf_freezecache.integrations import FreezeCacheCollator
from hf_freezecache.integrations.cache_request import (
    requested_augmentation,
    requested_fingerprint,
    requested_sidecars,
)
from hf_freezecache.models import BlockAdapter, build_model, get_block_adapter
from hf_freezecache.policies import BlockProbe, FreezePolicy, TrainingProgress, build_policy
from hf_freezecache.run.arguments import DataTrainingArguments, ModelArguments, expand_config_file

logger = get_logger(__name__)

#: `Trainer.get_decay_parameter_names`' exclusions: the same weight-decay groups as the Trainer recipe.
NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


@dataclass
class NoTrainerArguments:
    """The training loop's options; the defaults are the Trainer recipe's (`RECIPE_DEFAULTS`)."""

    output_dir: str = field(default="out", metadata={"help": "Where the model and eval_results.json are written."})
    num_train_epochs: int = field(default=10, metadata={"help": "Epochs to train."})
    per_device_train_batch_size: int = field(default=128, metadata={"help": "Training batch size per process."})
    per_device_eval_batch_size: int = field(
        default=256, metadata={"help": "Evaluation batch size per process; also the cache build's default."}
    )
    learning_rate: float = field(default=0.1, metadata={"help": "Peak learning rate of SGD."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    weight_decay: float = field(
        default=5e-4,
        metadata={"help": "Weight decay; biases and LayerNorm/RMSNorm parameters take none, as in Trainer."},
    )
    lr_scheduler_type: SchedulerType = field(
        default="cosine", metadata={"help": "Learning-rate schedule (transformers' `get_scheduler` names)."}
    )
    num_warmup_steps: int = field(default=0, metadata={"help": "Steps of linear warmup of the schedule."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0: no clipping)."})
    seed: int = field(default=42, metadata={"help": "Seed of initialisation, augmentation, shuffling and caches."})
    cpu: bool = field(
        default=False,
        metadata={
            "help": "Train on the CPU even when a GPU is available. Needed by `accelerate launch` on a machine "
            "without GPUs: the processes then train on the CPU with gloo."
        },
    )
    logging_steps: int = field(default=20, metadata={"help": "Log the training loss every this many steps."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})

    def __post_init__(self) -> None:
        self.lr_scheduler_type = SchedulerType(self.lr_scheduler_type)
        if self.lr_scheduler_type.value in ("reduce_lr_on_plateau", "greedy"):
            raise ValueError(
                f"--lr_scheduler_type {self.lr_scheduler_type.value} steps on a metric, which this loop does not "
                "compute every step; choose a schedule over steps (e.g. cosine, linear, constant)."
            )
        for name in ("num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")


Arguments = tuple[ModelArguments, DataTrainingArguments, FreezeCacheArguments, NoTrainerArguments]


def parse_arguments(argv: list[str] | None = None) -> Arguments:
    """Parses flags, or a config file (`.yaml`, `.yml`, `.json`) optionally followed by flags that override it."""
    argv = expand_config_file(argv)
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, FreezeCacheArguments, NoTrainerArguments))
    return parser.parse_args_into_dataclasses(args=argv)


def build_optimizer(model: nn.Module, args: NoTrainerArguments) -> torch.optim.Optimizer:
    """SGD with momentum; weight decay in `Trainer`'s groups (none on biases and LayerNorm/RMSNorm parameters)."""
    decay = set(get_parameter_names(model, [nn.LayerNorm], NO_DECAY_PATTERNS))
    groups = [
        {"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": args.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0},
    ]
    return torch.optim.SGD(groups, lr=args.learning_rate, momentum=args.momentum)


def make_train_dataloader(
    dataset: Dataset, collate_fn: Callable[[list[dict]], dict[str, torch.Tensor]], args: NoTrainerArguments
) -> DataLoader:
    """A training DataLoader in `FreezeCacheTrainer`'s sample order: a seeded permutation of images, or whole chunks
    of a cache in random order (`ChunkShuffleSampler`, re-seeded every epoch by `set_epoch`)."""
    sampler = ChunkShuffleSampler(dataset, args.per_device_train_batch_size, seed=args.seed)
    return DataLoader(
        dataset,
        batch_size=args.per_device_train_batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=args.dataloader_num_workers,
    )


def discard_position(
    adapter: BlockAdapter, freeze_args: FreezeCacheArguments, frozen_prefix: int, discarded: int
) -> int | None:
    """The block position to discard at now, given the frozen prefix, or None to keep training as is (the rule of
    `DiscardController.target_position`: the deepest allowed position the prefix reached, one block at least left)."""
    reachable = min(frozen_prefix, adapter.num_blocks - 1)
    positions = freeze_args.parsed_discard_positions()
    if positions is not None:
        reachable = max([p for p in positions if p <= reachable], default=0)
    return reachable if reachable > discarded else None


def load_or_build_cache(
    accelerator: Accelerator,
    adapter: BlockAdapter,
    position: int,
    data: ImageClassificationData,
    freeze_args: FreezeCacheArguments,
    args: NoTrainerArguments,
) -> tuple[ActivationCache, bool]:
    """The activation cache at `position`, and whether it was reused: the one in its folder when its fingerprint
    matches the model's prefix, the data and the options, otherwise built by all processes together.

    The sidecars and fingerprint are those `FreezeCacheTrainer` asks for (`requested_sidecars`,
    `requested_fingerprint`), so either recipe reuses the other's caches.
    """
    root = freeze_args.cache_dir or os.path.join(args.output_dir, "activation_cache")
    folder = os.path.join(root, f"position-{position:02d}")
    sidecars = requested_sidecars(freeze_args, adapter)
    dataset_hash = dataset_fingerprint(data.train_unaugmented)
    parts = requested_fingerprint(adapter, position, freeze_args, dataset_hash, sidecars, data.train, args.seed)
    # The main process decides (it verifies the shards once) and the others follow, so all build together or none.
    reuse = [False]
    if accelerator.is_main_process and os.path.isdir(folder):
        try:
            ActivationCache.load(folder, expected_fingerprint=parts)
            reuse = [True]
        except CacheMismatchError as error:
            logger.warning("%s Rebuilding it.", error)
    broadcast_object_list(reuse, from_process=0)
    if not reuse[0]:
        build_activation_cache(
            adapter,
            position,
            data.train_unaugmented,
            folder,
            build_codec(freeze_args.codec_config()),
            freeze_args.cache_chunk_size,
            parts,
            collate_fn=collate_image_batch,
            batch_size=freeze_args.cache_batch_size or args.per_device_eval_batch_size,
            device=accelerator.device,
            num_workers=args.dataloader_num_workers,
            encode_threads=freeze_args.cache_decode_threads,
            max_shard_size=freeze_args.cache_max_shard_size,
            sidecars=sidecars,
            augmented_dataset=data.train,
            seed=args.seed,
            processes=accelerator,
        )
    return ActivationCache.load(folder, expected_fingerprint=parts, verify=accelerator.is_main_process), reuse[0]


def discard_prefix(
    accelerator: Accelerator,
    prefix: DiscardedPrefix,
    position: int,
    data: ImageClassificationData,
    freeze_args: FreezeCacheArguments,
    args: NoTrainerArguments,
) -> DataLoader:
    """Discards blocks `0..position-1`: gets their activation cache and returns the prepared training DataLoader
    that reads it, with the feature augmentation."""
    adapter = prefix.adapter
    if accelerator.num_processes > 1:
        prefix.broadcast_from_main(position)
    # A prefix discarded earlier may sit offloaded: each cache is built from images through the whole prefix, so its
    # error stays within the codec's bound instead of compounding across caches.
    with prefix.restored():
        cache, reused = load_or_build_cache(accelerator, adapter, position, data, freeze_args, args)
    # Under DDP the prefix stays on the training device: DDP broadcasts all buffers before every forward.
    prefix.discard(position, offload=accelerator.num_processes == 1)
    collator = FreezeCacheCollator(collate_image_batch)
    collator.augmentation = requested_augmentation(freeze_args, adapter, cache.manifest)
    cached = CachedActivationDataset(cache, decode_threads=freeze_args.cache_decode_threads)
    logger.info(
        "Discarded blocks 0-%d: training reads %s (%s, %.2fx compression, %s).",
        position - 1,
        cache.folder,
        cache.manifest.codec["name"],
        cache.manifest.compression_ratio,
        "reused" if reused else f"built in {cache.manifest.build_seconds:.1f} s",
    )
    return accelerator.prepare(make_train_dataloader(cached, collator, args))


def evaluate(model: nn.Module, dataloader: DataLoader, accelerator: Accelerator) -> float:
    """Accuracy of `model` over the whole evaluation set (all processes' batches, without the padding duplicates)."""
    model.eval()
    predictions, references = [], []
    with torch.no_grad():
        for batch in dataloader:
            logits = model(**batch).logits
            predicted, labels = accelerator.gather_for_metrics((logits.argmax(dim=-1), batch["labels"]))
            predictions.append(predicted.cpu().numpy())
            references.append(labels.cpu().numpy())
    return float(np.mean(np.concatenate(predictions) == np.concatenate(references)))


def log_step_cost(
    model: nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, prefix: DiscardedPrefix | None
) -> None:
    """Logs what one training step costs in the current freeze state, measured on a copy of the model."""
    cost = measure_step_cost(model, batch, optimizer, exclude=prefix.prefix_tensors() if prefix else [])
    logger.info(
        "Step cost in this freeze state: %.2f MFLOPs per sample, %.1f MB of training memory (batch of %d).",
        cost.flops_per_sample / 1e6,
        cost.memory_bytes / 2**20,
        cost.batch_size,
    )


def decide_freeze(policy: FreezePolicy, engine: FreezingEngine, progress: TrainingProgress) -> list[int]:
    """Asks the policy which blocks to freeze now and freezes them; returns the newly frozen blocks.

    Every process must freeze the same blocks, or their gradients and caches would no longer match: the main
    process's decision is applied everywhere (a policy reading BatchNorm statistics, e.g. through its probe, can
    decide differently on another process's statistics).
    """
    decided = [policy.blocks_to_freeze(progress, frozenset(engine.frozen))]
    broadcast_object_list(decided, from_process=0)
    return engine.freeze(decided[0])


def main(argv: list[str] | None = None) -> dict[str, float | int]:
    """Parses `argv` (default: the command line), trains, evaluates and saves; returns the final evaluation."""
    model_args, data_args, freeze_args, args = parse_arguments(argv)
    if data_args.train_from_cache:
        raise ValueError("--train_from_cache is supported by recipes/train_image_classifier.py only.")
    # Frozen and discarded parameters get no gradient, and DDP without unused-parameter detection waits for them
    # forever. The model is wrapped once, before the first freeze, so DDP cannot be rebuilt around the blocks still
    # training; detection costs one traversal of the autograd graph per step.
    ddp_kwargs = DistributedDataParallelKwargs(find_unused_parameters=freeze_args.freeze_policy != "none")
    accelerator = Accelerator(cpu=args.cpu, kwargs_handlers=[ddp_kwargs])
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        raise ValueError(
            f"{launched} processes were launched but training is not distributed: without a GPU, add --cpu true "
            "(gloo on the CPU); otherwise each process would train on its own."
        )
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_local_main_process else logging.ERROR,
    )
    set_seed(args.seed)

    data = data_args.load()
    model = build_model(
        model_args.model, data.num_labels, model_args.pretrained_weights, model_args.parsed_timm_kwargs()
    )
    adapter = get_block_adapter(model, **freeze_args.adapter_modules())
    positions = freeze_args.parsed_discard_positions()
    if freeze_args.discard and positions and positions[-1] >= adapter.num_blocks:
        raise ValueError(
            f"--discard_positions {freeze_args.discard_positions!r}: position {positions[-1]} leaves no block to "
            f"train; this model has {adapter.num_blocks} blocks, so positions go from 1 to {adapter.num_blocks - 1}."
        )
    policy = build_policy(freeze_args)
    policy.setup(adapter)
    engine = FreezingEngine(adapter)
    scaler = BlockUpdateScaler(adapter)
    # Installed before `prepare`, so that DDP and the mixed-precision wrapper call the forward that accepts
    # `prefix_activations`.
    prefix = DiscardedPrefix(model, adapter) if freeze_args.discard else None
    whole_model = prefix.restored if prefix else contextlib.nullcontext

    optimizer = build_optimizer(model, args)
    eval_dataloader = DataLoader(
        data.eval,
        batch_size=args.per_device_eval_batch_size,
        collate_fn=collate_image_batch,
        num_workers=args.dataloader_num_workers,
    )
    model, optimizer, train_loader, eval_dataloader = accelerator.prepare(
        model, optimizer, make_train_dataloader(data.train, collate_image_batch, args), eval_dataloader
    )
    engine.attach_optimizer(optimizer)
    steps_per_epoch = len(train_loader)
    max_steps = args.num_train_epochs * steps_per_epoch
    num_epochs = float(args.num_train_epochs)
    # Stepped once per optimizer step by the loop; `prepare` would step it once per process per call.
    lr_scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps, num_training_steps=max_steps
    )
    if policy.needs_probe:
        probe = probe_batch(train_loader, freeze_args.policy_probe_size, accelerator.device)
        policy.set_probe(BlockProbe(adapter, probe["pixel_values"], restore=prefix.restored if prefix else None))

    logger.info(
        "Training %s (%d blocks, %s policy) on %d images for %d epochs: %d steps of %d x %d processes.",
        model_args.model,
        adapter.num_blocks,
        policy.describe(),
        len(data.train),
        args.num_train_epochs,
        max_steps,
        args.per_device_train_batch_size,
        accelerator.num_processes,
    )
    global_step = 0
    new = decide_freeze(policy, engine, TrainingProgress(0, max_steps, 0.0, num_epochs))
    if new:
        logger.info("Froze blocks %s before the first step.", new)
    cost_pending = freeze_args.cost_report
    accuracy = 0.0
    running_loss, running_steps = torch.zeros((), device=accelerator.device), 0
    progress_bar = tqdm(total=max_steps, disable=not accelerator.is_local_main_process)
    for epoch in range(args.num_train_epochs):
        position = discard_position(adapter, freeze_args, engine.frozen_prefix, prefix.position) if prefix else None
        if position is not None:
            train_loader = discard_prefix(accelerator, prefix, position, data, freeze_args, args)
            cost_pending = freeze_args.cost_report
        # The prepared DataLoader re-seeds its sampler with its own epoch counter, which a new DataLoader restarts.
        train_loader.set_epoch(epoch)
        model.train()  # frozen blocks stay in eval mode (FreezingEngine)
        for step, batch in enumerate(train_loader):
            loss = model(**batch).loss
            accelerator.backward(loss)
            if args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            # Gradients are present: the policy may observe them, and its per-block learning rates (FreezeOut's
            # annealing) scale each block's update, whatever the optimizer and schedule.
            progress = TrainingProgress(global_step, max_steps, epoch + step / steps_per_epoch, num_epochs)
            policy.observe_gradients(progress)
            scaler.before_step(policy.lr_scales(progress, frozenset(engine.frozen)))
            optimizer.step()
            scaler.after_step()
            lr_scheduler.step()
            optimizer.zero_grad()
            global_step += 1
            progress_bar.update(1)
            running_loss += loss.detach()
            running_steps += 1

            if cost_pending and accelerator.is_main_process:
                # After the state's first optimizer step, so that the optimizer state is measured too.
                cost_batch = probe_batch(train_loader, args.per_device_train_batch_size, accelerator.device)
                log_step_cost(accelerator.unwrap_model(model), cost_batch, optimizer, prefix)
            cost_pending = False
            epochs_done = epoch + (step + 1) / steps_per_epoch
            progress = TrainingProgress(global_step, max_steps, epochs_done, num_epochs)
            new = decide_freeze(policy, engine, progress)
            if new:
                cost_pending = freeze_args.cost_report
                logger.info(
                    "Step %d (epoch %.2f): froze blocks %s; frozen prefix is now %d of %d blocks.",
                    global_step,
                    epochs_done,
                    new,
                    engine.frozen_prefix,
                    adapter.num_blocks,
                )
            if global_step % args.logging_steps == 0:
                mean_loss = accelerator.reduce(running_loss / running_steps, reduction="mean").item()
                running_loss, running_steps = torch.zeros_like(running_loss), 0
                logger.info(
                    "Step %d (epoch %.2f): loss %.4f, learning rate %.4g, %d blocks frozen, %d discarded, %d "
                    "trainable parameters.",
                    global_step,
                    epochs_done,
                    mean_loss,
                    lr_scheduler.get_last_lr()[0],
                    len(engine.frozen),
                    prefix.position if prefix else 0,
                    engine.trainable_parameters(),
                )

        with whole_model():
            accuracy = evaluate(model, eval_dataloader, accelerator)
        logger.info("Epoch %d: eval accuracy %.4f.", epoch + 1, accuracy)
    progress_bar.close()

    results = {
        "eval_accuracy": accuracy,
        "epoch": float(args.num_train_epochs),
        "frozen_blocks": len(engine.frozen),
        "discarded_prefix": prefix.position if prefix else 0,
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        unwrapped = accelerator.unwrap_model(model)
        if isinstance(unwrapped, PreTrainedModel):
            unwrapped.save_pretrained(args.output_dir)  # model.safetensors and the config: loads with from_pretrained
        else:
            save_model(unwrapped, os.path.join(args.output_dir, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(args.output_dir, "eval_results.json"), "w") as f:
            json.dump(results, f, indent=2)
        logger.info("Model and eval_results.json written to %s: %s", args.output_dir, results)
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main()
