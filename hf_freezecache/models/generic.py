"""Any model whose forward runs a chain of named blocks, described by the qualified names of its modules."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import register_adapter
from .base import BlockAdapter

#: Values of `head_pooling`: what is applied to the output of the last block before the head.
HEAD_POOLINGS = ("none", "avg", "cls", "mean")


class _StopForward(Exception):
    """Raised from a hook to abandon the model's forward once the wanted activations are captured."""


@register_adapter("generic")
class GenericBlockAdapter(BlockAdapter):
    """A model described by module names: `stem_modules` -> `block_modules` -> `head_pooling` + `head_modules`.

    The model's forward must call each block once, in the given order, with the output of each block as the whole
    input of the next. Without `stem_modules`, `embed` and `prefix` run the model's own forward and capture the
    input of block 0 (or the output of block `k-1`) with a hook, stopping the forward there; this is exact for any
    such model, whatever it does before the blocks. `suffix` cannot use that trick, since the modules after the cut
    need the activations of the cut, not images, so it needs `head_modules` (or `head`); and freezing block 0 needs
    `stem_modules`, to know which parameters come with it. `check_block_split` tells whether the names describe the
    forward, and which part they miss when they do not.

    Never picked automatically (`matches` is `False`): `get_block_adapter(model, block_modules=[...])` builds one.

    Args:
        model (`nn.Module`): The model; a raw module returning logits or a model returning an output with `.logits`.
        block_modules (`list[str]`): Qualified names (as in `model.named_modules()`) of the blocks, in forward order,
            e.g. `["layer1.0", "layer1.1", ..., "layer4.1"]` for torchvision's resnet18.
        stem_modules (`list[str]`, *optional*): Modules applied, in order, to the images to get the input of block 0,
            e.g. `["conv1", "bn1", "relu", "maxpool"]`.
        head_modules (`list[str]`, *optional*): Modules applied, in order, to the output of the last block to get the
            logits, e.g. `["avgpool", "fc"]`. A `nn.Linear` given a tensor of more than 2 dimensions whose last one is
            not its input size gets it flattened from dimension 1 first, as forwards usually do with `flatten(1)`
            between a pool and the classifier.
        head_pooling (`str`, *optional*, defaults to `"none"`): Pooling the model's forward applies to the output of
            the last block before its head modules, where no module does it: `"avg"` averages `(B, C, H, W)` maps over
            H and W (ConvNext's `mean([-2, -1])`), `"cls"` takes token 0 of `(B, T, D)` tokens, `"mean"` averages
            the tokens.
        head (`Callable[[nn.Module, torch.Tensor], torch.Tensor]`, *optional*): Instead of `head_modules`, a function
            `head(model, hidden) -> logits` applied after `head_pooling`, for a forward that does more than call
            modules after the last block. It gets the adapter's model, so that `bind` carries it over to another
            instance. Its parameters freeze with no block, like those of `head_modules`.
    """

    family = "generic"

    def __init__(
        self,
        model: nn.Module,
        block_modules: list[str],
        stem_modules: list[str] | None = None,
        head_modules: list[str] | None = None,
        head_pooling: str = "none",
        head: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__(model)
        if not block_modules:
            raise ValueError("block_modules must name at least one block module, got an empty list.")
        if head_pooling not in HEAD_POOLINGS:
            raise ValueError(f"head_pooling must be one of {', '.join(HEAD_POOLINGS)}, got {head_pooling!r}.")
        if head is not None and head_modules is not None:
            raise ValueError("Pass head_modules or a head callable to the generic adapter, not both.")
        duplicates = sorted({name for name in block_modules if block_modules.count(name) > 1})
        if duplicates:
            raise ValueError(f"block_modules must name each block once; repeated: {', '.join(duplicates)}.")
        self.block_module_names = list(block_modules)
        self.stem_module_names = list(stem_modules) if stem_modules is not None else None
        self.head_module_names = list(head_modules) if head_modules is not None else None
        self.head_pooling = head_pooling
        self.head_callable = head
        self._blocks = self._resolve(self.block_module_names, "block_modules")
        self._stem = self._resolve(self.stem_module_names or [], "stem_modules")
        self._head = self._resolve(self.head_module_names or [], "head_modules")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return False

    def bind(self, model: nn.Module) -> GenericBlockAdapter:
        """The same module names, pooling and head callable, resolved in `model`."""
        self._check_same_architecture(model)
        return GenericBlockAdapter(
            model,
            self.block_module_names,
            self.stem_module_names,
            self.head_module_names,
            head_pooling=self.head_pooling,
            head=self.head_callable,
        )

    @property
    def blocks(self) -> list[nn.Module]:
        return self._blocks

    def stem_modules(self) -> list[nn.Module]:
        if self.stem_module_names is None:
            raise ValueError(
                "The generic adapter needs stem_modules (the modules run before the first block, e.g. "
                "['conv1', 'bn1', 'relu', 'maxpool']) to know which parameters freezing block 0 freezes."
            )
        return self._stem

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.stem_module_names is None:
            return self._capture(pixel_values, 0)
        hidden = pixel_values
        for module in self._stem:
            hidden = module(hidden)
        return hidden

    def prefix(self, pixel_values: torch.Tensor, position: int) -> torch.Tensor:
        if self.stem_module_names is None:
            self._check_position(position)
            return self._capture(pixel_values, position)
        return super().prefix(pixel_values, position)

    def suffix(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        # Fail before running the remaining blocks, not after.
        self._require_head()
        return super().suffix(hidden, position)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        self._require_head()
        hidden = self._pool(hidden)
        if self.head_callable is not None:
            return self.head_callable(self.model, hidden)
        for module in self._head:
            if isinstance(module, nn.Linear) and hidden.dim() > 2 and hidden.shape[-1] != module.in_features:
                hidden = hidden.flatten(1)
            hidden = module(hidden)
        return hidden

    def _pool(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.head_pooling == "none":
            return hidden
        # "avg" pools (B, C, H, W) maps, "cls" and "mean" (B, T, D) tokens.
        if hidden.dim() != (4 if self.head_pooling == "avg" else 3):
            allowed = {4: "none, avg", 3: "none, cls, mean"}.get(hidden.dim(), "none")
            raise ValueError(
                f"head_pooling={self.head_pooling!r} does not fit the {tuple(hidden.shape)} output of the last block; "
                f"allowed for it: {allowed}."
            )
        if self.head_pooling == "avg":
            return hidden.mean(dim=(-2, -1))
        return hidden[:, 0] if self.head_pooling == "cls" else hidden.mean(dim=1)

    def _require_head(self) -> None:
        if self.head_module_names is None and self.head_callable is None:
            raise ValueError(
                "The generic adapter needs head_modules (the modules run after the last block, e.g. ['avgpool', "
                "'fc']) or a head callable to compute logits from cached activations; pass head_modules=[...] to "
                "GenericBlockAdapter."
            )

    def _capture(self, pixel_values: torch.Tensor, position: int) -> torch.Tensor:
        """Runs the model's forward up to `position` and returns the activations there (input of block 0 for 0)."""
        captured: list[torch.Tensor] = []

        def keep_input(module: nn.Module, args: tuple[Any, ...]) -> None:
            captured.append(args[0])
            raise _StopForward

        def keep_output(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            captured.append(output)
            raise _StopForward

        if position == 0:
            handle = self._blocks[0].register_forward_pre_hook(keep_input)
        else:
            handle = self._blocks[position - 1].register_forward_hook(keep_output)
        try:
            self.model(pixel_values)
        except _StopForward:
            return captured[0]
        finally:
            handle.remove()
        name = self.block_module_names[max(position - 1, 0)]
        raise RuntimeError(f"The forward of {type(self.model).__name__} never called block module {name!r}.")

    def _resolve(self, names: list[str], argument: str) -> list[nn.Module]:
        modules = dict(self.model.named_modules())
        for name in names:
            if not name or name not in modules:
                close = difflib.get_close_matches(name, list(modules), n=5)
                hint = f" Close matches: {', '.join(close)}." if close else ""
                raise ValueError(
                    f"{argument} names {name!r}, which is not a submodule of {type(self.model).__name__}. Names are "
                    "qualified as in `model.named_modules()`; top-level modules: "
                    f"{', '.join(child for child, _ in self.model.named_children())}.{hint}"
                )
        return [modules[name] for name in names]
