"""Trains an image classifier with `FreezeCacheTrainer`, then writes the model, logs, cost report and plots.

    python recipes/train_image_classifier.py --model resnet20 --freeze_policy freezeout --output_dir out
    python recipes/train_image_classifier.py recipes/configs/cpu/resnet20_cifar10_scratch.yaml --discard true
    accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml recipes/train_image_classifier.py \\
        --model resnet20 --freeze_policy freezeout --discard true --output_dir out

Arguments follow transformers' `examples/pytorch/image-classification`: every `TrainingArguments` flag, next to
`ModelArguments`, `DataTrainingArguments` and `FreezeCacheArguments` (`--help` lists them all). A `.yaml`/`.json`
config file may hold them, and flags after it override it. Defaults (`RECIPE_DEFAULTS`) train CIFAR ResNet-20 from
scratch on the CIFAR-10 subset embedded in the package: 10 epochs, about two minutes on a 2-core CPU. An existing
checkpoint in `--output_dir` is resumed from. `hf-freezecache train` is the same command.
"""

import sys

from hf_freezecache.cli import run_reporting_user_errors
from hf_freezecache.run import parse_run_arguments, run_training


def main(argv: list[str] | None = None, callbacks: list | None = None) -> dict[str, float]:
    """Parses `argv` (default: the command line) and trains; `callbacks` are added to the Trainer's."""
    return run_training(parse_run_arguments(argv), callbacks=callbacks)


if __name__ == "__main__":
    sys.exit(run_reporting_user_errors("train_image_classifier.py", main))
