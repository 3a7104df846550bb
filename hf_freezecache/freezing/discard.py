"""Discarding a frozen prefix: the forward starts from cached activations and the prefix leaves training memory."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

from ..models import BlockAdapter

#: The batch key that carries cached activations in place of `pixel_values`.
ACTIVATIONS_KEY = "prefix_activations"


class _ForwardWithDiscard:
    """Installed as `model.forward`: the model's own forward, or its suffix when given `prefix_activations`.

    A callable object rather than a closure, so that `copy.deepcopy(model)` (cost measurement) gives the replica a
    dispatcher bound to the replica.
    """

    def __init__(self, model: nn.Module, adapter: BlockAdapter) -> None:
        self.model = model
        self.adapter = adapter
        self.position = 0
        # `Trainer` inspects `model.forward`'s signature (loss kwargs): show it the class's.
        self.__signature__ = inspect.signature(type(model).forward.__get__(model))

    def __call__(self, *args, prefix_activations: torch.Tensor | None = None, **kwargs):
        model = self.model
        if prefix_activations is None:
            return type(model).forward(model, *args, **kwargs)
        if args:
            raise TypeError("With `prefix_activations`, pass every other input by keyword.")
        labels = kwargs.pop("labels", None)
        reference = next(iter(self.adapter.blocks[self.position].parameters()))
        hidden = prefix_activations.to(device=reference.device, dtype=reference.dtype)
        logits = self.adapter.suffix(hidden, self.position)
        loss = None
        if labels is not None:
            if isinstance(model, PreTrainedModel):
                loss = model.loss_function(labels, logits, model.config, **kwargs)
            else:
                loss = F.cross_entropy(logits, labels)
        return ImageClassifierOutput(loss=loss, logits=logits)


class DiscardedPrefix:
    """Lets a model train from activations cached at a block position, with its prefix out of training memory.

    Installing it replaces `model.forward` on the instance by a dispatcher: called with `pixel_values` it is the
    model's own forward (evaluation, saving and inference see the whole model); called with
    `prefix_activations=<activations at position k>` and `labels`, it runs only blocks `k..n-1` and the head and
    returns an `ImageClassifierOutput` with the model's own loss. It is installed before `Trainer` wraps the model,
    so accelerate's mixed-precision wrapper (which replaces `forward` too) wraps the dispatcher and covers both paths.

    `discard(position)` moves the parameters and buffers of the prefix (stem and blocks `0..position-1`) off the
    training device (to CPU); `restored()` brings them back for evaluation. On a CPU run they stay where they are,
    and the cost report leaves them out of training memory because no training step touches them.

    Args:
        model (`nn.Module`): The model the Trainer calls (for timm, the `ImageClassifierWrapper`).
        adapter (`BlockAdapter`): Its block view.
        offload_device (`str` or `torch.device`): Where a discarded prefix waits while training runs on another device.
    """

    def __init__(self, model: nn.Module, adapter: BlockAdapter, offload_device: str | torch.device = "cpu") -> None:
        self.adapter = adapter
        self.offload_device = torch.device(offload_device)
        self._training_device: torch.device | None = None
        self._forward = _ForwardWithDiscard(model, adapter)
        model.forward = self._forward

    @property
    def position(self) -> int:
        """Blocks discarded so far (0: none)."""
        return self._forward.position

    def prefix_tensors(self, position: int | None = None) -> list[torch.Tensor]:
        """Parameters and buffers of the stem and blocks `0..position-1`."""
        position = self.position if position is None else position
        seen: set[int] = set()
        tensors = []
        for index in range(position):
            tensors += self.adapter.block_parameters(index)
            for module in self.adapter.block_modules(index):
                tensors += list(module.buffers())
        return [t for t in tensors if not (id(t) in seen or seen.add(id(t)))]

    def discard(self, position: int, offload: bool = True) -> None:
        """Trains from activations at `position` from now on; with `offload`, the prefix leaves the training device
        (under DDP it stays, see `DiscardController`)."""
        if not 0 < position < self.adapter.num_blocks:
            raise ValueError(
                f"Discard position {position} is outside the model: it must leave at least one block to train, "
                f"so it goes from 1 to {self.adapter.num_blocks - 1}."
            )
        if position < self.position:
            raise ValueError(f"Blocks 0-{self.position - 1} are already discarded; cannot go back to {position}.")
        self._forward.position = position
        device = next(t for t in self.adapter.blocks[position].parameters()).device
        if offload and device != self.offload_device:
            self._training_device = device
            self._move(self.prefix_tensors(), self.offload_device)

    def broadcast_from_main(self, position: int) -> None:
        """Gives every process of the initialized process group the main process's stem and blocks
        `0..position-1`, before they build the shares of one cache: BatchNorm statistics of blocks that trained
        until now are each process's own since the last forward (DDP broadcasts buffers from the main process only
        at the start of the next one)."""
        for tensor in self.prefix_tensors(position):
            torch.distributed.broadcast(tensor.data, src=0)

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        """Within the block, the discarded prefix is back on the training device (evaluation on raw images)."""
        offloaded = self._training_device is not None and self.position > 0
        if offloaded:
            self._move(self.prefix_tensors(), self._training_device)
        try:
            yield
        finally:
            if offloaded:
                self._move(self.prefix_tensors(), self.offload_device)

    @staticmethod
    def _move(tensors: list[torch.Tensor], device: torch.device) -> None:
        # `.data` assignment moves a parameter or buffer in place: optimizer slots and module attributes keep
        # pointing at the same Python objects.
        for tensor in tensors:
            tensor.data = tensor.data.to(device)
