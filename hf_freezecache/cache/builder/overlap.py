"""One process's part of a cache, its stages overlapped: the prefix runs on the calling thread while the previous
batches' chunks encode on a thread pool and a writer thread appends their rows, in order, to the shards."""

from __future__ import annotations

import contextlib
import math
import os
import queue
import threading
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from ..manifest import row_features
from .encode import EncodedRows, PartStats, encoded_rows
from .prepare import BuildPlan
from .shards import ShardWriter
from .staging import Staging

T = TypeVar("T")

# Batches of rows queued for the writer: with the batch the prefix computes and the one being written, memory holds
# this many plus two batches of activations and their encodes, whatever the size of the share.
_QUEUED_BATCHES = 2
_END = object()


def write_part(
    batches: Generator[dict[str, np.ndarray], None, None],
    first_index: int,
    stats: PartStats,
    plan: BuildPlan,
    chunk_size: int,
    threads: int,
    staging: Staging,
    rank: int,
    max_shard_size: str | int,
) -> None:
    """Encodes and writes process `rank`'s batches into `staging.part(rank)`, then their statistics `stats`.

    The part is a `save_to_disk` folder whose shards are written once, by one writer thread, in sample order. Its
    fingerprint is given (the build's, with the process index), so the shards are the same bytes on every run.

    Args:
        batches (`Generator`): The prefix's batches (`prefix_batches`), computed as the writer asks for them.
        first_index (`int`): Index of the first sample of the batches.
        stats (`PartStats`): Counts the rows as they are written.
        plan (`BuildPlan`): Gives the codec, the columns and the size of a row.
        chunk_size (`int`): Samples per row.
        threads (`int`): Threads encoding chunks.
        staging (`Staging`): Where to write.
        rank (`int`): The process index.
        max_shard_size (`str` or `int`): Largest Arrow shard (`"500MB"`, as `Dataset.save_to_disk` takes it).

    Raises:
        Exception: the first error of the prefix, of an encode or of the writer, as raised; no thread is left
            running.
    """
    part = staging.part(rank)
    os.makedirs(part)
    sample_bytes = 4 * (math.prod(plan.sample_shape) + sum(math.prod(a.shape) for a in plan.arrays.values()))
    features = row_features(plan.arrays)
    with ShardWriter(part, features, max_shard_size, sample_bytes * chunk_size, staging.fingerprint) as shards:

        def write(rows: EncodedRows) -> None:
            columns = rows.columns()
            shards.write(columns)
            stats.count(columns)

        pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="freezecache-encode")
        try:
            with contextlib.closing(batches):
                _overlapped(encoded_rows(batches, first_index, chunk_size, plan, pool), write, EncodedRows.cancel)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        shards.finish(f"{staging.fingerprint}-{rank}")
    stats.save(part)


def _overlapped(items: Generator[T, None, None], consume: Callable[[T], None], discard: Callable[[T], None]) -> None:
    """Consumes `items` in order on a writer thread while the calling thread produces the next ones.

    At most `_QUEUED_BATCHES` items wait between the two. An error on either side stops both: `items` is closed,
    the items not consumed are `discard`ed, the writer thread has ended, and the error is raised here, with its own
    traceback.
    """
    waiting: queue.Queue = queue.Queue(maxsize=_QUEUED_BATCHES)
    errors: list[BaseException] = []
    stopped = threading.Event()

    def drain() -> None:
        # Runs until `_END` whatever happens, so the producer never blocks on a full queue.
        while (item := waiting.get()) is not _END:
            if errors or stopped.is_set():
                discard(item)
                continue
            try:
                consume(item)
            except BaseException as error:  # raised again on the calling thread
                errors.append(error)
                discard(item)

    writer = threading.Thread(target=drain, name="freezecache-writer")
    writer.start()
    try:
        with contextlib.closing(items):
            for item in items:
                waiting.put(item)
                if errors:
                    break
    except BaseException:
        stopped.set()
        raise
    finally:
        waiting.put(_END)
        writer.join()
    if errors:
        raise errors[0]
