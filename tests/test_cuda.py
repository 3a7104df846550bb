"""What only a CUDA device shows: a discarded prefix waiting on the CPU while the suffix trains on the GPU, and the
peak memory the cost report takes from the device. Run by recipes/gpu_check.sh on a GPU machine; skipped, with this
reason, elsewhere."""

from __future__ import annotations

import pytest
import torch

from hf_freezecache.accounting import measure_step_cost
from hf_freezecache.model import FreezeCacheModel
from hf_freezecache.models import CifarResNet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: recipes/gpu_check.sh")


def test_a_discarded_prefix_waits_on_the_cpu_and_comes_back_for_the_whole_model(cifar_batch):
    model = FreezeCacheModel(CifarResNet.from_name("resnet20")).cuda().eval()
    batch = {key: value.cuda() for key, value in cifar_batch.items()}
    expected = model(**batch).logits
    model.freeze_blocks(range(3))
    with torch.no_grad():
        activations = model.adapter.prefix(batch["pixel_values"], 3)
    model.discard(3, offload_to="cpu")
    assert all(t.device.type == "cpu" for t in model.prefix_tensors())
    assert all(p.is_cuda for p in model.adapter.block_parameters(3))
    suffix = model(prefix_activations=activations, labels=batch["labels"]).logits
    torch.testing.assert_close(suffix, expected)
    with model.restored():
        assert all(t.is_cuda for t in model.prefix_tensors())
        torch.testing.assert_close(model(**batch).logits, expected)
    assert all(t.device.type == "cpu" for t in model.prefix_tensors())


def test_the_measurement_of_a_discarded_state_leaves_the_offloaded_prefix_out(cifar_batch):
    model = FreezeCacheModel(CifarResNet.from_name("resnet20")).cuda()
    batch = {key: value.cuda() for key, value in cifar_batch.items()}
    whole = measure_step_cost(model, batch, autocast_dtype=torch.bfloat16)
    model.freeze_blocks(range(3))
    with torch.no_grad():
        activations = model.adapter.prefix(batch["pixel_values"], 3)
    model.discard(3, offload_to="cpu")
    suffix_batch = {"prefix_activations": activations, "labels": batch["labels"]}
    discarded = measure_step_cost(model, suffix_batch, exclude=model.prefix_tensors(), autocast_dtype=torch.bfloat16)
    assert discarded.model_bytes < whole.model_bytes
    assert discarded.activation_bytes < whole.activation_bytes
    assert all(p.grad is None for p in model.parameters())
