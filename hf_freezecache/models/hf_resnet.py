"""Hugging Face `ResNetForImageClassification`, seen as embedder -> residual layers -> pool + classifier."""

from __future__ import annotations

import torch
from torch import nn
from transformers import ResNetForImageClassification

from . import register_adapter
from .base import BlockAdapter


@register_adapter("hf-resnet")
class HFResNetAdapter(BlockAdapter):
    """Transformers ResNet: stem = `resnet.embedder` (7x7 conv + BN + activation + max pool); blocks = every residual
    layer (`ResNetBasicLayer` or `ResNetBottleNeckLayer`) of every stage, in order; head = `resnet.pooler` (adaptive
    average pool) + `classifier` (flatten + linear).

    A stage adds nothing around its layers, so the blocks can be cut at any layer, not just at stage boundaries:
    `microsoft/resnet-50` (depths 3, 4, 6, 3) has 16 blocks.
    """

    family = "hf-resnet"
    model: ResNetForImageClassification

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, ResNetForImageClassification)

    @property
    def blocks(self) -> list[nn.Module]:
        return [layer for stage in self.model.resnet.encoder.stages for layer in stage.layers]

    def stem_modules(self) -> list[nn.Module]:
        return [self.model.resnet.embedder]

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.resnet.embedder(pixel_values)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        # `classifier` starts with `nn.Flatten`, as in `ResNetForImageClassification.forward`.
        return self.model.classifier(self.model.resnet.pooler(hidden))

    def model_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits
