"""timm ResNets (`timm.models.resnet.ResNet`), seen as conv stem -> residual blocks -> pool + fc."""

from __future__ import annotations

import torch
from timm.models.resnet import ResNet
from torch import nn

from . import register_adapter
from .base import BlockAdapter


@register_adapter("timm-resnet")
class TimmResNetAdapter(BlockAdapter):
    """timm ResNet (resnet18/50, resnet10t, resnet-d, SE/ECA variants...): stem = `conv1` (one conv, or the deep
    "tiered" stem's Sequential), `bn1`, `act1`, `maxpool`; blocks = the BasicBlocks/Bottlenecks of `layer1..layer4`,
    the per-block groups of `model.group_matcher()`; head = `model.forward_head` (global pool, dropout, `fc`).

    `resnet50` has 16 blocks, `resnet18` 8. Gradient checkpointing (`set_grad_checkpointing`) changes how
    `forward_features` runs the stages, not what they compute, so the blocks stay the same.
    """

    family = "timm-resnet"
    model: ResNet

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        # A subclass with its own forward might compute something else from the same modules.
        return (
            isinstance(model, ResNet)
            and type(model).forward is ResNet.forward
            and type(model).forward_features is ResNet.forward_features
        )

    @property
    def blocks(self) -> list[nn.Module]:
        model = self.model
        return [*model.layer1, *model.layer2, *model.layer3, *model.layer4]

    def stem_modules(self) -> list[nn.Module]:
        return [self.model.conv1, self.model.bn1, self.model.act1, self.model.maxpool]

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.maxpool(self.model.act1(self.model.bn1(self.model.conv1(pixel_values))))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(hidden)
