"""Trains an image classifier with `FreezeCacheTrainer`, then writes the model, logs and cost report.

    python recipes/train_image_classifier.py --model resnet20 --freeze_policy freezeout --output_dir out
    python recipes/train_image_classifier.py --freeze_policy fixed --freeze_schedule 5:3 --discard true
    accelerate launch recipes/train_image_classifier.py --model resnet20 --freeze_policy freezeout --output_dir out

Every `TrainingArguments` flag works, next to the `ModelArguments`, `DataTrainingArguments` and `FreezeCacheArguments`
below; a single `.json` or `.yaml` file may hold them all instead. Defaults (`RECIPE_DEFAULTS`) train CIFAR ResNet-20
from scratch on the CIFAR-10 subset embedded in the package: 10 epochs, about two minutes on a 2-core CPU.
An existing checkpoint in `--output_dir` is resumed from.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field

import transformers
from transformers import HfArgumentParser, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from hf_freezecache import FreezeCacheArguments, FreezeCacheTrainer, compute_accuracy
from hf_freezecache.data import EMBEDDED_CIFAR10, collate_image_batch, load_image_classification
from hf_freezecache.models import build_model

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model: str = field(
        default="resnet20",
        metadata={
            "help": "CIFAR ResNet (resnet20, resnet32, resnet44, resnet56, resnet110, resnet32-paper), "
            "'timm:<name>', or a transformers model id or folder (AutoModelForImageClassification)."
        },
    )
    pretrained_weights: str | None = field(
        default=None,
        metadata={
            "help": "Checkpoint for a CIFAR ResNet (pytorch_resnet_cifar10 layout, e.g. "
            "../shared/models/resnet-cifar10/resnet20-12fca82f.th) or a timm model."
        },
    )
    timm_kwargs: str | None = field(
        default=None,
        metadata={
            "help": "JSON object of timm.create_model keyword arguments for a 'timm:' model, e.g. "
            '\'{"img_size": 32, "patch_size": 4}\' for a 32x32 DeiT-Tiny (timm:deit_tiny_patch16_224).'
        },
    )


@dataclass
class DataTrainingArguments:
    dataset_name: str = field(
        default=EMBEDDED_CIFAR10,
        metadata={"help": "Hub dataset id or local folder; defaults to the CIFAR-10 subset embedded in the package."},
    )
    train_split: str = field(default="train", metadata={"help": "Training split."})
    eval_split: str = field(default="test", metadata={"help": "Evaluation split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N evaluation rows."})
    image_size: int = field(default=32, metadata={"help": "Side of the square model input."})
    augment: bool = field(default=True, metadata={"help": "Random crop and horizontal flip on training images."})


#: Defaults for a CIFAR ResNet on CPU (the CIFAR recipe of He et al.: SGD, momentum 0.9, lr 0.1, cosine), in place
#: of `TrainingArguments`' language-model defaults. Flags override them; a JSON/YAML file starts from the dataclasses.
RECIPE_DEFAULTS = dict(
    output_dir="out",
    num_train_epochs=10,
    per_device_train_batch_size=128,
    per_device_eval_batch_size=256,
    learning_rate=0.1,
    weight_decay=5e-4,
    optim="sgd",
    optim_args="momentum=0.9",
    lr_scheduler_type="cosine",
    eval_strategy="epoch",
    save_strategy="epoch",
    save_total_limit=2,
    logging_steps=20,
    report_to="none",
)


def parse_arguments(argv: list[str] | None = None):
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments, FreezeCacheArguments))
    parser.set_defaults(**RECIPE_DEFAULTS)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(argv[0]))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None, callbacks: list | None = None) -> dict[str, float]:
    """Parses `argv` (default: the command line), trains, saves and evaluates; `callbacks` are added to the
    Trainer's (e.g. `HistoryRecorder` in `train_smartfrz_predictor.py`)."""
    model_args, data_args, training_args, freeze_args = parse_arguments(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    # Preprocessing runs in the dataset's transform, which produces the model's inputs itself.
    training_args.remove_unused_columns = False
    set_seed(training_args.seed)

    data = load_image_classification(
        data_args.dataset_name,
        train_split=data_args.train_split,
        eval_split=data_args.eval_split,
        max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples,
        image_size=data_args.image_size,
        augment=data_args.augment,
    )
    timm_kwargs = json.loads(model_args.timm_kwargs) if model_args.timm_kwargs else None
    model = build_model(model_args.model, data.num_labels, model_args.pretrained_weights, timm_kwargs)
    trainer = FreezeCacheTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=collate_image_batch,
        compute_metrics=compute_accuracy,
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

    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    return metrics


if __name__ == "__main__":
    main()
