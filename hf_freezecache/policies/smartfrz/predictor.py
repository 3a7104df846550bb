"""SmartFRZ's lightweight attention predictor (Li et al. 2024, section 3.3 and Appendix C), on scale-free inputs.

The paper feeds each record's raw tailored weights to the attention. Raw values mostly encode a layer's
initialisation scale and the run's learning rate, which differ from model to model; a predictor fitted on them
memorises its training runs (format 1 of this file answered "freeze" for every held-out window). Here every record
is first turned into a few numbers that mean the same in any model (`record_features`): how far the block's
weights moved since the previous record relative to their size and to the window's largest move, whether the moves
keep their direction, how straight the path through the window is. With `context=True` two more inputs say where
the record sits: the fraction of training done and the block's relative depth. The attention itself is the paper's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

#: The predictor fitted on the history corpus by `recipes/train_smartfrz_predictor.py fit`, used by default.
DEFAULT_PREDICTOR = Path(__file__).with_name("predictor.safetensors")
_FORMAT = "hf_freezecache.smartfrz-predictor/2"
#: The inputs of every record, in order: `WEIGHT_FEATURES`, then `CONTEXT_FEATURES` when the predictor uses context.
WEIGHT_FEATURES = (
    "log_relative_step",
    "step_over_window_max",
    "log_step_over_first_step",
    "step_cosine",
    "straightness",
    "log_norm_change",
)
CONTEXT_FEATURES = ("training_fraction", "block_depth")
_TINY = 1e-12


def _mlp(sizes: tuple[int, int, int]) -> nn.Sequential:
    # The paper's "3-layer MLP": input, one hidden layer, output.
    return nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.ReLU(), nn.Linear(sizes[1], sizes[2]))


def _log10_ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    return torch.log10((numerator + _TINY) / (denominator + _TINY)).clamp(-6.0, 6.0)


def record_features(records: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale-free description of every record of a window, and which records have one.

    A record's step is its tailored weights minus the previous record's. Its features (`WEIGHT_FEATURES`): log10 of
    the step's norm over the weights' norm; the step over the window's largest step; log10 of the step over the
    window's first step; the cosine between this step and the previous one; the straightness of the path from the
    window's first record (distance covered over path length); log10 of the weights' norm over the first record's.
    Only records with a step (a real record before them) have features; a window of one record keeps its latest.

    Args:
        records (`torch.Tensor`): `(batch, window, size)` tailored weights, oldest first, padding first.
        mask (`torch.Tensor`): `(batch, window)` booleans, True for real records (a suffix of every row).

    Returns:
        `(features (batch, window, len(WEIGHT_FEATURES)), valid (batch, window))`.
    """
    records = records.float()
    batch, window, _ = records.shape
    first = (~mask).sum(dim=1).clamp(max=window - 1)  # index of the first real record
    rows = torch.arange(batch, device=records.device)
    steps = torch.zeros_like(records)
    steps[:, 1:] = records[:, 1:] - records[:, :-1]
    valid = torch.zeros_like(mask)
    valid[:, 1:] = mask[:, 1:] & mask[:, :-1]
    step = steps.norm(dim=-1) * valid
    norm = records.norm(dim=-1)
    first_step = step[rows, (first + 1).clamp(max=window - 1)].unsqueeze(1)
    previous = torch.zeros_like(steps)
    previous[:, 1:] = steps[:, :-1]
    has_previous = torch.zeros_like(valid)
    has_previous[:, 1:] = valid[:, 1:] & valid[:, :-1]
    cosine = torch.nn.functional.cosine_similarity(steps, previous, dim=-1, eps=_TINY) * has_previous
    path = torch.cumsum(step, dim=1)
    covered = (records - records[rows, first].unsqueeze(1)).norm(dim=-1)
    features = torch.stack(
        [
            _log10_ratio(step, norm),
            step / (step.amax(dim=1, keepdim=True) + _TINY),
            _log10_ratio(step, first_step),
            cosine,
            covered / (path + _TINY) * (path > 0),
            _log10_ratio(norm, norm[rows, first].unsqueeze(1)),
        ],
        dim=-1,
    )
    features = features * valid.unsqueeze(-1)
    valid[:, -1] |= ~valid.any(dim=1)  # a lone record: attend to it, with features all zero
    return features, valid


