"""Evaluation metrics: an `evaluate` metric module where one can be loaded, numpy top-1 accuracy where not."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
from transformers import EvalPrediction

logger = logging.getLogger(__name__)

#: The metric with a numpy fallback (`compute_accuracy`), which computes what `evaluate-metric/accuracy` computes.
FALLBACK_METRIC = "accuracy"


def top1_accuracy(predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """The fraction of predicted classes equal to the references, as `{"accuracy": ...}`, with numpy."""
    return {"accuracy": float((np.asarray(predictions) == np.asarray(references)).mean())}


def compute_accuracy(eval_prediction: EvalPrediction) -> dict[str, float]:
    """Top-1 accuracy with numpy, as `Trainer(compute_metrics=compute_accuracy)` expects; loads nothing."""
    return top1_accuracy(_predicted_classes(eval_prediction.predictions), eval_prediction.label_ids)


class ClassificationMetric:
    """A metric of predicted classes against labels, computed by an `evaluate` module or by numpy (`load_metric`).

    Called with an `EvalPrediction` it is a `Trainer`'s `compute_metrics` (the predicted class is the argmax of the
    logits); `compute` takes the classes themselves, as a training loop gathers them. Either way the result's keys
    are the module's (`accuracy` for accuracy), which `Trainer` logs as `eval_<key>`.

    Args:
        source (`str`): What computes it, in words, for the log.
        module (`evaluate.EvaluationModule`, *optional*): The `evaluate` module; without it, numpy top-1 accuracy.
    """

    def __init__(self, source: str, module: Any | None = None) -> None:
        self.source = source
        self.module = module

    def compute(self, predictions: np.ndarray, references: np.ndarray) -> dict[str, Any]:
        """The metric of predicted classes `predictions` against labels `references` (1-D integer arrays)."""
        if self.module is None:
            return top1_accuracy(predictions, references)
        result = self.module.compute(predictions=np.asarray(predictions), references=np.asarray(references))
        # Python floats, not numpy scalars: the results go into JSON files and the Trainer's logs.
        return {
            key: float(value) if isinstance(value, (int, float, np.number)) else value for key, value in result.items()
        }

    def __call__(self, eval_prediction: EvalPrediction) -> dict[str, Any]:
        return self.compute(_predicted_classes(eval_prediction.predictions), eval_prediction.label_ids)


def load_metric(name_or_path: str = FALLBACK_METRIC) -> ClassificationMetric:
    """The metric `name_or_path` names, loaded with `evaluate.load`; logs which metric runs and from where.

    - A local path (a folder holding `<folder name>.py`, or a `.py` file) is loaded as an `evaluate` metric module.
    - Any other name is an `evaluate` metric on the Hub (`accuracy`, or `owner/name`): downloaded, or taken from the
      HF cache. Under `HF_HUB_OFFLINE=1` (or `HF_EVALUATE_OFFLINE=1`) only the cache is looked at, with no network
      access (`evaluate` itself follows only `HF_EVALUATE_OFFLINE`).
    - When `accuracy` cannot be loaded (offline or the Hub unreachable, and not in the cache; or a dependency of the
      Hub module is missing), numpy top-1 accuracy (`compute_accuracy`) computes it instead, with a warning saying
      why.

    Args:
        name_or_path (`str`, *optional*, defaults to `"accuracy"`): A metric name on the Hub or a local path.

    Raises:
        ValueError: a local path that does not exist or is not a loadable `evaluate` metric module, or another Hub
            metric than `accuracy` that cannot be loaded.
    """
    path = os.path.expanduser(name_or_path)
    if _looks_local(path):
        if not os.path.exists(path):
            raise ValueError(
                f"--metric {name_or_path!r} does not exist: give an evaluate metric name (e.g. accuracy) or the "
                "folder or .py file of an evaluate metric module."
            )
        try:
            module = _evaluate_load(path, offline=True)
        except Exception as error:  # importing a user's module can fail in any way
            raise ValueError(
                f"--metric {name_or_path!r} is not a loadable evaluate metric module: {_first_line(error)}"
            ) from error
        source = f"evaluate metric module {os.path.abspath(path)}"
    else:
        offline = _offline()
        try:
            module = _evaluate_load(name_or_path, offline=offline)
        except Exception as error:  # network, cache and the module's own imports all fail differently
            if offline:
                reason = "offline (HF_HUB_OFFLINE or HF_EVALUATE_OFFLINE) and not in the HF cache"
            elif isinstance(error, (ConnectionError, FileNotFoundError)):
                # evaluate says "doesn't exist on the Hub" for an unreachable Hub too.
                reason = "not in the HF cache, and the Hub is unreachable or has no such metric"
            else:
                reason = _first_line(error)  # e.g. a dependency of the Hub module (scikit-learn) is missing
            if name_or_path != FALLBACK_METRIC:
                raise ValueError(
                    f"--metric {name_or_path!r} cannot be loaded ({reason}); only {FALLBACK_METRIC!r} has a fallback."
                ) from error
            logger.warning(
                "Metric: numpy top-1 accuracy, since evaluate's %r cannot be loaded (%s).", name_or_path, reason
            )
            return ClassificationMetric("numpy top-1 accuracy")
        source = f"evaluate metric {name_or_path!r} (Hub or HF cache)"
    logger.info("Metric: %s.", source)
    return ClassificationMetric(source, module)


def _predicted_classes(predictions: np.ndarray | tuple[np.ndarray, ...]) -> np.ndarray:
    logits = predictions[0] if isinstance(predictions, tuple) else predictions
    return np.argmax(logits, axis=-1)


def _looks_local(path: str) -> bool:
    # As `evaluate.load` reads it: a script file or a folder with its script, else a Hub name (at most one slash,
    # `owner/name`); a folder without the script, named like a metric (an output folder `accuracy`), is not a metric.
    script = os.path.join(path, os.path.basename(os.path.normpath(path)) + ".py")
    if os.path.isfile(path) or os.path.isfile(script):
        return True
    return path.endswith(".py") or os.path.isabs(path) or path.startswith(".") or path.count("/") > 1


def _offline() -> bool:
    import evaluate
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE or evaluate.config.HF_EVALUATE_OFFLINE)


def _evaluate_load(path: str, offline: bool) -> Any:
    # Imported here: `evaluate` imports transformers' pipelines, seconds that code not computing metrics never pays.
    import evaluate

    # evaluate reads HF_EVALUATE_OFFLINE once, at import; set, it looks in the cache without trying the network
    # (which would otherwise wait up to 100 s per request where the network drops packets).
    previous = evaluate.config.HF_EVALUATE_OFFLINE
    evaluate.config.HF_EVALUATE_OFFLINE = previous or offline
    try:
        # In memory: no cache files or locks, which processes evaluating at once would share.
        return evaluate.load(path, module_type="metric", keep_in_memory=True)
    finally:
        evaluate.config.HF_EVALUATE_OFFLINE = previous


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
