"""Gives a logits-returning model (timm, torchvision, plain PyTorch) the `Trainer` calling convention."""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput


class ImageClassifierWrapper(nn.Module):
    """Wraps `model(images) -> logits` as `forward(pixel_values, labels=None) -> ImageClassifierOutput`.

    `Trainer` feeds batches as keyword arguments and expects a `loss` when `labels` are given; timm models take a
    positional tensor and return logits. The wrapped model stays reachable as `.model`, and its own state dict is
    `wrapper.model.state_dict()`.

    Args:
        model (`nn.Module`): The model to wrap.
        source (`str`, *optional*): What the model was built from, e.g. `"timm:deit_tiny_patch16_224"` (the name
            `build_model` was given), which `models.model_source` reports.
    """

    def __init__(self, model: nn.Module, source: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.source = source

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ImageClassifierOutput:
        logits = self.model(pixel_values)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)
