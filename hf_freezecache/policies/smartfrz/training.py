"""Training SmartFRZ's predictor: record weight histories and CKA, label them, fit, and measure on held-out runs.

The pipeline (driven by `recipes/train_smartfrz_predictor.sh`): train a reference model; train the same model again
with a `HistoryRecorder` attached, which writes every block's tailored weights and its CKA to the reference at each
freezing stage; label each (block, stage) with the `cka` policy's rule (`label_freeze_points`); fit the predictor on
the windows of some runs and measure it on others (`fit_predictor`, `evaluate_predictor`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F
from transformers import TrainerCallback

from ...data.batches import probe_batch
from ...models import get_block_adapter
from .._probe import BlockProbe
from .._reference import ReferenceRepresentations, load_reference_state
from .._schedule import EvaluationClock, stabilised
from ..base import TrainingProgress
from .policy import SmartFRZConfig
from .predictor import FreezePredictor
from .tailoring import WeightTailor


class HistoryRecorder(TrainerCallback):
    """Records, `records_per_epoch` times per epoch, every block's tailored weights and its linear CKA to a reference
    model on a fixed probe batch; writes them to `output_path` (`.npz`) when training ends. Freezes nothing.

    Args:
        reference (`str`): Output dir or weights file of the reference model (same architecture, trained).
        probe_size (`int`): Training images in the fixed probe batch (the first ones of the training set).
        output_path (`str`): Where to write the history.
        records_per_epoch (`int`): Records per epoch (the policy's `--smartfrz_records_per_epoch`).
        tailored_size (`int`): Weights per record (the predictor's input size).
        seed (`int`): Seed of the tailored weights' selection.
        metadata (`dict`, *optional*): Stored with the history (model, dataset, ...).
    """

    def __init__(
        self,
        reference: str,
        probe_size: int,
        output_path: str,
        records_per_epoch: int = SmartFRZConfig.records_per_epoch,
        tailored_size: int = 1024,
        seed: int = SmartFRZConfig.seed,
        metadata: dict | None = None,
    ) -> None:
        self.reference_state = load_reference_state(reference)
        self.probe_size = probe_size
        self.output_path = output_path
        self.clock = EvaluationClock(records_per_epoch)
        self.tailored_size = tailored_size
        self.seed = seed
        self.metadata = {"reference": os.fspath(reference), "records_per_epoch": records_per_epoch, **(metadata or {})}
        self.records: list[np.ndarray] = []
        self.cka: list[list[float]] = []
        self.epochs: list[float] = []

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        adapter = get_block_adapter(model)
        pixel_values = probe_batch(train_dataloader, self.probe_size, args.device)["pixel_values"]
        self.tailor = WeightTailor(adapter, self.tailored_size, seed=self.seed)
        self.probe = BlockProbe(adapter, pixel_values)
        self.reference = ReferenceRepresentations(adapter, self.reference_state, pixel_values)
        self.reference_state = None

    def on_step_end(self, args, state, control, **kwargs):
        progress = TrainingProgress.from_trainer_state(state)
        if not self.clock.due(progress):
            return
        blocks = range(self.tailor.adapter.num_blocks)
        self.records.append(torch.stack([self.tailor.record(i) for i in blocks]).numpy())
        scores = self.reference.cka({i: output for i, (_, output) in self.probe.run().items()})
        self.cka.append([scores[i] for i in blocks])
        self.epochs.append(progress.epoch)

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.output_path)), exist_ok=True)
        np.savez_compressed(
            self.output_path,
            records=np.stack(self.records).astype(np.float32),
            cka=np.asarray(self.cka, dtype=np.float64),
            epochs=np.asarray(self.epochs),
            metadata=json.dumps(self.metadata),
        )


def label_freeze_points(cka: np.ndarray, window: int, tolerance: float) -> np.ndarray:
    """Freeze labels `(stages, blocks)`: 1 from the first stage at which the block's CKA has stabilised (the `cka`
    policy's rule: the last `window` values within `tolerance`) to the end, 0 before."""
    labels = np.zeros(cka.shape, dtype=np.int64)
    for block in range(cka.shape[1]):
        series = list(cka[:, block])
        first = next((t for t in range(len(series)) if stabilised(series[: t + 1], window, tolerance)), None)
        if first is not None:
            labels[first:, block] = 1
    return labels


@dataclass
class HistoryWindows:
    """(window of records, label) examples of recorded runs, built on demand from the records.

    Example k is block `blocks[k]` of run `runs[k]` at stage `stages[k]`: its window is the run's records of that
    block at stages `stages[k] - window + 1 .. stages[k]` (fewer at the start, padded at the front).
    """

    records: list[np.ndarray]  # per run: (stages, blocks, size)
    labels: list[np.ndarray]  # per run: (stages, blocks)
    runs: np.ndarray
    stages: np.ndarray
    blocks: np.ndarray
    window: int

    @classmethod
    def from_files(
        cls, paths: list[str], window: int, min_records: int, cka_window: int, cka_tolerance: float
    ) -> HistoryWindows:
        """Loads `HistoryRecorder` files and labels them; examples start at `min_records` records, as the policy."""
        records, labels, index = [], [], []
        for run, path in enumerate(paths):
            with np.load(path) as data:
                records.append(data["records"])
                labels.append(label_freeze_points(data["cka"], cka_window, cka_tolerance))
            stages, blocks = labels[-1].shape
            index += [(run, t, b) for t in range(min_records - 1, stages) for b in range(blocks)]
        runs, stages, blocks = (np.asarray(column) for column in zip(*index, strict=True))
        return cls(records, labels, runs, stages, blocks, window)

    def __len__(self) -> int:
        return len(self.runs)

    @property
    def targets(self) -> np.ndarray:
        return np.asarray([self.labels[r][t, b] for r, t, b in zip(self.runs, self.stages, self.blocks, strict=True)])

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(records (n, window, size), mask (n, window), labels (n,))` of examples `indices`."""
        size = self.records[0].shape[-1]
        x = np.zeros((len(indices), self.window, size), dtype=np.float32)
        mask = np.zeros((len(indices), self.window), dtype=bool)
        y = np.zeros(len(indices), dtype=np.int64)
        for row, k in enumerate(indices):
            run, stage, block = self.runs[k], self.stages[k], self.blocks[k]
            start = max(0, stage - self.window + 1)
            history = self.records[run][start : stage + 1, block]
            x[row, self.window - len(history) :] = history
            mask[row, self.window - len(history) :] = True
            y[row] = self.labels[run][stage, block]
        return torch.from_numpy(x), torch.from_numpy(mask), torch.from_numpy(y)


def fit_predictor(
    train: HistoryWindows,
    validation: HistoryWindows | None = None,
    epochs: int = 30,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
    log=print,
) -> tuple[FreezePredictor, list[dict]]:
    """Trains a predictor with class-balanced cross-entropy (Adam); keeps the epoch with the best validation balanced
    accuracy (training's without validation). Balanced accuracy, not F1: when most examples say "freeze", a
    predictor that always says "freeze" has a high F1 but a balanced accuracy of 0.5. Returns it and the per-epoch
    metrics."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    predictor = FreezePredictor(input_size=train.records[0].shape[-1])
    targets = train.targets
    counts = np.bincount(targets, minlength=2).astype(np.float64)
    weight = torch.tensor(counts.sum() / (2 * np.maximum(counts, 1)), dtype=torch.float32)
    optimizer = torch.optim.Adam(predictor.parameters(), lr=learning_rate, weight_decay=1e-4)
    best, best_state, curve = -1.0, None, []
    for epoch in range(epochs):
        predictor.train()
        order = torch.randperm(len(train), generator=generator).numpy()
        for start in range(0, len(order), batch_size):
            x, mask, y = train.batch(order[start : start + batch_size])
            logits, _ = predictor(x, mask)
            loss = F.cross_entropy(logits, y, weight=weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        entry = {"epoch": epoch + 1, "train": evaluate_predictor(predictor, train)}
        if validation is not None:
            entry["validation"] = evaluate_predictor(predictor, validation)
        curve.append(entry)
        score = entry["validation" if validation is not None else "train"]["balanced_accuracy"]
        log(json.dumps(entry))
        if score > best:
            best, best_state = score, {k: v.clone() for k, v in predictor.state_dict().items()}
    predictor.load_state_dict(best_state)
    return predictor.eval(), curve


@torch.no_grad()
def evaluate_predictor(predictor: FreezePredictor, windows: HistoryWindows, batch_size: int = 256) -> dict:
    """Accuracy, balanced accuracy (mean recall of both classes), precision, recall and F1 of the freeze class, and
    the label balance, over every example."""
    was_training = predictor.training
    predictor.eval()
    predictions, targets = [], []
    for start in range(0, len(windows), batch_size):
        x, mask, y = windows.batch(np.arange(start, min(start + batch_size, len(windows))))
        logits, _ = predictor(x, mask)
        predictions.append(logits.argmax(dim=-1).numpy())
        targets.append(y.numpy())
    predictor.train(was_training)
    p, t = np.concatenate(predictions), np.concatenate(targets)
    tp, fp, fn = int(((p == 1) & (t == 1)).sum()), int(((p == 1) & (t == 0)).sum()), int(((p == 0) & (t == 1)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    negatives = int((t == 0).sum())
    specificity = int(((p == 0) & (t == 0)).sum()) / negatives if negatives else None
    return {
        "examples": int(len(t)),
        "freeze_fraction": float(t.mean()) if len(t) else 0.0,
        "accuracy": float((p == t).mean()) if len(t) else 0.0,
        "balanced_accuracy": (recall + specificity) / 2 if specificity is not None else recall,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
    }
