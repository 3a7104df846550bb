"""Discarding the frozen prefix: exactness of training from a cache, memory, continuity, resume, and faults."""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments, set_seed

from hf_freezecache import FreezeCacheArguments, FreezeCacheCallback, FreezeCacheTrainer
from hf_freezecache.cache import (
    ActivationCache,
    CachedActivationDataset,
    CacheMismatchError,
    ChunkShuffleSampler,
    CorruptCacheError,
    build_activation_cache,
    build_codec,
    check_destination,
    dataset_fingerprint,
    fingerprint_parts,
)
from hf_freezecache.data import collate_image_batch, load_image_classification
from hf_freezecache.models import CifarResNet, get_block_adapter

SAMPLES = 192
BATCH = 32


@pytest.fixture(scope="module")
def data():
    return load_image_classification(max_train_samples=SAMPLES, max_eval_samples=64, augment=False)


def _trainer(data, out, *, epochs=2, save="no", seed=0, **freeze):
    set_seed(seed)
    model = CifarResNet.from_name("resnet20", num_classes=10)
    args = TrainingArguments(
        output_dir=str(out),
        num_train_epochs=epochs,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=64,
        learning_rate=0.05,
        optim="sgd",
        optim_args="momentum=0.9",
        weight_decay=5e-4,
        logging_steps=1,
        save_strategy=save,
        eval_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
        seed=seed,
    )
    options = dict(freeze_policy="fixed", freeze_schedule="1:3", feature_augmentation="none", cache_codec="none")
    options.update(freeze)
    return FreezeCacheTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=collate_image_batch,
        freeze_args=FreezeCacheArguments(**options),
        cache_dataset=data.train_unaugmented,
    )


def _logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h and "train_runtime" not in h]


def _adapter_and_batch(data, n=32):
    model = CifarResNet.from_name("resnet20", num_classes=10).eval()
    return get_block_adapter(model), collate_image_batch([data.train[i] for i in range(n)])


def _build(data, adapter, folder, position=3, codec=None, chunk_size=4):
    codec = codec or {"name": "none"}
    parts = fingerprint_parts(adapter, position, dataset_fingerprint(data.train_unaugmented), codec, chunk_size)
    build_activation_cache(
        adapter,
        position,
        data.train_unaugmented,
        folder,
        build_codec(codec),
        chunk_size,
        parts,
        collate_fn=collate_image_batch,
        batch_size=50,
        progress=False,
    )
    return parts


def test_none_cache_trains_exactly_like_freeze_only(data, tmp_path):
    """The cache is exact: same losses, learning rates and final weights as freeze-only training (momentum SGD, so
    the optimizer state of the remaining parameters must carry over the discard untouched)."""
    frozen = _trainer(data, tmp_path / "freeze", discard=False, cache_chunk_size=1)
    frozen.train()
    discarded = _trainer(data, tmp_path / "discard", discard=True, cache_chunk_size=1)
    discarded.train()
    assert discarded.discarder.position == 3
    assert _logged(discarded, "loss") == _logged(frozen, "loss")
    assert _logged(discarded, "learning_rate") == _logged(frozen, "learning_rate")
    assert discarded.state.global_step == frozen.state.global_step == 2 * SAMPLES // BATCH
    for (name, a), b in zip(frozen.model.state_dict().items(), discarded.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_discard_state_cost_excludes_prefix(data, tmp_path):
    trainer = _trainer(data, tmp_path, discard=True)
    trainer.train()
    states = trainer.freeze_callback.report.states
    assert [s.discarded_prefix for s in states] == [0, 3]  # the freeze state that saw no step is not kept
    first, discard = states[0].cost, states[1].cost
    adapter = trainer.freeze_callback.engine.adapter
    prefix = {id(t) for t in trainer.model.prefix_tensors()}
    suffix_bytes = sum(
        t.numel() * t.element_size()
        for t in [*adapter.model.parameters(), *adapter.model.buffers()]
        if id(t) not in prefix
    )
    assert discard["model_bytes"] == suffix_bytes < first["model_bytes"]
    assert discard["gradient_bytes"] < first["gradient_bytes"]
    assert discard["activation_bytes"] < first["activation_bytes"]
    # Neither forward nor backward of blocks 0-2 is paid per step; their one-off pass is counted once.
    assert discard["forward_flops_per_sample"] < first["forward_flops_per_sample"]
    cache = states[1].cache
    assert states[1].one_off_flops == pytest.approx(cache["prefix_forward_flops_per_sample"] * SAMPLES)
    report = trainer.freeze_callback.report
    per_step = sum(s.cost["flops_per_sample"] * SAMPLES * s.epochs for s in states)
    assert report.total_training_flops == pytest.approx(per_step + states[1].one_off_flops)
    assert cache["raw_bytes"] == cache["stored_bytes"] == SAMPLES * 16 * 32 * 32 * 4


def test_evaluation_and_saved_model_are_the_whole_model(data, tmp_path):
    trainer = _trainer(data, tmp_path, discard=True, cache_codec="zfp", feature_augmentation="auto")
    trainer.train()
    metrics = trainer.evaluate()
    model = trainer.model
    batch = collate_image_batch([data.eval[i] for i in range(64)])
    with torch.no_grad():
        model.eval()
        expected = model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss.item()
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)
    trainer.save_model()
    from safetensors.torch import load_file

    fresh = CifarResNet.from_name("resnet20", num_classes=10)
    fresh.load_state_dict(load_file(os.path.join(tmp_path, "model.safetensors")), strict=True)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(batch["pixel_values"]).logits, model(pixel_values=batch["pixel_values"]).logits)


