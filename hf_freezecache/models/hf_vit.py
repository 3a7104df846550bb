"""Hugging Face ViT and DeiT image classifiers (transformers), seen as embeddings -> encoder layers -> norm + head."""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import nn
from transformers import (
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    PreTrainedModel,
    ViTForImageClassification,
)
from transformers.masking_utils import create_bidirectional_mask

from . import register_adapter
from .base import BlockAdapter


class _HFViTStyleAdapter(BlockAdapter):
    """Common view of transformers' ViT-style classifiers: stem = `embeddings` (patch embedding, prefix tokens,
    position embeddings, dropout); blocks = the encoder `layers`; head = final `layernorm`, token pooling, classifier.

    In transformers 5 the layers sit directly on the backbone (`vit.layers`, no `encoder` module) and each returns a
    plain tensor, not a tuple. The backbone builds the attention mask once from the embeddings and passes it to every
    layer; `run_block` rebuilds it from its input, which has the same shape, dtype and device, so the mask (`None`
    for the default unpadded case) is the same one.

    Args:
        model (`PreTrainedModel`): The classifier.
        interpolate_pos_encoding (`bool`, *optional*, defaults to `False`): Forwarded to the embeddings and to the
            model's own forward, as the model's `interpolate_pos_encoding` argument (fine-tuning at another
            resolution than the position embeddings were trained at).
    """

    model: PreTrainedModel

    def __init__(self, model: PreTrainedModel, interpolate_pos_encoding: bool = False) -> None:
        super().__init__(model)
        self.interpolate_pos_encoding = interpolate_pos_encoding

    def bind(self, model: PreTrainedModel) -> _HFViTStyleAdapter:
        """The same view of `model`, with the same `interpolate_pos_encoding`."""
        self._check_same_architecture(model)
        return type(self)(model, interpolate_pos_encoding=self.interpolate_pos_encoding)

    @property
    @abstractmethod
    def backbone(self) -> nn.Module:
        """The `ViTModel`/`DeiTModel` inside the classifier."""

    @abstractmethod
    def classify(self, sequence_output: torch.Tensor) -> torch.Tensor:
        """The classifier's pooling and linear layer(s), applied to the normalised token sequence."""

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.backbone.layers)

    def stem_modules(self) -> list[nn.Module]:
        return [self.backbone.embeddings]

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        embeddings = self.backbone.embeddings
        # The backbone casts the images to the patch projection's dtype before embedding them.
        pixel_values = pixel_values.to(embeddings.patch_embeddings.projection.weight.dtype)
        return embeddings(pixel_values, interpolate_pos_encoding=self.interpolate_pos_encoding)

    def run_block(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        attention_mask = create_bidirectional_mask(
            config=self.backbone.config, inputs_embeds=hidden, attention_mask=None
        )
        return self.blocks[index](hidden, attention_mask)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classify(self.backbone.layernorm(hidden))

    def model_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values, interpolate_pos_encoding=self.interpolate_pos_encoding).logits


@register_adapter("hf-vit")
class HFViTAdapter(_HFViTStyleAdapter):
    """Transformers `ViTForImageClassification`: the CLS token (index 0) feeds the classifier.

    `google/vit-base-patch16-224` has 12 blocks.
    """

    family = "hf-vit"
    model: ViTForImageClassification
    num_special_tokens = 1

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, ViTForImageClassification)

    @property
    def backbone(self) -> nn.Module:
        return self.model.vit

    def classify(self, sequence_output: torch.Tensor) -> torch.Tensor:
        return self.model.classifier(sequence_output[:, 0, :])


@register_adapter("hf-deit")
class HFDeiTAdapter(_HFViTStyleAdapter):
    """Transformers DeiT: `DeiTForImageClassification` classifies the CLS token (index 0) and ignores the
    distillation token (index 1); `DeiTForImageClassificationWithTeacher` averages a CLS-token head and a
    distillation-token head, as its forward does in training and inference alike.

    The stem carries both tokens: `cls_token` and `distillation_token` live in `deit.embeddings`.
    """

    family = "hf-deit"
    model: DeiTForImageClassification | DeiTForImageClassificationWithTeacher
    num_special_tokens = 2

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, (DeiTForImageClassification, DeiTForImageClassificationWithTeacher))

    @property
    def backbone(self) -> nn.Module:
        return self.model.deit

    def classify(self, sequence_output: torch.Tensor) -> torch.Tensor:
        if isinstance(self.model, DeiTForImageClassificationWithTeacher):
            cls_logits = self.model.cls_classifier(sequence_output[:, 0, :])
            distillation_logits = self.model.distillation_classifier(sequence_output[:, 1, :])
            return (cls_logits + distillation_logits) / 2
        return self.model.classifier(sequence_output[:, 0, :])
