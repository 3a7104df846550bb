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


@pytest.mark.parametrize("memory", ["device", "host", "disk"])
@pytest.mark.parametrize(
    "codec", [{"name": "codebook", "bits": 2}, {"name": "lowbit", "bits": 4}, {"name": "int8"}, {"name": "bf16"}]
)
def test_packed_batches_decode_on_the_gpu_to_the_host_path_values(codec, memory, tmp_path):
    from test_device_path import BATCH, _build

    from hf_freezecache.cache import ActivationCache, CachedActivationDataset, ChunkShuffleSampler
    from hf_freezecache.data import load_image_classification
    from hf_freezecache.discard import FreezeCacheCollator
    from hf_freezecache.models import get_block_adapter

    data = load_image_classification(max_train_samples=46, augment=True)
    adapter = get_block_adapter(CifarResNet.from_name("resnet20").eval())
    cache: ActivationCache = _build(adapter, 3, data, tmp_path / "c", codec, [])
    host = CachedActivationDataset(cache, memory="disk")
    reading = CachedActivationDataset(cache, memory=memory, device="cuda", decode_on_device=True)
    collator = FreezeCacheCollator()
    order = list(ChunkShuffleSampler(reading, BATCH, seed=0))
    for start in range(0, len(order), BATCH):
        indices = order[start : start + BATCH]
        batch = collator(reading.__getitems__(indices))
        if memory != "device":
            batch["prefix_activations"] = batch["prefix_activations"].pin_memory()
        finished = collator.finish(batch, "cuda")
        assert finished["prefix_activations"].is_cuda and finished["labels"].is_cuda
        expected = torch.stack([item["prefix_activations"] for item in host.__getitems__(indices)])
        assert torch.equal(finished["prefix_activations"].cpu(), expected)
    if memory == "device":
        assert reading.memory_summary()["held_on"].startswith("cuda")
