"""The device data path: packed batches decoded and augmented where training runs give the host path's batches, in
every memory mode, with the channel-flip and token-replacement sidecars; memory modes; DataLoader workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_VIT
from torch.utils.data import DataLoader
from transformers import ViTConfig, ViTForImageClassification

from hf_freezecache.augmentation import FeatureMapAugmentationConfig, TokenAugmentationConfig
from hf_freezecache.cache import (
    ActivationCache,
    CachedActivationDataset,
    ChunkShuffleSampler,
    PackedBatch,
    build_activation_cache,
    build_codec,
    build_sidecar,
    choose_memory,
    dataset_fingerprint,
    fingerprint_parts,
)
from hf_freezecache.cache import memory as memory_module
from hf_freezecache.cache.resident import resident_bytes
from hf_freezecache.data import collate_image_batch, load_image_classification
from hf_freezecache.discard import FreezeCacheCollator
from hf_freezecache.models import get_block_adapter, load_cifar_resnet

SAMPLES = 46  # chunks of 4: the last one holds 2 samples
BATCH = 10  # chunks straddle batches
MEMORY_MODES = ["disk", "host", "device"]
CODECS = {
    "lowbit4": {"name": "lowbit", "bits": 4},
    "lowbit2-zstd": {"name": "lowbit", "bits": 2, "entropy": "zstd"},
    "int8": {"name": "int8"},
    "bf16": {"name": "bf16"},
    "zfp": {"name": "zfp", "tolerance": 0.05, "relative": True},
}


@pytest.fixture(scope="module")
def data():
    return load_image_classification(max_train_samples=SAMPLES, max_eval_samples=16, augment=True)


def _build(adapter, position, data, folder, codec, sidecars) -> ActivationCache:
    extra = {"sidecars": {s.name: s.config() for s in sidecars}}
    parts = fingerprint_parts(adapter, position, dataset_fingerprint(data.train_unaugmented), codec, 4, extra)
    build_activation_cache(
        adapter,
        position,
        data.train_unaugmented,
        folder,
        build_codec(codec),
        4,
        parts,
        collate_fn=collate_image_batch,
        batch_size=16,
        progress=False,
        sidecars=sidecars,
        augmented_dataset=data.train,
    )
    return ActivationCache.load(folder, expected_fingerprint=parts)


@pytest.fixture(scope="module")
def resnet(resnet20_weights):
    return get_block_adapter(load_cifar_resnet(str(resnet20_weights), num_classes=10).eval())


@pytest.fixture(scope="module")
def feature_map_caches(resnet, data, tmp_path_factory):
    """ResNet-20 activations after block 3 with the channel-flip sidecar, one cache per codec."""
    root = tmp_path_factory.mktemp("maps")
    sidecar = build_sidecar("channel-flip", gamma=0.25)
    return {name: _build(resnet, 3, data, root / name, codec, [sidecar]) for name, codec in CODECS.items()}


@pytest.fixture(scope="module")
def token_cache(data, tmp_path_factory):
    """Tiny ViT tokens after block 2 with the token-replacement sidecar (lowbit)."""
    torch.manual_seed(0)
    adapter = get_block_adapter(ViTForImageClassification(ViTConfig(**TINY_VIT, num_labels=10)).eval())
    sidecar = build_sidecar("token-replacement", alpha=0.25, num_special_tokens=1)
    cache = _build(adapter, 2, data, tmp_path_factory.mktemp("tokens") / "c", CODECS["lowbit4"], [sidecar])
    return adapter, cache


def _epoch(dataset, augmentation, *, device_path: bool, seed: int = 0, **loader) -> list[dict]:
    collator = FreezeCacheCollator(collate_image_batch)
    collator.augmentation = augmentation
    if augmentation is not None:
        collator.generator = torch.Generator().manual_seed(seed)
    sampler = ChunkShuffleSampler(dataset, BATCH, seed=3)
    batches = DataLoader(dataset, batch_size=BATCH, sampler=sampler, collate_fn=collator, **loader)
    if device_path:
        return [collator.finish(batch, "cpu") for batch in batches]
    return list(batches)


def _assert_same(host: list[dict], device: list[dict]) -> None:
    assert len(host) == len(device)
    for a, b in zip(host, device, strict=True):
        assert torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["prefix_activations"], b["prefix_activations"])


@pytest.mark.parametrize("memory", MEMORY_MODES)
@pytest.mark.parametrize("codec", list(CODECS))
def test_device_path_gives_the_host_path_batches_with_channel_flip(feature_map_caches, resnet, codec, memory):
    cache = feature_map_caches[codec]
    config = FeatureMapAugmentationConfig(flip_probability=0.5, crop_padding=0.125, noise_std=0.1, blur_sigma=0.5)
    augmentation = config.build(resnet, cache.manifest)
    assert augmentation.flipped_channels  # the stored flipped channels are used on every flipped sample
    host = _epoch(CachedActivationDataset(cache, memory="disk"), augmentation, device_path=False)
    reading = CachedActivationDataset(cache, memory=memory, decode_on_device=True)
    assert reading.memory == memory
    _assert_same(host, _epoch(reading, augmentation, device_path=True))
    # Without augmentation the batches are the decoded rows, sample for sample.
    decoded = np.concatenate([cache.decode(c) for c in range(cache.num_chunks)])
    order = list(ChunkShuffleSampler(reading, BATCH, seed=3))
    plain = torch.cat([b["prefix_activations"] for b in _epoch(reading, None, device_path=True)])
    assert torch.equal(plain, torch.from_numpy(decoded[order]))


@pytest.mark.parametrize("memory", MEMORY_MODES)
def test_device_path_gives_the_host_path_batches_with_token_replacement(token_cache, memory):
    adapter, cache = token_cache
    augmentation = TokenAugmentationConfig(noise_std=0.1, drop_rate=0.25, replace_probability=0.5).build(
        adapter, cache.manifest
    )
    host = _epoch(CachedActivationDataset(cache, memory="disk"), augmentation, device_path=False)
    device = _epoch(
        CachedActivationDataset(cache, memory=memory, decode_on_device=True), augmentation, device_path=True
    )
    _assert_same(host, device)
    assert host[0]["prefix_activations"].shape[1] == 1 + 12  # 16 patches, 4 dropped: the draws were made


def test_packed_batches_carry_the_compressed_fields_or_only_indices(feature_map_caches):
    cache = feature_map_caches["lowbit4"]
    disk = CachedActivationDataset(cache, memory="disk", decode_on_device=True)
    packed = FreezeCacheCollator()(disk.__getitems__(list(range(8, 18))))["prefix_activations"]
    assert isinstance(packed, PackedBatch) and packed.chunks.tolist() == [2, 3, 4]
    assert packed.fields["data"]["codes"].dtype == torch.uint8  # 4-bit codes, two per byte, cross the link
    raw = 10 * 16 * 32 * 32 * 4
    assert sum(t.numel() * t.element_size() for t in packed.fields["data"].values()) < raw / 4
    device = CachedActivationDataset(cache, memory="device", decode_on_device=True)
    resident = FreezeCacheCollator()(device.__getitems__(list(range(8, 18))))["prefix_activations"]
    assert resident.fields == {} and resident.resident is not None
    assert torch.equal(packed.decode()["data"], resident.decode()["data"])


def test_memory_modes_hold_what_they_say_and_auto_follows_the_budget(feature_map_caches, monkeypatch):
    lowbit, zfp = feature_map_caches["lowbit4"], feature_map_caches["zfp"]
    cpu = torch.device("cpu")
    assert choose_memory(lowbit, "auto", cpu)[0] == "device"
    device = CachedActivationDataset(lowbit, memory="device")
    assert device.held_bytes == resident_bytes(lowbit.field_lengths(), lowbit.num_chunks)
    assert device.held_bytes < lowbit.manifest.raw_bytes / 4  # 4-bit codes plus per-channel offsets and scales
    # zfp decodes on the host: device memory holds its rows decoded, as large as float32.
    assert CachedActivationDataset(zfp, memory="device").held_bytes >= zfp.manifest.raw_bytes
    host = CachedActivationDataset(feature_map_caches["int8"], memory="host")
    manifest = host.cache.manifest
    assert host.held_bytes == manifest.stored_bytes + manifest.sidecar_bytes
    assert host.memory_summary() == {"memory": "host", "held_bytes": host.held_bytes, "held_on": "host"}
    assert CachedActivationDataset(ActivationCache.load(zfp.folder), memory="disk").held_bytes == 0
    monkeypatch.setattr(memory_module, "available_device_bytes", lambda device: 0)
    assert choose_memory(lowbit, "auto", cpu)[0] == "host"
    monkeypatch.setattr(memory_module, "available_host_bytes", lambda: 0)
    assert choose_memory(lowbit, "auto", cpu)[0] == "disk"
    with pytest.raises(ValueError, match="--cache_memory 'gpu' is not a memory mode; choose one of auto, device"):
        choose_memory(lowbit, "gpu", cpu)


@pytest.mark.parametrize(("memory", "context"), [("device", "spawn"), ("disk", "fork")])
def test_dataloader_workers_collate_packed_batches_the_training_process_decodes(feature_map_caches, memory, context):
    cache = feature_map_caches["lowbit4"]
    reading = CachedActivationDataset(cache, memory=memory, decode_on_device=True)
    alone = _epoch(reading, None, device_path=True)
    workers = _epoch(reading, None, device_path=True, num_workers=1, multiprocessing_context=context)
    _assert_same(alone, workers)
