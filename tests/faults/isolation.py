"""Runs faults in a child process, so that a fault that crashes the interpreter (a segfault in a decompressor) or
hangs in native code is recorded as a `TRACEBACK` instead of ending the campaign; the child is restarted after."""

from __future__ import annotations

import multiprocessing
from multiprocessing.connection import Connection
from pathlib import Path

from .bases import Base
from .generator import Fault
from .kills import run_kill
from .runner import Result, Runner


def _serve(connection: Connection, bases: dict[str, Base], scratch: Path) -> None:
    runner = Runner(bases, scratch)
    while (job := _next(connection)) is not None:
        index, fault = job
        connection.send(run_kill(runner, fault, index) if fault.kind == "kill" else runner.run(fault, index))


def _next(connection: Connection) -> tuple[int, Fault] | None:
    try:
        return connection.recv()
    except EOFError:  # the campaign ended without `close`
        return None


class IsolatedRunner:
    """Runs each fault (or kill) in a spawned child process that serves them one after the other.

    Args:
        bases (`dict[str, Base]`): The built bases.
        scratch (`Path`): Where the copies go.
        timeout (`float`): Wall-clock seconds a fault may take before the child is killed and the fault counted as
            a hang.
    """

    def __init__(self, bases: dict[str, Base], scratch: str | Path, timeout: float = 300.0) -> None:
        self.bases, self.scratch, self.timeout = bases, Path(scratch), timeout
        self._process = None
        self._connection: Connection | None = None

    def run(self, fault: Fault, index: int) -> Result:
        if self._process is None:
            self._connection, theirs = multiprocessing.Pipe()
            context = multiprocessing.get_context("spawn")
            # Not a daemon: the kills fork children of their own. It ends when the pipe closes, with this process.
            self._process = context.Process(target=_serve, args=(theirs, self.bases, self.scratch))
            self._process.start()
        self._connection.send((index, fault))
        # The first fault also waits for the child's imports.
        if self._connection.poll(self.timeout):
            try:
                return self._connection.recv()
            except EOFError:
                pass
        else:
            self._process.kill()
        self._process.join()
        code = self._process.exitcode
        self._process = None
        what = (
            f"no answer within {self.timeout:g} s (a hang)" if code == -9 else f"the process died (exit code {code})"
        )
        return Result(
            kind=fault.kind,
            target=fault.target,
            file=fault.file,
            description=fault.description,
            params=fault.params,
            outcome="TRACEBACK",
            error="crash",
            detail=what,
        )

    def close(self) -> None:
        if self._process is not None:
            self._connection.send(None)
            self._process.join()
            self._process = None
