"""`kill -9` during cache builds: afterwards the folder must hold the previous complete cache, the new complete
cache, or nothing loadable.

The build runs in a child process forked from this one (it has torch and the library imported already, so a kill
costs a fraction of a second instead of a fresh interpreter's imports), over a copy of the previous cache or an
empty place, and is killed with SIGKILL after a random fraction of the base's measured build time.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import random
import shutil
import signal
import time
from pathlib import Path

from hf_freezecache.cache import load_cache

from .bases import Base, build_base
from .generator import Fault
from .runner import CPU_BUDGET, FaultTimeout, Result, Runner, cpu_budget, differences, read_cache, refusal

#: `(the base rebuilt, the base whose cache is in the folder before, or None)`.
KILL_PLANS = [
    ("fp16-other-weights", "fp16"),  # a rebuild over a cache of the same shape
    ("zfp-flip", None),  # a first build, with the channel-flip sidecar's calibration
    ("codebook", "codebook-resnet32"),  # several shards, over another model's cache
    ("codebook-position-6", None),
    ("zfp-flip-other-weights", "zfp-flip"),
]
# Kill times are drawn up to this multiple of the base's build time, so that some builds finish first.
_SPAN = 1.2


def kill_faults(seed: int, n: int) -> list[Fault]:
    """Draws kills: the plans of `KILL_PLANS` in turn (shuffled by `seed`), each at a random point of the build.

    Args:
        seed (`int`): Seeds the order and the kill times.
        n (`int`): How many.

    Returns:
        `list[Fault]`: Faults of kind `"kill"` (run them with `run_kill`).
    """
    rng = random.Random(seed)
    plans: list[tuple[str, str | None]] = []
    while len(plans) < n:
        plans += rng.sample(KILL_PLANS, len(KILL_PLANS))
    kills = []
    for build, previous in plans[:n]:
        fraction = rng.random()
        over = f"over a copy of {previous}" if previous else "into an empty place"
        description = f"{build}: kill -9 the build {over} at {fraction:.0%} of its build time"
        kills.append(Fault("kill", build, "folder", {"previous": previous, "fraction": fraction}, description))
    return kills


def run_kill(runner: Runner, fault: Fault, index: int) -> Result:
    """Builds `fault.target` in a forked child over a copy of `fault.params["previous"]` (or into an empty place),
    kills it, and says what a user finds there.

    Args:
        runner (`Runner`): The runner of the campaign (its bases, their readings and scratch folder).
        fault (`Fault`): A fault of `kill_faults`.
        index (`int`): Numbers its scratch folder.

    Returns:
        `Result`: `harmless` when the folder holds the previous or the new complete cache (the detail says which,
        and any staging folder the build left beside it), `refused at load` when nothing there loads.
    """
    bases, previous = runner.bases, fault.params["previous"]
    work = runner.scratch / f"kill-{index:04d}"
    folder = work / "cache"
    work.mkdir(parents=True)
    if previous:
        shutil.copytree(bases[previous].folder, folder)
    start = time.perf_counter()
    child = multiprocessing.get_context("fork").Process(
        target=build_base, args=(bases[fault.target].spec, str(folder))
    )
    child.start()
    time.sleep(fault.params["fraction"] * _SPAN * bases[fault.target].build_seconds)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    found = _left_behind(runner, folder, fault.target, previous, work)
    staging = [p.name for p in work.iterdir() if ".partial-" in p.name]
    found["detail"] = "; ".join(filter(None, [found.get("detail"), f"staging left: {staging}" if staging else ""]))
    shutil.rmtree(work, ignore_errors=True)
    return Result(**dataclasses.asdict(fault), **found, seconds=time.perf_counter() - start)


def _left_behind(runner: Runner, folder: Path, built: str, previous: str | None, work: Path) -> dict:
    """What a user finds in `folder`: nothing loadable, or a complete cache equal to the previous or the new one."""
    candidates: dict[str, Base] = {runner.bases[built].fingerprint: runner.bases[built]}
    if previous:
        candidates[runner.bases[previous].fingerprint] = runner.bases[previous]
    stage = "load"
    try:
        with cpu_budget(CPU_BUDGET):
            cache = load_cache(folder)
            base = candidates.get(cache.manifest.fingerprint)
            if base is None:
                return {"outcome": "SILENT", "detail": f"a cache of neither build ({cache.manifest.fingerprint})"}
            stage = "read"
            reading = read_cache(cache, runner.adapter(base.name))
    except (Exception, FaultTimeout) as error:
        return refusal(stage, error, work)
    differing = differences(reading, runner.expected(base.name))
    if differing:
        return {"outcome": "SILENT", "detail": f"{base.name}'s fingerprint, but differs in {', '.join(differing)}"}
    which = "the previous" if base.name == previous else "the new"
    return {"outcome": "harmless", "detail": f"{which} complete cache"}
