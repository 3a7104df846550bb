"""Trains an image classifier with progressive freezing in a plain `accelerate` loop: no `Trainer` involved.

    python recipes/train_image_classifier_no_trainer.py --model resnet20 --freeze_policy freezeout --output_dir out
    python recipes/train_image_classifier_no_trainer.py my_config.yaml --discard true
    accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml recipes/train_image_classifier_no_trainer.py \\
        --model resnet20 --freeze_policy fixed --freeze_schedule 3:3,6:6 --discard true --cpu true --output_dir out

The `train_image_classifier.py` recipe (`FreezeCacheTrainer`) written out as a training loop, in the style of
transformers' `examples/pytorch/image-classification/run_image_classification_no_trainer.py`, from the same library
pieces: the model is a `FreezeCacheModel`, a `PolicyRunner` asks the freezing policy after every optimizer step (the
main process's decision applies on every process), `FreezingEngine` freezes, `BlockUpdateScaler` applies the
policy's per-block learning rates (FreezeOut), and with `--discard true` the `PrefixDiscarder` of the Trainer path
discards the frozen prefix at the next epoch boundary: the cache is reused when its fingerprint matches or built by
all processes together from the un-augmented training images, and the training data (a `DiscardableTrainDataset`
read through a `ChunkShuffleSampler`, the `FreezeCacheCollator` with its feature augmentation) switches to it. Each
epoch ends with an evaluation of the whole model on raw images.

Arguments are `ModelArguments`, `DataTrainingArguments`, `FreezeCacheArguments` and this recipe's
`NoTrainerArguments` (`--help` lists them all); a `.yaml`/`.json` config file of these options may come first, and
flags after it override it. `--cost_report true` logs the cost of each freeze state (`measure_step_cost`); the full
cost report, checkpoints and resumption, `--train_from_cache` and `report_to` loggers are the Trainer recipe's.
`output_dir` receives `model.safetensors` (the whole model) and `eval_results.json`.

Over 300 lines on purpose: like transformers' no_trainer examples, the whole loop is one file a reader (or a user
copying it) follows from top to bottom.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from safetensors.torch import save_model
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import HfArgumentParser, PreTrainedModel, SchedulerType, get_scheduler
from transformers.trainer_pt_utils import get_parameter_names

from hf_freezecache.accounting import measure_step_cost
from hf_freezecache.cache import ChunkShuffleSampler
from hf_freezecache.cli import run_reporting_user_errors
from hf_freezecache.config import FreezeCacheArguments
from hf_freezecache.data import collate_image_batch, probe_batch
from hf_freezecache.discard import CacheBuildSettings, DiscardableTrainDataset, FreezeCacheCollator, PrefixDiscarder
from hf_freezecache.freezing import BlockUpdateScaler, FreezingEngine
from hf_freezecache.integrations import ClassificationMetric, load_metric
from hf_freezecache.model import ACTIVATIONS_KEY, FreezeCacheModel
from hf_freezecache.models import build_model, check_block_split, get_block_adapter
from hf_freezecache.policies import BlockProbe, TrainingProgress, build_policy, schedule_factor
from hf_freezecache.policies.runner import PolicyRunner
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


def evaluate(
    model: nn.Module, dataloader: DataLoader, accelerator: Accelerator, metric: ClassificationMetric
) -> dict[str, float]:
    """`metric` (`--metric`, as in the Trainer recipe) of `model` over the whole evaluation set (all processes'
    batches, without the padding duplicates)."""
    model.eval()
    predictions, references = [], []
    with torch.no_grad():
        for batch in dataloader:
            logits = model(**batch).logits
            predicted, labels = accelerator.gather_for_metrics((logits.argmax(dim=-1), batch["labels"]))
            predictions.append(predicted.cpu().numpy())
            references.append(labels.cpu().numpy())
    return metric.compute(np.concatenate(predictions), np.concatenate(references))


def log_step_cost(
    model: FreezeCacheModel, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, autocast_dtype
) -> None:
    """Logs what one training step costs in the current freeze state, measured on a true replica of the model."""
    cost = measure_step_cost(model, batch, optimizer, exclude=model.prefix_tensors(), autocast_dtype=autocast_dtype)
    logger.info(
        "Step cost in this freeze state: %.2f MFLOPs per sample, %.1f MB of training memory (batch of %d).",
        cost.flops_per_sample / 1e6,
        cost.memory_bytes / 2**20,
        cost.batch_size,
    )


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
    metric = load_metric(data_args.metric)
    set_seed(args.seed)
    processes = accelerator if accelerator.num_processes > 1 else None

    data = data_args.load()
    base = build_model(
        model_args.model, data.num_labels, model_args.pretrained_weights, model_args.parsed_timm_kwargs()
    )
    model = FreezeCacheModel(base, get_block_adapter(base, **freeze_args.adapter_modules()))
    policy = build_policy(freeze_args.policy_config())
    policy.setup(model.adapter)
    engine = FreezingEngine(model)
    scaler = BlockUpdateScaler(model.adapter)
    runner = PolicyRunner(policy, engine, processes)

    train_data = DiscardableTrainDataset(data.train)
    collator = FreezeCacheCollator(collate_image_batch)
    discarder = None
    if freeze_args.discard:
        cache_root = os.path.join(args.output_dir, "activation_cache")
        config = freeze_args.discard_config()
        discarder = PrefixDiscarder(model, config, train_data, collator, data.train_unaugmented, cache_root)
    optimizer = build_optimizer(model, args)
    eval_dataloader = DataLoader(
        data.eval,
        batch_size=args.per_device_eval_batch_size,
        collate_fn=collate_image_batch,
        num_workers=args.dataloader_num_workers,
    )
    model, optimizer, train_loader, eval_dataloader = accelerator.prepare(
        model, optimizer, make_train_dataloader(train_data, collator, args), eval_dataloader
    )
    wrapper: FreezeCacheModel = accelerator.unwrap_model(model)
    engine.attach_optimizer(optimizer)
    steps_per_epoch = len(train_loader)
    max_steps = args.num_train_epochs * steps_per_epoch
    num_epochs = float(args.num_train_epochs)
    # Stepped once per optimizer step by the loop; `prepare` would step it once per process per call.
    lr_scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps, num_training_steps=max_steps
    )
    probe = probe_batch(train_loader, args.per_device_train_batch_size, accelerator.device)
    if freeze_args.freeze_policy != "none" or discarder is not None:
        check_block_split(wrapper.adapter, probe["pixel_values"][:4])
    if policy.needs_probe:
        pixels = probe_batch(train_loader, policy.config.probe_size, accelerator.device)["pixel_values"]
        runner.timed(policy.set_probe, BlockProbe(wrapper.adapter, pixels, restore=wrapper.restored))
    build = CacheBuildSettings(
        device=accelerator.device,
        batch_size=freeze_args.cache_batch_size or args.per_device_eval_batch_size,
        num_workers=args.dataloader_num_workers,
        seed=args.seed,
        progress=accelerator.is_local_main_process,
        processes=processes,
    )
    if discarder is not None:
        discarder.check_destination(probe["pixel_values"])
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)

    logger.info(
        "Training %s (%d blocks, %s policy) on %d images for %d epochs: %d steps of %d x %d processes.",
        model_args.model,
        wrapper.num_blocks,
        policy.describe(),
        len(data.train),
        args.num_train_epochs,
        max_steps,
        args.per_device_train_batch_size,
        accelerator.num_processes,
    )
    global_step = 0
    new = runner.decide(TrainingProgress(0, max_steps, 0.0, num_epochs))
    if new:
        logger.info("Froze blocks %s before the first step.", [event["block"] for event in new])
    cost_batch = probe if freeze_args.cost_report else None
    cost_pending = cost_batch is not None
    scores = {}
    running_loss, running_steps = torch.zeros((), device=accelerator.device), 0
    progress_bar = tqdm(total=max_steps, disable=not accelerator.is_local_main_process)
    for epoch in range(args.num_train_epochs):
        position = discarder.target_position(engine.frozen_prefix) if discarder is not None else None
        if position is not None:
            # Under DDP the prefix stays on the training device: DDP broadcasts all buffers before every forward.
            offload = "cpu" if accelerator.num_processes == 1 else None
            discarder.discard(position, build, probe["pixel_values"], offload)
            if cost_batch is not None:
                with torch.no_grad(), wrapper.restored():
                    activations = wrapper.adapter.prefix(probe["pixel_values"], position)
                cost_batch = {ACTIVATIONS_KEY: activations, "labels": probe["labels"]}
                cost_pending = True
        # The prepared DataLoader re-seeds its sampler with its own epoch counter.
        train_loader.set_epoch(epoch)
        model.train()  # frozen blocks stay in eval mode (FreezeCacheModel.train)
        for step, batch in enumerate(train_loader):
            batch = collator.finish(batch, accelerator.device)  # cached batches are decoded on the device
            loss = model(**batch).loss
            accelerator.backward(loss)
            if args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            # Gradients are present: the policy may observe them, and its per-block learning rates (FreezeOut's
            # annealing) scale each block's update, whatever the optimizer and schedule.
            fraction = epoch + step / steps_per_epoch
            progress = TrainingProgress(global_step, max_steps, fraction, num_epochs, schedule_factor(lr_scheduler))
            scaler.before_step(runner.before_optimizer_step(progress))
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
                log_step_cost(wrapper, cost_batch, optimizer, autocast_dtype)
            cost_pending = False
            epochs_done = epoch + (step + 1) / steps_per_epoch
            new = runner.decide(TrainingProgress(global_step, max_steps, epochs_done, num_epochs))
            if new:
                cost_pending = cost_batch is not None
                logger.info(
                    "Step %d (epoch %.2f): froze blocks %s; frozen prefix is now %d of %d blocks.",
                    global_step,
                    epochs_done,
                    [event["block"] for event in new],
                    engine.frozen_prefix,
                    wrapper.num_blocks,
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
                    wrapper.discarded_position,
                    engine.trainable_parameters(),
                )

        with wrapper.restored():
            scores = evaluate(model, eval_dataloader, accelerator, metric)
        logger.info("Epoch %d: eval %s.", epoch + 1, scores)
    progress_bar.close()

    results = {
        **{f"eval_{key}": value for key, value in scores.items()},
        "epoch": float(args.num_train_epochs),
        "frozen_blocks": len(engine.frozen),
        "discarded_prefix": wrapper.discarded_position,
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        trained = wrapper.unwrap()
        if isinstance(trained, PreTrainedModel):
            trained.save_pretrained(args.output_dir)  # model.safetensors and the config: loads with from_pretrained
        else:
            save_model(trained, os.path.join(args.output_dir, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(args.output_dir, "eval_results.json"), "w") as f:
            json.dump(results, f, indent=2)
        logger.info("Model and eval_results.json written to %s: %s", args.output_dir, results)
    accelerator.end_training()
    return results


if __name__ == "__main__":
    sys.exit(run_reporting_user_errors("train_image_classifier_no_trainer.py", main))
