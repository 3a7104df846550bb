"""Applies faults to fresh copies of the base caches and says what a user of each damaged cache would get.

A user opens a cache as the trainer does (`load_cache`, pinned to the fingerprint it expects: the fingerprint parts
for a cache it built, the card's fingerprint for a Hub export), checks it fits the model (`check_cache_fits_model`),
then reads every row: `decode`, `decode_sidecars`, the labels and indices, every sample through
`CachedActivationDataset`, and the training augmentation built from the manifest (every sample flipped, so the
channel-flip sidecar's channels are used). The outcome of a fault is then one of:

- `refused at load` / `refused when reading`: one of the documented errors (`CorruptCacheError`,
  `CacheMismatchError`, `FileNotFoundError`, `ValueError`), with a one-line message;
- `harmless`: everything read, and the manifest fields that say how the rows are used, equal the original's;
- `SILENT`: accepted, but something read differs from the original;
- `TRACEBACK`: any other exception (or a run past `CPU_BUDGET` seconds of CPU);
- `UNCLEAR`: a documented error whose message is empty, several lines or longer than `MAX_MESSAGE`.
"""

from __future__ import annotations

import dataclasses
import shutil
import signal
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_freezecache.augmentation import FeatureMapAugmentationConfig
from hf_freezecache.cache import (
    ActivationCache,
    CachedActivationDataset,
    CacheMismatchError,
    CorruptCacheError,
    check_cache_fits_model,
    load_cache,
)
from hf_freezecache.discard.config import DiscardConfig
from hf_freezecache.discard.request import requested_augmentation

from .bases import Base, model_adapter
from .generator import Fault

OUTCOMES = ("refused at load", "refused when reading", "harmless", "SILENT", "TRACEBACK", "UNCLEAR")
FAILURES = ("SILENT", "TRACEBACK", "UNCLEAR")
#: Longest message a refusal may have to count as clear (one line naming the file, the field and what is allowed).
MAX_MESSAGE = 600
#: CPU seconds a fault may take before it counts as a hang.
CPU_BUDGET = 60.0
#: Manifest fields that describe the build (sizes, times, costs, the codec's measured error), or say where the shards
#: are, how they are stored and checked: the rows read back show whether a change to them mattered.
REPORT_FIELDS = {
    "raw_bytes",
    "stored_bytes",
    "build_seconds",
    "prefix_forward_flops_per_sample",
    "build_prefix_passes",
    "source",
    "num_processes",
    "codec_error",
    "codec_request",
    "shards",
    "layout",
    "split",
    "seal",
}


class FaultTimeout(BaseException):
    """A fault ran past its CPU budget (a BaseException, so that no `except Exception` in the library hides it)."""


@dataclass
class Reading:
    """Everything a user gets from a cache: the arrays read (by how they were read), the manifest fields that say how
    they are used, and the other manifest fields (`REPORT_FIELDS`)."""

    arrays: dict[str, Any]
    used: dict[str, Any]
    reported: dict[str, Any]


@dataclass
class Result:
    """What became of one fault: the fault's fields, its outcome (`OUTCOMES`), the stage that refused it (`"load"` or
    `"read"`), the error's type and first line (paths under the fault's scratch folder shortened to `<scratch>`),
    what differed or proved it harmless, and how long it took."""

    kind: str
    target: str
    file: str
    description: str
    outcome: str
    stage: str = ""
    error: str = ""
    message: str = ""
    detail: str = ""
    seconds: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)


def pin(base: Base) -> str | dict[str, str]:
    """What a user expects of the base: the fingerprint parts (a cache the trainer built), or the card's
    fingerprint (a Hub export)."""
    return base.fingerprint if base.layout == "parquet" else base.parts


def read_cache(cache: ActivationCache, adapter) -> Reading:
    """Reads every row of `cache` the ways training does (see the module docstring)."""
    check_cache_fits_model(cache, adapter)
    rows = range(cache.num_chunks)
    arrays: dict[str, Any] = {
        "decode": [cache.decode(row) for row in rows],
        "decode_sidecars": [cache.decode_sidecars(row) for row in rows],
        "labels": cache.labels,
        "indices": np.concatenate([np.asarray(row, np.int64) for row in cache.rows["indices"]]),
    }
    dataset = CachedActivationDataset(cache, decode_threads=1, memory="disk", progress=False)
    items = dataset.__getitems__(list(range(len(dataset))))
    samples = torch.stack([item["prefix_activations"] for item in items])
    sidecar = {key[len("sidecar.") :]: torch.stack([i[key] for i in items]) for key in items[0] if "sidecar." in key}
    options = DiscardConfig(augmentations={"feature-maps": FeatureMapAugmentationConfig(1.0, crop_padding=0.0)})
    augmentation = requested_augmentation(options, adapter, cache.manifest)
    flipped = augmentation(samples, sidecar or None, generator=torch.Generator().manual_seed(0))
    arrays.update(
        samples=samples.numpy(),
        sample_labels=np.array([item["labels"] for item in items]),
        sample_sidecars={name: value.numpy() for name, value in sidecar.items()},
        augmented=flipped.numpy(),
    )
    manifest = dataclasses.asdict(cache.manifest)
    for sidecar_fields in manifest["sidecars"].values():  # the calibration scores are reported, not used
        sidecar_fields["summary"] = {k: v for k, v in sidecar_fields["summary"].items() if k == "channels"}
        for spec in sidecar_fields["arrays"].values():
            spec.pop("stored_bytes", None)
    used = {k: v for k, v in manifest.items() if k not in REPORT_FIELDS}
    return Reading(arrays, used, {k: v for k, v in manifest.items() if k in REPORT_FIELDS})


