"""Pipelined cache builds: the prefix overlaps the encodes and the writer, and every shard is written once.

The rows must come out in sample order over several shards, the folder must open as `save_to_disk` writes it, and
an error in any stage (the images, an encode, the writer) must reach the caller with its message and leave no thread
running and no staging folder behind.
"""

import os
import threading

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch

from hf_freezecache.cache import ActivationCache, CacheManifest, build_activation_cache, build_codec
from hf_freezecache.cache.builder import shards
from hf_freezecache.data import collate_image_batch, load_image_classification
from hf_freezecache.models import CifarResNet, get_block_adapter

SAMPLES = 96
CHUNK = 4


@pytest.fixture(scope="module")
def images():
    return load_image_classification(max_train_samples=SAMPLES, augment=False).train_unaugmented


@pytest.fixture
def adapter():
    return get_block_adapter(CifarResNet.from_name("resnet20", num_classes=10).eval())


def _build(adapter, dataset, folder, *, batch_size=16, max_shard_size="500MB", encode_threads=2):
    return build_activation_cache(
        adapter,
        3,
        dataset,
        folder,
        build_codec({"name": "fp16"}),
        CHUNK,
        {"test": "pipelined"},
        collate_fn=collate_image_batch,
        batch_size=batch_size,
        encode_threads=encode_threads,
        max_shard_size=max_shard_size,
        progress=False,
    )


class Unreadable(torch.utils.data.Dataset):
    """`dataset`, except that sample `bad` raises `OSError` once it has been read `good_reads` times."""

    def __init__(self, dataset, bad, good_reads):
        self.dataset, self.bad, self.good_reads = dataset, bad, good_reads

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        if index == self.bad:
            if self.good_reads == 0:
                raise OSError(f"image {index} is unreadable")
            self.good_reads -= 1
        return self.dataset[index]


def test_shards_are_written_once_in_sample_order(adapter, images, tmp_path, monkeypatch):
    def refused(*args, **kwargs):
        raise AssertionError("the build must not write its rows through `datasets`")

    monkeypatch.setattr(datasets.Dataset, "from_generator", refused)
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", refused)
    opened = []
    open_file = pa.OSFile

    def recording(path, mode="rb"):
        opened.append((os.path.basename(path), mode))
        return open_file(path, mode)

    monkeypatch.setattr(shards.pa, "OSFile", recording)
    # A row is 4 samples of 16 x 32 x 32 activations: 256 KB before encoding, so record batches of 2 rows; 128 KB
    # in fp16, so 2 record batches per shard.
    manifest = _build(adapter, images, tmp_path / "cache", max_shard_size=600_000)

    assert len(manifest.shards) == SAMPLES // CHUNK // 4
    # One file written per shard, then only renamed; no other Arrow file (no scratch `datasets` cache).
    assert len(opened) == len(manifest.shards) and {mode for _, mode in opened} == {"wb"}
    assert sorted(os.listdir(tmp_path)) == ["cache"]
    rows = datasets.load_from_disk(str(tmp_path / "cache"))
    assert rows.num_rows == manifest.num_chunks == SAMPLES // CHUNK
    assert rows.column_names == ["data", "labels", "indices"]
    assert [i for row in rows["indices"] for i in row] == list(range(SAMPLES))
    assert [label for row in rows["labels"] for label in row] == [images[i]["labels"] for i in range(SAMPLES)]
    for name in manifest.shards:
        with pa.memory_map(str(tmp_path / "cache" / name)) as source:
            stream = pa.ipc.open_stream(source)
            assert b"huggingface" in stream.schema.metadata
            assert [batch.num_rows for batch in stream] == [2, 2]
    cache = ActivationCache.load(tmp_path / "cache")  # checks the shards' sha256 against the manifest
    with torch.no_grad():
        pixels = collate_image_batch([images[i] for i in range(SAMPLES - CHUNK, SAMPLES)])["pixel_values"]
        expected = adapter.prefix(pixels, 3).numpy()
    np.testing.assert_allclose(cache.decode(cache.num_chunks - 1), expected, rtol=1e-2, atol=1e-2)


def test_shards_depend_on_the_rows_alone_not_on_how_many_come_at_a_time(tmp_path):
    from hf_freezecache.cache.manifest import row_features

    rows = [{"data": bytes([i]) * (100 + i), "labels": [i, i + 1], "indices": [2 * i, 2 * i + 1]} for i in range(50)]
    written = []
    for pieces in ([1] * 50, [7, 13, 30], [50]):
        folder = tmp_path / f"pieces-{len(pieces)}"
        folder.mkdir()
        # Rows of 800 bytes before encoding: record batches of 10 rows, 3 and 2 in shards of at most 8,000 bytes.
        with shards.ShardWriter(str(folder), row_features({}), 8_000, 800, "0" * 32) as writer:
            start = 0
            for size in pieces:
                piece = rows[start : start + size]
                writer.write({name: [row[name] for row in piece] for name in ("data", "labels", "indices")})
                start += size
            files = writer.finish("fingerprint")
        written.append({name: (folder / name).read_bytes() for name in files})
    assert written[0] == written[1] == written[2] and len(written[0]) == 2
    assert datasets.load_from_disk(str(tmp_path / "pieces-1"))["indices"] == [row["indices"] for row in rows]


