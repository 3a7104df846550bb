"""The arguments of a training run, in the conventions of transformers' `examples/pytorch/image-classification`."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments

from ..config import FreezeCacheArguments
from ..data import EMBEDDED_CIFAR10, ImageClassificationData, load_image_classification


@dataclass
class ModelArguments:
    """Which model to train and where its starting weights come from."""

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
            "../shared/models/resnet-cifar10/resnet20-12fca82f.th, or the output_dir / model.safetensors of an "
            "earlier run) or a timm model."
        },
    )
    timm_kwargs: str | None = field(
        default=None,
        metadata={
            "help": "JSON object of timm.create_model keyword arguments for a 'timm:' model, e.g. "
            '\'{"img_size": 32, "patch_size": 4}\' for a 32x32 DeiT-Tiny (timm:deit_tiny_patch16_224).'
        },
    )

    def parsed_timm_kwargs(self) -> dict[str, Any] | None:
        if not self.timm_kwargs:
            return None
        try:
            kwargs = json.loads(self.timm_kwargs)
        except json.JSONDecodeError as error:
            raise ValueError(f"--timm_kwargs {self.timm_kwargs!r} is not a JSON object ({error}).") from error
        if not isinstance(kwargs, dict):
            raise ValueError(f"--timm_kwargs {self.timm_kwargs!r} must be a JSON object, e.g. '{{\"img_size\": 32}}'.")
        return kwargs


@dataclass
class DataTrainingArguments:
    """Which data to train and evaluate on, and how images are prepared."""

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
    train_from_cache: str | None = field(
        default=None,
        metadata={
            "help": "Train only the suffix, from this activation cache (a folder, a Hub dataset id written by "
            "push_cache_to_hub, or a URL such as s3://bucket/path with --cache_storage_options) instead of images: no "
            "training images and no prefix weights are needed."
        },
    )
    eval_from_cache: str | None = field(
        default=None,
        metadata={"help": "With --train_from_cache: an activation cache of the evaluation split to evaluate on."},
    )
    cache_revision: str | None = field(
        default=None, metadata={"help": "With --train_from_cache: Hub revision (branch, tag or commit) of the cache."}
    )
    num_labels: int | None = field(
        default=None,
        metadata={"help": "With --train_from_cache: number of classes (default: the largest cached label + 1)."},
    )
    metric: str = field(
        default="accuracy",
        metadata={
            "help": "Evaluation metric (load_metric): an evaluate metric on the Hub or in the HF cache, or the folder "
            "or .py file of a local evaluate metric module. When accuracy cannot be loaded (offline and not cached), "
            "numpy top-1 accuracy computes it; the log says which ran."
        },
    )

    def __post_init__(self) -> None:
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be at least 1, got {value}.")
        if self.image_size < 1:
            raise ValueError(f"--image_size must be at least 1, got {self.image_size}.")
        if not self.train_from_cache:
            cache_only = ("eval_from_cache", "cache_revision", "num_labels")
            given = [f"--{name}" for name in cache_only if getattr(self, name)]
            if given:
                raise ValueError(f"{', '.join(given)} only apply with --train_from_cache, which is not given.")

    def load(self) -> ImageClassificationData:
        """The training and evaluation splits these options describe (`load_image_classification`)."""
        return load_image_classification(
            self.dataset_name,
            train_split=self.train_split,
            eval_split=self.eval_split,
            max_train_samples=self.max_train_samples,
            max_eval_samples=self.max_eval_samples,
            image_size=self.image_size,
            augment=self.augment,
        )


#: Defaults for a CIFAR ResNet on CPU (the CIFAR recipe of He et al.: SGD, momentum 0.9, lr 0.1, cosine), in place
#: of `TrainingArguments`' language-model defaults. A config file and flags override them.
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

RunArguments = tuple[ModelArguments, DataTrainingArguments, TrainingArguments, FreezeCacheArguments]


def run_argument_parser() -> HfArgumentParser:
    """The parser of `ModelArguments`, `DataTrainingArguments`, `TrainingArguments` and `FreezeCacheArguments`, with
    `RECIPE_DEFAULTS`."""
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments, FreezeCacheArguments))
    parser.set_defaults(**RECIPE_DEFAULTS)
    return parser


def config_file_flags(path: str | os.PathLike) -> list[str]:
    """The options of a `.yaml`/`.yml`/`.json` config file (a flat mapping of option names to values) as flags.

    Going through flags rather than `parse_yaml_file` lets flags given after the file override it, and gives a file
    the same checks and `RECIPE_DEFAULTS` as the command line.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file {path!r} does not exist.")
    with open(path) as f:
        values = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    if not isinstance(values, dict):
        raise ValueError(f"Config file {path!r} must hold a mapping of option names to values, got {type(values)}.")
    flags = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, list):
            flags += [f"--{key}", *(str(v) for v in value)]
        elif isinstance(value, dict):
            flags += [f"--{key}", json.dumps(value)]
        else:
            flags += [f"--{key}", str(value)]
    return flags


def expand_config_file(argv: list[str] | None = None) -> list[str]:
    """Command-line arguments (default: `sys.argv[1:]`) with a leading `.yaml`/`.yml`/`.json` config file replaced
    by its options as flags, so that the flags after it override it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        return config_file_flags(argv[0]) + argv[1:]
    return argv


def parse_run_arguments(argv: list[str] | None = None) -> RunArguments:
    """Parses a run's arguments: flags, or a config file (`.yaml`, `.yml`, `.json`) optionally followed by flags that
    override it.

    Raises:
        ValueError: on an unknown option (HfArgumentParser names it). A bad value exits through argparse, with the
            usage line.
    """
    return run_argument_parser().parse_args_into_dataclasses(args=expand_config_file(argv))
