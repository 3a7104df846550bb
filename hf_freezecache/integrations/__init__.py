"""Integration with `transformers.Trainer`: the callback (freezing) and a Trainer subclass (freezing + discarding)."""

from .metrics import ClassificationMetric, compute_accuracy, load_metric
from .trainer import FreezeCacheTrainer
from .trainer_callback import FreezeCacheCallback

__all__ = ["ClassificationMetric", "FreezeCacheCallback", "FreezeCacheTrainer", "compute_accuracy", "load_metric"]
