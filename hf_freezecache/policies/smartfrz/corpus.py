"""The SmartFRZ history corpus on disk: recorded runs as a `datasets` dataset in the Hub parquet layout, with a card.

One row per (recorded run, block): the run's setup (family, model, dataset, regime, optimizer, learning rate,
schedule, seed), the block's CKA to the reference and its label at every record, and its tailored weights as one
binary column (float32, `(records, record_size)`, little-endian). `corpus.json` is the manifest: format, label rule,
counts and the sha256 of every parquet file, checked on load. `README.md` is the card (`datasets.load_dataset(folder)`
reads it). Labels are stored for reading; fitting relabels from the stored CKA with the rule it is given.

Over 300 lines on purpose: the writer, the reader and the card share one column schema (`_COLUMNS`), kept in one
place so that they cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass

import numpy as np

from .recording import label_freeze_points

_FORMAT = "hf_freezecache.smartfrz-corpus/1"


@dataclass
class RunHistory:
    """One recorded run: its setup and, at every record, every block's tailored weights and CKA to the reference.

    Args:
        run (`str`): `<setup>/<variant>`, unique in a corpus.
        family, dataset, regime (`str`): Model family, dataset label, `scratch` or `finetune`.
        args (`dict`): The run's training flags.
        records (`np.ndarray`): `(records, blocks, size)` float32 tailored weights.
        cka (`np.ndarray`): `(records, blocks)` CKA of each block's output to the reference's.
        epochs, fractions (`np.ndarray`): `(records,)` epoch and fraction of training done at each record.
    """

    run: str
    family: str
    dataset: str
    regime: str
    args: dict
    records: np.ndarray
    cka: np.ndarray
    epochs: np.ndarray
    fractions: np.ndarray

    @property
    def num_blocks(self) -> int:
        return self.cka.shape[1]

    def labels(self, tolerance: float) -> np.ndarray:
        """`(records, blocks)` freeze labels (`label_freeze_points` with this relative tolerance)."""
        return label_freeze_points(self.cka, tolerance)


def read_history(folder: str) -> RunHistory:
    """A run recorded by `recipes/build_smartfrz_corpus.py`: its `run.json` and `history.npz`."""
    with open(os.path.join(folder, "run.json")) as f:
        spec = json.load(f)
    with np.load(os.path.join(folder, "history.npz")) as data:
        arrays = {k: data[k] for k in ("records", "cka", "epochs", "fractions")}
    return RunHistory(
        f"{spec['setup']}/{spec['variant']}", spec["family"], spec["dataset"], spec["regime"], spec["args"], **arrays
    )


def collect_runs(folders: dict[str, str]) -> tuple[list[RunHistory], list[str]]:
    """The recorded runs among `folders` (name -> run folder) that finished, and the names of those that did not."""
    done = [name for name, folder in folders.items() if os.path.exists(os.path.join(folder, "history.npz"))]
    return [read_history(folders[name]) for name in done], [name for name in folders if name not in done]


def write_corpus(histories: list[RunHistory], folder: str, label_tolerance: float, command: str = "") -> str:
    """Writes `histories` as a corpus (parquet, manifest, card) to `folder`, replacing it whole; returns `folder`.

    Args:
        histories (`list[RunHistory]`): The recorded runs.
        folder (`str`): Where to write it; written beside and renamed into place, so a crash leaves the old one.
        label_tolerance (`float`): The label rule's tolerance (`label_freeze_points`) of the stored `label` column.
        command (`str`): How the corpus was built, for the card.
    """
    import datasets

    if not histories:
        raise ValueError("no recorded runs to write: build some first (recipes/build_smartfrz_corpus.py build).")
    names = [h.run for h in histories]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be unique in a corpus, got {sorted(n for n in names if names.count(n) > 1)}")
    rows: dict[str, list] = {key: [] for key in _COLUMNS}
    for history in histories:
        labels = history.labels(label_tolerance)
        args = history.args
        for block in range(history.num_blocks):
            values = {
                "run": history.run,
                "family": history.family,
                "model": str(args.get("model", "")),
                "dataset": history.dataset,
                "regime": history.regime,
                "optimizer": str(args.get("optim", "")),
                "learning_rate": float(args.get("learning_rate", float("nan"))),
                "lr_scheduler": str(args.get("lr_scheduler_type", "")),
                "seed": int(args.get("seed", 0)),
                "num_train_epochs": float(args.get("num_train_epochs", float("nan"))),
                "train_samples": int(args.get("max_train_samples") or -1),
                "training_args": json.dumps(args, sort_keys=True),
                "block": block,
                "num_blocks": history.num_blocks,
                "epochs": history.epochs.astype(np.float64).tolist(),
                "fractions": history.fractions.astype(np.float64).tolist(),
                "cka": history.cka[:, block].astype(np.float64).tolist(),
                "label": labels[:, block].astype(np.int8).tolist(),
                "record_size": history.records.shape[-1],
                "records": np.ascontiguousarray(history.records[:, block], dtype="<f4").tobytes(),
            }
            for key, value in values.items():
                rows[key].append(value)
    partial = f"{folder.rstrip('/')}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(os.path.join(partial, "data"))
    written = os.path.join(partial, "data", "train.parquet")
    datasets.Dataset.from_dict(rows, features=_features()).to_parquet(written)
    digest = _sha256(written)
    # The version is in the data file's name and the card's pattern: `datasets` caches a local folder by its name and
    # data-file patterns, so two corpora in folders of the same name would otherwise load each other's rows.
    data_file = f"data/train-{digest[:12]}-00000-of-00001.parquet"
    os.replace(written, os.path.join(partial, data_file))
    manifest = {
        "format": _FORMAT,
        "version": digest[:12],
        "label_rule": {"rule": "settled", "relative_tolerance": label_tolerance},
        "runs": len(histories),
        "rows": len(rows["run"]),
        "families": dict(sorted(Counter(h.family for h in histories).items())),
        "datasets": dict(sorted(Counter(h.dataset for h in histories).items())),
        "regimes": dict(sorted(Counter(h.regime for h in histories).items())),
        "files": {data_file: digest},
    }
    with open(os.path.join(partial, "corpus.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    with open(os.path.join(partial, "README.md"), "w") as f:
        f.write(_card(histories, manifest, command))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return folder


def load_corpus(folder: str) -> tuple[list[RunHistory], dict]:
    """The runs of a corpus written by `write_corpus`, and its manifest.

    Raises:
        ValueError: one line when `folder` is not a corpus, has another format, or its data differ from the manifest.
    """
    import datasets

    path = os.path.join(folder, "corpus.json")
    if not os.path.exists(path):
        raise ValueError(
            f"{folder!r} is not a SmartFRZ history corpus (no corpus.json); build one with "
            "recipes/build_smartfrz_corpus.py."
        )
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != _FORMAT:
        found = manifest.get("format")
        raise ValueError(f"{folder!r}: corpus format {found!r}, this hf_freezecache reads {_FORMAT!r}.")
    for name, digest in manifest["files"].items():
        if _sha256(os.path.join(folder, name)) != digest:
            raise ValueError(
                f"{folder!r}: {name} changed after the corpus was written (sha256 differs from "
                "corpus.json); rebuild it with recipes/build_smartfrz_corpus.py pack."
            )
    table = datasets.Dataset.from_parquet([os.path.join(folder, name) for name in manifest["files"]])
    runs: dict[str, dict] = {}
    for row in table:
        run = runs.setdefault(row["run"], {"row": row, "blocks": {}})
        stages = len(row["cka"])
        records = np.frombuffer(row["records"], dtype="<f4").reshape(stages, row["record_size"])
        run["blocks"][row["block"]] = (records, np.asarray(row["cka"]))
    histories = []
    for name, run in runs.items():
        row, blocks = run["row"], run["blocks"]
        if sorted(blocks) != list(range(row["num_blocks"])):
            raise ValueError(f"{folder!r}: run {name!r} has blocks {sorted(blocks)} of {row['num_blocks']}.")
        ordered = [blocks[b] for b in range(row["num_blocks"])]
        histories.append(
            RunHistory(
                name,
                row["family"],
                row["dataset"],
                row["regime"],
                json.loads(row["training_args"]),
                records=np.stack([r for r, _ in ordered], axis=1),
                cka=np.stack([c for _, c in ordered], axis=1),
                epochs=np.asarray(row["epochs"]),
                fractions=np.asarray(row["fractions"]),
            )
        )
    return histories, manifest


def leave_one_family_out(histories: list[RunHistory]) -> list[tuple[str, list[int], list[int]]]:
    """`(held-out family, training run indices, held-out run indices)` for every family, in name order."""
    families = sorted({h.family for h in histories})
    if len(families) < 2:
        raise ValueError(f"leave-one-family-out needs runs of at least two model families, got {families}.")
    return [
        (
            family,
            [i for i, h in enumerate(histories) if h.family != family],
            [i for i, h in enumerate(histories) if h.family == family],
        )
        for family in families
    ]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_COLUMNS = {
    "run": "string",
    "family": "string",
    "model": "string",
    "dataset": "string",
    "regime": "string",
    "optimizer": "string",
    "learning_rate": "float64",
    "lr_scheduler": "string",
    "seed": "int64",
    "num_train_epochs": "float64",
    "train_samples": "int64",
    "training_args": "string",
    "block": "int32",
    "num_blocks": "int32",
    "epochs": ["float64"],
    "fractions": ["float64"],
    "cka": ["float64"],
    "label": ["int8"],
    "record_size": "int32",
    "records": "binary",
}


def _features():
    import datasets

    def feature(kind):
        return datasets.Sequence(datasets.Value(kind[0])) if isinstance(kind, list) else datasets.Value(kind)

    return datasets.Features({name: feature(kind) for name, kind in _COLUMNS.items()})


def _card(histories: list[RunHistory], manifest: dict, command: str) -> str:
    rule = manifest["label_rule"]
    # Read from the records, not assumed: runs added with other `record` flags must not get a card that says
    # otherwise.
    rates = sorted({round(1 / float(np.median(np.diff(h.epochs)))) for h in histories if len(h.epochs) > 1})
    sizes = sorted({h.records.shape[-1] for h in histories})
    setups: dict[str, list[RunHistory]] = {}
    for history in histories:
        setups.setdefault(history.run.split("/")[0], []).append(history)
    table = [
        "| setup | family | model | dataset | regime | runs | blocks | records | optimizers, lr, schedules |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for setup, runs in setups.items():
        first = runs[0]
        hyper = sorted(
            {f"{r.args.get('optim')} {r.args.get('learning_rate')} {r.args.get('lr_scheduler_type')}" for r in runs}
        )
        table.append(
            f"| {setup} | {first.family} | {first.args.get('model')} | {first.dataset} | {first.regime} | "
            f"{len(runs)} | {first.num_blocks} | {', '.join(sorted({str(len(r.epochs)) for r in runs}))} | "
            f"{'; '.join(hyper)} |"
        )
    return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-{manifest["version"]}-*.parquet
tags:
- hf_freezecache
- smartfrz
- layer-freezing
pretty_name: SmartFRZ training-history corpus ({manifest["runs"]} runs)
---
# SmartFRZ training-history corpus (version {manifest["version"]})

Training histories for fitting SmartFRZ's freezing predictor (Li et al. 2024), recorded by hf_freezecache:
{manifest["runs"]} runs, {manifest["rows"]} (run, block) rows, families {manifest["families"]},
datasets {manifest["datasets"]}, regimes {manifest["regimes"]}.

**How it was recorded.** Each setup (a model on a dataset, from scratch or fine-tuned) is trained once as the
reference (seed 0). Each recorded run trains the same network on the same data again with other seeds, learning
rates, optimizers, schedules or batch sizes, and {" or ".join(map(str, rates))} times per epoch records every block's
tailored weights ({" or ".join(map(str, sizes))} weights drawn once, `WeightTailor`) and the linear CKA of the block's
output to the reference's on a fixed probe batch of training images (`train_smartfrz_predictor.py record
--probe_size`, 256 by default; SmartFRZ section 3.3).

**Labels.** `label[t] = 1` from the first record after which the block's CKA stays, to the end of the run, within
{rule["relative_tolerance"]} of the whole range it moved over the run; 0 before (`label_freeze_points`: the block's
similarity to the well-trained reference has settled for good, SmartFRZ section 3.3). Fitting relabels from `cka`
with the tolerance it is given.

**Columns.** `run` (`setup/variant`), `family`, `model`, `dataset`, `regime`, `optimizer`, `learning_rate`,
`lr_scheduler`, `seed`, `num_train_epochs`, `train_samples`, `training_args` (JSON), `block`, `num_blocks`, and per
record: `epochs`, `fractions` (of training done), `cka`, `label`; `records`: float32 little-endian bytes of shape
`(len(cka), record_size)`.

| | |
|---|---|
| format | `{manifest["format"]}` |
| built with | `{command or "recipes/build_smartfrz_corpus.py"}` |

{chr(10).join(table)}
"""
