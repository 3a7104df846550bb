"""A cache cannot be edited unnoticed, and everything that reads one is matched to it: the manifest's seal, the
shards' binding to their cache, the format version, evaluation caches matched to the training cache, and the
augmented view of a sidecar matched sample by sample."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import TINY_VIT, build_cache
from torch.utils.data import Dataset
from transformers import TrainingArguments, ViTConfig, ViTForImageClassification

from hf_freezecache import FreezeCacheTrainer, export_cache, load_cache
from hf_freezecache.cache import (
    CachedActivationDataset,
    CacheMismatchError,
    CorruptCacheError,
    build_sidecar,
)
from hf_freezecache.cache.manifest import MANIFEST_NAME, file_sha256
from hf_freezecache.cache.manifest.integrity import BINDING_KEY, manifest_seal, sealed_fields
from hf_freezecache.cache.sidecars import ChannelFlipSidecar
from hf_freezecache.data import load_image_classification
from hf_freezecache.models import CifarResNet, get_block_adapter

SAMPLES = 24
ZFP = {"name": "zfp", "tolerance": 0.05, "relative": True}


@pytest.fixture(scope="module")
def data():
    return load_image_classification(max_train_samples=SAMPLES, max_eval_samples=8, augment=True)


def _build(adapter, position, dataset, folder, sidecars=(), augmented=None, codec=ZFP):
    cache, _ = build_cache(adapter, position, dataset, folder, codec, sidecars=sidecars, augmented=augmented)
    return cache


def _resnet(seed: int = 0):
    torch.manual_seed(seed)
    return get_block_adapter(CifarResNet.from_name("resnet20", num_classes=10).eval())


@pytest.fixture(scope="module")
def flip_cache(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("integrity") / "flip"
    _build(_resnet(), 3, data.train_unaugmented, folder, [ChannelFlipSidecar(0.25, 16)])
    return folder


def _copy(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    return copy


def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_NAME).read_text())


def _write(folder: Path, manifest: dict, reseal: bool = False) -> None:
    if reseal:
        manifest["seal"] = manifest_seal(manifest)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


def _flip(manifest: dict) -> dict:
    return manifest["sidecars"]["channel-flip"]


def _other_channels(manifest: dict) -> list[int]:
    channels = manifest["sidecars"]["channel-flip"]["summary"]["channels"]
    return [c for c in range(16) if c not in channels][: len(channels)]


# Edits that keep the manifest well-formed, so that only the seal can notice them: each changes what is decoded or
# how it is used (or, like build_seconds, nothing; refused all the same: every field is sealed).
EDITS = {
    "channel list": ("sidecars", lambda m: _flip(m)["summary"].update(channels=_other_channels(m))),
    "sidecar config": ("sidecars", lambda m: _flip(m)["config"].update(gamma=0.5)),
    "codec parameter": ("codec", lambda m: m["codec"].update(tolerance=m["codec"]["tolerance"] * 2)),
    "sample shape": ("sample_shape", lambda m: m.update(sample_shape=m["sample_shape"][::-1])),
    "position": ("position", lambda m: m.update(position=4)),
    "model class": ("model_class", lambda m: m.update(model_class="OtherNet")),
    "source model": ("source_model", lambda m: m.update(source_model="resnet56")),
    "blocks": ("model_num_blocks", lambda m: m.update(model_num_blocks=12)),
    "build seconds": ("build_seconds", lambda m: m.update(build_seconds=1.0)),
    "sidecars removed": ("sidecars", lambda m: m.pop("sidecars")),
    "codec error removed": ("codec_error", lambda m: m.pop("codec_error")),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_a_manifest_field_edited_after_the_build_is_refused_and_named(flip_cache, tmp_path, edit):
    field, change = EDITS[edit]
    folder = _copy(flip_cache, tmp_path)
    manifest = _manifest(folder)
    change(manifest)
    _write(folder, manifest)
    with pytest.raises(CorruptCacheError, match=rf"{field} changed after the cache was built"):
        load_cache(folder)


def test_every_field_is_sealed_and_a_seal_that_leaves_one_out_is_refused(flip_cache, tmp_path):
    manifest = _manifest(flip_cache)
    assert set(manifest["seal"]) == set(sealed_fields()) == set(manifest) - {"seal", "compression_ratio"}
    folder = _copy(flip_cache, tmp_path)
    del manifest["seal"]["sidecars"], manifest["sidecars"]
    _write(folder, manifest)
    with pytest.raises(CorruptCacheError, match="the seal does not cover sidecars"):
        load_cache(folder)
    del manifest["seal"]
    _write(folder, manifest)
    with pytest.raises(CorruptCacheError, match="invalid seal None; expected a JSON object"):
        load_cache(folder)


def test_a_fingerprint_that_is_not_the_hash_of_its_parts_is_refused(flip_cache, tmp_path):
    folder = _copy(flip_cache, tmp_path)
    manifest = _manifest(folder)
    manifest["fingerprint_parts"]["position"] = "4"
    _write(folder, manifest, reseal=True)
    with pytest.raises(CorruptCacheError, match="invalid fingerprint .*the hash of fingerprint_parts"):
        load_cache(folder)


def test_a_cache_of_an_earlier_format_is_rebuilt_not_read(flip_cache, tmp_path):
    folder = _copy(flip_cache, tmp_path)
    manifest = _manifest(folder)
    manifest["format_version"] = 1
    del manifest["seal"]
    _write(folder, manifest)
    # A mismatch (not corruption): the discard path rebuilds such a cache by itself.
    with pytest.raises(CacheMismatchError, match="format 1, written by an earlier hf_freezecache"):
        load_cache(folder)


def _swap_first_shard(source: Path, target: Path, pattern: str) -> None:
    """Copies `source`'s first shard over `target`'s, recomputes its sha256 in `target`'s manifest and reseals it:
    a forger who rebuilds the checksum and the seal, but not the fingerprint."""
    manifest = _manifest(target)
    name = sorted(manifest["shards"])[0]
    assert name.endswith(pattern)
    shutil.copyfile(source / sorted(_manifest(source)["shards"])[0], target / name)
    manifest["shards"][name] = file_sha256(target / name)
    _write(target, manifest, reseal=True)


@pytest.mark.parametrize("layout", ["arrow", "parquet"])
def test_a_shard_moved_from_another_cache_is_refused_even_with_checksum_and_seal_recomputed(data, tmp_path, layout):
    # Two caches of the same shape, codec and chunking: another model's prefix over the same images.
    first = _build(_resnet(0), 3, data.train_unaugmented, tmp_path / "a", codec={"name": "none"})
    second = _build(_resnet(1), 3, data.train_unaugmented, tmp_path / "b", codec={"name": "none"})
    if layout == "parquet":
        first = load_cache(export_cache(first.folder, tmp_path / "a-hub", progress=False))
        second = load_cache(export_cache(second.folder, tmp_path / "b-hub", progress=False))
    target = _copy(Path(second.folder), tmp_path)
    _swap_first_shard(Path(first.folder), target, f".{layout}")
    with pytest.raises(CorruptCacheError, match=rf"binding of another cache \('{first.manifest.fingerprint}'\)"):
        load_cache(target)


def test_shards_carry_their_cache_fingerprint(flip_cache, tmp_path):
    cache = load_cache(flip_cache)
    shard = flip_cache / sorted(cache.manifest.shards)[0]
    with pa.memory_map(str(shard)) as source:
        metadata = pa.ipc.open_stream(source).schema.metadata
    assert json.loads(metadata[BINDING_KEY]) == {"fingerprint": cache.manifest.fingerprint}
    exported = load_cache(export_cache(flip_cache, tmp_path / "hub", progress=False))
    assert exported.manifest.fingerprint == cache.manifest.fingerprint
    assert all(np.array_equal(exported.decode(c), cache.decode(c)) for c in range(cache.num_chunks))


# Evaluation caches are matched to the training cache.


def _vit(seed: int):
    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(**TINY_VIT, num_labels=10)).eval()


def _eval_trainer(tmp_path, train_cache, eval_cache, model):
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[], max_steps=1)
    return FreezeCacheTrainer(
        model=model,
        args=args,
        activation_cache=train_cache,
        eval_dataset=CachedActivationDataset(eval_cache, decode_on_device=True),
    )


def test_an_evaluation_cache_of_another_position_or_prefix_is_refused(data, tmp_path):
    model = _vit(0)
    adapter = get_block_adapter(model)
    train = _build(adapter, 2, data.train_unaugmented, tmp_path / "train", codec={"name": "none"})
    same = _build(adapter, 2, data.eval, tmp_path / "eval", codec={"name": "none"})
    # ViT tokens have the same shape at every position: only the manifest can tell positions apart.
    other_position = _build(adapter, 1, data.eval, tmp_path / "eval-1", codec={"name": "none"})
    assert other_position.manifest.sample_shape == train.manifest.sample_shape
    other_prefix = _build(get_block_adapter(_vit(1)), 2, data.eval, tmp_path / "eval-w", codec={"name": "none"})

    trainer = _eval_trainer(tmp_path, train, same, model)
    trainer.train()
    assert trainer.evaluate()["eval_loss"] > 0
    with pytest.raises(CacheMismatchError, match=r"differs in: block position \(1 vs 2\), prefix weights\)"):
        _eval_trainer(tmp_path, train, other_position, model)
    with pytest.raises(CacheMismatchError, match=r"eval-w was not built from .*differs in: prefix weights\)"):
        _eval_trainer(tmp_path, train, other_prefix, model)


def test_the_cli_refuses_an_evaluation_cache_of_another_position(data, tmp_path, capsys):
    from hf_freezecache.cli import main

    adapter = _resnet()
    _build(adapter, 3, data.train_unaugmented, tmp_path / "train", codec={"name": "none"})
    _build(adapter, 6, data.eval, tmp_path / "eval", codec={"name": "none"})
    status = main(
        ["train", "--model", "resnet20", "--train_from_cache", str(tmp_path / "train"), "--eval_from_cache",
         str(tmp_path / "eval"), "--output_dir", str(tmp_path / "run"), "--use_cpu", "true", "--max_steps", "1",
         "--report_to", "none"]
    )  # fmt: skip
    assert status == 2
    assert "block position (6 vs 3)" in capsys.readouterr().err


# A sidecar's augmented view is matched to the activations sample by sample.


class _Reordered(Dataset):
    """The items of `dataset` in another order: no stored rows to compare, only the labels the items carry."""

    def __init__(self, dataset, order):
        self.dataset, self.order = dataset, order

    def __len__(self):
        return len(self.order)

    def __getitem__(self, index):
        return self.dataset[int(self.order[index])]


def test_an_augmented_view_in_another_order_is_refused_by_its_rows_or_its_labels(data, tmp_path):
    model = _vit(0)
    adapter = get_block_adapter(model)
    sidecar = build_sidecar("token-replacement", alpha=0.25, num_special_tokens=1)
    # Same length, other order: a `datasets` view is compared by its stored rows.
    reversed_view = data.train.select(list(reversed(range(SAMPLES))))
    with pytest.raises(ValueError, match=r"sample 0 is another stored row \(24 of 24 samples differ\)"):
        _build(adapter, 2, data.train_unaugmented, tmp_path / "rows", [sidecar], augmented=reversed_view)
    assert not os.path.exists(tmp_path / "rows")
    # Any other dataset is compared by its labels, batch by batch.
    labels = np.array([data.train_unaugmented[i]["labels"] for i in range(SAMPLES)])
    order = np.roll(np.arange(SAMPLES), 1)
    first = int(np.flatnonzero(labels[order] != labels)[0])
    with pytest.raises(ValueError, match=rf"Sample {first} of `augmented_dataset` has label {labels[order][first]}"):
        reordered = _Reordered(data.train, order)
        _build(adapter, 2, data.train_unaugmented, tmp_path / "labels", [sidecar], augmented=reordered)
    # The same rows through another transform are the same samples.
    cache = _build(adapter, 2, data.train_unaugmented, tmp_path / "ok", [sidecar], augmented=data.train)
    assert cache.manifest.sidecars["token-replacement"]["arrays"]


def test_an_evaluation_cache_without_a_training_cache_is_refused_not_ignored(tmp_path):
    from hf_freezecache.run import parse_run_arguments

    with pytest.raises(ValueError, match="--eval_from_cache only apply with --train_from_cache"):
        parse_run_arguments(["--output_dir", str(tmp_path), "--eval_from_cache", str(tmp_path / "eval")])
