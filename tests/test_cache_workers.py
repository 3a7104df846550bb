"""DataLoader workers and other copies of a cache reopen it by path instead of receiving its payloads."""

from __future__ import annotations

import pickle
import shutil

import pytest
import torch
from conftest import build_cache
from torch.utils.data import DataLoader, get_worker_info

from hf_freezecache.cache import (
    ActivationCache,
    CachedActivationDataset,
    CacheMismatchError,
    ChunkShuffleSampler,
)
from hf_freezecache.data import load_image_classification
from hf_freezecache.models import CifarResNet, get_block_adapter

SAMPLES = 48
BATCH = 8


@pytest.fixture(scope="module")
def data():
    return load_image_classification(max_train_samples=SAMPLES, augment=False)


@pytest.fixture(scope="module")
def adapter():
    return get_block_adapter(CifarResNet.from_name("resnet20", num_classes=10).eval())


def _build(data, adapter, folder, position: int = 3) -> None:
    build_cache(adapter, position, data.train_unaugmented, folder)


@pytest.fixture(scope="module")
def cache_folder(data, adapter, tmp_path_factory):
    folder = tmp_path_factory.mktemp("workers") / "cache"
    _build(data, adapter, folder)
    return folder


def _batches(dataset, **loader) -> list[dict[str, torch.Tensor]]:
    sampler = ChunkShuffleSampler(dataset, BATCH, seed=3)
    return list(DataLoader(dataset, batch_size=BATCH, sampler=sampler, **loader))


def _assert_same(batches, expected) -> None:
    assert len(batches) == len(expected) == SAMPLES // BATCH
    for batch, reference in zip(batches, expected, strict=True):
        assert torch.equal(batch["labels"], reference["labels"])
        assert torch.equal(batch["prefix_activations"], reference["prefix_activations"])


def _check_worker_reads_mapped_shards(worker_id: int) -> None:
    # In the worker: the payloads the training process loaded into memory were not copied here.
    dataset = get_worker_info().dataset
    assert not dataset.cache.in_memory and dataset.cache.memory_bytes == 0


@pytest.mark.parametrize("memory", ["disk", "host", "device"])
def test_pickle_holds_the_path_not_the_payloads(cache_folder, memory):
    cache = ActivationCache.load(cache_folder)
    dataset = CachedActivationDataset(cache, memory=memory, progress=False)
    stored = cache.manifest.stored_bytes
    assert stored > 2**20
    size = len(pickle.dumps(dataset))
    assert size < 16 * 2**10 and size < stored / 100

    dataset[5]  # one decode, counted
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy.cache is not cache and copy.cache.folder == cache.folder
    assert copy.cache.decode_calls == cache.decode_calls > 0
    assert copy.cache.decode_seconds == cache.decode_seconds
    assert not copy.cache.in_memory  # reopened memory-mapped, whatever the original held
    copy.cache.decode(1)  # the copy's lock and counters work
    assert copy.cache.decode_calls == cache.decode_calls + 1
    _assert_same(_batches(copy), _batches(dataset))


def test_spawned_workers_yield_the_same_batches(cache_folder):
    dataset = CachedActivationDataset(ActivationCache.load(cache_folder), memory="host", progress=False)
    assert dataset.cache.in_memory
    expected = _batches(dataset)
    batches = _batches(
        dataset,
        num_workers=2,
        multiprocessing_context="spawn",
        worker_init_fn=_check_worker_reads_mapped_shards,
    )
    _assert_same(batches, expected)


def test_a_cache_replaced_on_disk_is_refused(data, adapter, tmp_path):
    folder = tmp_path / "cache"
    _build(data, adapter, folder, position=3)
    pickled = pickle.dumps(CachedActivationDataset(ActivationCache.load(folder), progress=False))
    _build(data, adapter, tmp_path / "other", position=6)
    shutil.rmtree(folder)
    shutil.move(tmp_path / "other", folder)
    with pytest.raises(CacheMismatchError, match=r"was replaced after it was opened \(differs in: .*block position"):
        pickle.loads(pickled)
