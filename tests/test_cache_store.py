"""Activation caches on an fsspec store reached by URL: built, loaded, exported, reused and trained from, by one
process (`memory://`) or by two that share no local folder (`file://`, gloo on the CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid

import datasets
import fsspec
import pytest
import torch
from conftest import ROOT
from huggingface_hub import constants

from hf_freezecache.cache import (
    ActivationCache,
    CacheMismatchError,
    CorruptCacheError,
    build_activation_cache,
    build_codec,
    dataset_fingerprint,
    export_cache,
    fingerprint_parts,
    load_cache,
)
from hf_freezecache.cache.config import CacheConfig
from hf_freezecache.cache.manifest import MANIFEST_NAME
from hf_freezecache.cache.store import CacheStore
from hf_freezecache.cli import main as cli
from hf_freezecache.data import collate_image_batch, load_image_classification
from hf_freezecache.discard import CacheBuildSettings, DiscardConfig, reuse_or_build_cache
from hf_freezecache.discard import reuse_or_build as reuse_module
from hf_freezecache.model import FreezeCacheModel
from hf_freezecache.models import CifarResNet, get_block_adapter
from hf_freezecache.run import parse_run_arguments, run_training

SAMPLES, CHUNK, POSITION = 32, 4, 3
CODEC = {"name": "fp16"}
WORKER = ROOT / "tests" / "store_worker.py"
MEMORY = fsspec.filesystem("memory")


@pytest.fixture(autouse=True)
def _local_folders(tmp_path, monkeypatch):
    # Default download and staging folders, and the `datasets` cache of parquet conversions, stay in the test's.
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))


@pytest.fixture
def url():
    bucket = f"bucket-{uuid.uuid4().hex[:8]}"
    yield f"memory://{bucket}/caches/position-03"
    MEMORY.rm(f"/{bucket}", recursive=True)


@pytest.fixture(scope="module")
def images():
    return load_image_classification(max_train_samples=SAMPLES, augment=False).train_unaugmented


@pytest.fixture
def adapter():
    torch.manual_seed(0)
    return get_block_adapter(CifarResNet.from_name("resnet20", num_classes=10).eval())


def _build(adapter, images, folder, codec=CODEC, **options):
    parts = fingerprint_parts(adapter, POSITION, dataset_fingerprint(images), codec, CHUNK)
    return build_activation_cache(
        adapter, POSITION, images, folder, build_codec(codec), CHUNK, parts, collate_fn=collate_image_batch,
        batch_size=8, progress=False, **options,
    )  # fmt: skip


def _rows(cache: ActivationCache) -> dict:
    return cache.rows.data.to_pydict()


def _remote_files(url: str) -> list[str]:
    root = CacheStore(url).path
    return sorted(path[len(root) + 1 :] for path in MEMORY.find(root))


def _flip_byte(url: str, name: str) -> None:
    path = f"{CacheStore(url).path}/{name}"
    data = bytearray(MEMORY.cat_file(path))
    data[-100] ^= 0xFF
    MEMORY.pipe_file(path, bytes(data))


def test_a_cache_built_at_a_url_is_the_local_build_and_loads_back(adapter, images, url, tmp_path, monkeypatch):
    local = _build(adapter, images, tmp_path / "local")
    upload, uploaded = CacheStore.upload, []

    def recorded(self, local_folder, names, **options):
        uploaded.extend(f"{self.url}/{options.get('prefix', '')}{name}" for name in names)
        return upload(self, local_folder, names, **options)

    monkeypatch.setattr(CacheStore, "upload", recorded)
    remote = _build(adapter, images, url, local_dir=tmp_path / "staging")
    assert remote.shards == local.shards  # the same shard files, byte for byte
    # The shards went to the build's part folder and were moved in; the manifest was sent once, last.
    assert [name for name in uploaded if name.startswith(url + "/")][-1] == f"{url}/{MANIFEST_NAME}"
    assert sum(name.endswith(MANIFEST_NAME) for name in uploaded) == 1
    assert not [name for name in uploaded if name.startswith(url + "/") and name.endswith(".arrow")]
    assert _remote_files(url) == sorted(os.listdir(tmp_path / "local"))
    # Nothing staged is left, locally or beside the cache on the store.
    assert os.listdir(tmp_path / "staging") == []
    assert [p for p in MEMORY.find(CacheStore(url).path.rsplit("/", 1)[0]) if ".partial-" in p] == []

    cache = load_cache(url, download_dir=tmp_path / "downloads", expected_fingerprint=local.fingerprint)
    assert cache.folder.startswith(str(tmp_path / "downloads"))
    reference = ActivationCache.load(tmp_path / "local")
    assert _rows(cache) == _rows(reference)
    assert (cache.decode(2) == reference.decode(2)).all()

    # A second load finds the local copy: only the manifest is read from the store.
    MEMORY.rm(f"{CacheStore(url).path}/{next(iter(local.shards))}")
    assert load_cache(url, download_dir=tmp_path / "downloads").folder == cache.folder


def test_a_damaged_remote_cache_is_refused_and_no_copy_is_kept(adapter, images, url, tmp_path):
    manifest = _build(adapter, images, url, local_dir=tmp_path / "staging")
    shard = next(iter(manifest.shards))
    _flip_byte(url, shard)
    with pytest.raises(CorruptCacheError, match=f"{url}/{shard} does not match its checksum"):
        load_cache(url, download_dir=tmp_path / "downloads")
    assert os.listdir(tmp_path / "downloads") == []
    MEMORY.rm(f"{CacheStore(url).path}/{shard}")
    with pytest.raises(CorruptCacheError, match="is missing"):
        load_cache(url, download_dir=tmp_path / "downloads")


def test_a_remote_manifest_is_checked_before_any_shard_is_fetched(adapter, images, url, tmp_path):
    manifest = _build(adapter, images, url, local_dir=tmp_path / "staging")
    downloads = tmp_path / "downloads"
    with pytest.raises(CacheMismatchError, match="differs in: chunk size"):
        load_cache(url, download_dir=downloads, expected_fingerprint={**manifest.fingerprint_parts, "chunk_size": "8"})
    path = f"{CacheStore(url).path}/{MANIFEST_NAME}"
    edited = json.loads(MEMORY.cat_file(path))
    edited["shards"] = {"../../outside.arrow": next(iter(edited["shards"].values()))}
    MEMORY.pipe_file(path, json.dumps(edited).encode())
    with pytest.raises(CorruptCacheError, match="shard path"):
        load_cache(url, download_dir=downloads)
    MEMORY.pipe_file(path, b"{" * (17 << 20))
    with pytest.raises(CorruptCacheError, match="bytes"):
        load_cache(url, download_dir=downloads)
    assert not downloads.exists()
    with pytest.raises(FileNotFoundError, match="no freezecache_manifest.json"):
        load_cache(url + "-none", download_dir=downloads)


def test_export_to_and_from_a_url(adapter, images, url, tmp_path):
    _build(adapter, images, url, local_dir=tmp_path / "staging")
    _build(adapter, images, tmp_path / "local")
    hub_url = url.rsplit("/", 1)[0] + "/hub"
    assert export_cache(url, hub_url, progress=False) == hub_url
    assert [name for name in _remote_files(hub_url) if name.startswith("data/")] == [
        "data/train-00000-of-00001.parquet"
    ]
    exported = load_cache(hub_url)
    local = load_cache(export_cache(tmp_path / "local", tmp_path / "hub", progress=False))
    assert exported.manifest.layout == "parquet" and exported.manifest.shards == local.manifest.shards
    assert _rows(exported) == _rows(local)
    with pytest.raises(FileExistsError, match="not empty"):
        export_cache(tmp_path / "local", hub_url, progress=False)


def test_an_interrupted_upload_leaves_nothing_loadable_and_the_next_build_recovers(
    adapter, images, url, tmp_path, monkeypatch
):
    _build(adapter, images, url, local_dir=tmp_path / "staging")
    upload = CacheStore.upload

    def fail_on_manifest(self, local_folder, names, **options):
        if MANIFEST_NAME in names:
            raise OSError("connection lost")
        return upload(self, local_folder, names, **options)

    monkeypatch.setattr(CacheStore, "upload", fail_on_manifest)
    with pytest.raises(OSError, match="connection lost"):
        _build(adapter, images, url, codec={"name": "int8"}, local_dir=tmp_path / "staging")
    # The old cache's manifest went first, the new one never came: nothing there loads, nothing is half-trusted.
    assert MANIFEST_NAME not in _remote_files(url) and _remote_files(url)
    with pytest.raises(FileNotFoundError, match="did not finish"):
        load_cache(url)
    monkeypatch.setattr(CacheStore, "upload", upload)
    manifest = _build(adapter, images, url, codec={"name": "int8"}, local_dir=tmp_path / "staging")
    assert load_cache(url).manifest.codec["name"] == "int8" == manifest.codec["name"]
    assert os.listdir(tmp_path / "staging") == []


def test_reuse_or_build_finds_the_remote_cache_and_does_not_rebuild(images, url, tmp_path, monkeypatch, caplog):
    torch.manual_seed(0)
    base = CifarResNet.from_name("resnet20", num_classes=10)
    model = FreezeCacheModel(base, get_block_adapter(base))
    settings = CacheBuildSettings(device=torch.device("cpu"), batch_size=8, progress=False)
    probe = collate_image_batch([images[i] for i in range(4)])["pixel_values"]

    def get(chunk_size=4):
        config = DiscardConfig(cache=CacheConfig(codec="fp16", chunk_size=chunk_size), cache_local_dir=str(tmp_path))
        options = dict(collate_fn=collate_image_batch, probe=probe)
        return reuse_or_build_cache(model, POSITION, url, config, images, settings, **options)

    built, reused = get()
    assert not reused and built.manifest.num_chunks == SAMPLES // 4
    build = reuse_module.build_activation_cache

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a cache that matches")

    monkeypatch.setattr(reuse_module, "build_activation_cache", no_build)
    again, reused = get()
    assert reused and again.manifest.to_dict() == built.manifest.to_dict()
    monkeypatch.setattr(reuse_module, "build_activation_cache", build)
    with caplog.at_level("WARNING"):
        rebuilt, reused = get(chunk_size=8)
    assert not reused and "differs in: chunk size" in caplog.text
    assert CacheStore(url).manifest().chunk_size == 8 == rebuilt.manifest.chunk_size


def test_command_line_reads_a_url_and_names_bad_storage_options(adapter, images, url, tmp_path, capsys):
    manifest = _build(adapter, images, url, local_dir=tmp_path / "staging")
    assert cli(["inspect", url, "--download_dir", str(tmp_path / "downloads")]) == 0
    assert manifest.fingerprint in capsys.readouterr().out
    assert cli(["inspect", url, "--storage_options", "anon"]) == 2
    assert "--storage_options must be a JSON object" in capsys.readouterr().err
    assert cli(["inspect", "nosuchprotocol://bucket/cache"]) == 2
    assert "Cannot open 'nosuchprotocol://bucket/cache'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--cache_storage_options must be a JSON object"):
        DiscardConfig(cache_storage_options="[1, 2]")
    with pytest.raises(ValueError, match="is a bucket or a root"):
        _build(adapter, images, "memory://bucket-only", local_dir=tmp_path / "staging")


def test_training_discards_into_a_url_and_trains_from_it(url, tmp_path):
    common = [
        "--model", "resnet20", "--max_train_samples", "32", "--max_eval_samples", "16", "--num_train_epochs", "1",
        "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16", "--cache_codec", "fp16",
        "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none", "--use_cpu", "true",
        "--disable_tqdm", "true", "--cache_local_dir", str(tmp_path / "local"), "--cost_report", "false",
    ]  # fmt: skip
    cache_root = url.rsplit("/", 1)[0]
    discard = ["--freeze_policy", "fixed", "--freeze_schedule", "0:3", "--discard", "true", "--cache_dir", cache_root]
    metrics = run_training(parse_run_arguments([*common, *discard, "--output_dir", str(tmp_path / "run")]))
    assert metrics["discarded_prefix"] == 3
    assert CacheStore(url).manifest().num_samples == 32
    assert not (tmp_path / "run" / "activation_cache").exists()
    run_training(parse_run_arguments([*common, "--train_from_cache", url, "--output_dir", str(tmp_path / "suffix")]))
    suffix = json.loads((tmp_path / "suffix" / "train_results.json").read_text())
    assert suffix["discarded_prefix"] == 3 and suffix["cache_build_seconds"] == 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_without_a_shared_folder_build_one_cache_in_a_store(tmp_path):
    """Each process gets a local folder of its own (staging and downloads): only the store, reached by a `file://`
    URL, is shared. The cache equals a single-process build, and the second call reuses it on both."""
    store = tmp_path / "store"
    url = f"file://{store}/caches/position-03"
    results = tmp_path / "results"
    results.mkdir()
    group = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    workers, logs = [], []
    for rank in range(2):
        local = tmp_path / f"machine-{rank}"
        local.mkdir()
        # LOCAL_RANK 0 on both: two machines of one process each.
        env = {**os.environ, **group, "RANK": str(rank), "LOCAL_RANK": "0", "HF_HOME": str(local / "hf_home")}
        logs.append(open(tmp_path / f"{rank}.log", "w"))
        command = [sys.executable, str(WORKER), url, str(local), str(results)]
        workers.append(subprocess.Popen(command, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
    start = time.monotonic()
    try:
        for worker in workers:
            worker.wait(timeout=max(1.0, 120 - (time.monotonic() - start)))
    finally:
        for worker, log in zip(workers, logs, strict=True):
            if worker.poll() is None:
                worker.kill()
                worker.wait()
            log.close()
    outputs = [(tmp_path / f"{rank}.log").read_text()[-3000:] for rank in range(2)]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    reports = [json.loads((results / f"{rank}.json").read_text()) for rank in range(2)]
    for rank, report in enumerate(reports):
        assert report["reused"] == [False, True]
        assert report["num_processes"] == 2 and len(report["shards"]) == 2  # one shard from each process
        assert report["read_from"].startswith(str(tmp_path / f"machine-{rank}"))
        assert not [entry for entry in report["local_entries"] if entry.startswith("build-")]
    assert reports[0]["rows"] == reports[1]["rows"] == reports[0]["single_rows"]
    assert sorted(os.listdir(store / "caches")) == ["position-03"]  # no staging left on the store
    assert load_cache(url, download_dir=tmp_path / "check").manifest.shards == reports[0]["shards"]
