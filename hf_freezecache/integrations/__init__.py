"""Integration with `transformers.Trainer`: the callback (freezing) and a Trainer subclass (freezing + discarding)."""

from .discard import DiscardableTrainDataset, DiscardController, FreezeCacheCollator
from .metrics import compute_accuracy
from .trainer import FreezeCacheTrainer
from .trainer_callback import FreezeCacheCallback

__all__ = [
    "DiscardController",
    "DiscardableTrainDataset",
    "FreezeCacheCallback",
    "FreezeCacheCollator",
    "FreezeCacheTrainer",
    "compute_accuracy",
]
