"""`FreezeCacheModel`: the one `nn.Module` that owns a model, its block view, and which blocks are frozen or discarded.

It wraps the user's model the way peft's `PeftModel` does, and never patches it: no method of any module is replaced
on an instance. Patches do not survive the wrappers training goes through (accelerate's mixed-precision closure,
`copy.deepcopy`, `nn.DataParallel` replicas, `torch.compile`); a class's own methods do.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

from .models import BlockAdapter, get_block_adapter

#: The batch key that carries cached activations in place of `pixel_values`.
ACTIVATIONS_KEY = "prefix_activations"
_BASE = "base_model."


class FreezeCacheModel(nn.Module):
    """A model seen as stem -> blocks -> head, with frozen blocks and, possibly, a discarded prefix.

    - `forward(pixel_values=..., labels=...)` is the whole model. With nothing frozen it is the model's own forward;
      once blocks `0..k-1` are frozen, the prefix runs under `torch.no_grad()` (no graph, nothing saved for
      backward) and the rest with gradients, through the adapter's `prefix`/`suffix`, which equal the model's
      forward (`check_block_split`).
    - `forward(prefix_activations=..., labels=...)` runs only the suffix after the discarded prefix: blocks
      `discarded_position..n-1` and the head, from cached activations.
    - `train(mode)` keeps frozen blocks in eval mode, so `Trainer`'s `model.train()` every step moves no BatchNorm
      statistics and draws no Dropout mask in them.
    - Its `state_dict()` keys are the base model's, and `load_state_dict` takes them: checkpoints and saved weights
      load into the plain model (`unwrap()`) with its family's `load_state_dict` / `from_pretrained`.

    Args:
        model (`nn.Module`): The model to train, with the `Trainer` calling convention (`forward(pixel_values,
            labels)` returning an output with `.loss` and `.logits`).
        adapter (`BlockAdapter`, *optional*): Its block view, over `model` or a submodule of it; default
            `get_block_adapter(model)`.
    """

    def __init__(self, model: nn.Module, adapter: BlockAdapter | None = None) -> None:
        super().__init__()
        if isinstance(model, FreezeCacheModel):
            raise ValueError("The model is already a FreezeCacheModel; pass it as it is.")
        self.base_model = model
        self.adapter = adapter if adapter is not None else get_block_adapter(model)
        self._adapter_path = _submodule_path(model, self.adapter.model)
        self.frozen_blocks: set[int] = set()
        self.discarded_position = 0
        self._offloaded_from: torch.device | None = None
        self.register_state_dict_post_hook(_base_model_keys)
        self.register_load_state_dict_pre_hook(_wrapper_keys)

    # -- what the base model says about itself --------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        # As peft's PeftModel: what the wrapper does not have is the base model's (`config`,
        # `gradient_checkpointing_enable`, ...), so code written for the model keeps working on `trainer.model`.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Whether `Trainer` may pass `num_items_in_batch`: as for the base model (Trainer reads this attribute)."""
        base = self.base_model
        if hasattr(base, "accepts_loss_kwargs"):
            return bool(base.accepts_loss_kwargs)
        parameters = inspect.signature(base.forward).parameters.values()
        return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters)

    @property
    def num_blocks(self) -> int:
        return self.adapter.num_blocks

    def unwrap(self) -> nn.Module:
        """The base model, as given: what users get back and what is saved."""
        return self.base_model

    # -- freezing ---------------------------------------------------------------------------------------------------

    @property
    def frozen_prefix(self) -> int:
        """Length of the contiguous run of frozen blocks starting at block 0."""
        position = 0
        while position in self.frozen_blocks:
            position += 1
        return position

    def freeze_blocks(self, indices) -> list[int]:
        """Freezes blocks `indices` (block 0 with the stem): no gradient, no update, eval mode from now on.

        Returns the blocks that were not frozen before, sorted. Every index is checked before anything changes, so a
        bad call leaves no half-frozen model.
        """
        new = sorted(set(int(i) for i in indices) - self.frozen_blocks)
        outside = [index for index in new if not 0 <= index < self.num_blocks]
        if outside:
            raise ValueError(
                f"Block index {outside[0]} is outside the model: blocks go from 0 to {self.num_blocks - 1}."
            )
        for index in new:
            for param in self.adapter.block_parameters(index):
                param.requires_grad_(False)
                param.grad = None
            for module in self.adapter.block_modules(index):
                module.train(False)
            self.frozen_blocks.add(index)
        return new

    def trainable_parameters(self) -> int:
        """Number of parameters that still train."""
        return sum(p.numel() for p in self.base_model.parameters() if p.requires_grad)

    def train(self, mode: bool = True) -> FreezeCacheModel:
        super().train(mode)
        for index in self.frozen_blocks:
            for module in self.adapter.block_modules(index):
                module.train(False)
        return self

    # -- discarding -------------------------------------------------------------------------------------------------

    def prefix_tensors(self, position: int | None = None) -> list[torch.Tensor]:
        """Parameters and buffers of the stem and blocks `0..position-1` (default: the discarded prefix)."""
        position = self.discarded_position if position is None else position
        seen: set[int] = set()
        tensors: list[torch.Tensor] = []
        for index in range(position):
            tensors += self.adapter.block_parameters(index)
            for module in self.adapter.block_modules(index):
                tensors += list(module.buffers())
        return [t for t in tensors if not (id(t) in seen or seen.add(id(t)))]

    def discard(self, position: int, offload_to: torch.device | str | None = None) -> None:
        """Trains from activations at `position` from now on (`forward(prefix_activations=...)`).

        With `offload_to`, the discarded prefix's tensors move there (e.g. the CPU) until `restored()` brings them
        back; leave it None when a wrapper needs every tensor on the training device (DDP broadcasts buffers,
        `nn.DataParallel` replicates all of them).
        """
        if not 0 < position < self.num_blocks:
            raise ValueError(
                f"Discard position {position} is outside the model: it must leave at least one block to train, so it "
                f"goes from 1 to {self.num_blocks - 1}."
            )
        if position < self.discarded_position:
            raise ValueError(
                f"Blocks 0-{self.discarded_position - 1} are already discarded; cannot go back to {position}."
            )
        if not set(range(position)) <= self.frozen_blocks:
            raise ValueError(f"Blocks 0-{position - 1} must be frozen before they are discarded.")
        self.discarded_position = position
        device = self.training_device
        target = torch.device(offload_to) if offload_to is not None else None
        if target is not None and target != device:
            self._offloaded_from = device
            _move(self.prefix_tensors(), target)

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        """Within the block, an offloaded prefix is back on the training device (evaluation on raw images, probes,
        building a deeper cache)."""
        device = self._offloaded_from
        if device is None:
            yield
            return
        away = self.prefix_tensors()[0].device
        _move(self.prefix_tensors(), device)
        try:
            yield
        finally:
            _move(self.prefix_tensors(), away)

    # -- forward ----------------------------------------------------------------------------------------------------

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        prefix_activations: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        adapter = self._bound_adapter()
        if prefix_activations is not None:
            if pixel_values is not None:
                raise ValueError("Give either `pixel_values` or `prefix_activations`, not both.")
            position = self.discarded_position
            if position == 0:
                raise ValueError("`prefix_activations` given, but no prefix is discarded: call `discard` first.")
            reference = next(iter(adapter.blocks[position].parameters()))
            hidden = prefix_activations.to(device=reference.device, dtype=reference.dtype)
            return self._output(adapter.suffix(hidden, position), labels, kwargs)
        if pixel_values is None:
            raise ValueError("FreezeCacheModel needs `pixel_values` (images) or `prefix_activations` (a cache).")
        position = min(self.frozen_prefix, self.num_blocks)
        if position == 0:
            return self.base_model(pixel_values=pixel_values, labels=labels, **kwargs)
        with torch.no_grad():
            hidden = adapter.prefix(pixel_values, position)
        return self._output(adapter.suffix(hidden, position), labels, kwargs)

    def _output(self, logits: torch.Tensor, labels: torch.Tensor | None, kwargs: dict[str, Any]):
        loss = None
        if labels is not None:
            if isinstance(self.base_model, PreTrainedModel):
                loss = self.base_model.loss_function(labels, logits, self.base_model.config, **kwargs)
            else:
                loss = F.cross_entropy(logits, labels)
        return ImageClassifierOutput(loss=loss, logits=logits)

    def _bound_adapter(self) -> BlockAdapter:
        # `nn.DataParallel` replicas share this object's attributes, so `self.adapter` views the original modules;
        # a replica runs its own modules through an adapter bound to them.
        target = self.base_model.get_submodule(self._adapter_path)
        return self.adapter if self.adapter.model is target else self.adapter.bind(target)

    @property
    def training_device(self) -> torch.device:
        """Where the blocks that train are (a discarded prefix may wait elsewhere)."""
        position = min(self.discarded_position, self.num_blocks - 1)
        return next(iter(self.adapter.blocks[position].parameters())).device


def _submodule_path(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ValueError(f"The block adapter views a {type(target).__name__} that is not part of the model given.")


def _move(tensors: list[torch.Tensor], device: torch.device | str) -> None:
    # `.data` assignment moves a parameter or buffer in place: optimizer slots and module attributes keep pointing at
    # the same Python objects.
    for tensor in tensors:
        tensor.data = tensor.data.to(device)


def _base_model_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post-hook: `<prefix>base_model.<key>` -> `<prefix><key>`, so saved weights are the base model's."""
    for key in [key for key in state_dict if key.startswith(prefix + _BASE)]:
        state_dict[prefix + key[len(prefix + _BASE) :]] = state_dict.pop(key)


def _wrapper_keys(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Load pre-hook: the base model's keys `<prefix><key>` -> `<prefix>base_model.<key>` (keys already in the
    wrapper's naming are left as they are)."""
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + _BASE)]:
        state_dict[prefix + _BASE + key[len(prefix) :]] = state_dict.pop(key)
