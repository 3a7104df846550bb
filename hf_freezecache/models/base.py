"""The uniform view of a model that freezing, caching and accounting work on: stem -> ordered blocks -> head."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn


class BlockAdapter(ABC):
    """A model seen as `stem -> blocks[0] -> ... -> blocks[n-1] -> head`.

    Position `k` (0 <= k <= `num_blocks`) is the point after the first `k` blocks: `prefix(x, k)` runs the stem and
    blocks `0..k-1`, `suffix(h, k)` runs blocks `k..n-1` and the head, and `suffix(prefix(x, k), k)` equals the
    model's own forward for every `k`. The stem belongs to block 0 for freezing: freezing block 0 freezes the stem
    too, because a prefix can never start after it.

    Subclasses implement `matches`, `blocks`, `stem_modules`, `embed` and `head`, and register themselves with
    `@register_adapter("family-name")` in `hf_freezecache.models`.

    Args:
        model (`nn.Module`): The model to view. The adapter holds a reference; it never copies or modifies it.
    """

    family: ClassVar[str] = ""
    #: Tokens before the patch grid in a transformer's hidden states (CLS, distillation, registers); 0 for CNNs.
    num_special_tokens: int = 0
    #: What the model was built from (`model_source` of the model as given), when the adapter views a model inside
    #: a wrapper (a timm model in `ImageClassifierWrapper`), whose name only the wrapper knows; set by
    #: `get_block_adapter`. None: `model_source(self.model)`.
    source: tuple[str, str | None] | None = None

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def bind(self, model: nn.Module) -> BlockAdapter:
        """The same view of `model`, another instance of this adapter's model class (a deep copy, other weights).

        Adapters with options (module names, `interpolate_pos_encoding`) override it to carry them over.
        """
        self._check_same_architecture(model)
        return type(self)(model)

    @classmethod
    @abstractmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether this adapter understands `model`."""

    @property
    @abstractmethod
    def blocks(self) -> list[nn.Module]:
        """The freezable blocks, in forward order."""

    @abstractmethod
    def stem_modules(self) -> list[nn.Module]:
        """Modules that run before block 0."""

    def stem_parameters(self) -> list[nn.Parameter]:
        """Parameters used before block 0. Override when the model keeps some outside any stem module (timm ViT)."""
        return [p for module in self.stem_modules() for p in module.parameters()]

    @abstractmethod
    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Runs the stem: images -> input of block 0."""

    def run_block(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Runs block `index` on `hidden`."""
        return self.blocks[index](hidden)

    @abstractmethod
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Runs everything after the last block: output of the last block -> logits."""

    def model_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Logits of the model's own forward, the reference that `prefix`/`suffix` must reproduce."""
        output = self.model(pixel_values)
        return output.logits if hasattr(output, "logits") else output

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def prefix(self, pixel_values: torch.Tensor, position: int) -> torch.Tensor:
        """Activations at `position`: the stem and blocks `0..position-1` applied to `pixel_values`."""
        self._check_position(position)
        hidden = self.embed(pixel_values)
        for index in range(position):
            hidden = self.run_block(index, hidden)
        return hidden

    def suffix(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        """Logits from activations at `position`: blocks `position..n-1` and the head."""
        self._check_position(position)
        for index in range(position, self.num_blocks):
            hidden = self.run_block(index, hidden)
        return self.head(hidden)

    def block_modules(self, index: int) -> list[nn.Module]:
        """Modules frozen when block `index` is frozen (block 0 takes the stem with it)."""
        return ([*self.stem_modules(), self.blocks[index]]) if index == 0 else [self.blocks[index]]

    def block_parameters(self, index: int) -> list[nn.Parameter]:
        """Parameters frozen when block `index` is frozen (block 0 takes the stem's with it)."""
        params = list(self.blocks[index].parameters())
        if index == 0:
            params = self.stem_parameters() + params
        seen: set[int] = set()
        return [p for p in params if not (id(p) in seen or seen.add(id(p)))]

    def block_names(self) -> list[str]:
        """Qualified module names of the blocks, for logs and error messages."""
        names = {id(module): name for name, module in self.model.named_modules()}
        return [names.get(id(block), f"block{index}") for index, block in enumerate(self.blocks)]

    def _check_same_architecture(self, model: nn.Module) -> None:
        if type(model) is not type(self.model):
            raise ValueError(
                f"bind needs another {type(self.model).__name__} (the class of this adapter's model), got "
                f"{type(model).__name__}."
            )

    def _check_position(self, position: int) -> None:
        if not 0 <= position <= self.num_blocks:
            raise ValueError(
                f"Block position {position} is outside this {self.family} model: positions go from 0 to "
                f"{self.num_blocks} ({self.num_blocks} blocks)."
            )
