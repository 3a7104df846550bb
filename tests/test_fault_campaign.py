"""A slice of the fault campaign (recipes/fault_campaign.py runs all of it, the machinery is in tests/faults/): 60
seeded faults over activation caches and their Hub exports, covering every kind of fault and of file, and 3
`kill -9`s during builds. Each must be refused with a documented one-line error or be provably harmless (the same
rows, labels, indices, sidecars and augmented batch read back): never accepted with other data, never another
exception."""

from __future__ import annotations

import datasets
import pyarrow as pa
import pytest
from faults.bases import TARGETS, build_bases
from faults.damage import read_manifest
from faults.generator import FILE_KINDS, KINDS, faults, field_group, field_holders
from faults.kills import kill_faults, run_kill
from faults.runner import FAILURES, OUTCOMES, Runner, differences, refusal
from faults.values import VALUE_CLASSES

from hf_freezecache.cache import CacheMismatchError, CorruptCacheError

SEED, FAULTS, KILLS = 0, 60, 3


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> Runner:
    # Parquet shards are converted into the `datasets` cache when read: keep that out of the home folder.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets-cache")))
        root = tmp_path_factory.mktemp("faults")
        yield Runner(build_bases(root / "bases"), root / "scratch")


@pytest.fixture(scope="module")
def manifests(runner) -> dict:
    return {name: read_manifest(runner.bases[name].folder) for name in TARGETS}


@pytest.fixture(scope="module")
def results(runner, manifests) -> list:
    found = [runner.run(fault, index) for index, fault in enumerate(faults(SEED, FAULTS, manifests))]
    return found + [run_kill(runner, fault, index) for index, fault in enumerate(kill_faults(SEED, KILLS))]


def test_no_fault_is_accepted_with_other_data_or_answered_with_a_traceback(results):
    failures = [
        f"{r.outcome}: {r.description}: {r.detail} {r.error} {r.message}" for r in results if r.outcome in FAILURES
    ]
    assert not failures, f"{len(failures)} of {len(results)} faults:\n" + "\n".join(failures)


def test_the_slice_covers_every_kind_of_fault_and_of_file(results, runner):
    assert {r.kind for r in results} == {*KINDS, "kill"}
    flipped = {(runner.bases[r.target].layout, r.file) for r in results if r.kind == "byte-flip"}
    assert flipped == set(FILE_KINDS)
    assert {r.target for r in results if r.kind != "kill"} == set(TARGETS)
    assert {r.outcome for r in results} <= set(OUTCOMES)
    # Both refusals and harmless faults occur: the runner tells them apart.
    assert {"refused at load", "harmless"} <= {r.outcome for r in results}


def test_kills_leave_the_previous_cache_the_new_one_or_nothing_loadable(results):
    kills = [r for r in results if r.kind == "kill"]
    assert len(kills) == KILLS
    assert all(r.outcome in ("harmless", "refused at load") for r in kills), [(r.description, r.detail) for r in kills]
    assert all(
        r.detail.split(";")[0] in ("the previous complete cache", "the new complete cache")
        for r in kills
        if r.outcome == "harmless"
    )


def test_the_generator_is_seeded_and_draws_hundreds_of_distinct_faults(manifests):
    drawn = faults(SEED, 300, manifests)
    assert drawn == faults(SEED, 300, manifests)
    assert drawn != faults(SEED + 1, 300, manifests)
    assert len({(f.kind, f.target, repr(f.params)) for f in drawn}) >= 200
    assert drawn[:FAULTS] == faults(SEED, FAULTS, manifests)  # the slice is the campaign's beginning
    # Every field of every target's manifest is edited, each value class used.
    edited = [f.params for f in drawn if f.kind == "manifest-field"]
    assert {field_group(tuple(p["field"])) for p in edited} == set(field_holders(manifests))
    assert {p["value_class"] for p in edited} == set(VALUE_CLASSES)


def test_the_runner_tells_other_data_from_the_same_data(runner):
    # Another model's weights decode to other rows; the Hub export of a cache reads back as the cache itself.
    assert {"decode", "samples", "augmented"} <= set(
        differences(runner.expected("fp16-other-weights"), runner.expected("fp16"))
    )
    assert differences(runner.expected("parquet"), runner.expected("zfp-flip")) == []


@pytest.mark.parametrize(
    "error, outcome",
    [
        (CorruptCacheError("shard x is missing."), "refused at load"),
        (CacheMismatchError("built for another position."), "refused at load"),
        (FileNotFoundError("No activation cache at x."), "refused at load"),
        (KeyError("codec"), "TRACEBACK"),
        (pa.ArrowInvalid("Invalid IPC stream"), "TRACEBACK"),  # a ValueError, but not one of ours
        (CorruptCacheError("two\nlines"), "UNCLEAR"),
        (CorruptCacheError(""), "UNCLEAR"),
    ],
)
def test_refusals_are_classified_by_kind_and_message(error, outcome, tmp_path):
    assert refusal("load", error, tmp_path)["outcome"] == outcome
