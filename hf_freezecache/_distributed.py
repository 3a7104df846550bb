"""Keeping the processes of a distributed run together: one decision for all of them, and one failure stops all.

Every function here is a collective: each process of the group must call it, in the same order. With no group (or a
group of one process) they cost nothing, so single-process code calls them unconditionally.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import torch.distributed as dist

T = TypeVar("T")


class ProcessGroup(Protocol):
    """What hf_freezecache needs of accelerate's `PartialState` (or `Accelerator`): who this process is, how many
    there are, and a barrier. The collectives run on torch's default process group, which accelerate initialises."""

    process_index: int
    num_processes: int

    def wait_for_everyone(self) -> None: ...


class ProcessFailure(RuntimeError):
    """Raised on the processes that did not fail when another one did, with that process's message."""


def _distributed(processes: ProcessGroup | None) -> bool:
    if processes is None or processes.num_processes <= 1:
        return False
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{processes.num_processes} processes are declared but torch.distributed is not initialised: create the "
            "accelerate `PartialState` (or `Accelerator`) before building or reading caches together."
        )
    return True


def gather_objects(value: T, processes: ProcessGroup | None) -> list[T]:
    """Every process's `value` (picklable), in process order, on every process."""
    if not _distributed(processes):
        return [value]
    gathered: list[Any] = [None] * processes.num_processes
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_from_main(value: T, processes: ProcessGroup | None) -> T:
    """The main process's `value` (picklable), on every process: how a decision taken once reaches all of them."""
    if not _distributed(processes):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def all_or_none(processes: ProcessGroup | None, what: str) -> Iterator[None]:
    """Runs a block on every process, then lets every process know whether it failed anywhere.

    At the end of the block the processes exchange one status each (a collective: the block acts as a barrier). If
    the block raised on some process, that process re-raises its own exception and every other one raises a
    `ProcessFailure` naming the failed process and its message, so the launch stops within seconds with the same
    message everywhere, instead of the others waiting in their next collective until the launcher's timeout.

    Args:
        processes (`ProcessGroup`, *optional*): The processes running the block together; None for one process.
        what (`str`): What the block does, for the message ("building the activation cache at block 3").
    """
    error: BaseException | None = None
    try:
        yield
    except Exception as raised:  # not KeyboardInterrupt/SystemExit: those end the process as they should
        error = raised
    if not _distributed(processes):
        if error is not None:
            raise error
        return
    status = None if error is None else f"{type(error).__name__}: {error}"
    failures = [(rank, message) for rank, message in enumerate(gather_objects(status, processes)) if message]
    if error is not None:
        raise error
    if failures:
        rank, message = failures[0]
        raise ProcessFailure(f"{what} failed on process {rank} of {processes.num_processes}: {message}")


def main_process_result(compute: Callable[[], T], processes: ProcessGroup | None, what: str) -> T:
    """Runs `compute` on every process and returns the main process's result everywhere, in one collective.

    The decision a process takes from its own state (BatchNorm statistics, a probe batch) may differ from another's;
    applying the main process's everywhere keeps them in step. If `compute` raises anywhere, every process raises
    (the failing one its own exception, the others a `ProcessFailure` with its message), as in `all_or_none`.
    """
    error: Exception | None = None
    result: Any = None
    try:
        result = compute()
    except Exception as raised:
        error = raised
    if not _distributed(processes):
        if error is not None:
            raise error
        return result
    status = None if error is None else f"{type(error).__name__}: {error}"
    gathered = gather_objects((status, result if error is None else None), processes)
    if error is not None:
        raise error
    failures = [(rank, message) for rank, (message, _) in enumerate(gathered) if message]
    if failures:
        rank, message = failures[0]
        raise ProcessFailure(f"{what} failed on process {rank} of {processes.num_processes}: {message}")
    return gathered[0][1]
