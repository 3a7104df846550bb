"""timm Vision Transformers and DeiTs, seen as patch embedding + tokens -> transformer blocks -> norm + head."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from . import register_adapter
from .base import BlockAdapter


@register_adapter("timm-vit")
class TimmViTAdapter(BlockAdapter):
    """timm `VisionTransformer`, which timm's DeiT, DeiT III, CLIP, SigLIP... ViTs are, and the distilled DeiTs
    (`VisionTransformerDistilled`, with a distillation token and a second head).

    Stem = what `forward_features` runs before the blocks: `patch_embed`, `_pos_embed` (prepends the class, register
    and distillation tokens, adds `pos_embed`, `pos_drop`), `patch_drop`, `norm_pre`. The tokens and `pos_embed` are
    parameters of the root model, outside every stem module, so `stem_parameters` adds them. Blocks = `blocks`.
    Head = the final `norm`, then `forward_head` (pooling or attention pooling, `fc_norm`, dropout, `head`; the
    distilled model averages `head` on the class token and `head_dist` on the distillation token).

    The model's forward runs the blocks as `blocks(x)`, without the `attn_mask`/`is_causal` it can be given; the
    adapter reproduces that default forward only. `vit_base_patch16_224` has 12 blocks.
    """

    family = "timm-vit"
    model: VisionTransformer

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        # A subclass with its own forward might compute something else from the same modules; the distilled DeiT
        # only overrides `_pos_embed` and `forward_head`, which the adapter calls.
        return (
            isinstance(model, VisionTransformer)
            and type(model).forward is VisionTransformer.forward
            and type(model).forward_features is VisionTransformer.forward_features
        )

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.model.blocks)

    @property
    def num_special_tokens(self) -> int:
        return self.model.num_prefix_tokens

    def stem_modules(self) -> list[nn.Module]:
        return [self.model.patch_embed, self.model.pos_drop, self.model.patch_drop, self.model.norm_pre]

    def stem_parameters(self) -> list[nn.Parameter]:
        tokens = [getattr(self.model, name, None) for name in ("cls_token", "reg_token", "dist_token", "pos_embed")]
        return [token for token in tokens if isinstance(token, nn.Parameter)] + super().stem_parameters()

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.model._pos_embed(self.model.patch_embed(pixel_values))
        return self.model.norm_pre(self.model.patch_drop(hidden))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.norm(hidden))
