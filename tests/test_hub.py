"""Activation caches on the Hub: the parquet export, its card, push and download (against an in-memory Hub), and
the checks that refuse a corrupt or hostile cache before anything is decoded."""

from __future__ import annotations

import base64
import json
import os
import pickle
import re
import shutil
import struct
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
import zfpy
import zstandard
from huggingface_hub import DatasetCard

from hf_freezecache import export_cache, load_cache, push_cache_to_hub
from hf_freezecache.cache import (
    ActivationCache,
    CacheMismatchError,
    CorruptCacheError,
    build_activation_cache,
    build_codec,
    build_sidecar,
    dataset_fingerprint,
    fingerprint_parts,
)
from hf_freezecache.cache.codecs import int8, zfp
from hf_freezecache.cache.manifest import MANIFEST_NAME, file_sha256
from hf_freezecache.cache.manifest.integrity import manifest_seal
from hf_freezecache.data import collate_image_batch, load_image_classification
from hf_freezecache.models import CifarResNet, get_block_adapter

SAMPLES, CHUNK, POSITION = 48, 4, 3
CODEC = {"name": "zfp", "tolerance": 0.05, "relative": True}


@pytest.fixture(scope="module", autouse=True)
def _datasets_cache(tmp_path_factory):
    # Parquet shards are converted to Arrow in the `datasets` cache when loaded: keep that out of the home folder.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("datasets-cache"))
        yield


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A zfp cache with a channel-flip sidecar in the builder's Arrow layout: 48 samples, 12 rows of 4."""
    data = load_image_classification(max_train_samples=SAMPLES, max_eval_samples=8, augment=False)
    torch.manual_seed(0)
    adapter = get_block_adapter(CifarResNet.from_name("resnet20", num_classes=10).eval())
    parts = fingerprint_parts(adapter, POSITION, dataset_fingerprint(data.train_unaugmented), CODEC, CHUNK)
    folder = tmp_path_factory.mktemp("built") / "cache"
    build_activation_cache(
        adapter,
        POSITION,
        data.train_unaugmented,
        folder,
        build_codec(CODEC),
        CHUNK,
        parts,
        collate_fn=collate_image_batch,
        batch_size=16,
        progress=False,
        sidecars=[build_sidecar("channel-flip", gamma=0.25, calibration_size=8)],
    )
    return folder, parts


@pytest.fixture(scope="module")
def original(built) -> ActivationCache:
    return ActivationCache.load(built[0])


@pytest.fixture(scope="module")
def exported(built, original, tmp_path_factory) -> Path:
    """The cache in the Hub layout, in about 4 shards."""
    output = tmp_path_factory.mktemp("exported") / "hub"
    assert export_cache(built[0], output, max_shard_size=original.manifest.stored_bytes // 3, progress=False) == str(
        output
    )
    return output


@pytest.fixture
def no_pickle(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the cache reader unpickled something")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_same_cache(cache: ActivationCache, reference: ActivationCache) -> None:
    assert cache.num_chunks == reference.num_chunks and np.array_equal(cache.labels, reference.labels)
    for chunk in range(reference.num_chunks):
        assert np.array_equal(cache.decode(chunk), reference.decode(chunk))
        ours, theirs = cache.decode_sidecars(chunk), reference.decode_sidecars(chunk)
        assert ours.keys() == theirs.keys() == {"flipped_channels"}
        assert all(np.array_equal(ours[name], theirs[name]) for name in ours)


def test_export_writes_the_hub_layout_and_decodes_bit_identical(built, original, exported, no_pickle):
    files = _files(exported)
    shards = sorted(name for name in files if name.startswith("data/"))
    assert len(shards) >= 3
    assert shards == [f"data/train-{i:05d}-of-{len(shards):05d}.parquet" for i in range(len(shards))]
    assert set(files) == {MANIFEST_NAME, "README.md", *shards}
    manifest = json.loads(files[MANIFEST_NAME])
    assert manifest["layout"] == "parquet" and manifest["split"] == "train"
    assert manifest["shards"] == {name: file_sha256(exported / name) for name in shards}
    assert manifest["fingerprint"] == original.manifest.fingerprint

    cache = load_cache(exported, expected_fingerprint=built[1])
    assert cache.manifest.layout == "parquet"
    _assert_same_cache(cache, original)
    assert load_cache(built[0]).manifest.layout == "arrow"  # the builder's layout, through the same checks
    assert load_cache(str(exported), expected_fingerprint=original.manifest.fingerprint).num_samples == SAMPLES
    with pytest.raises(CacheMismatchError, match="not the expected 0{32}"):
        load_cache(exported, expected_fingerprint="0" * 32)
    with pytest.raises(ValueError, match="revision='main' applies to Hub repos"):
        load_cache(exported, revision="main")


def test_datasets_loads_the_export_with_the_same_rows(original, exported, tmp_path):
    loaded = datasets.load_dataset(str(exported), cache_dir=str(tmp_path))
    assert list(loaded) == ["train"]
    rows = loaded["train"]
    assert rows.features == original.rows.features
    assert rows.num_rows == original.num_chunks
    for column in rows.column_names:
        assert rows[column] == original.rows[column], column


def test_export_is_reproducible_and_refuses_bad_destinations(built, original, exported, tmp_path):
    small = original.manifest.stored_bytes // 3
    again = export_cache(built[0], tmp_path / "again", max_shard_size=small, progress=False)
    assert _files(Path(again)) == _files(exported)
    # A Hub-layout folder exports to the same bytes too.
    assert _files(Path(export_cache(exported, tmp_path / "twice", max_shard_size=small, progress=False))) == _files(
        exported
    )
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="busy exists and is not empty"):
        export_cache(built[0], tmp_path / "busy")
    with pytest.raises(ValueError, match="Invalid split name 'train-2'"):
        export_cache(built[0], tmp_path / "split", split="train-2")
    assert not (tmp_path / "split").exists() and not list(tmp_path.glob("*.partial-*"))


