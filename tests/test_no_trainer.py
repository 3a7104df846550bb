"""The `accelerate` loop recipe (recipes/train_image_classifier_no_trainer.py): freezing and discarding without
`Trainer`, in one process and in two CPU processes under `accelerate launch`."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from hf_freezecache.cache import CacheManifest
from hf_freezecache.models import get_block_adapter, load_cifar_resnet

RECIPE = str(ROOT / "recipes" / "train_image_classifier_no_trainer.py")
ACCELERATE_CONFIG = str(ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml")
# Blocks 0-2 freeze before the first step and are discarded at once (the cache is built from the pretrained
# prefix); blocks 3-5 freeze at the end of epoch 1 and are discarded for epoch 2.
EXPECTED = {"epoch": 2.0, "frozen_blocks": 6, "discarded_prefix": 6}


def _arguments(output_dir, weights) -> list[str]:
    return [
        "--model", "resnet20", "--pretrained_weights", str(weights), "--output_dir", str(output_dir),
        "--max_train_samples", "128", "--max_eval_samples", "64", "--num_train_epochs", "2",
        "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32", "--learning_rate", "0.01",
        "--freeze_policy", "fixed", "--freeze_schedule", "0:3,1:6", "--discard", "true", "--logging_steps", "4",
        "--cpu", "true",
    ]  # fmt: skip


def _run(command: list[str]) -> None:
    # One thread per process: two processes share the test machine's cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory, resnet20_weights):
    output_dir = tmp_path_factory.mktemp("no_trainer") / "one"
    _run([sys.executable, RECIPE, *_arguments(output_dir, resnet20_weights)])
    return output_dir


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, resnet20_weights):
    output_dir = tmp_path_factory.mktemp("no_trainer") / "two"
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    _run([accelerate, "launch", "--config_file", ACCELERATE_CONFIG, RECIPE, *_arguments(output_dir, resnet20_weights)])
    return output_dir


def _check_results(output_dir) -> None:
    results = json.loads((output_dir / "eval_results.json").read_text())
    assert {key: results[key] for key in EXPECTED} == EXPECTED
    # The whole model on raw images, starting from pretrained weights: far above chance (0.1).
    assert 0.5 < results["eval_accuracy"] <= 1.0


def test_single_process_run_freezes_discards_and_keeps_the_prefix(single_process_run, resnet20_weights):
    _check_results(single_process_run)
    for position in (3, 6):
        manifest = CacheManifest.load(single_process_run / "activation_cache" / f"position-{position:02d}")
        assert (manifest.position, manifest.num_processes, manifest.num_samples) == (position, 1, 128)

    pretrained = get_block_adapter(load_cifar_resnet(resnet20_weights, num_classes=10))
    trained = get_block_adapter(load_cifar_resnet(single_process_run / "model.safetensors", num_classes=10))

    def tensors(adapter, index):  # parameters and buffers (BatchNorm statistics) of block `index`
        return [t for module in adapter.block_modules(index) for t in module.state_dict().values()]

    # Blocks 0-2 (with the stem) were frozen before any step: bit-identical, BatchNorm statistics included.
    for index in range(3):
        assert all(map(torch.equal, tensors(trained, index), tensors(pretrained, index))), index
    # Blocks 3-5 trained during epoch 1, blocks 6-8 during both epochs.
    for index in range(3, 9):
        assert not all(map(torch.equal, tensors(trained, index), tensors(pretrained, index))), index


def test_two_processes_under_accelerate_launch_build_the_same_cache(two_process_run, single_process_run):
    _check_results(two_process_run)
    manifest = CacheManifest.load(two_process_run / "activation_cache" / "position-03")
    assert manifest.num_processes == 2 and len(manifest.shards) == 2  # each process wrote its share
    # Built from the pretrained prefix, it is the cache a single process builds (tests/test_distributed.py compares
    # the rows byte for byte).
    single = CacheManifest.load(single_process_run / "activation_cache" / "position-03")
    assert (manifest.fingerprint, manifest.stored_bytes) == (single.fingerprint, single.stored_bytes)
    assert (two_process_run / "activation_cache" / "position-06").is_dir()
    load_cifar_resnet(two_process_run / "model.safetensors", num_classes=10)
