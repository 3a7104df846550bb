"""A fixed probe batch run through the model block by block, and linear CKA between block outputs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import torch
from torch import nn

from ..models import BlockAdapter


def check_probe_size(size: int) -> None:
    """Rejects a probe batch of fewer than 2 images: centred over one sample, every block output is zero."""
    if size < 2:
        raise ValueError(f"--policy_probe_size must be at least 2, got {size}.")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Within the block every module of `model` is in eval mode; each module's own flag is restored after.

    A probe pass in train mode would move BatchNorm statistics and draw Dropout masks of the blocks still training.
    """
    modes = [(module, module.training) for module in model.modules()]
    for module, _ in modes:
        module.training = False
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


class BlockProbe:
    """Inputs and outputs of every block on one fixed batch, for policies that watch representations.

    The frozen prefix's output never changes, so it is computed once per prefix length and reused; only the blocks
    after it run at each evaluation. Advancing the prefix runs blocks that may already be discarded (moved off the
    training device): `restore` is the context manager that brings them back (`FreezeCacheModel.restored`).

    Args:
        adapter (`BlockAdapter`): The model's block view.
        pixel_values (`torch.Tensor`): The probe images, preprocessed as for training.
        restore (`Callable`, *optional*): Returns a context manager within which the whole model can run.
    """

    def __init__(
        self,
        adapter: BlockAdapter,
        pixel_values: torch.Tensor,
        restore: Callable[[], AbstractContextManager] | None = None,
    ) -> None:
        self.adapter = adapter
        self.pixel_values = pixel_values
        self.restore = restore or contextlib.nullcontext
        self._prefix: tuple[int, torch.Tensor] | None = None

    @property
    def num_samples(self) -> int:
        return len(self.pixel_values)

    @torch.no_grad()
    def run(self, start: int = 0) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """`{block: (input, output)}` for blocks `start..n-1`, with every module in eval mode.

        Blocks before `start` must be frozen: their output at `start` is cached on first use.
        """
        adapter = self.adapter
        with eval_mode(adapter.model):
            hidden = self._hidden_at(start)
            io = {}
            for index in range(start, adapter.num_blocks):
                output = adapter.run_block(index, hidden)
                io[index] = (hidden, output)
                hidden = output
        return io

    def _hidden_at(self, position: int) -> torch.Tensor:
        if self._prefix is not None and self._prefix[0] == position:
            return self._prefix[1]
        with self.restore():
            if self._prefix is not None and self._prefix[0] < position:
                start, hidden = self._prefix
            else:
                device = next(self.adapter.model.parameters()).device
                start, hidden = 0, self.adapter.embed(self.pixel_values.to(device))
            for index in range(start, position):
                hidden = self.adapter.run_block(index, hidden)
        self._prefix = (position, hidden)
        return hidden


def centered_gram(features: torch.Tensor) -> torch.Tensor:
    """`X X^T` of the samples' flattened features after centering every feature over the samples (float64)."""
    x = features.reshape(len(features), -1).double()
    x = x - x.mean(dim=0, keepdim=True)
    return x @ x.T


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) of two representations of the same samples (first dimension).

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) with centered features, computed from the samples' Gram
    matrices, so the feature sizes of `x` and `y` may differ. 1 for identical representations; invariant to
    orthogonal transforms and isotropic scaling of either.
    """
    return cka_from_grams(centered_gram(x), centered_gram(y))


def cka_from_grams(k: torch.Tensor, l: torch.Tensor) -> float:  # noqa: E741 (the paper's K and L)
    """Linear CKA from two `centered_gram` matrices: tr(K L) / (||K||_F ||L||_F)."""
    denominator = torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(l)
    return float((k * l).sum() / denominator) if denominator > 0 else 0.0