@pytest.mark.parametrize("stage", ["images", "encode", "writer"])
def test_an_error_in_any_stage_reaches_the_caller_and_stops_all_threads(stage, adapter, images, tmp_path, monkeypatch):
    dataset, message = images, None
    if stage == "images":
        # Read once while the codec is resolved, then fails in the prefix pass (in its last batch, the only one
        # that is not the same as one of the codec's: those hold samples 0-39 and 40-79).
        dataset, message = Unreadable(images, 85, good_reads=1), "image 85 is unreadable"
    elif stage == "encode":
        codec = type(build_codec({"name": "fp16"}))
        encode, calls = codec.encode, []

        def failing(self, chunk):
            calls.append(len(chunk))
            if len(calls) == 9:
                raise ValueError("cannot encode chunk 9")
            return encode(self, chunk)

        monkeypatch.setattr(codec, "encode", failing)
        message = "cannot encode chunk 9"
    else:
        write, calls = shards.ShardWriter.write, []

        def full(self, columns):
            calls.append(len(columns["data"]))
            if len(calls) == 2:
                raise OSError("No space left on device")
            write(self, columns)

        monkeypatch.setattr(shards.ShardWriter, "write", full)
        message = "No space left on device"
    before = set(threading.enumerate())
    adapter.model.train()
    with pytest.raises(Exception, match=message):
        _build(adapter, dataset, tmp_path / "cache", batch_size=40, max_shard_size=600_000)
    assert set(threading.enumerate()) == before
    assert os.listdir(tmp_path) == []  # neither a cache nor a staging folder
    # The prefix's batches were closed: the prefix modules are back in training mode.
    assert all(module.training for module in adapter.model.modules())


def test_a_good_build_leaves_no_thread(adapter, images, tmp_path):
    before = set(threading.enumerate())
    manifest = _build(adapter, images, tmp_path / "cache", encode_threads=3)
    assert set(threading.enumerate()) == before
    assert CacheManifest.load(tmp_path / "cache").shards == manifest.shards


def test_the_prefix_runs_once_per_sample_and_resolving_the_codec_is_reused(adapter, images, tmp_path, monkeypatch):
    from hf_freezecache.cache.builder import pipeline

    prefix, samples = adapter.prefix, []

    def counted(pixels, position):
        samples.append(len(pixels))
        return prefix(pixels, position)

    monkeypatch.setattr(adapter, "prefix", counted)
    reused = _build(adapter, images, tmp_path / "reused", batch_size=24)
    # The sample shape and the FLOPs take a sample each; the codec is resolved on the first batches, which the
    # prefix pass then takes as they are.
    assert sum(samples) == SAMPLES + 2

    prepare = pipeline.prepare_build
    monkeypatch.setattr(pipeline, "prepare_build", lambda *args: (prepare(*args)[0], []))
    assert _build(adapter, images, tmp_path / "computed", batch_size=24).shards == reused.shards


@pytest.mark.parametrize("share", [range(0, 40), range(0, 96), range(48, 96)])
def test_a_share_takes_only_its_own_whole_batches_from_the_codec_resolution(adapter, images, share):
    from hf_freezecache.cache.builder.batches import prefix_batches
    from hf_freezecache.cache.builder.prepare import PrefixRun, prepare_build

    run = PrefixRun(adapter, 3, images, collate_image_batch, 16, 0, torch.device("cpu"), 0)
    _, computed = prepare_build(run, build_codec({"name": "fp16"}), (), 4)
    assert len(computed) == SAMPLES // 16
    taken = list(prefix_batches(run, share, computed=computed))
    fresh = list(prefix_batches(run, share))
    assert [len(batch["data"]) for batch in taken] == [len(batch["data"]) for batch in fresh]
    for ours, theirs in zip(taken, fresh, strict=True):
        assert np.array_equal(ours["data"], theirs["data"]) and np.array_equal(ours["labels"], theirs["labels"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_build_on_the_gpu_copies_activations_through_pinned_memory(adapter, images, tmp_path):
    _build(adapter, images, tmp_path / "cpu", batch_size=40)
    adapter.model.cuda()
    try:
        _build(adapter, images, tmp_path / "gpu", batch_size=40)
    finally:
        adapter.model.cpu()
    on_cpu, on_gpu = ActivationCache.load(tmp_path / "cpu"), ActivationCache.load(tmp_path / "gpu")
    for chunk in range(on_cpu.num_chunks):
        np.testing.assert_allclose(on_gpu.decode(chunk), on_cpu.decode(chunk), rtol=1e-2, atol=1e-2)