def record_inputs(
    records: torch.Tensor, mask: torch.Tensor, context: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`record_features` followed by each record's context `(batch, window, 2)` (fraction of training done, block
    depth), zero where a record has no features: what a predictor with context reads."""
    features, valid = record_features(records, mask)
    return torch.cat([features, context.to(features.dtype) * valid.unsqueeze(-1)], dim=-1), valid


class FreezePredictor(nn.Module):
    """Describes each record of a window (`record_features`, plus the context when `context=True`), encodes it into
    key, query and value with three MLPs, attends from the latest record's query over all records' keys (softmax),
    sums the values into a context vector, and classifies it as keep (0) / freeze (1).

    Args:
        input_size (`int`): Tailored weights per record (1024 in the paper); the features do not depend on it.
        hidden_size (`int`): Hidden width of the key/query/value MLPs.
        key_size (`int`): Size of keys, queries, values and the context vector.
        classifier_hidden_size (`int`): Hidden width of the decision MLP.
        context (`bool`): Whether the training fraction and the block's depth are inputs too.
    """

    def __init__(
        self,
        input_size: int = 1024,
        hidden_size: int = 32,
        key_size: int = 16,
        classifier_hidden_size: int = 16,
        context: bool = True,
    ) -> None:
        super().__init__()
        self.sizes = {
            "input_size": input_size,
            "hidden_size": hidden_size,
            "key_size": key_size,
            "classifier_hidden_size": classifier_hidden_size,
            "context": context,
        }
        features = len(WEIGHT_FEATURES) + (len(CONTEXT_FEATURES) if context else 0)
        self.key = _mlp((features, hidden_size, key_size))
        self.query = _mlp((features, hidden_size, key_size))
        self.value = _mlp((features, hidden_size, key_size))
        self.classifier = _mlp((key_size, classifier_hidden_size, 2))
        self.metadata: dict[str, object] = {}

    @property
    def input_size(self) -> int:
        return self.sizes["input_size"]

    @property
    def uses_context(self) -> bool:
        return self.sizes["context"]

    def forward(
        self, records: torch.Tensor, mask: torch.Tensor | None = None, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits `(batch, 2)` and attention weights `(batch, window)` for windows of records (latest last).

        Args:
            records (`torch.Tensor`): `(batch, window, size)` tailored weights; shorter windows are padded at the
                front.
            mask (`torch.Tensor`, *optional*): `(batch, window)`, True for real records; default all real.
            context (`torch.Tensor`, *optional*): `(batch, window, 2)`: each record's fraction of training done and
                the block's relative depth (index over number of blocks - 1). Required when `uses_context`.
        """
        return self.classify(*self.inputs(records, mask, context))

    def inputs(
        self, records: torch.Tensor, mask: torch.Tensor | None = None, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the attention reads: `(features (batch, window, n), valid (batch, window))`; arguments as `forward`.
        Fitting computes them once per window and trains `classify` on them."""
        if mask is None:
            mask = torch.ones(records.shape[:2], dtype=torch.bool, device=records.device)
        if not self.uses_context:
            return record_features(records, mask)
        if context is None:
            raise ValueError("this SmartFRZ predictor reads the training fraction and block depth: pass context.")
        return record_inputs(records, mask, context)

    def classify(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The paper's attention and decision on `inputs`: logits `(batch, 2)` and attention `(batch, window)`."""
        keys, values = self.key(x), self.value(x)
        query = self.query(x[:, -1])
        scores = torch.einsum("bwk,bk->bw", keys, query).masked_fill(~valid, float("-inf"))
        attention = torch.softmax(scores, dim=-1)
        summary = torch.einsum("bw,bwk->bk", attention, values)
        return self.classifier(summary), attention

    @torch.no_grad()
    def freeze_probability(
        self, records: torch.Tensor, fractions: torch.Tensor | None = None, depth: float | None = None
    ) -> float:
        """P(freeze) for one window `(window, size)` of records, latest last.

        Args:
            records (`torch.Tensor`): The block's tailored weights at each record.
            fractions (`torch.Tensor`, *optional*): `(window,)` fraction of training done at each record.
            depth (`float`, *optional*): The block's index over (number of blocks - 1).
        """
        context = None
        if self.uses_context:
            if fractions is None or depth is None:
                raise ValueError("this SmartFRZ predictor reads the training fraction and block depth.")
            context = torch.stack([fractions.float(), torch.full_like(fractions.float(), depth)], dim=-1)[None]
        logits, _ = self(records.unsqueeze(0), None, context)
        return float(torch.softmax(logits, dim=-1)[0, 1])

    def save(self, path: str | os.PathLike, **metadata: object) -> None:
        """Writes the weights and sizes, plus `metadata` (its card: corpus, features, validation), to safetensors."""
        from safetensors.torch import save_file

        info = {"format": _FORMAT, "sizes": json.dumps(self.sizes)}
        info.update({key: json.dumps(value) for key, value in metadata.items()})
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, os.fspath(path), metadata=info)

    @classmethod
    def from_file(cls, path: str | os.PathLike | None = None) -> FreezePredictor:
        """Loads a predictor written by `save` (default: the one shipped with hf_freezecache)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = os.fspath(path or DEFAULT_PREDICTOR)
        if not os.path.exists(path):
            raise FileNotFoundError(f"SmartFRZ predictor {path!r} does not exist.")
        with safe_open(path, framework="pt") as f:
            info = f.metadata() or {}
        found = info.get("format")
        if found != _FORMAT:
            hint = (
                " (a predictor on raw weights from an earlier hf_freezecache: refit it with "
                "recipes/train_smartfrz_predictor.py fit)"
                if found == "hf_freezecache.smartfrz-predictor/1"
                else ""
            )
            raise ValueError(
                f"{path!r} is not a SmartFRZ predictor this hf_freezecache reads (format {found!r}, expected "
                f"{_FORMAT!r}){hint}."
            )
        predictor = cls(**json.loads(info["sizes"]))
        predictor.load_state_dict(load_file(path))
        predictor.metadata = {k: json.loads(v) for k, v in info.items() if k not in ("format", "sizes")}
        return predictor.eval()
