"""`--metric`: an `evaluate` metric module where one loads (a local module, the HF cache), numpy accuracy offline."""

from __future__ import annotations

import logging
import sys

import evaluate
import numpy as np
import pytest
import requests
from huggingface_hub import constants
from transformers import EvalPrediction

from hf_freezecache.integrations import compute_accuracy, load_metric
from hf_freezecache.run import parse_run_arguments, run_training

#: An `evaluate` metric module that also counts the samples, so that a test can tell it from numpy accuracy.
COUNTING_ACCURACY = """
import datasets
import evaluate


class CountingAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Top-1 accuracy and the number of samples.",
            citation="",
            inputs_description="predictions and references: class indices",
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        matches = [int(p) == int(r) for p, r in zip(predictions, references)]
        return {"accuracy": sum(matches) / len(matches), "counted": len(matches)}
"""

LOGITS = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.0, 1.0, 0.0]])
LABELS = np.array([1, 0, 1, 1])  # 3 of 4 right


@pytest.fixture(scope="module", autouse=True)
def modules_cache(tmp_path_factory):
    """An empty HF modules cache (where `evaluate` copies the modules it imports), first on the import path."""
    folder = tmp_path_factory.mktemp("hf_modules")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate.config, "HF_MODULES_CACHE", folder)
        patch.syspath_prepend(str(folder))
        for name in [name for name in sys.modules if name.split(".")[0] == "evaluate_modules"]:
            patch.delitem(sys.modules, name)
        yield folder


@pytest.fixture
def offline(monkeypatch):
    """Offline as `HF_HUB_OFFLINE=1` makes it (read at import), with any HTTP request failing the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError(f"network request while offline: {args} {kwargs}")

    monkeypatch.setattr(requests, "request", no_network)
    monkeypatch.setattr(requests.Session, "request", no_network)


def _module_folder(parent, name="counting_accuracy"):
    folder = parent / name
    folder.mkdir()
    (folder / f"{name}.py").write_text(COUNTING_ACCURACY)
    return folder


def test_a_local_metric_module_computes_the_metric(tmp_path, caplog, offline):
    folder = _module_folder(tmp_path)
    for given in (folder, folder / "counting_accuracy.py"):
        with caplog.at_level(logging.INFO, logger="hf_freezecache.integrations.metrics"):
            metric = load_metric(str(given))
        assert metric.module is not None
        assert f"Metric: evaluate metric module {given}" in caplog.text
        # As a Trainer's compute_metrics (logits), and as the training loop calls it (classes).
        assert metric(EvalPrediction(predictions=LOGITS, label_ids=LABELS)) == {"accuracy": 0.75, "counted": 4.0}
        assert metric.compute(np.array([2, 2]), np.array([2, 0])) == {"accuracy": 0.5, "counted": 2.0}
        caplog.clear()


def test_offline_without_a_cached_metric_falls_back_to_numpy_accuracy(caplog, offline):
    with caplog.at_level(logging.INFO, logger="hf_freezecache.integrations.metrics"):
        metric = load_metric("accuracy")
    assert metric.module is None
    (record,) = [r for r in caplog.records if r.name == "hf_freezecache.integrations.metrics"]
    assert record.levelno == logging.WARNING
    assert "numpy top-1 accuracy" in record.message and "offline" in record.message
    prediction = EvalPrediction(predictions=LOGITS, label_ids=LABELS)
    assert metric(prediction) == compute_accuracy(prediction) == {"accuracy": 0.75}
    with pytest.raises(ValueError, match="'f1' cannot be loaded .*only 'accuracy' has a fallback"):
        load_metric("f1")


def test_offline_a_hub_metric_in_the_hf_cache_is_used(modules_cache, offline):
    # Where evaluate keeps a metric downloaded from the Hub (evaluate-metric/top1) once it has loaded it.
    cached = modules_cache / "evaluate_modules" / "metrics" / "evaluate-metric--top1" / ("0" * 64)
    cached.mkdir(parents=True)
    (cached / "top1.py").write_text(COUNTING_ACCURACY)
    for folder in (cached, *cached.parents[:3]):
        (folder / "__init__.py").touch()
    metric = load_metric("top1")
    assert metric.compute(np.array([1, 2, 3]), np.array([1, 2, 0])) == {"accuracy": 2 / 3, "counted": 3.0}


def test_a_bad_local_metric_is_a_one_line_error(tmp_path):
    missing = tmp_path / "missing_metric.py"
    with pytest.raises(ValueError, match="does not exist") as error:
        load_metric(str(missing))
    assert str(missing) in str(error.value) and "\n" not in str(error.value)
    broken = tmp_path / "broken_metric.py"
    broken.write_text("this is not python\n")
    with pytest.raises(ValueError, match="is not a loadable evaluate metric module") as error:
        load_metric(str(broken))
    assert "\n" not in str(error.value)
    # Refused before any data is loaded or any model built.
    arguments = parse_run_arguments(["--metric", str(missing), "--output_dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="missing_metric.py"):
        run_training(arguments)


def test_the_trainer_recipe_reports_the_chosen_metric(tmp_path, offline):
    folder = _module_folder(tmp_path)
    arguments = parse_run_arguments(
        [
            "--metric", str(folder), "--output_dir", str(tmp_path / "out"), "--max_train_samples", "16",
            "--max_eval_samples", "12", "--num_train_epochs", "1", "--per_device_train_batch_size", "16",
            "--save_strategy", "no", "--eval_strategy", "no", "--use_cpu", "true", "--disable_tqdm", "true",
        ]
    )  # fmt: skip
    metrics = run_training(arguments)
    assert metrics["eval_counted"] == 12.0 and 0.0 <= metrics["eval_accuracy"] <= 1.0


def test_the_no_trainer_recipe_uses_the_same_metric(tmp_path, offline):
    from train_image_classifier_no_trainer import main

    folder = _module_folder(tmp_path)
    results = main(
        [
            "--metric", str(folder), "--output_dir", str(tmp_path / "out"), "--max_train_samples", "16",
            "--max_eval_samples", "12", "--num_train_epochs", "1", "--per_device_train_batch_size", "16",
            "--cpu", "true",
        ]
    )  # fmt: skip
    assert results["eval_counted"] == 12.0 and 0.0 <= results["eval_accuracy"] <= 1.0
