"""When a policy that observes training takes its next look, and how it writes numeric history into its state."""

from __future__ import annotations

import base64
import math

import numpy as np

from .base import TrainingProgress


class EvaluationClock:
    """Fires `per_epoch` times per epoch, at the first optimizer step at or after each `1/per_epoch` of an epoch.

    Counting in epochs (not steps) keeps a policy's rhythm the same whatever the dataset size or batch size, which a
    predictor trained on other runs relies on.

    Args:
        per_epoch (`int`): Evaluations per epoch.
    """

    def __init__(self, per_epoch: int) -> None:
        self.per_epoch = per_epoch
        self.last = 0  # index of the last evaluation fired; evaluation k is due at epoch k / per_epoch

    def due(self, progress: TrainingProgress) -> bool:
        """Whether an evaluation is due now; advances the clock when it is."""
        index = math.floor(progress.epoch * self.per_epoch + 1e-6)
        if index <= self.last:
            return False
        self.last = index
        return True


def stabilised(values: list[float], window: int, tolerance: float) -> bool:
    """Whether the last `window` values stay within `tolerance` of each other (max - min <= tolerance)."""
    if len(values) < window:
        return False
    recent = values[-window:]
    return max(recent) - min(recent) <= tolerance


def relative_slope(values: list[float]) -> float:
    """Least-squares slope of `values` per step, divided by their mean (0 for a zero mean)."""
    y = np.asarray(values, dtype=np.float64)
    x = np.arange(len(y), dtype=np.float64)
    slope = float(np.polyfit(x, y, 1)[0])
    mean = float(y.mean())
    return slope / mean if mean else 0.0


def encode_array(array: np.ndarray) -> dict:
    """A numpy array as JSON (exact bytes in base64): policy histories go into Trainer checkpoints this way."""
    array = np.ascontiguousarray(array)
    return {"dtype": array.dtype.str, "shape": list(array.shape), "data": base64.b64encode(array.tobytes()).decode()}


def decode_array(encoded: dict) -> np.ndarray:
    """Inverse of `encode_array`."""
    data = base64.b64decode(encoded["data"])
    return np.frombuffer(data, dtype=np.dtype(encoded["dtype"])).reshape(encoded["shape"]).copy()
