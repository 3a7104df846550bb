"""Distributed training on the CPU: 2 processes (gloo) launched with `accelerate launch`, as a user would."""

import hashlib
import json
import os
import subprocess
import sys

import datasets
import pytest
from conftest import ROOT

from hf_freezecache.cache import CacheManifest
from hf_freezecache.models import load_cifar_resnet

ACCELERATE_CONFIG = ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml"


def _arguments(output_dir, weights) -> list[str]:
    return [
        "--model", "resnet20", "--pretrained_weights", str(weights), "--output_dir", str(output_dir),
        "--max_train_samples", "200", "--max_eval_samples", "64", "--num_train_epochs", "2",
        "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32", "--learning_rate", "0.01",
        # Blocks 0-2 freeze before the first step and are discarded at once, so the cache is built from the
        # pretrained prefix in every run (with the channel-flip sidecar); blocks 3-5 freeze after an epoch of DDP
        # training, long after the Trainer wrapped the model, and are discarded too.
        "--freeze_policy", "fixed", "--freeze_schedule", "0:3,1:6", "--discard", "true", "--channel_aug_gamma", "0.25",
        "--cache_chunk_size", "3", "--save_strategy", "no", "--eval_strategy", "no", "--disable_tqdm", "true",
        "--report_to", "none", "--use_cpu", "true",
    ]  # fmt: skip


def _run(command: list[str]) -> None:
    # One thread per process in both runs: the prefix then computes the same bits in every process.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "recipes")}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def _rows(folder):
    # Python bytes and lists straight from Arrow (numpy's bytes_ would drop trailing zero bytes from a blob).
    table = datasets.load_from_disk(str(folder)).data
    return {name: table.column(name).to_pylist() for name in table.column_names}


def _accelerate() -> str:
    return os.path.join(os.path.dirname(sys.executable), "accelerate")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, resnet20_weights):
    """The same training run with 2 processes under `accelerate launch` (reading the cache from host memory, and
    from device memory with the lowbit codec), and with 1 process (from disk)."""
    root = tmp_path_factory.mktemp("distributed")
    worker = str(ROOT / "tests" / "distributed_worker.py")
    launch = [_accelerate(), "launch", "--config_file", str(ACCELERATE_CONFIG), worker]
    _run([*launch, *_arguments(root / "two", resnet20_weights), "--cache_memory", "host"])
    device = ["--cache_memory", "device", "--cache_codec", "lowbit"]
    _run([*launch, *_arguments(root / "two-device", resnet20_weights), *device])
    _run([sys.executable, worker, *_arguments(root / "one", resnet20_weights), "--cache_memory", "disk"])
    return root / "two", root / "one", root / "two-device"


def test_cache_built_by_two_processes_equals_the_single_process_cache(runs):
    two, one = (run / "activation_cache" / "position-03" for run in runs[:2])
    manifest_two, manifest_one = CacheManifest.load(two), CacheManifest.load(one)
    assert (manifest_two.num_processes, manifest_one.num_processes) == (2, 1)
    assert len(manifest_two.shards) == 2  # each process wrote its own shard
    assert manifest_two.fingerprint == manifest_one.fingerprint
    for field in ("num_samples", "num_chunks", "stored_bytes", "sidecars", "codec", "sample_shape", "raw_bytes"):
        assert getattr(manifest_two, field) == getattr(manifest_one, field), field
    rows_two, rows_one = _rows(two), _rows(one)
    assert rows_two.keys() == rows_one.keys() and "sidecar.flipped" in "".join(rows_two)
    for name in rows_one:
        assert len(rows_two[name]) == len(rows_one[name]) == manifest_one.num_chunks
        for index, (a, b) in enumerate(zip(rows_two[name], rows_one[name], strict=True)):
            assert a == b, (name, index)  # encoded bytes, or label/index lists


@pytest.mark.parametrize("memory", ["host", "device"])
def test_training_proceeds_in_lockstep_on_both_processes(runs, resnet20_weights, memory):
    two = runs[0] if memory == "host" else runs[2]
    reports = [json.loads((two / f"process-{index}.json").read_text()) for index in (0, 1)]
    assert {r["cache_memory"] for r in reports} == {memory}
    assert [r["process_index"] for r in reports] == [0, 1] and {r["world_size"] for r in reports} == {2}
    # 200 samples, 2 processes x 16 per step: 7 steps per epoch (the last one short), 2 epochs.
    assert {r["global_step"] for r in reports} == {14}
    # Each process read the cache (its own batches), and DDP kept their weights identical.
    assert all(r["cache_decode_calls"] > 0 for r in reports)
    assert (two / "activation_cache" / "position-06").is_dir()
    assert reports[0]["parameters_hash"] == reports[1]["parameters_hash"]
    # The frozen, discarded prefix is bit-identical to the pretrained one, on both processes.
    pretrained = load_cifar_resnet(resnet20_weights, num_classes=10)
    digest = hashlib.sha256()
    for block in pretrained.layer1[:3]:
        for tensor in block.state_dict().values():
            digest.update(tensor.contiguous().numpy().tobytes())
    assert {r["prefix_hash"] for r in reports} == {digest.hexdigest()}
    assert not any(r["frozen_requires_grad"] for r in reports)
    report = json.loads((two / "cost_report.json").read_text())
    assert [state["discarded_prefix"] for state in report["states"]] == [3, 6]
    load_cifar_resnet(two / "model.safetensors", num_classes=10)
