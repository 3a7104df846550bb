"""Fitting SmartFRZ's predictor on a history corpus, and measuring it on model families it never saw.

`HistoryWindows` turns recorded runs into (window of records, label) examples as the policy would see them and
computes the predictor's inputs once; `fit_predictor` trains one with a `PredictorRecipe`; `cross_validate` fits it
once per held-out family (`leave_one_family_out`) and scores the held-out family's windows (balanced accuracy) and
the freeze decisions the policy would have taken on its runs (`freeze_decisions`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.nn import functional as F

from .corpus import RunHistory, leave_one_family_out
from .policy import SmartFRZConfig
from .predictor import WEIGHT_FEATURES, FreezePredictor, record_inputs
from .recording import LABEL_TOLERANCE


@dataclass
class PredictorRecipe:
    """How a predictor is fitted: its sizes and inputs, the optimisation, and how examples are cut and labelled."""

    hidden_size: int = 32
    key_size: int = 16
    classifier_hidden_size: int = 16
    context: bool = True
    # False zeroes the weight features: an ablation that measures what the weight history adds over the context
    # alone. Such a predictor is not SmartFRZ and is never shipped.
    weights: bool = True
    epochs: int = 20
    learning_rate: float = 3e-3
    weight_decay: float = 1e-3
    batch_size: int = 128
    seed: int = 0
    window: int = SmartFRZConfig.window
    min_records: int = SmartFRZConfig.min_records
    label_tolerance: float = LABEL_TOLERANCE

    def predictor(self, input_size: int) -> FreezePredictor:
        return FreezePredictor(
            input_size, self.hidden_size, self.key_size, self.classifier_hidden_size, context=self.context
        )


@dataclass
class HistoryWindows:
    """Examples of recorded runs: example k is block `blocks[k]` of run `runs[k]` at record `stages[k]`, with the
    predictor's inputs for the window of records ending there (fewer at the start, padded at the front), computed
    with context; `inputs(context=False)` drops it."""

    features: torch.Tensor  # (n, window, len(WEIGHT_FEATURES) + 2)
    valid: torch.Tensor  # (n, window)
    targets: np.ndarray  # (n,)
    runs: np.ndarray
    stages: np.ndarray
    blocks: np.ndarray
    epochs: list[np.ndarray]  # per run: epoch at each record
    names: list[str]  # per run
    input_size: int

    @classmethod
    def from_histories(cls, histories: list[RunHistory], recipe: PredictorRecipe, chunk: int = 256) -> HistoryWindows:
        """The windows of every block of every run, from `recipe.min_records` records on, as the policy decides."""
        window = recipe.window
        features, valid, targets, index = [], [], [], []
        for run, history in enumerate(histories):
            labels = history.labels(recipe.label_tolerance)
            stages, blocks = labels.shape
            depth_scale = max(1, blocks - 1)
            examples = [(t, b) for b in range(blocks) for t in range(recipe.min_records - 1, stages)]
            for start in range(0, len(examples), chunk):
                part = examples[start : start + chunk]
                x = torch.zeros(len(part), window, history.records.shape[-1])
                mask = torch.zeros(len(part), window, dtype=torch.bool)
                context = torch.zeros(len(part), window, 2)
                for row, (t, b) in enumerate(part):
                    first = max(0, t - window + 1)
                    length = t + 1 - first
                    x[row, window - length :] = torch.from_numpy(history.records[first : t + 1, b])
                    mask[row, window - length :] = True
                    context[row, window - length :, 0] = torch.from_numpy(history.fractions[first : t + 1])
                    context[row, :, 1] = b / depth_scale
                inputs, ok = record_inputs(x, mask, context)
                features.append(inputs)
                valid.append(ok)
                targets += [labels[t, b] for t, b in part]
                index += [(run, t, b) for t, b in part]
        runs, stages, blocks = (np.asarray(column) for column in zip(*index, strict=True))
        return cls(
            torch.cat(features),
            torch.cat(valid),
            np.asarray(targets, dtype=np.int64),
            runs,
            stages,
            blocks,
            [h.epochs for h in histories],
            [h.run for h in histories],
            histories[0].records.shape[-1],
        )

    def __len__(self) -> int:
        return len(self.targets)

    def inputs(
        self, indices: np.ndarray | slice, context: bool, weights: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.features[indices]
        if not weights:
            x = torch.cat([torch.zeros_like(x[..., : len(WEIGHT_FEATURES)]), x[..., len(WEIGHT_FEATURES) :]], dim=-1)
        return (x if context else x[..., : len(WEIGHT_FEATURES)]), self.valid[indices]


def fit_predictor(train: HistoryWindows, recipe: PredictorRecipe) -> FreezePredictor:
    """Trains a predictor on `train` for `recipe.epochs` epochs with class-balanced cross-entropy (Adam).

    No epoch is picked on held-out data: the recipe (epochs included) is chosen by leave-one-family-out validation,
    so the scores it reports are those of a predictor fitted exactly as the shipped one.
    """
    generator = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    predictor = recipe.predictor(train.input_size)
    counts = np.bincount(train.targets, minlength=2).astype(np.float64)
    weight = torch.tensor(counts.sum() / (2 * np.maximum(counts, 1)), dtype=torch.float32)
    targets = torch.from_numpy(train.targets)
    optimizer = torch.optim.Adam(predictor.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    predictor.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(order), recipe.batch_size):
            batch = order[start : start + recipe.batch_size]
            logits, _ = predictor.classify(*train.inputs(batch, recipe.context, recipe.weights))
            loss = F.cross_entropy(logits, targets[batch], weight=weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return predictor.eval()


@torch.no_grad()
def freeze_probabilities(predictor: FreezePredictor, windows: HistoryWindows, weights: bool = True) -> np.ndarray:
    """P(freeze) of every example (`weights=False`: with the weight features zeroed, for the ablation)."""
    logits, _ = predictor.classify(*windows.inputs(slice(None), predictor.uses_context, weights))
    return torch.softmax(logits, dim=-1)[:, 1].numpy()


def evaluate_predictor(
    predictor: FreezePredictor, windows: HistoryWindows, threshold: float = 0.5, weights: bool = True
) -> dict:
    """Balanced accuracy (mean recall of both classes), accuracy, precision, recall and F1 of the freeze class, the
    label balance, and the fraction of examples predicted "freeze". Balanced accuracy, not F1: when most examples
    say "freeze", a predictor that always says "freeze" has a high F1 but a balanced accuracy of 0.5."""
    p = (freeze_probabilities(predictor, windows, weights) > threshold).astype(np.int64)
    t = windows.targets
    tp, fp = int(((p == 1) & (t == 1)).sum()), int(((p == 1) & (t == 0)).sum())
    negatives, positives = int((t == 0).sum()), int((t == 1).sum())
    recall = tp / positives if positives else None
    specificity = int(((p == 0) & (t == 0)).sum()) / negatives if negatives else None
    present = [r for r in (recall, specificity) if r is not None]
    precision = tp / (tp + fp) if tp + fp else 0.0
    return {
        "examples": int(len(t)),
        "freeze_fraction": float(t.mean()),
        "predicted_freeze_fraction": float(p.mean()),
        "accuracy": float((p == t).mean()),
        "balanced_accuracy": float(np.mean(present)),
        "precision": precision,
        "recall": recall if recall is not None else 0.0,
        "f1": 2 * precision * recall / (precision + recall) if recall and precision + recall else 0.0,
    }


def freeze_decisions(
    predictor: FreezePredictor, windows: HistoryWindows, threshold: float = 0.5, weights: bool = True
) -> list[dict]:
    """The policy's decision for every (run, block): the epoch of the first window it would freeze at, against the
    epoch at which the label first says "freeze" (None: never within the run)."""
    probability = freeze_probabilities(predictor, windows, weights)
    decisions: dict[tuple[int, int], dict] = {}
    for k in np.lexsort((windows.stages, windows.blocks, windows.runs)):
        run, block, stage = int(windows.runs[k]), int(windows.blocks[k]), int(windows.stages[k])
        entry = decisions.setdefault(
            (run, block), {"run": windows.names[run], "block": block, "predicted_epoch": None, "label_epoch": None}
        )
        epoch = float(windows.epochs[run][stage])
        if entry["predicted_epoch"] is None and probability[k] > threshold:
            entry["predicted_epoch"] = epoch
        if entry["label_epoch"] is None and windows.targets[k] == 1:
            entry["label_epoch"] = epoch
    return list(decisions.values())


def summarize_decisions(decisions: list[dict]) -> dict:
    """How the freeze decisions spread over blocks and runs, and how far they fall from the labels' (epochs)."""
    predicted = [d["predicted_epoch"] for d in decisions]
    pairs = [(d["predicted_epoch"], d["label_epoch"]) for d in decisions]
    both = [(p, t) for p, t in pairs if p is not None and t is not None]
    early = [p < t for p, t in both]
    return {
        "blocks": len(decisions),
        "frozen": sum(p is not None for p in predicted),
        "labelled_frozen": sum(d["label_epoch"] is not None for d in decisions),
        "distinct_freeze_epochs": len({p for p in predicted if p is not None}),
        "runs_with_a_freeze": len({d["run"] for d in decisions if d["predicted_epoch"] is not None}),
        "mean_abs_epoch_error": float(np.mean([abs(p - t) for p, t in both])) if both else None,
        "frozen_early_fraction": float(np.mean(early)) if early else None,
    }


def cross_validate(histories: list[RunHistory], recipe: PredictorRecipe, log=print) -> dict:
    """Leave-one-family-out: for every family, fit on the others' runs and score its runs; with the recipe and the
    lowest (worst-family) balanced accuracy, the score model selection ranks recipes by."""
    families = {}
    for family, train_runs, test_runs in leave_one_family_out(histories):
        train = HistoryWindows.from_histories([histories[i] for i in train_runs], recipe)
        test = HistoryWindows.from_histories([histories[i] for i in test_runs], recipe)
        predictor = fit_predictor(train, recipe)
        decisions = freeze_decisions(predictor, test, weights=recipe.weights)
        families[family] = {
            "runs": len(test_runs),
            **evaluate_predictor(predictor, test, weights=recipe.weights),
            "decisions": summarize_decisions(decisions),
        }
        log(json.dumps({"held_out": family, "balanced_accuracy": round(families[family]["balanced_accuracy"], 4)}))
    scores = [f["balanced_accuracy"] for f in families.values()]
    return {"recipe": asdict(recipe), "families": families, "worst": min(scores), "mean": float(np.mean(scores))}
