"""Integration with `transformers.Trainer`: the callback (freezing) and a Trainer subclass (freezing + discarding)."""

from .metrics import compute_accuracy
from .trainer import FreezeCacheTrainer
from .trainer_callback import FreezeCacheCallback

__all__ = ["FreezeCacheCallback", "FreezeCacheTrainer", "compute_accuracy"]
