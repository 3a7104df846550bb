"""The SmartFRZ history corpus and the predictor fitted on it: the plan, the on-disk format (a `datasets` dataset with
its manifest and card), refusal of an altered corpus, leave-one-family-out splitting, cross-validation, and the two
recipes end to end on a tiny plan (build, resume, pack, fit, load the predictor into the policy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from hf_freezecache.models import CifarResNet, get_block_adapter
from hf_freezecache.policies import SmartFRZConfig, TrainingProgress, build_policy
from hf_freezecache.policies.smartfrz import FreezePredictor
from hf_freezecache.policies.smartfrz.corpus import RunHistory, leave_one_family_out, load_corpus, write_corpus
from hf_freezecache.policies.smartfrz.fitting import PredictorRecipe, cross_validate
from hf_freezecache.policies.smartfrz.plan import read_plan
from hf_freezecache.policies.smartfrz.recording import label_freeze_points

ROOT = Path(__file__).resolve().parents[1]


def _history(name: str, family: str, blocks: int = 3, records: int = 12, seed: int = 0) -> RunHistory:
    """A run whose blocks move less and less, later blocks later, with CKA settling as they slow down."""
    rng = np.random.default_rng(seed)
    decay = np.exp(-np.arange(records)[:, None] / (2.0 + np.arange(blocks)[None, :]))  # (records, blocks)
    steps = rng.normal(size=(records, blocks, 16)) * decay[..., None]
    weights = (rng.normal(size=(1, blocks, 16)) + steps.cumsum(axis=0)).astype(np.float32)
    cka = 0.9 - 0.5 * decay + rng.normal(scale=1e-3, size=decay.shape)
    epochs = np.arange(1, records + 1) / 4
    args = {"model": "resnet20", "optim": "sgd", "learning_rate": 0.1, "seed": seed, "num_train_epochs": records / 4}
    return RunHistory(name, family, "cifar10", "scratch", args, weights, cka, epochs, epochs / epochs[-1])


def test_shipped_plan_spans_the_families_datasets_and_regimes_it_must():
    runs = read_plan(ROOT / "recipes" / "configs" / "smartfrz_corpus.yaml")
    recorded = [r for r in runs if not r.is_reference]
    assert len(recorded) >= 40
    assert len({r.family for r in recorded}) >= 4 and len({r.dataset for r in recorded}) >= 3
    assert {r.regime for r in recorded} == {"scratch", "finetune"}
    assert len({(r.args["optim"], r.args["learning_rate"], r.args["lr_scheduler_type"]) for r in recorded}) >= 10
    setups = {}
    for run in runs:  # each setup's reference comes first, with seed 0; recorded runs use other seeds
        setups.setdefault(run.setup, []).append(run)
    for members in setups.values():
        assert members[0].is_reference and members[0].args["seed"] == 0
        assert all(m.args["seed"] != 0 for m in members[1:])
    adamw = next(r for r in recorded if r.variant == "adamw")
    assert "optim_args" not in adamw.args  # a null in a variant removes the setup's flag


@pytest.mark.parametrize(
    "change, message",
    [
        ({"regime": "pretrain"}, "regime 'pretrain' is not one of"),
        ({"variants": []}, "has no variants"),
        ({"variants": [{"name": "reference", "seed": 1}]}, "variant names must be given and unique"),
        ({"colour": "red"}, r"unknown keys \['colour'\]"),
    ],
)
def test_plan_mistakes_are_one_line_errors(tmp_path, change, message):
    setup = {"name": "s", "family": "f", "dataset": "d", "regime": "scratch", "args": {}, "variants": [{"name": "a"}]}
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump({"setups": [{**setup, **change}]}))
    with pytest.raises(ValueError, match=message):
        read_plan(tmp_path / "plan.yaml")


def test_corpus_round_trips_exactly_and_loads_as_a_hub_dataset(tmp_path):
    import datasets

    histories = [_history("a/1", "fa", seed=1), _history("a/2", "fa", blocks=2, seed=2), _history("b/1", "fb", seed=3)]
    folder = write_corpus(histories, str(tmp_path / "corpus"), label_tolerance=0.2, command="cmd")
    loaded, manifest = load_corpus(folder)
    assert [h.run for h in loaded] == ["a/1", "a/2", "b/1"]
    for original, copy in zip(histories, loaded, strict=True):
        for key in ("records", "cka", "epochs", "fractions"):
            np.testing.assert_array_equal(getattr(copy, key), getattr(original, key))
        assert (copy.family, copy.args) == (original.family, original.args)
    assert manifest["runs"] == 3 and manifest["rows"] == 3 + 2 + 3 and manifest["families"] == {"fa": 2, "fb": 1}
    table = datasets.load_dataset(folder, split="train")  # the card's config: the Hub layout
    assert table.num_rows == 8, "datasets loaded another corpus cached under the same folder name"
    assert table[3]["run"] == "a/2" and table[3]["block"] == 0
    assert table[3]["label"] == label_freeze_points(histories[1].cka, 0.2)[:, 0].tolist()
    card = (tmp_path / "corpus" / "README.md").read_text()
    assert "within\n0.2 of the whole range" in card and manifest["version"] in card
    assert "4 times per epoch" in card and "(16 weights drawn once" in card  # read from the records
    with pytest.raises(ValueError, match="run names must be unique"):
        write_corpus(histories + histories[:1], str(tmp_path / "other"), 0.2)


def test_an_altered_corpus_is_refused(tmp_path):
    folder = write_corpus([_history("a/1", "fa")], str(tmp_path / "corpus"), 0.2)
    with pytest.raises(ValueError, match="is not a SmartFRZ history corpus"):
        load_corpus(str(tmp_path))
    (data,) = (tmp_path / "corpus" / "data").glob("*.parquet")
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 1
    data.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="changed after the corpus was written"):
        load_corpus(folder)
    manifest = json.loads((tmp_path / "corpus" / "corpus.json").read_text())
    (tmp_path / "corpus" / "corpus.json").write_text(json.dumps({**manifest, "format": "other/9"}))
    with pytest.raises(ValueError, match="corpus format 'other/9'"):
        load_corpus(folder)


def test_leave_one_family_out_holds_out_each_family_once_and_only_it():
    histories = [_history(f"r{i}", family) for i, family in enumerate(["b", "a", "c", "a", "b"])]
    splits = leave_one_family_out(histories)
    assert [family for family, _, _ in splits] == ["a", "b", "c"]
    for family, train, held_out in splits:
        assert sorted(train + held_out) == list(range(5))
        assert {histories[i].family for i in held_out} == {family}
        assert family not in {histories[i].family for i in train}
    with pytest.raises(ValueError, match="at least two model families"):
        leave_one_family_out(histories[1::2])


def test_cross_validation_scores_every_held_out_family():
    histories = [_history(f"{f}/{s}", f, seed=s) for f in ("fa", "fb") for s in range(2)]
    result = cross_validate(
        histories, PredictorRecipe(epochs=3, window=4, min_records=2, label_tolerance=0.2), log=lambda _: 0
    )
    assert set(result["families"]) == {"fa", "fb"}
    assert result["worst"] == min(f["balanced_accuracy"] for f in result["families"].values())
    for scores in result["families"].values():
        assert scores["runs"] == 2 and scores["examples"] == 2 * 3 * 11 and 0 <= scores["balanced_accuracy"] <= 1
        assert scores["decisions"]["blocks"] == 6


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_recipes_build_resume_pack_and_fit_a_predictor_the_policy_loads(tmp_path):
    args = {
        "model": "resnet20",
        "max_train_samples": 96,
        "max_eval_samples": 32,
        "per_device_train_batch_size": 16,
        "num_train_epochs": 2,
        "learning_rate": 0.05,
        "optim": "sgd",
        "lr_scheduler_type": "cosine",
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
        "cost_report": False,
    }
    setups = [
        {
            "name": name,
            "family": name,
            "dataset": "embedded",
            "regime": "scratch",
            "args": args,
            "variants": [{"name": "seed1", "seed": 1}],
        }
        for name in ("fam-a", "fam-b")
    ]
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"defaults": {"dataloader_num_workers": 0}, "setups": setups}))
    out = tmp_path / "out"
    build = ["recipes/build_smartfrz_corpus.py", "build", str(out), "--plan", str(plan), "--jobs", "2"]
    result = _run(build, ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 of 4 runs already done" in result.stdout
    again = _run(build, ROOT)
    assert again.returncode == 0 and "4 of 4 runs already done; 0 to train" in again.stdout
    assert _run(["recipes/build_smartfrz_corpus.py", "pack", str(out), "--plan", str(plan)], ROOT).returncode == 0
    histories, manifest = load_corpus(str(out / "corpus"))
    assert [h.run for h in histories] == ["fam-a/seed1", "fam-b/seed1"]
    assert histories[0].records.shape == (8, 9, 1024)  # 4 records per epoch, 2 epochs, 9 blocks
    assert np.all((histories[0].cka > 0) & (histories[0].cka <= 1 + 1e-9))
    assert histories[0].fractions[-1] == pytest.approx(1.0)
    fit = [
        "recipes/train_smartfrz_predictor.py",
        "fit",
        str(out / "corpus"),
        "--output",
        str(tmp_path / "p.st"),
        "--report",
        str(tmp_path / "report.json"),
        "--only_default",
        "--min_records",
        "4",
        "--card",
        str(tmp_path / "card.md"),
    ]
    result = _run(fit, ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    predictor = FreezePredictor.from_file(tmp_path / "p.st")
    assert predictor.metadata["corpus"]["version"] == manifest["version"]
    assert set(predictor.metadata["leave_one_family_out_balanced_accuracy"]) == {"fam-a", "fam-b"}
    report = json.loads((tmp_path / "report.json").read_text())
    card = (tmp_path / "card.md").read_text()
    assert manifest["version"] in card and "| fam-a | 1 |" in card  # the held-out family's decisions
    assert set(report["candidates"][0]["families"]) == {"fam-a", "fam-b"}
    policy = build_policy(SmartFRZConfig(predictor=str(tmp_path / "p.st"), min_records=2))
    policy.setup(get_block_adapter(CifarResNet.from_name("resnet20")))
    for step in (1, 2):
        policy.blocks_to_freeze(TrainingProgress(step, 8, step / 4, 2.0), frozenset())
    assert sorted(policy.evidence) == list(range(9))  # the fitted predictor decides for every block
