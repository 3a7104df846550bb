"""A whole training run: data, model, `FreezeCacheTrainer`, checkpoints, evaluation (the `train` recipe/command)."""

from __future__ import annotations

import logging
import os

import transformers
from transformers import TrainerCallback, set_seed
from transformers.trainer_utils import get_last_checkpoint

from ..cache import CachedActivationDataset, load_cache
from ..data import collate_image_batch
from ..integrations import FreezeCacheTrainer, load_metric
from ..models import build_model
from .arguments import RunArguments

logger = logging.getLogger(__name__)


def run_training(arguments: RunArguments, callbacks: list[TrainerCallback] | None = None) -> dict[str, float]:
    """Trains, saves and evaluates as `arguments` say; returns the evaluation metrics (empty without evaluation).

    The model, logs, checkpoints, `cost_report.{json,md}` and its plots go to `--output_dir`; an existing checkpoint
    there is resumed from. With `--train_from_cache` only the suffix trains, from that cache (a folder or a Hub
    dataset id): no images and no prefix weights are read, and evaluation runs on `--eval_from_cache` when given.

    Args:
        arguments: `(ModelArguments, DataTrainingArguments, TrainingArguments, FreezeCacheArguments)`, e.g. from
            `parse_run_arguments`.
        callbacks (`list[TrainerCallback]`, *optional*): Added to the Trainer's.
    """
    model_args, data_args, training_args, freeze_args = arguments
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training_args.world_size == 1:
        raise ValueError(
            f"{launched} processes were launched but training is not distributed: without a GPU, add "
            "--use_cpu true (gloo on the CPU); otherwise each process would train on its own."
        )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    # Preprocessing runs in the dataset's transform, which produces the model's inputs itself.
    training_args.remove_unused_columns = False
    metric = load_metric(data_args.metric)
    set_seed(training_args.seed)

    if data_args.train_from_cache:
        # A URL is read through --cache_storage_options, into --cache_local_dir.
        store = dict(
            storage_options=freeze_args.discard_config().storage_options(), download_dir=freeze_args.cache_local_dir
        )
        cache = load_cache(data_args.train_from_cache, revision=data_args.cache_revision, **store)
        eval_cache = load_cache(data_args.eval_from_cache, **store) if data_args.eval_from_cache else None
        num_labels = data_args.num_labels or int(cache.labels.max()) + 1
        model = build_model(
            model_args.model, num_labels, model_args.pretrained_weights, model_args.parsed_timm_kwargs()
        )
        if eval_cache is None and training_args.eval_strategy != "no":
            logger.info("No --eval_from_cache: training from a cache without evaluation.")
            training_args.eval_strategy = "no"
        threads = freeze_args.cache_decode_threads
        eval_dataset = None
        if eval_cache is not None:
            eval_dataset = CachedActivationDataset(
                eval_cache,
                decode_threads=threads,
                memory=freeze_args.cache_memory,
                device=training_args.device,
                decode_on_device=True,
            )
        trainer = FreezeCacheTrainer(
            model=model,
            args=training_args,
            eval_dataset=eval_dataset,
            compute_metrics=metric,
            freeze_args=freeze_args,
            activation_cache=cache,
            callbacks=callbacks,
        )
    else:
        data = data_args.load()
        model = build_model(
            model_args.model, data.num_labels, model_args.pretrained_weights, model_args.parsed_timm_kwargs()
        )
        trainer = FreezeCacheTrainer(
            model=model,
            args=training_args,
            train_dataset=data.train,
            eval_dataset=data.eval,
            data_collator=collate_image_batch,
            compute_metrics=metric,
            freeze_args=freeze_args,
            cache_dataset=data.train_unaugmented,
            callbacks=callbacks,
        )

    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is None and os.path.isdir(training_args.output_dir):
        checkpoint = get_last_checkpoint(training_args.output_dir)
        if checkpoint is not None:
            logger.info("Resuming from %s (start from scratch with another --output_dir).", checkpoint)
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()

    if trainer.eval_dataset is None:
        return {}
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    return metrics
