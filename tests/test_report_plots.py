"""The cost report's plots, and what FreezeCacheCallback logs to the Trainer's loggers."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image
from transformers import TrainingArguments, set_seed

from hf_freezecache import FreezeCacheArguments, FreezeCacheTrainer
from hf_freezecache.accounting import (
    CostReport,
    plot_compression,
    plot_freeze_timeline,
    plot_state_costs,
    save_report_plots,
)
from hf_freezecache.cache import ActivationCache
from hf_freezecache.data import collate_image_batch, load_image_classification
from hf_freezecache.models import CifarResNet

SAMPLES = 192
BATCH = 32
STEPS_PER_EPOCH = SAMPLES // BATCH


def _state(frozen, discarded, start, end, flops, activations, cache=None):
    cost = {
        "flops_per_sample": flops,
        "forward_flops_per_sample": flops / 3,
        "model_bytes": 1_000_000,
        "gradient_bytes": 900_000,
        "optimizer_bytes": 900_000,
        "activation_bytes": activations,
        "batch_size": 128,
        "memory_bytes": 2_800_000 + activations,
    }
    return {
        "frozen_blocks": frozen,
        "frozen_prefix": len(frozen),
        "trainable_parameters": 1000 - 100 * len(frozen),
        "start_step": int(start * 10),
        "start_epoch": start,
        "end_step": int(end * 10),
        "end_epoch": end,
        "cost": cost,
        "discarded_prefix": discarded,
        "cache": cache,
    }


def _cache(position, ratio, sidecar_bytes=0):
    raw = 600_000_000 // position
    return {
        "sidecar_bytes": sidecar_bytes,
        "position": position,
        "codec": "zfp(tolerance=0.05)",
        "chunk_size": 4,
        "raw_bytes": raw,
        "stored_bytes": int(raw / ratio),
        "compression_ratio": ratio,
        "build_seconds": 10.0,
        "reused": False,
    }


def _report(caches: bool = True) -> CostReport:
    discarded = (3, 6) if caches else (0, 0)
    states = [
        _state([], 0, 0.0, 5.0, 240e6, 190_000_000),
        _state([0, 1, 2], discarded[0], 5.0, 10.0, 150e6, 80_000_000, _cache(3, 3.0, 30_000_000) if caches else None),
        _state(list(range(6)), discarded[1], 10.0, 15.0, 75e6, 30_000_000, _cache(6, 2.5) if caches else None),
    ]
    events = [
        {"block": b, "name": f"layer{b}", "step": 50 if b < 3 else 100, "epoch": 5.0 if b < 3 else 10.0}
        for b in range(6)
    ]
    data = {"model": "Net (cifar-resnet)", "policy": "fixed (5:3,10:6)", "num_blocks": 9, "train_samples": 1000}
    return CostReport.from_dict({**data, "device": "cpu", "states": states, "freeze_events": events})


def _assert_png(path, min_bytes=10_000):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.width >= 600 and image.height >= 300, (path, image.size)
    assert os.path.getsize(path) > min_bytes


def test_each_plot_writes_a_png(tmp_path):
    report = _report()
    for plot, name in (
        (plot_freeze_timeline, "timeline.png"),
        (plot_state_costs, "costs.png"),
        (plot_compression, "compression.png"),
    ):
        assert plot(report, tmp_path / "figures" / name) == str(tmp_path / "figures" / name)
        _assert_png(tmp_path / "figures" / name)


def test_save_report_plots_writes_what_applies(tmp_path):
    written = save_report_plots(_report(), tmp_path / "with_cache")
    names = ["freeze_timeline.png", "state_costs.png", "compression.png"]
    assert written == [str(tmp_path / "with_cache" / name) for name in names]

    report = _report(caches=False)
    assert plot_compression(report, tmp_path / "compression.png") is None
    assert not (tmp_path / "compression.png").exists()
    written = save_report_plots(report, tmp_path / "no_cache")
    assert sorted(p.name for p in (tmp_path / "no_cache").iterdir()) == ["freeze_timeline.png", "state_costs.png"]
    assert len(written) == 2

    for state in report.states:
        state.cost = None  # --cost_report false: nothing measured
    assert plot_state_costs(report, tmp_path / "costs.png") is None
    assert not (tmp_path / "costs.png").exists()


def test_timeline_of_several_runs_and_the_recipe(tmp_path):
    from summarize_policies import plot_timeline

    _assert_png(plot_freeze_timeline({"a": _report(), "b": _report(caches=False)}, tmp_path / "two.png", "runs"))
    folders = []
    for name, caches in (("freeze", False), ("discard", True)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "cost_report.json").write_text(json.dumps(_report(caches).to_dict()))
        folders.append(str(tmp_path / name))
    plot_timeline(folders, str(tmp_path / "recipe.png"), "title")
    _assert_png(tmp_path / "recipe.png")


@pytest.fixture(scope="module")
def discard_run(tmp_path_factory):
    """A tiny FreezeCacheTrainer run: blocks 0-2 freeze after epoch 1 and are discarded for epoch 2 (fp16 cache,
    read from disk: every batch's rows are unpacked in the training process, and timed)."""
    data = load_image_classification(max_train_samples=SAMPLES, max_eval_samples=32, augment=False)
    out = tmp_path_factory.mktemp("discard_run")
    set_seed(0)
    args = TrainingArguments(
        output_dir=str(out),
        num_train_epochs=2,
        per_device_train_batch_size=BATCH,
        learning_rate=0.05,
        optim="sgd",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
        seed=0,
    )
    options = dict(freeze_policy="fixed", freeze_schedule="1:3", discard=True, cache_codec="fp16", cache_memory="disk")
    trainer = FreezeCacheTrainer(
        model=CifarResNet.from_name("resnet20", num_classes=10),
        args=args,
        train_dataset=data.train,
        data_collator=collate_image_batch,
        freeze_args=FreezeCacheArguments(**options, feature_augmentation="none"),
        cache_dataset=data.train_unaugmented,
    )
    trainer.train()
    return trainer, out


def test_logs_carry_savings_freeze_events_and_cache_numbers(discard_run):
    trainer, out = discard_run
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    new_keys = (
        "discarded_prefix",
        "newly_frozen_blocks",
        "last_frozen_block",
        "training_flops_saved_fraction",
        "cache_compression_ratio",
        "cache_stored_mb",
        "cache_build_seconds",
        "cache_decode_seconds",
    )
    for entry in logs:
        assert all(type(entry[key]) in (int, float) for key in new_keys if key in entry), entry

    # Freeze events: blocks 0-2 froze at the end of epoch 1, and are discarded from epoch 2 on.
    freeze_step = STEPS_PER_EPOCH
    steps = [entry["step"] for entry in logs]
    assert [entry["newly_frozen_blocks"] for entry in logs] == [3 if step == freeze_step else 0 for step in steps]
    assert [entry.get("last_frozen_block") for entry in logs] == [2 if step >= freeze_step else None for step in steps]
    assert [entry["discarded_prefix"] for entry in logs] == [3 if step > freeze_step else 0 for step in steps]

    # FLOPs saved so far, from the report's states: full training for epoch 1, the suffix after it, plus the build.
    report = trainer.freeze_callback.report
    full, suffix = (s.cost["flops_per_sample"] for s in report.states)
    one_off = report.states[1].one_off_flops
    assert one_off > 0
    for entry in logs:
        epoch = entry["step"] / STEPS_PER_EPOCH
        spent = SAMPLES * (full * min(epoch, 1.0) + suffix * max(epoch - 1.0, 0.0)) + (one_off if epoch > 1 else 0)
        assert entry["training_flops"] == pytest.approx(spent, rel=1e-9)
        assert entry["training_flops_saved_fraction"] == pytest.approx(1 - spent / (SAMPLES * full * epoch), abs=1e-9)
    assert logs[0]["training_flops_saved_fraction"] == 0.0
    totals = json.loads((out / "cost_report.json").read_text())["totals"]
    assert logs[-1]["training_flops_saved_fraction"] == pytest.approx(totals["training_flops_saved_fraction"])
    baseline = 2 * SAMPLES * full
    assert totals["training_flops_saved_fraction"] == pytest.approx(1 - totals["training_flops"] / baseline)

    # The cache's numbers, while training reads it, are its manifest's.
    manifest = ActivationCache.load(out / "activation_cache" / "position-03").manifest
    cached = [entry for entry in logs if entry["step"] > freeze_step]
    assert all("cache_compression_ratio" not in entry for entry in logs if entry["step"] <= freeze_step)
    assert manifest.compression_ratio == pytest.approx(2.0, rel=1e-3)  # fp16 of float32
    for entry in cached:
        assert entry["cache_compression_ratio"] == manifest.compression_ratio
        assert entry["cache_stored_mb"] == manifest.stored_bytes / 2**20
        assert entry["cache_build_seconds"] == report.cache_build_seconds == manifest.build_seconds
    decode = [entry["cache_decode_seconds"] for entry in cached]
    assert decode == sorted(decode) and decode[-1] > 0
    assert decode[-1] <= report.states[1].decode_seconds + 1e-9


def test_training_end_writes_the_plots_next_to_the_report(discard_run):
    _, out = discard_run
    for name in ("cost_report.json", "cost_report.md", "freeze_timeline.png", "state_costs.png", "compression.png"):
        assert (out / name).exists(), name
    for name in ("freeze_timeline.png", "state_costs.png", "compression.png"):
        _assert_png(out / name)
