"""The last stage of a build, on the main process: the processes' parts gathered into one cache, and its manifest."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

from ...models import model_source
from ..manifest import CacheManifest, cache_fingerprint, file_sha256, row_features
from ..sidecars import Sidecar
from .encode import PartStats
from .prepare import BuildPlan, PrefixRun
from .shards import shard_names, write_dataset_files
from .staging import RemoteStaging, Staging


def gather_parts(
    staging: Staging | RemoteStaging, num_parts: int, plan: BuildPlan
) -> tuple[PartStats, dict[str, str]]:
    """Gathers the processes' shards, in process order, into one `save_to_disk` folder.

    Shards are renamed, never copied: each is written once, by its process. In a local build they are renamed into
    `staging.final`. In a build to a URL, only each part's record (statistics, and the sha256 its process computed
    as it uploaded the shards) is read from the store; `staging.final` gets the folder's small files, and the shards
    are moved on the store when the cache is published (`RemoteStaging.moves`).

    Returns:
        The totals of the parts' statistics, and the sha256 of each gathered shard by file name, in row order.
    """
    if isinstance(staging, RemoteStaging):
        return _gather_uploaded(staging, num_parts, plan)
    totals = PartStats()
    sources = []
    for rank in range(num_parts):
        part = staging.part(rank)
        totals.add(_part_stats(part, rank, staging.path))
        with open(os.path.join(part, "state.json")) as f:
            sources += [os.path.join(part, entry["filename"]) for entry in json.load(f)["_data_files"]]
    os.makedirs(staging.final)
    files = shard_names(len(sources))
    for source, name in zip(sources, files, strict=True):
        os.rename(source, os.path.join(staging.final, name))
    write_dataset_files(staging.final, files, row_features(plan.arrays), staging.fingerprint, totals.rows)
    return totals, {name: file_sha256(os.path.join(staging.final, name)) for name in files}


def _gather_uploaded(staging: RemoteStaging, num_parts: int, plan: BuildPlan) -> tuple[PartStats, dict[str, str]]:
    totals = PartStats()
    sources = []
    for rank in range(num_parts):
        digests = staging.fetch_part(rank)
        totals.add(_part_stats(staging.part(rank) if digests is not None else None, rank, staging.uploads.url))
        sources += [(f"part-{rank:05d}/{name}", digest) for name, digest in digests.items()]
    files = shard_names(len(sources))
    staging.moves = [(staging.uploads, source, name) for (source, _), name in zip(sources, files, strict=True)]
    os.makedirs(staging.final, exist_ok=True)
    write_dataset_files(staging.final, files, row_features(plan.arrays), staging.fingerprint, totals.rows)
    return totals, {name: digest for (_, digest), name in zip(sources, files, strict=True)}


def _part_stats(part: str | None, rank: int, where: str) -> PartStats:
    stats = PartStats.load(part) if part is not None else None
    if stats is None:
        raise RuntimeError(
            f"Process {rank} wrote no part of the cache in {where}: the processes disagree on what they build (their "
            "prefix weights, dataset or options differ), or they do not share the folder (a local --cache_dir must "
            "be on a file system every process sees; a URL must reach the same store from every machine)."
        )
    return stats


def cache_manifest(
    run: PrefixRun,
    plan: BuildPlan,
    sidecars: Sequence[Sidecar],
    *,
    fingerprint_parts: dict[str, str],
    chunk_size: int,
    totals: PartStats,
    shards: dict[str, str],
    build_seconds: float,
    num_processes: int,
) -> CacheManifest:
    """The manifest of the gathered cache.

    Raises:
        RuntimeError: the processes wrote another number of rows than the samples make.
    """
    num_samples = len(run.dataset)
    source_model, source_revision = run.adapter.source or model_source(run.adapter.model)
    manifest = CacheManifest(
        fingerprint=cache_fingerprint(fingerprint_parts),
        fingerprint_parts=fingerprint_parts,
        model_family=run.adapter.family,
        model_class=type(run.adapter.model).__name__,
        position=run.position,
        sample_shape=list(plan.sample_shape),
        dtype="float32",
        codec=plan.codec.config(),
        codec_error=plan.codec_error,
        codec_request=plan.codec_request,
        chunk_size=chunk_size,
        num_samples=num_samples,
        num_chunks=-(-num_samples // chunk_size),
        raw_bytes=int(num_samples * math.prod(plan.sample_shape) * 4),
        stored_bytes=totals.stored,
        build_seconds=build_seconds,
        prefix_forward_flops_per_sample=plan.flops_per_sample,
        build_prefix_passes=1
        + sum(s.extra_prefix_passes for s in sidecars)
        + sum(s.calibration_passes * min(s.calibration_size, num_samples) for s in sidecars) / num_samples,
        source="images",
        shards=shards,
        sidecars={
            sidecar.name: {
                "config": sidecar.config(),
                "summary": sidecar.summary(),
                "arrays": {
                    name: {"shape": list(spec.shape), "dtype": spec.dtype, "stored_bytes": totals.sidecar_bytes[name]}
                    for name, spec in sidecar.arrays(plan.sample_shape).items()
                },
            }
            for sidecar in sidecars
        },
        source_model=source_model,
        source_revision=source_revision,
        num_processes=num_processes,
        model_num_blocks=run.adapter.num_blocks,
    )
    if totals.rows != manifest.num_chunks:
        raise RuntimeError(
            f"The processes wrote {totals.rows} rows in all, {manifest.num_chunks} were expected: a process built "
            "from another dataset or chunk size."
        )
    return manifest
