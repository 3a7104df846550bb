"""Sharing activation caches on the Hugging Face Hub: the dataset-repo parquet layout, upload and download.

A cache on the Hub is a dataset repo that `datasets.load_dataset` reads like any other (`data/<split>-*.parquet`,
declared in the card's `configs`), plus the cache's manifest, whose `shards` hold the sha256 of every parquet file.
`load_cache` trusts nothing it downloads: `ActivationCache.load` checks the manifest, the checksums, the columns and
the rows before any chunk is decoded, and only JSON and parquet are read (never a pickle).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets.utils.py_utils import convert_file_size_to_int
from huggingface_hub import CommitInfo, HfApi, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError
from huggingface_hub.utils import HFValidationError, validate_repo_id
from tqdm.auto import tqdm

from .manifest import (
    CARD_NAME,
    LAYOUT_PARQUET,
    MANIFEST_NAME,
    SPLIT_NAME,
    CacheManifest,
    cache_features,
    file_sha256,
)
from .reader import ActivationCache

logger = logging.getLogger(__name__)

#: What a cache repo holds; the rest of a repo (e.g. `.gitattributes`) is neither downloaded nor needed.
HUB_FILES = [MANIFEST_NAME, CARD_NAME, "data/*"]
# Parquet row groups of about this size: small enough for the dataset viewer, large enough to read fast.
_ROW_GROUP_BYTES = 100 << 20


def export_cache(
    cache_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    split: str = "train",
    max_shard_size: str | int = "500MB",
    progress: bool = True,
) -> str:
    """Writes the cache in `cache_dir` in the Hub dataset-repo layout, ready for `push_cache_to_hub`.

    `output_dir` gets `data/<split>-NNNNN-of-NNNNN.parquet` (the rows, in order, in shards of at most about
    `max_shard_size`), the manifest (its `shards` now the parquet files' sha256, its `layout` `"parquet"`) and the
    dataset card, whose `configs` let `datasets.load_dataset(output_dir)` load the rows as split `split`. The cache
    is checked (`ActivationCache.load`, checksums included) before anything is written; the folder is written under
    a temporary name and renamed once complete. The fingerprint is unchanged: the rows are the same bytes.

    Args:
        cache_dir (`str` or `os.PathLike`): A cache folder, in either layout.
        output_dir (`str` or `os.PathLike`): Where to write; must not exist or be empty.
        split (`str`, *optional*, defaults to `"train"`): The split name of the rows (letters, digits, `_`).
        max_shard_size (`str` or `int`, *optional*, defaults to `"500MB"`): Largest parquet shard, in bytes or
            as a string like `"500MB"`; a row is never split, so a shard holds at least one row.
        progress (`bool`, *optional*, defaults to `True`): Show a progress bar over the shards.

    Returns:
        `str`: The absolute path of `output_dir`.

    Raises:
        FileNotFoundError: `cache_dir` does not exist.
        CorruptCacheError: `cache_dir` is not a valid cache (the message names the problem).
        FileExistsError: `output_dir` exists and is not empty.
        ValueError: `split` or `max_shard_size` is invalid, or `output_dir` is `cache_dir`.
    """
    cache = ActivationCache.load(cache_dir)
    output_dir = os.path.abspath(output_dir)
    _export(cache, output_dir, split=split, max_shard_size=max_shard_size, progress=progress)
    return output_dir


def _export(
    cache: ActivationCache, output_dir: str, *, split: str, max_shard_size: str | int, progress: bool
) -> CacheManifest:
    """Writes `cache` into `output_dir` in the Hub layout; returns the manifest written there."""
    if not isinstance(split, str) or not SPLIT_NAME.fullmatch(split):
        raise ValueError(f"Invalid split name {split!r}: use letters, digits and '_' (dot-separated), e.g. 'train'.")
    max_bytes = convert_file_size_to_int(max_shard_size)
    if max_bytes < 1:
        raise ValueError(f"max_shard_size must be a positive size (e.g. '500MB'), got {max_shard_size!r}.")
    if output_dir == os.path.abspath(cache.folder):
        raise ValueError(f"Cannot export the cache in {output_dir} onto itself: choose another output_dir.")
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise FileExistsError(f"{output_dir} exists and is not empty: export_cache writes into a new folder.")

    features = cache_features(cache.manifest)
    table = cache.rows.data.table.select(list(features)).cast(features.arrow_schema)
    row_bytes = _row_bytes(table)
    bounds = _shard_bounds(row_bytes, max_bytes)
    staging = f"{output_dir}.partial-{uuid.uuid4().hex[:8]}"
    os.makedirs(os.path.join(staging, "data"))
    try:
        shards = {}
        bar = tqdm(bounds, desc="Exporting activation cache", unit="shard", disable=not progress)
        for index, (start, stop) in enumerate(bar):
            name = f"data/{split}-{index:05d}-of-{len(bounds):05d}.parquet"
            rows = table.slice(start, stop - start)
            row_group = max(1, _ROW_GROUP_BYTES * rows.num_rows // max(1, sum(row_bytes[start:stop])))
            pq.write_table(rows, os.path.join(staging, name), row_group_size=row_group)
            shards[name] = file_sha256(os.path.join(staging, name))
        manifest = dataclasses.replace(cache.manifest, shards=shards, layout=LAYOUT_PARQUET, split=split)
        manifest.save(staging)
        if os.path.isdir(output_dir):
            os.rmdir(output_dir)
        os.rename(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        "Exported the activation cache in %s to %s (%d parquet shards).", cache.folder, output_dir, len(bounds)
    )
    return manifest


def _row_bytes(table: pa.Table) -> list[int]:
    """Approximate stored bytes of each row: its binary payloads plus 8 bytes per label and index."""
    sizes = pc.multiply(pc.list_value_length(table["indices"]), 16)
    for name in table.column_names:
        if pa.types.is_binary(table.schema.field(name).type):
            sizes = pc.add(sizes, pc.binary_length(table[name]))
    return sizes.to_pylist()


def _shard_bounds(row_bytes: list[int], max_bytes: int) -> list[tuple[int, int]]:
    """Consecutive `(start, stop)` row ranges of at most `max_bytes` each (at least one row per shard)."""
    bounds, start, size = [], 0, 0
    for row, nbytes in enumerate(row_bytes):
        if row > start and size + nbytes > max_bytes:
            bounds.append((start, row))
            start, size = row, 0
        size += nbytes
    bounds.append((start, len(row_bytes)))
    return bounds


def push_cache_to_hub(
    cache_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
) -> CommitInfo:
    """Uploads the cache in `cache_dir` to the Hub dataset repo `repo_id`, in the Hub layout (`export_cache`).

    The cache is checked (`ActivationCache.load`, checksums included) before anything is sent. A cache in the Arrow
    layout of `build_activation_cache` is exported first, to a temporary folder beside it (so that folder's file
    system needs room for a second copy); one already in the Hub layout is uploaded as it is. The repo is created if
    needed; parquet shards of an earlier upload that this cache does not have are deleted in the same commit, so
    `data/<split>-*` never mixes two caches.

    Args:
        cache_dir (`str` or `os.PathLike`): A cache folder, in either layout.
        repo_id (`str`): `"namespace/name"` (or `"name"`, in the token owner's namespace).
        private (`bool`, *optional*): Visibility of a repo created by this call (default: the Hub's default);
            an existing repo keeps its visibility.
        token (`str`, *optional*): A Hub token with write access; default: the saved login or `HF_TOKEN`.
        revision (`str`, *optional*): An existing branch to commit to (default: the main branch).
        commit_message (`str`, *optional*): Summary of the commit; defaults to one naming the cache.
        create_pr (`bool`, *optional*, defaults to `False`): Open a pull request instead of committing directly.

    Returns:
        `huggingface_hub.CommitInfo`: The commit (`commit_url`, `oid`; `pr_url` with `create_pr`).

    Raises:
        ValueError: `repo_id` is not a valid repo id.
        FileNotFoundError: `cache_dir` does not exist.
        CorruptCacheError: `cache_dir` is not a valid cache (the message names the problem).
        huggingface_hub.errors.HfHubHTTPError: the Hub refused a request (authentication, permissions, ...).
    """
    _check_repo_id(repo_id)
    cache = ActivationCache.load(cache_dir)
    manifest = cache.manifest
    message = commit_message or (
        f"Upload activation cache: {manifest.model_class} at block position {manifest.position}, "
        f"{manifest.codec['name']} codec, fingerprint {manifest.fingerprint}"
    )
    # Beside the cache: the file system that holds it has room for a copy more likely than the system's temp dir.
    parent = os.path.dirname(os.path.abspath(cache.folder))
    with tempfile.TemporaryDirectory(prefix=".freezecache-export-", dir=parent) as scratch:
        if manifest.layout == LAYOUT_PARQUET:
            folder, shards = cache.folder, list(manifest.shards)
        else:
            folder = os.path.join(scratch, "cache")
            shards = list(_export(cache, folder, split="train", max_shard_size="500MB", progress=True).shards)
        api = HfApi(token=token)
        repo = api.create_repo(repo_id, repo_type="dataset", exist_ok=True, private=private)
        return api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=folder,
            repo_type="dataset",
            revision=revision,
            commit_message=message,
            create_pr=create_pr,
            allow_patterns=[MANIFEST_NAME, CARD_NAME, *shards],
            delete_patterns=["data/*"],
        )


def load_cache(
    repo_id_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | None = None,
    download_dir: str | os.PathLike | None = None,
    expected_fingerprint: str | dict[str, str] | None = None,
    verify: bool = True,
) -> ActivationCache:
    """Opens an activation cache from a local folder (either layout) or a Hub dataset repo.

    A Hub repo is downloaded with `huggingface_hub.snapshot_download` (only the manifest, the card and `data/*`;
    files already in the local Hub cache are not downloaded again). Either way the cache is checked before any
    chunk is decoded (`ActivationCache.load`): the manifest's fields, the fingerprint, the shards' checksums, their
    columns and types, the row count and order. Only JSON, Arrow and parquet are read; nothing is unpickled.

    Args:
        repo_id_or_path (`str` or `os.PathLike`): A cache folder, or a Hub dataset repo id (`"namespace/name"`).
            An existing folder wins over a repo of the same name.
        revision (`str`, *optional*): Branch, tag or commit of the Hub repo (default: the main branch).
        token (`str`, *optional*): Hub token, for private repos; default: the saved login or `HF_TOKEN`.
        download_dir (`str` or `os.PathLike`, *optional*): The Hub cache folder to download into (default:
            `HF_HUB_CACHE`).
        expected_fingerprint (`str` or `dict[str, str]`, *optional*): Refuse a cache without this fingerprint (as on
            the card) or these fingerprint parts (`fingerprint_parts(...)`).
        verify (`bool`, *optional*, defaults to `True`): Check the shards' sha256 against the manifest.

    Returns:
        `ActivationCache`: The cache, ready for `CachedActivationDataset`.

    Raises:
        FileNotFoundError: `repo_id_or_path` is neither a folder nor an existing Hub dataset repo.
        CacheMismatchError: the cache does not have `expected_fingerprint`.
        CorruptCacheError: the cache fails a check (the message names the file and the problem).
        ValueError: `revision` is given for a local folder.
    """
    path = os.fspath(repo_id_or_path)
    if os.path.isdir(path):
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repos; {path} is a local folder.")
        return ActivationCache.load(path, expected_fingerprint=expected_fingerprint, verify=verify)
    try:
        validate_repo_id(path)
    except HFValidationError:
        raise FileNotFoundError(
            f"No activation cache at {path!r}: no such folder, and not a Hub repo id ('namespace/name')."
        ) from None
    try:
        folder = snapshot_download(
            path,
            repo_type="dataset",
            revision=revision,
            token=token,
            cache_dir=download_dir,
            allow_patterns=HUB_FILES,
        )
    except RepositoryNotFoundError as error:
        raise FileNotFoundError(
            f"No activation cache at {path!r}: no such folder, and no Hub dataset repo {path!r} (or it is private "
            "and no token with access to it was given)."
        ) from error
    return ActivationCache.load(folder, expected_fingerprint=expected_fingerprint, verify=verify)


def _check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ValueError(
            f"Invalid Hub repo id {repo_id!r}: expected 'namespace/name' or 'name', of letters, digits, '-', '_' and "
            "'.' (not starting or ending with '-' or '.', no '--' or '..', at most 96 characters)."
        ) from None