def test_card_metadata_is_the_manifest(original, exported):
    manifest = original.manifest
    card = DatasetCard.load(exported / "README.md")
    metadata = card.data.to_dict()
    assert metadata["configs"] == [
        {"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}
    ]
    assert metadata["tags"] == ["hf_freezecache", "activation-cache"]
    ours = metadata["hf_freezecache"]
    assert ours == {
        "format_version": manifest.format_version,
        "fingerprint": manifest.fingerprint,
        "source_model": manifest.source_model,
        "source_revision": manifest.source_revision,
        "model_family": "cifar-resnet",
        "model_class": "CifarResNet",
        "model_num_blocks": 9,
        "position": POSITION,
        "activation_shape": [16, 32, 32],
        "activation_dtype": "float32",
        "codec": manifest.codec,
        "codec_error": manifest.codec_error,
        "chunk_size": CHUNK,
        "num_samples": SAMPLES,
        "num_rows": SAMPLES // CHUNK,
        "raw_bytes": manifest.raw_bytes,
        "stored_bytes": manifest.stored_bytes,
        "compression_ratio": manifest.compression_ratio,
        "sidecars": {
            "channel-flip": {
                "config": {"gamma": 0.25, "calibration_size": 8},
                "arrays": {"flipped_channels": {"shape": [4, 32, 32], "dtype": "float32"}},
            }
        },
        "layout": "parquet",
    }
    assert ours["codec"]["requested_tolerance"] == 0.05 and ours["codec"]["tolerance"] > 0
    assert manifest.fingerprint in card.text and "load_cache(" in card.text and "adapter.suffix(" in card.text
    # The builder's card comes from the same generator: same metadata, no `configs` (no parquet shards to point at).
    built_card = (Path(original.folder) / "README.md").read_text()
    built_metadata = yaml.safe_load(built_card.split("---\n")[1])
    assert "configs" not in built_metadata
    assert built_metadata["hf_freezecache"] == {**ours, "layout": "arrow"}


def test_push_uploads_the_export_and_load_cache_downloads_it(built, original, exported, hub, tmp_path, no_pickle):
    info = push_cache_to_hub(built[0], "user/acts", private=True, token="hf_fake_token")
    assert hub.repos["user/acts"]["visibility"] == "private"
    sha = hub.repos["user/acts"]["history"][-1][0]
    assert info.commit_url == f"https://huggingface.co/datasets/user/acts/commit/{sha}" and info.oid == sha
    # What was committed is the export of the cache, byte for byte (one shard at the default 500MB).
    reference = Path(export_cache(built[0], tmp_path / "reference", progress=False))
    (commit,) = hub.commits
    header, *operations = commit
    assert header["key"] == "header" and "CifarResNet at block position 3" in header["value"]["summary"]
    committed = {op["value"]["path"]: base64.b64decode(op["value"]["content"]) for op in operations}
    assert committed == _files(reference) == hub.files("user/acts")
    assert set(committed) == {MANIFEST_NAME, "README.md", "data/train-00000-of-00001.parquet"}
    assert not list(built[0].parent.glob(".freezecache-export-*"))  # the temporary export is gone

    # A folder already in the Hub layout goes up as it is; shards of the previous upload are deleted.
    push_cache_to_hub(exported, "user/acts", token="hf_fake_token", commit_message="four shards")
    assert hub.files("user/acts") == _files(exported)
    deleted = [op["value"]["path"] for op in hub.commits[-1] if op["key"] == "deletedFile"]
    assert deleted == ["data/train-00000-of-00001.parquet"]
    assert hub.commits[-1][0]["value"]["summary"] == "four shards"

    cache = load_cache("user/acts", download_dir=tmp_path / "hub-cache", token="hf_fake_token")
    assert Path(cache.folder).is_relative_to(tmp_path / "hub-cache")
    _assert_same_cache(cache, original)
    sha = hub.repos["user/acts"]["history"][-1][0]
    downloaded = {p.removeprefix(f"/datasets/user/acts/resolve/{sha}/") for m, p in hub.requests if m == "GET"}
    assert set(_files(exported)) <= downloaded
    with pytest.raises(FileNotFoundError, match="no Hub dataset repo 'user/missing'"):
        load_cache("user/missing", download_dir=tmp_path / "hub-cache")
    assert hub.unexpected == []


def test_push_refuses_bad_input_before_any_request(built, hub, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        push_cache_to_hub(tmp_path / "nowhere", "user/acts")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorruptCacheError, match=f"{MANIFEST_NAME} is missing"):
        push_cache_to_hub(tmp_path / "empty", "user/acts")
    for repo_id in ("user/acts/extra", "user/bad..name", "-user/acts"):
        with pytest.raises(ValueError, match=re.escape(f"Invalid Hub repo id {repo_id!r}: expected 'namespace/name'")):
            push_cache_to_hub(built[0], repo_id)
    with pytest.raises(FileNotFoundError, match="no such folder, and not a Hub repo id"):
        load_cache(tmp_path / "not" / "a" / "cache")
    assert hub.requests == []


def _copy(exported: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(exported, folder)
    return folder


def _edit_manifest(folder: Path, **changes) -> None:
    """Edits the manifest and reseals it, as a forger would, so that only the checks after the seal can object."""
    path = folder / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    manifest["seal"] = manifest_seal(manifest)
    path.write_text(json.dumps(manifest))


def _rewrite_shard(folder: Path, index: int, transform) -> None:
    """Rewrites shard `index` as `transform(table)` and records its new checksum, so only later checks can object."""
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    name = sorted(manifest["shards"])[index]
    pq.write_table(transform(pq.read_table(folder / name)), folder / name)
    _edit_manifest(folder, shards={**manifest["shards"], name: file_sha256(folder / name)})


def test_tampered_shard_is_refused(exported, tmp_path):
    folder = _copy(exported, tmp_path)
    shard = folder / "data" / sorted(os.listdir(folder / "data"))[1]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(CorruptCacheError, match=f"{shard.name} does not match its checksum"):
        load_cache(folder)
    shard.unlink()
    with pytest.raises(CorruptCacheError, match=f"{shard.name} is missing"):
        load_cache(folder)


@pytest.mark.parametrize(
    "transform, message",
    [
        (lambda t: t.append_column("extra", pa.array([0] * t.num_rows)), r"missing: \[\], unexpected: \['extra'\]"),
        (lambda t: t.drop_columns(["labels"]), r"missing: \['labels'\], unexpected: \[\]"),
        (lambda t: t.drop_columns(["sidecar.flipped_channels"]), r"missing: \['sidecar.flipped_channels'\]"),
        (
            lambda t: t.set_column(1, "labels", t["labels"].cast(pa.list_(pa.int32()))),
            r"column 'labels' is list<element: int32>, expected list<item: int64>",
        ),
        (lambda t: t.set_column(0, "data", t["data"].cast(pa.large_binary())), "column 'data' is large_binary"),
        (lambda t: t.slice(1), r"has 11 rows; its manifest says 12"),
        (lambda t: t.take(list(reversed(range(t.num_rows)))), r"rows do not hold samples 0..47 in order"),
        (
            lambda t: t.set_column(2, "indices", pa.array([[0, 1, 2]] + t["indices"].to_pylist()[1:])),
            r"indices do not come 4 per row",
        ),
    ],
    ids=[
        "extra-column",
        "missing-column",
        "missing-sidecar",
        "int32-labels",
        "large-binary",
        "row-missing",
        "rows-reversed",
        "short-row",
    ],
)
def test_wrong_rows_are_refused(exported, tmp_path, transform, message):
    folder = _copy(exported, tmp_path)
    _rewrite_shard(folder, 0, transform)
    with pytest.raises(CorruptCacheError, match=message):
        load_cache(folder)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"sample_shape": [16, -32, 32]}, r"invalid sample_shape \[16, -32, 32\]; expected a list of 1 to 3 positive"),
        ({"sample_shape": [16, 32, 32, 1]}, "expected a list of 1 to 3 positive integers"),
        ({"sample_shape": [65536, 65536, 65536]}, "at most 67,108,864 values per sample"),
        (
            {"sample_shape": [4096, 128, 128], "chunk_size": 16, "num_chunks": 3},
            r"invalid chunk_size 16; expected a chunk of at most 2,147,483,648 bytes",
        ),
        ({"codec": {"name": "lzma"}}, r"invalid codec \{'name': 'lzma'\}: Unknown activation codec 'lzma'"),
        ({"codec": {"name": "zfp", "tolerance": -1}}, "tolerance must be a number > 0"),
        ({"num_chunks": 13}, r"invalid num_chunks 13; expected ceil\(num_samples / chunk_size\) = 12"),
        ({"num_samples": 0}, "invalid num_samples 0; expected an integer >= 1"),
        ({"chunk_size": True}, "invalid chunk_size True; expected an integer >= 1"),
        ({"dtype": "float64"}, "invalid dtype 'float64'; expected 'float32'"),
        ({"layout": "zip"}, "invalid layout 'zip'; expected 'arrow' or 'parquet'"),
        ({"format_version": 3}, "written by a newer hf_freezecache"),
        (
            {"shards": {"../outside.parquet": "0" * 64}},
            r"invalid shard paths \['../outside.parquet'\]; expected \['data/train-00000-of-00001.parquet'\]",
        ),
        (
            {"shards": {f"data/train-0000{i}-of-00002.parquet": "0" * 64 for i in (1, 0)}},
            r"expected \['data/train-00000-of-00002.parquet', 'data/train-00001-of-00002.parquet'\] .*in order",
        ),
        ({"layout": "arrow", "shards": {"../outside.arrow": "0" * 64}}, r"invalid shard path '../outside.arrow'"),
        ({"layout": "arrow", "shards": {"/etc/passwd.arrow": "0" * 64}}, r"invalid shard path '/etc/passwd.arrow'"),
        ({"shards": {"data/train-00000-of-00001.parquet": "abc"}}, "expected 64 lowercase hex digits"),
        ({"shards": {}}, "expected a JSON object of at least one shard"),
        (
            {
                "sidecars": {
                    "channel-flip": {
                        "config": {},
                        "summary": {},
                        "arrays": {"x": {"shape": [0], "dtype": "float32", "stored_bytes": 0}},
                    }
                }
            },
            r"invalid sidecars.channel-flip.arrays.x.shape \[0\]",
        ),
        ({"fingerprint": None}, "invalid fingerprint None; expected a string"),
    ],
)
def test_invalid_manifest_is_refused(exported, tmp_path, changes, message):
    folder = _copy(exported, tmp_path)
    _edit_manifest(folder, **changes)
    with pytest.raises(CorruptCacheError, match=message):
        load_cache(folder)


