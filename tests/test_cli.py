"""The `hf-freezecache` command line: build a cache, inspect it, train a suffix from it, render a report."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from hf_freezecache.cache import ActivationCache, CacheManifest, export_cache
from hf_freezecache.cli import main

TINY = ["--max_train_samples", "48", "--max_eval_samples", "32", "--cache_chunk_size", "4"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    """Runs the installed console script in a fresh process, as a user would."""
    script = os.path.join(os.path.dirname(sys.executable), "hf-freezecache")
    return subprocess.run([script, *args], capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def built(tmp_path_factory, resnet20_weights):
    """Caches of the training and evaluation splits at block 3 of the pretrained ResNet-20, built by the CLI."""
    root = tmp_path_factory.mktemp("cli")
    common = ["--model", "resnet20", "--pretrained_weights", str(resnet20_weights), "--position", "3", *TINY]
    assert main(["build-cache", *common, "--output_dir", str(root / "train"), "--disable_tqdm", "true"]) == 0
    eval_args = ["--split", "eval", "--output_dir", str(root / "eval"), "--disable_tqdm", "true"]
    assert main(["build-cache", *common, *eval_args]) == 0
    return root


def test_help_lists_every_command_and_option():
    result = _cli("--help")
    assert result.returncode == 0
    for command in ("train", "build-cache", "inspect", "export", "push", "pull", "report"):
        assert command in result.stdout
    train_help = _cli("train", "--help")
    assert train_help.returncode == 0
    for flag in ("--freeze_policy", "--discard", "--train_from_cache", "--per_device_train_batch_size", "--model"):
        assert flag in train_help.stdout, flag
    assert "--position" in _cli("build-cache", "--help").stdout


def test_build_cache_writes_both_splits(built):
    train, evaluation = CacheManifest.load(built / "train"), CacheManifest.load(built / "eval")
    assert (train.num_samples, evaluation.num_samples, train.position) == (48, 32, 3)
    assert train.source_model == "resnet20" and train.fingerprint != evaluation.fingerprint


def test_inspect_prints_the_manifest_and_verifies_checksums(built, capsys):
    assert main(["inspect", str(built / "train")]) == 0
    out = capsys.readouterr().out
    manifest = CacheManifest.load(built / "train")
    expected = ("resnet20", "block position", "(16, 32, 32)", f"{manifest.compression_ratio:.2f}x", "codebook", "ok ")
    for text in (*expected, "codec error", "RMS"):
        assert text in out, text
    assert main(["inspect", "--json", "--no-verify", str(built / "train")]) == 0
    assert json.loads(capsys.readouterr().out)["fingerprint"] == manifest.fingerprint


def test_inspect_reports_a_damaged_shard_in_one_line(built, tmp_path):
    damaged = tmp_path / "damaged"
    export_cache(built / "train", damaged)
    shard = next((damaged / "data").glob("*.parquet"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = _cli("inspect", str(damaged))
    assert result.returncode == 2
    assert "MISMATCH" in result.stdout
    last = result.stderr.strip().splitlines()[-1]  # after the progress bars of `datasets`
    assert "Traceback" not in result.stderr
    assert last.startswith("hf-freezecache inspect: error:") and "fail their checksum" in last


def test_user_mistakes_end_in_one_line_not_a_traceback(tmp_path):
    result = _cli("inspect", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("hf-freezecache inspect: error:") and "nowhere" in result.stderr
    result = _cli("report", str(tmp_path))
    assert result.returncode == 2 and "cost_report.json" in result.stderr


def test_exported_cache_trains_a_suffix_in_a_fresh_process(built, tmp_path):
    """Someone with only the exported caches (no images, no prefix weights) trains the suffix."""
    export_cache(built / "train", tmp_path / "hub-train")
    export_cache(built / "eval", tmp_path / "hub-eval", split="test")
    out = tmp_path / "suffix"
    result = _cli(
        "train", "--model", "resnet20", "--train_from_cache", str(tmp_path / "hub-train"),
        "--eval_from_cache", str(tmp_path / "hub-eval"), "--output_dir", str(out), "--num_train_epochs", "2",
        "--per_device_train_batch_size", "16", "--learning_rate", "0.01", "--save_strategy", "no",
        "--disable_tqdm", "true", "--report_to", "none",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((out / "eval_results.json").read_text())
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    report = json.loads((out / "cost_report.json").read_text())
    first = report["states"][0]
    assert (first["discarded_prefix"], first["frozen_blocks"]) == (3, [0, 1, 2])
    assert first["cache"]["reused"] is True and report["freeze_events"][0]["step"] == 0
    # 48 samples in batches of 16, 2 epochs: every step read the cache.
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6


def test_a_cache_of_another_model_is_refused(built, tmp_path):
    result = _cli(
        "train", "--model", "resnet32", "--train_from_cache", str(built / "train"), "--output_dir",
        str(tmp_path / "x"), "--report_to", "none",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "built from a 9-block resnet20; this model has 15 blocks" in result.stderr


def test_build_cache_gives_the_cache_training_would_build(built, tmp_path, resnet20_weights):
    """A cache built ahead of training has training's fingerprint: a run pointed at it reuses it."""
    cache_root = tmp_path / "caches"
    cache_root.mkdir()
    os.symlink(built / "train", cache_root / "position-03")
    out = tmp_path / "run"
    assert main([
        "train", "--model", "resnet20", "--pretrained_weights", str(resnet20_weights), *TINY,
        "--freeze_policy", "fixed", "--freeze_schedule", "0:3", "--discard", "true",
        "--cache_dir", str(cache_root), "--output_dir", str(out), "--num_train_epochs", "1",
        "--per_device_train_batch_size", "16", "--learning_rate", "0.01", "--save_strategy", "no",
        "--eval_strategy", "no", "--disable_tqdm", "true", "--report_to", "none",
    ]) == 0  # fmt: skip
    report = json.loads((out / "cost_report.json").read_text())
    assert report["states"][-1]["cache"]["reused"] is True
    ActivationCache.load(built / "train")  # untouched


def test_report_renders_the_table_and_plots(built, tmp_path, capsys, resnet20_weights):
    out = tmp_path / "run"
    assert main([
        "train", "--model", "resnet20", "--pretrained_weights", str(resnet20_weights), *TINY[:4],
        "--freeze_policy", "fixed", "--freeze_schedule", "1:3", "--discard", "true", "--output_dir", str(out),
        "--num_train_epochs", "2", "--per_device_train_batch_size", "16", "--save_strategy", "no",
        "--eval_strategy", "no", "--disable_tqdm", "true", "--report_to", "none",
    ]) == 0  # fmt: skip
    capsys.readouterr()
    plots = tmp_path / "plots"
    assert main(["report", str(out), "--output_dir", str(plots)]) == 0
    printed = capsys.readouterr().out
    assert "| " in printed and "Freeze timeline" in printed
    for name in ("freeze_timeline.png", "state_costs.png", "compression.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_push_then_pull_through_the_hub_client(built, hub, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token")
    assert main(["push", str(built / "train"), "user/resnet20-block3", "--private"]) == 0
    assert "https://huggingface.co/datasets/user/resnet20-block3" in capsys.readouterr().out
    assert hub.repos["user/resnet20-block3"]["visibility"] == "private"
    assert main(["pull", "user/resnet20-block3", "--download_dir", str(tmp_path / "hub")]) == 0
    out = capsys.readouterr().out
    assert CacheManifest.load(built / "train").fingerprint in out and "--train_from_cache" in out
    assert main(["push", str(built / "train"), "not a repo id"]) == 2
    assert "error" in capsys.readouterr().err