def reference(base: Base) -> Reading:
    """The reading of the undamaged base."""
    return read_cache(load_cache(base.folder, expected_fingerprint=pin(base)), model_adapter(base.spec))


def same(a: Any, b: Any) -> bool:
    """Whether two readings' values are equal: same types, and arrays of the same dtype, shape and values."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return type(a) is type(b) and a == b


def _differing(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    return [name for name in sorted(set(ours) | set(theirs)) if not same(ours.get(name), theirs.get(name))]


def differences(reading: Reading, expected: Reading) -> list[str]:
    """What a user gets differently from `reading` than from `expected`: arrays, and fields that say how they are
    used."""
    return _differing(reading.arrays, expected.arrays) + _differing(reading.used, expected.used)


@contextmanager
def cpu_budget(seconds: float) -> Iterator[None]:
    """Raises `FaultTimeout` in the main thread after `seconds` of CPU time (a no-op in other threads)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise FaultTimeout(f"still running after {seconds:g} s of CPU time (a hang)")

    previous = signal.signal(signal.SIGPROF, expire)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


def is_user_error(error: BaseException) -> bool:
    """One of the documented kinds: the cache errors (and their subclasses), or a plain `FileNotFoundError` or
    `ValueError` (a subclass from elsewhere, e.g. pyarrow's `ArrowInvalid`, is a leak)."""
    if isinstance(error, (CorruptCacheError, CacheMismatchError)):
        return True
    return type(error) in (FileNotFoundError, ValueError) or (
        isinstance(error, (FileNotFoundError, ValueError)) and type(error).__module__.startswith("hf_freezecache")
    )


def refusal(stage: str, error: BaseException, scratch: Path) -> dict[str, Any]:
    """The outcome, error type, first message line and detail of `error` raised at `stage` ("load" or "read")."""
    message = str(error).replace(str(scratch), "<scratch>")
    first = message.splitlines()[0] if message.strip() else ""
    fields = {"stage": stage, "error": type(error).__name__, "message": first}
    if not is_user_error(error):
        where = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
        place = f" at {Path(where.filename).name}:{where.lineno} ({where.name})" if where else ""
        return {**fields, "outcome": "TRACEBACK", "detail": f"{type(error).__name__}{place}"}
    if not first or "\n" in message.strip() or len(message) > MAX_MESSAGE:
        return {**fields, "outcome": "UNCLEAR", "detail": f"{len(message.splitlines())} lines, {len(message)} chars"}
    return {**fields, "outcome": "refused at load" if stage == "load" else "refused when reading"}


def observe(folder: Path, base: Base, expected: Reading, adapter, scratch: Path) -> dict[str, Any]:
    """Opens and reads the cache in `folder` as a user of `base` would, and says what came of it."""
    stage = "load"
    try:
        with cpu_budget(CPU_BUDGET):
            cache = load_cache(folder, expected_fingerprint=pin(base))
            stage = "read"
            reading = read_cache(cache, adapter)
    except (Exception, FaultTimeout) as error:
        return refusal(stage, error, scratch)
    differing = differences(reading, expected)
    if differing:
        return {"outcome": "SILENT", "stage": "read", "detail": f"accepted; differs in {', '.join(differing)}"}
    changed = _differing(reading.reported, expected.reported)
    return {
        "outcome": "harmless",
        "detail": f"same rows; reported fields differ: {', '.join(changed)}" if changed else "",
    }


class Runner:
    """Runs faults against the bases, each on a fresh copy, and compares what is read with the undamaged base's.

    Args:
        bases (`dict[str, Base]`): The built bases (`bases.build_bases`).
        scratch (`str` or `Path`): Where the copies go (each removed once observed).
    """

    def __init__(self, bases: dict[str, Base], scratch: str | Path) -> None:
        self.bases, self.scratch = bases, Path(scratch)
        self.donors = {name: base.folder for name, base in bases.items()}
        self._references: dict[str, Reading] = {}
        self._adapters: dict[str, Any] = {}

    def expected(self, target: str) -> Reading:
        """The reading of the undamaged base `target` (read once)."""
        if target not in self._references:
            self._references[target] = reference(self.bases[target])
        return self._references[target]

    def adapter(self, target: str):
        """The block adapter of the model of base `target`, whose suffix reads the cache (built once)."""
        if target not in self._adapters:
            self._adapters[target] = model_adapter(self.bases[target].spec)
        return self._adapters[target]

    def run(self, fault: Fault, index: int) -> Result:
        """Applies `fault` to a fresh copy of its target (in `scratch/fault-<index>`) and observes the copy."""
        base, expected, adapter = self.bases[fault.target], self.expected(fault.target), self.adapter(fault.target)
        work = self.scratch / f"fault-{index:04d}"
        folder = work / "cache"
        start = time.perf_counter()
        shutil.copytree(base.folder, folder, symlinks=True)
        fault.apply(folder, self.donors)
        found = observe(folder, base, expected, adapter, work)
        shutil.rmtree(work, ignore_errors=True)
        fields = dataclasses.asdict(fault)
        return Result(**fields, **found, seconds=time.perf_counter() - start)


def tally(results: list[Result]) -> dict[str, Counter]:
    """Outcomes by fault kind."""
    table: dict[str, Counter] = {}
    for result in results:
        table.setdefault(result.kind, Counter())[result.outcome] += 1
    return table
