"""Metrics computed with numpy, so evaluation needs no Hub download (unlike `evaluate.load`)."""

from __future__ import annotations

import numpy as np
from transformers import EvalPrediction


def compute_accuracy(eval_prediction: EvalPrediction) -> dict[str, float]:
    """Top-1 accuracy, as `Trainer(compute_metrics=compute_accuracy)` expects."""
    logits = eval_prediction.predictions
    logits = logits[0] if isinstance(logits, tuple) else logits
    labels = eval_prediction.label_ids
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}
