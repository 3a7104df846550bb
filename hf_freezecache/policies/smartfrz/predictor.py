"""SmartFRZ's lightweight attention predictor (Li et al. 2024, section 3.3 and Appendix C)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

#: The predictor trained by `recipes/train_smartfrz_predictor.sh`, shipped with the package and used by default.
DEFAULT_PREDICTOR = Path(__file__).with_name("predictor.safetensors")
_FORMAT = "hf_freezecache.smartfrz-predictor/1"


def _mlp(sizes: tuple[int, int, int]) -> nn.Sequential:
    # The paper's "3-layer MLP": input, one hidden layer, output.
    return nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.ReLU(), nn.Linear(sizes[1], sizes[2]))


def normalize_records(records: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Centres every tailored weight over the window and scales by the spread of the latest record's weights.

    The paper feeds raw weights; raw values mostly encode a layer's initialisation scale, which differs across models
    and says nothing about convergence. After this, a record is "how far this weight sits from its mean over the
    window, in units of the layer's weight spread": the movement the predictor has to judge, comparable across
    layers and models.

    Args:
        records (`torch.Tensor`): `(batch, window, size)` tailored weights, oldest first, padding first.
        mask (`torch.Tensor`): `(batch, window)` booleans, True for real records.
    """
    weights = mask.unsqueeze(-1).to(records.dtype)
    count = weights.sum(dim=1, keepdim=True).clamp_min(1.0)
    mean = (records * weights).sum(dim=1, keepdim=True) / count
    scale = records[:, -1].std(dim=-1, keepdim=True).unsqueeze(1).clamp_min(1e-12)
    return (records - mean) / scale * weights


class FreezePredictor(nn.Module):
    """Encodes each record into key, query and value with three MLPs, attends from the latest record's query over all
    records' keys (softmax), sums the values into a context vector, and classifies it as keep (0) / freeze (1).

    Args:
        input_size (`int`): Tailored weights per record (1024 in the paper).
        hidden_size (`int`): Hidden width of the key/query/value MLPs (256).
        key_size (`int`): Size of keys, queries, values and the context (64).
        classifier_hidden_size (`int`): Hidden width of the decision MLP (32).
    """

    def __init__(
        self, input_size: int = 1024, hidden_size: int = 256, key_size: int = 64, classifier_hidden_size: int = 32
    ) -> None:
        super().__init__()
        self.sizes = {
            "input_size": input_size,
            "hidden_size": hidden_size,
            "key_size": key_size,
            "classifier_hidden_size": classifier_hidden_size,
        }
        self.key = _mlp((input_size, hidden_size, key_size))
        self.query = _mlp((input_size, hidden_size, key_size))
        self.value = _mlp((input_size, hidden_size, key_size))
        self.classifier = _mlp((key_size, classifier_hidden_size, 2))
        self.metadata: dict[str, str] = {}

    @property
    def input_size(self) -> int:
        return self.sizes["input_size"]

    def forward(self, records: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits `(batch, 2)` and attention weights `(batch, window)` for windows of records (latest last).

        Args:
            records (`torch.Tensor`): `(batch, window, input_size)` raw tailored weights; shorter windows are padded
                at the front.
            mask (`torch.Tensor`, *optional*): `(batch, window)`, True for real records; default all real.
        """
        if mask is None:
            mask = torch.ones(records.shape[:2], dtype=torch.bool, device=records.device)
        x = normalize_records(records, mask)
        keys, values = self.key(x), self.value(x)
        query = self.query(x[:, -1])
        scores = torch.einsum("bwk,bk->bw", keys, query).masked_fill(~mask, float("-inf"))
        attention = torch.softmax(scores, dim=-1)
        context = torch.einsum("bw,bwk->bk", attention, values)
        return self.classifier(context), attention

    @torch.no_grad()
    def freeze_probability(self, records: torch.Tensor) -> float:
        """P(freeze) for one window `(window, input_size)` of records, latest last."""
        logits, _ = self(records.unsqueeze(0))
        return float(torch.softmax(logits, dim=-1)[0, 1])

    def save(self, path: str | os.PathLike, **metadata: object) -> None:
        """Writes the weights and sizes (plus `metadata`, e.g. how it was trained) to a safetensors file."""
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
        if info.get("format") != _FORMAT:
            raise ValueError(
                f"{path!r} is not a SmartFRZ predictor written by hf_freezecache (format {info.get('format')!r}, "
                f"expected {_FORMAT!r})."
            )
        predictor = cls(**json.loads(info["sizes"]))
        predictor.load_state_dict(load_file(path))
        predictor.metadata = {k: json.loads(v) for k, v in info.items() if k not in ("format", "sizes")}
        return predictor.eval()