def test_each_chunk_decoded_once_per_epoch(data, tmp_path, monkeypatch):
    adapter, _ = _adapter_and_batch(data)
    _build(data, adapter, tmp_path / "cache", chunk_size=4)
    cache = ActivationCache.load(tmp_path / "cache")
    decoded: list[int] = []
    unpack = cache.unpack
    monkeypatch.setattr(cache, "unpack", lambda chunk: decoded.append(chunk) or unpack(chunk))
    for batch_size in (32, 30):  # 30: chunks straddle batches and must still be decoded once
        dataset = CachedActivationDataset(cache, decode_threads=2)
        sampler = ChunkShuffleSampler(dataset, batch_size, seed=1)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=lambda items: items)
        for epoch in range(2):
            sampler.set_epoch(epoch)
            decoded.clear()
            seen = [item["labels"] for batch in loader for item in batch]
            assert len(decoded) == len(set(decoded))  # no chunk decoded twice in an epoch
            # every chunk once; a chunk decoded for the last batch of the previous epoch may be served again
            assert len(decoded) >= cache.num_chunks - (epoch > 0)
            assert sorted(seen) == sorted(cache.labels.tolist())


def test_chunk_shuffle_sampler_order():
    class Sized:
        def __init__(self, n, k):
            self.n, self.chunk_size = n, k

        def __len__(self):
            return self.n

    sampler = ChunkShuffleSampler(Sized(50, 4), batch_size=8, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(50))
    assert set(order[48:]) == {48, 49}  # the short last chunk comes last
    for start in range(0, 48, 8):  # every batch holds two whole chunks
        chunks = [i // 4 for i in order[start : start + 8]]
        assert len(set(chunks)) == 2 and all(chunks.count(c) == 4 for c in chunks)
    assert order[:8] != sorted(order[:8])  # shuffled within the batch
    unchunked = ChunkShuffleSampler(Sized(50, 1), batch_size=8, seed=3)
    assert list(unchunked) == torch.randperm(50, generator=torch.Generator().manual_seed(3)).tolist()
    sampler.set_epoch(1)
    assert list(sampler) != order
    sampler.set_epoch(0)
    assert list(sampler) == order


def test_cache_decodes_to_prefix_activations(data, tmp_path):
    adapter, batch = _adapter_and_batch(data)
    codec = {"name": "zfp", "tolerance": 0.05, "relative": True}
    _build(data, adapter, tmp_path / "cache", position=6, codec=codec, chunk_size=4)
    cache = ActivationCache.load(tmp_path / "cache")
    with torch.no_grad():
        expected = adapter.prefix(batch["pixel_values"], 6).numpy()
    decoded = np.concatenate([cache.decode(c) for c in range(8)])
    assert np.abs(decoded - expected).max() <= cache.codec.max_abs_error(expected)
    assert cache.labels[:32].tolist() == batch["labels"].tolist()
    m = cache.manifest
    assert m.sample_shape == [32, 16, 16] and m.num_chunks == SAMPLES // 4 and m.position == 6
    assert m.compression_ratio > 1.5
    assert "zfp" in open(tmp_path / "cache" / "README.md").read()


def test_fingerprint_mismatch_is_refused(data, tmp_path):
    adapter, _ = _adapter_and_batch(data)
    parts = _build(data, adapter, tmp_path / "cache")
    ActivationCache.load(tmp_path / "cache", expected_fingerprint=parts)
    dataset_hash = parts["dataset"]
    other_codec = fingerprint_parts(adapter, 3, dataset_hash, {"name": "fp16"}, 4)
    with pytest.raises(CacheMismatchError, match="codec configuration"):
        ActivationCache.load(tmp_path / "cache", expected_fingerprint=other_codec)
    with pytest.raises(CacheMismatchError, match="block position"):
        ActivationCache.load(
            tmp_path / "cache", expected_fingerprint=fingerprint_parts(adapter, 4, dataset_hash, {"name": "none"}, 4)
        )
    other_model = get_block_adapter(CifarResNet.from_name("resnet20", num_classes=10))  # other random weights
    with pytest.raises(CacheMismatchError, match="prefix weights"):
        ActivationCache.load(
            tmp_path / "cache",
            expected_fingerprint=fingerprint_parts(other_model, 3, dataset_hash, {"name": "none"}, 4),
        )
    small = load_image_classification(max_train_samples=SAMPLES - 1, augment=False)
    assert dataset_fingerprint(small.train_unaugmented) != dataset_hash
    resized = load_image_classification(max_train_samples=SAMPLES, augment=False, image_size=28)
    assert dataset_fingerprint(resized.train_unaugmented) != dataset_hash


def test_trainer_rebuilds_a_mismatching_cache_and_reuses_a_matching_one(data, tmp_path, caplog):
    _trainer(data, tmp_path / "a", discard=True, cache_dir=str(tmp_path / "cache")).train()
    again = _trainer(data, tmp_path / "b", discard=True, cache_dir=str(tmp_path / "cache"))
    again.train()
    assert again.freeze_callback.report.states[-1].cache["reused"] is True
    assert again.freeze_callback.report.states[-1].one_off_flops == 0
    with caplog.at_level(logging.WARNING):
        other = _trainer(data, tmp_path / "c", discard=True, cache_dir=str(tmp_path / "cache"), cache_codec="fp16")
        other.train()
    assert other.freeze_callback.report.states[-1].cache["reused"] is False
    assert "codec configuration" in caplog.text
    assert ActivationCache.load(tmp_path / "cache" / "position-03").manifest.codec["name"] == "fp16"


def test_corrupt_shard_is_detected_and_named(data, tmp_path):
    adapter, _ = _adapter_and_batch(data)
    _build(data, adapter, tmp_path / "cache")
    shard = next(f for f in os.listdir(tmp_path / "cache") if f.endswith(".arrow"))
    path = tmp_path / "cache" / shard
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptCacheError, match=shard):
        ActivationCache.load(tmp_path / "cache")
    path.write_bytes(bytes(raw[: len(raw) // 3]))  # truncated
    with pytest.raises(CorruptCacheError, match=shard):
        ActivationCache.load(tmp_path / "cache")


def test_interrupted_build_leaves_nothing_that_looks_complete(data, tmp_path):
    adapter, _ = _adapter_and_batch(data)

    class Failing(torch.utils.data.Dataset):
        def __len__(self):
            return SAMPLES

        def __getitem__(self, index):
            if index >= 100:
                raise KeyboardInterrupt  # as a user's Ctrl-C in the middle of the build
            return data.train_unaugmented[index]

    with pytest.raises(KeyboardInterrupt):
        build_activation_cache(
            adapter,
            3,
            Failing(),
            tmp_path / "cache",
            build_codec({"name": "none"}),
            4,
            {},
            collate_fn=collate_image_batch,
            batch_size=50,
            progress=False,
        )
    assert os.listdir(tmp_path) == []
    # A build killed outright leaves only a `.partial-*` folder, which is not a cache and is removed by the next build.
    os.makedirs(tmp_path / "cache.partial-deadbeef" / "cache")
    with pytest.raises(FileNotFoundError):
        ActivationCache.load(tmp_path / "cache")
    _build(data, adapter, tmp_path / "cache")
    assert sorted(os.listdir(tmp_path)) == ["cache"]


def test_unwritable_or_full_destination_fails_before_training(data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="Cannot write the activation cache"):
        check_destination(blocker / "cache" / "position-03", 0)
    with pytest.raises(OSError, match="Not enough free disk"):
        check_destination(tmp_path / "cache", 1 << 60)
    trainer = _trainer(data, tmp_path / "out", discard=True, cache_dir=str(blocker / "cache"))
    with pytest.raises(OSError, match="Cannot write the activation cache"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_resume_after_discard_reuses_or_rebuilds_the_cache(data, tmp_path):
    # Device memory: the resumed run loads the cache into memory again and draws the same augmentation.
    memory = "device"
    options = dict(discard=True, cache_memory=memory, cache_codec="lowbit", feature_augmentation="feature-maps")
    full = _trainer(data, tmp_path / "full", epochs=3, **options)
    full.train()
    run = tmp_path / "run"
    first = _trainer(data, run, epochs=3, save="epoch", **options)
    first.train()
    checkpoint = run / "checkpoint-12"  # after epoch 2, taken after the discard at the start of epoch 2
    for rebuild in (False, True):
        if rebuild:
            shutil.rmtree(run / "activation_cache")
        resumed = _trainer(data, run, epochs=3, save="no", **options)
        resumed.train(resume_from_checkpoint=str(checkpoint))
        assert resumed.discarder.position == 3
        assert resumed.train_dataset.cached.memory == memory
        assert resumed.freeze_callback.report.states[-1].discarded_prefix == 3
        for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    assert os.path.isdir(run / "activation_cache" / "position-03")


def test_every_memory_mode_trains_bit_identical_weights(data, tmp_path):
    """Decoding and augmentation run in the training process whatever the memory mode, so the random draws and the
    decoded values are the same: so are the weights."""
    weights = {}
    for memory in ("disk", "host", "device"):
        trainer = _trainer(
            data,
            tmp_path / memory,
            discard=True,
            cache_memory=memory,
            cache_codec="lowbit",
            feature_augmentation="feature-maps",
            feature_noise_std=0.05,
        )
        trainer.train()
        assert trainer.train_dataset.cached.memory == memory
        summary = trainer.freeze_callback.report.states[-1].cache
        assert summary["memory"] == memory and (summary["held_bytes"] > 0) == (memory != "disk")
        weights[memory] = trainer.model.state_dict()
    for name, tensor in weights["disk"].items():
        assert torch.equal(tensor, weights["host"][name]) and torch.equal(tensor, weights["device"][name]), name


def test_two_discard_points_build_each_cache_from_images(data, tmp_path):
    trainer = _trainer(data, tmp_path, epochs=3, discard=True, freeze_schedule="1:3,2:6")
    trainer.train()
    states = trainer.freeze_callback.report.states
    assert [s.discarded_prefix for s in states] == [0, 3, 6]
    cache = ActivationCache.load(tmp_path / "activation_cache" / "position-06")
    assert cache.manifest.source == "images"
    adapter = trainer.freeze_callback.engine.adapter
    batch = collate_image_batch([data.train_unaugmented[i] for i in range(8)])
    with torch.no_grad():
        expected = adapter.prefix(batch["pixel_values"], 6).numpy()
    assert np.array_equal(np.concatenate([cache.decode(0), cache.decode(1)]), expected)


def test_discard_positions_and_bad_options(caplog):
    args = FreezeCacheArguments(freeze_policy="fixed", freeze_schedule="1:3", discard=True, discard_positions="6, 3")
    assert args.discard_config().parsed_positions() == [3, 6]
    with pytest.raises(ValueError, match="'0,3'"):
        FreezeCacheArguments(discard=True, discard_positions="0,3")
    # A recipe config lists positions; its rows without discarding only switch --discard off.
    with caplog.at_level("WARNING", logger="hf_freezecache.config"):
        FreezeCacheArguments(discard_positions="3")
    assert "--discard_positions 3 is ignored without --discard true" in caplog.text
    with pytest.raises(ValueError, match="'lz4'.*bf16, budget, codebook, fp16, int8, lowbit, none, zfp"):
        FreezeCacheArguments(discard=True, cache_codec="lz4")
    with pytest.raises(ValueError, match="--cache_chunk_size must be at least 1, got 0"):
        FreezeCacheArguments(discard=True, cache_chunk_size=0)
    with pytest.raises(ValueError, match="crop_padding"):
        FreezeCacheArguments(discard=True, feature_crop_padding=0.9)


def test_discard_positions_choose_where_to_discard(data, tmp_path):
    trainer = _trainer(data, tmp_path, epochs=3, discard=True, freeze_schedule="1:3,2:6", discard_positions="6")
    trainer.train()
    assert [s.discarded_prefix for s in trainer.freeze_callback.report.states] == [0, 0, 6]
    with pytest.raises(ValueError, match="leaves no block to train"):
        _trainer(data, tmp_path, discard=True, discard_positions="9")


def test_discard_needs_the_trainer_subclass(data, tmp_path):
    model = CifarResNet.from_name("resnet20", num_classes=10)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False)
    callback = FreezeCacheCallback(FreezeCacheArguments(freeze_policy="fixed", freeze_schedule="1:3", discard=True))
    trainer = Trainer(
        model=model, args=args, train_dataset=data.train, data_collator=collate_image_batch, callbacks=[callback]
    )
    with pytest.raises(ValueError, match="FreezeCacheTrainer"):
        trainer.train()
