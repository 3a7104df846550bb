"""One process's rows, streamed into Arrow shards (`Dataset.from_generator`, then `save_to_disk`)."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import datasets
from datasets.exceptions import DatasetGenerationError

from ..manifest import row_features
from .encode import PartStats
from .prepare import BuildPlan
from .staging import Staging

# Rows buffered in memory by the Arrow writer: about this many bytes at a time, whatever the activation size.
_WRITER_BUFFER_BYTES = 64 << 20


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    # Our own progress bar covers the build; `datasets`' per-step bars would only add noise.
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def write_part(
    rows: Callable[[], Iterator[dict[str, Any]]] | None,
    stats: PartStats,
    plan: BuildPlan,
    chunk_size: int,
    staging: Staging,
    rank: int,
    max_shard_size: str | int,
) -> None:
    """Writes process `rank`'s rows into `staging.part(rank)`, then their statistics `stats` once they are complete.

    Memory holds a bounded writer buffer, never the whole part. The `datasets` fingerprint is given (the
    build's, with the process index), so nothing is hashed and the shards are the same bytes on every run.

    Args:
        rows (`Callable`, *optional*): Makes the generator of the rows (`encoded_rows`); None for an empty share.
        stats (`PartStats`): Filled by the rows as they are generated.
        plan (`BuildPlan`): Gives the columns and the size of a row.
        chunk_size (`int`): Samples per row.
        staging (`Staging`): Where to write.
        rank (`int`): The process index.
        max_shard_size (`str` or `int`): Largest Arrow shard (`Dataset.save_to_disk`).
    """
    part = staging.part(rank)
    if rows is None:
        os.makedirs(part)
    else:
        sample_bytes = 4 * (math.prod(plan.sample_shape) + sum(math.prod(a.shape) for a in plan.arrays.values()))
        with _quiet_datasets():
            try:
                generated = datasets.Dataset.from_generator(
                    rows,
                    features=row_features(plan.arrays),
                    cache_dir=staging.scratch(rank),
                    fingerprint=f"{staging.fingerprint}-{rank}",
                    writer_batch_size=max(1, _WRITER_BUFFER_BYTES // max(1, sample_bytes * chunk_size)),
                )
            except DatasetGenerationError as error:
                # What failed is the prefix, a sidecar or an image, not `datasets`: its message is the one to give.
                if isinstance(error.__cause__, Exception):
                    raise error.__cause__ from None
                raise
            generated.save_to_disk(part, max_shard_size=max_shard_size)
            del generated
    stats.save(part)