def test_unreadable_manifest_is_refused(exported, tmp_path):
    folder = _copy(exported, tmp_path)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    del manifest["fingerprint"], manifest["codec"]
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CorruptCacheError, match="the manifest lacks fingerprint, codec"):
        load_cache(folder)
    (folder / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(CorruptCacheError, match="is not a JSON cache manifest"):
        load_cache(folder)
    (folder / MANIFEST_NAME).write_text("[]")
    with pytest.raises(CorruptCacheError, match="invalid manifest"):
        load_cache(folder)


def _claiming(payload: bytes, shape: tuple[int, ...]) -> bytes:
    """A zfp stream whose header declares a 3-D float32 array of `shape` (C order), with `payload`'s body."""
    nz, ny, nx = (size - 1 for size in shape)
    meta = ((((nz << 16 | ny) << 16 | nx) << 2 | 2) << 2) | (zfp._ZFP_TYPE_FLOAT - 1)
    header = int.from_bytes(payload[:11], "little")
    header = (header & ~(((1 << 52) - 1) << 32)) | (meta << 32)
    return header.to_bytes(11, "little") + payload[11:]


def test_oversize_payload_is_refused_before_decompressing(exported, original, tmp_path, monkeypatch):
    folder = _copy(exported, tmp_path)
    first = original.rows.data.column("data")[0].as_py()
    huge = _claiming(first, (65536, 65536, 65536))
    assert zfp.zfp_header(huge) == (zfp._ZFP_TYPE_FLOAT, (65536, 65536, 65536))

    def replace_first(table: pa.Table) -> pa.Table:
        data = table["data"].to_pylist()
        return table.set_column(0, "data", pa.array([huge, *data[1:]], pa.binary()))

    _rewrite_shard(folder, 0, replace_first)
    cache = load_cache(folder)  # the rows are well-formed; row 0's payload lies about its size
    monkeypatch.setattr(zfpy, "decompress_numpy", lambda data: pytest.fail("zfp was asked to decode"))
    with pytest.raises(
        CorruptCacheError, match=r"'data' of row 0 cannot be decoded: .*declares a \(65536, 65536, 65536\)"
    ):
        cache.decode(0)


def test_zfp_header_is_read_before_zfp(original, monkeypatch):
    codec = original.codec
    for shape in [(2, 16, 32, 32), (3, 17, 48), (5, 7)]:
        data = codec.encode(np.random.default_rng(0).standard_normal(shape, dtype=np.float32))
        found = zfpy.header(data)
        sizes = tuple(s for s in (found["nw"], found["nz"], found["ny"], found["nx"]) if s)
        assert zfp.zfp_header(data) == (zfp._ZFP_TYPE_FLOAT, sizes) == (zfp._ZFP_TYPE_FLOAT, zfp._folded_shape(shape))
    data = codec.encode(np.ones((2, 16, 8, 8), np.float32))
    monkeypatch.setattr(zfpy, "decompress_numpy", lambda data: pytest.fail("zfp was asked to decode"))
    with pytest.raises(ValueError, match=r"declares a \(32, 8, 8\) array .* needs float32 \(type 3\) \(32, 8, 9\)"):
        codec.decode(data, (2, 16, 8, 9))
    with pytest.raises(ValueError, match="not a zfp stream"):
        codec.decode(b"\x00" * 64, (2, 16, 8, 8))
    with pytest.raises(ValueError, match="not a zfp stream"):
        codec.decode(data[:8], (2, 16, 8, 8))


def test_zstd_frame_declaring_a_huge_size_is_refused_before_decompressing(monkeypatch):
    codec = build_codec({"name": "int8"})
    chunk = np.random.default_rng(0).standard_normal((2, 3, 4, 4), dtype=np.float32)
    assert np.abs(codec.decode(codec.encode(chunk), chunk.shape) - chunk).max() <= codec.max_abs_error(chunk)
    # A single-segment frame header whose 8-byte content size says 1 TiB.
    huge = struct.pack("<IB", 0xFD2FB528, 0xE0) + (1 << 40).to_bytes(8, "little") + b"\x01\x00\x00"
    assert zstandard.frame_content_size(huge) == 1 << 40
    monkeypatch.setattr(int8.Int8Codec, "_decompressor", lambda self: pytest.fail("zstd was asked to decompress"))
    with pytest.raises(
        ValueError, match=r"declares 1099511627776 decompressed bytes but shape \(2, 3, 4, 4\) needs 128"
    ):
        codec.decode(huge, chunk.shape)
    with pytest.raises(ValueError, match="not a zstd frame"):
        codec.decode(b"nope", chunk.shape)
    with pytest.raises(ValueError, match="declares 8 decompressed bytes"):
        codec.decode(zstandard.ZstdCompressor().compress(b"\x00" * 8), chunk.shape)


@pytest.mark.parametrize("name, itemsize", [("none", 4), ("fp16", 2), ("bf16", 2)])
def test_raw_payload_of_the_wrong_size_is_refused(name, itemsize):
    codec = build_codec({"name": name})
    with pytest.raises(ValueError, match=rf"has 10 bytes but shape \(2, 3\) needs {6 * itemsize}"):
        codec.decode(b"\x00" * 10, (2, 3))
    with pytest.raises(ValueError, match="every size must be >= 1"):
        codec.decode(b"", (0, 3))
