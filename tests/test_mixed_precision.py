"""Measuring costs cannot touch training, in any precision: the same run with and without `--cost_report` ends with
bit-identical weights, BatchNorm statistics and optimizer state, in float32, bf16 (CPU autocast) and fp16, freezing
only or discarding. On the CPU accelerate runs `--fp16` without autocast (it has none for the CPU), so fp16 autocast
with its gradient scaler is checked on a CUDA device (`recipes/gpu_check.sh`)."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments, set_seed

from hf_freezecache import FreezeCacheArguments, FreezeCacheTrainer
from hf_freezecache.data import collate_image_batch, load_image_classification
from hf_freezecache.models import CifarResNet

PRECISIONS = {"fp32": {}, "bf16": {"bf16": True}, "fp16": {"fp16": True}}


@pytest.fixture(scope="module")
def data():
    # Random crop and flip on: the measurement must not consume the random numbers that augmentation draws.
    return load_image_classification(max_train_samples=96, max_eval_samples=32)


def _train(data, out, precision: str, discard: bool, cost_report: bool, use_cpu: bool = True) -> FreezeCacheTrainer:
    set_seed(0)
    args = TrainingArguments(
        output_dir=str(out),
        num_train_epochs=2,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=32,
        learning_rate=0.05,
        optim="sgd",
        optim_args="momentum=0.9",
        weight_decay=5e-4,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=use_cpu,
        disable_tqdm=True,
        remove_unused_columns=False,  # the image transform reads the raw columns
        seed=0,
        **PRECISIONS[precision],
    )
    freeze_args = FreezeCacheArguments(
        freeze_policy="fixed", freeze_schedule="0.5:2,1:3", discard=discard, cost_report=cost_report
    )
    trainer = FreezeCacheTrainer(
        model=CifarResNet.from_name("resnet20"),
        args=args,
        train_dataset=data.train,
        data_collator=collate_image_batch,
        freeze_args=freeze_args,
        cache_dataset=data.train_unaugmented,
    )
    trainer.train()
    return trainer


def _optimizer_tensors(trainer: FreezeCacheTrainer) -> list[torch.Tensor]:
    state = trainer.optimizer.state_dict()["state"]
    return [value for key in sorted(state) for value in state[key].values() if isinstance(value, torch.Tensor)]


def _check_bit_identical(data, tmp_path, precision: str, discard: bool, use_cpu: bool) -> None:
    measured = _train(data, tmp_path / "measured", precision, discard, cost_report=True, use_cpu=use_cpu)
    plain = _train(data, tmp_path / "plain", precision, discard, cost_report=False, use_cpu=use_cpu)
    states = measured.freeze_callback.report.states
    # Every state was measured (the one before block 2 froze, one frozen mid-epoch, and the discarded one).
    assert len(states) == 3 and all(state.cost is not None for state in states)
    assert [state.discarded_prefix for state in states] == ([0, 0, 3] if discard else [0, 0, 0])
    assert all(state.cost is None for state in plain.freeze_callback.report.states)
    weights, reference = measured.model.state_dict(), plain.model.state_dict()
    assert list(weights) == list(reference)
    differing = [key for key in weights if not torch.equal(weights[key], reference[key])]
    assert differing == []  # weights and BatchNorm statistics, the frozen stem included
    optimizer, reference_optimizer = _optimizer_tensors(measured), _optimizer_tensors(plain)
    assert len(optimizer) == len(reference_optimizer) > 0
    assert all(torch.equal(a, b) for a, b in zip(optimizer, reference_optimizer, strict=True))


@pytest.mark.parametrize("discard", [False, True], ids=["freeze", "discard"])
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_the_cost_report_leaves_training_bit_identical(data, tmp_path, precision, discard):
    _check_bit_identical(data, tmp_path, precision, discard, use_cpu=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: run by recipes/gpu_check.sh")
@pytest.mark.parametrize("discard", [False, True], ids=["freeze", "discard"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_cost_report_leaves_training_bit_identical_on_cuda(data, tmp_path, precision, discard):
    torch.use_deterministic_algorithms(True, warn_only=True)
    _check_bit_identical(data, tmp_path, precision, discard, use_cpu=False)
