"""Integration with `transformers.Trainer`."""

from .metrics import compute_accuracy
from .trainer_callback import FreezeCacheCallback

__all__ = ["FreezeCacheCallback", "compute_accuracy"]
