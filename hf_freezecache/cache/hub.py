"""Sharing activation caches: export (in the Hub layout, `export.py`), upload to the Hub, and loading from a folder,
a Hub repo or a URL (`store.py`).

A cache on the Hub is a dataset repo that `datasets.load_dataset` reads like any other (`data/<split>-*.parquet`,
declared in the card's `configs`), plus the cache's manifest, whose `shards` hold the sha256 of every parquet file.
`load_cache` trusts nothing it downloads: `ActivationCache.load` checks the manifest, the checksums, the columns and
the rows before any chunk is decoded, and only JSON and parquet are read (never a pickle).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any

from huggingface_hub import CommitInfo, HfApi, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .export import write_hub_layout
from .manifest import CARD_NAME, LAYOUT_PARQUET, MANIFEST_NAME
from .reader import ActivationCache
from .store import CacheStore, is_url, local_scratch

logger = logging.getLogger(__name__)

#: What a cache repo holds; the rest of a repo (e.g. `.gitattributes`) is neither downloaded nor needed.
HUB_FILES = [MANIFEST_NAME, CARD_NAME, "data/*"]


def export_cache(
    cache_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    split: str = "train",
    max_shard_size: str | int = "500MB",
    progress: bool = True,
    storage_options: dict[str, Any] | None = None,
    local_dir: str | os.PathLike | None = None,
) -> str:
    """Writes the cache in `cache_dir` in the Hub dataset-repo layout, ready for `push_cache_to_hub`.

    `output_dir` gets `data/<split>-NNNNN-of-NNNNN.parquet` (the rows, in order, in shards of at most about
    `max_shard_size`), the manifest (its `shards` now the parquet files' sha256, its `layout` `"parquet"`) and the
    dataset card, whose `configs` let `datasets.load_dataset(output_dir)` load the rows as split `split`. The cache
    is checked (`ActivationCache.load`, checksums included) before anything is written; the folder is written under
    a temporary name and renamed once complete. The fingerprint is unchanged: the rows are the same bytes.

    Either may be a URL (`load_cache`): an export to a URL is written locally, then uploaded, its manifest last.

    Args:
        cache_dir (`str` or `os.PathLike`): A cache folder (in either layout) or URL.
        output_dir (`str` or `os.PathLike`): Where to write; must not exist or be empty.
        split (`str`, *optional*, defaults to `"train"`): The split name of the rows (letters, digits, `_`).
        max_shard_size (`str` or `int`, *optional*, defaults to `"500MB"`): Largest parquet shard, in bytes or
            as a string like `"500MB"`; a row is never split, so a shard holds at least one row.
        progress (`bool`, *optional*, defaults to `True`): Show a progress bar over the shards.
        storage_options (`dict`, *optional*): Options of the store of a URL (credentials, endpoint...).
        local_dir (`str`, *optional*): Local folder of the download of a URL `cache_dir`, and of the export to a
            URL `output_dir` before it is uploaded (default `$HF_HOME/hf_freezecache`).

    Returns:
        `str`: The absolute path of `output_dir`, or its URL.

    Raises:
        FileNotFoundError: `cache_dir` does not exist.
        CorruptCacheError: `cache_dir` is not a valid cache (the message names the problem).
        FileExistsError: `output_dir` exists and is not empty.
        ValueError: `split` or `max_shard_size` is invalid, or `output_dir` is `cache_dir`.
    """
    if is_url(cache_dir):
        cache = load_cache(cache_dir, storage_options=storage_options, download_dir=local_dir, progress=progress)
    else:
        cache = ActivationCache.load(cache_dir)
    options = dict(split=split, max_shard_size=max_shard_size, progress=progress)
    if not is_url(output_dir):
        write_hub_layout(cache, os.path.abspath(output_dir), **options)
        return os.path.abspath(output_dir)
    store = CacheStore(os.fspath(output_dir), storage_options)
    if not store.is_empty():
        raise FileExistsError(f"{store.url} exists and is not empty: export_cache writes into a new folder.")
    scratch = local_scratch(local_dir, "export-")
    try:
        manifest = write_hub_layout(cache, os.path.join(scratch, "cache"), **options)
        store.publish(os.path.join(scratch, "cache"), list(manifest.shards), progress=progress)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return store.url


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
            shards = list(write_hub_layout(cache, folder, split="train", max_shard_size="500MB", progress=True).shards)
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
    storage_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> ActivationCache:
    """Opens an activation cache from a local folder (either layout), a Hub dataset repo, or a URL on any fsspec
    store (`s3://bucket/path`, `gs://`, `hf://`, `file://`, `memory://`).

    A Hub repo is downloaded with `huggingface_hub.snapshot_download` (only the manifest, the card and `data/*`;
    files already in the local Hub cache are not downloaded again); a URL is copied by `CacheStore.download` (the
    manifest checked before any shard is fetched, each shard checked as it arrives; a later call reuses the copy).
    Either way the cache is checked before any chunk is decoded (`ActivationCache.load`): the manifest's fields, the
    fingerprint, the shards' checksums, their columns and types, the row count and order. Only JSON, Arrow and
    parquet are read; nothing is unpickled.

    Args:
        repo_id_or_path (`str` or `os.PathLike`): A cache folder, a Hub dataset repo id (`"namespace/name"`), or a
            URL (`protocol://...`). An existing folder wins over a repo of the same name.
        revision (`str`, *optional*): Branch, tag or commit of the Hub repo (default: the main branch).
        token (`str`, *optional*): Hub token, for private repos; default: the saved login or `HF_TOKEN`.
        download_dir (`str` or `os.PathLike`, *optional*): The Hub cache folder to download into (default:
            `HF_HUB_CACHE`), or for a URL the folder of the local copies.
        expected_fingerprint (`str` or `dict[str, str]`, *optional*): Refuse a cache without this fingerprint (as on
            the card) or these fingerprint parts (`fingerprint_parts(...)`).
        verify (`bool`, *optional*, defaults to `True`): Check the shards' sha256 against the manifest.
        storage_options (`dict`, *optional*): Options of the store of a URL (credentials, endpoint...), as
            `fsspec.filesystem` takes them.
        progress (`bool`, *optional*, defaults to `True`): Show a progress bar while downloading from a URL.

    Returns:
        `ActivationCache`: The cache, ready for `CachedActivationDataset`.

    Raises:
        FileNotFoundError: `repo_id_or_path` is neither a folder nor an existing Hub dataset repo, or a URL without
            a cache manifest.
        CacheMismatchError: the cache does not have `expected_fingerprint`.
        CorruptCacheError: the cache fails a check (the message names the file and the problem).
        ValueError: `revision` is given for a local folder or a URL, or the URL's store cannot be opened.
    """
    path = os.fspath(repo_id_or_path)
    if is_url(path):
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repo ids; {path} is a URL.")
        store = CacheStore(path, storage_options)
        folder = store.download(download_dir, expected_fingerprint=expected_fingerprint, progress=progress)
        return ActivationCache.load(folder, expected_fingerprint=expected_fingerprint, verify=verify)
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
