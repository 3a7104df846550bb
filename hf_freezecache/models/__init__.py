"""Block adapters: one file per model family, all behind `get_block_adapter`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .._registry import Registry
from .base import BlockAdapter

ADAPTERS: Registry[BlockAdapter] = Registry("block adapter")
register_adapter = ADAPTERS.register

# Registration order is matching order: specific families first; `generic` only matches when asked for by name.
from . import cifar_resnet, hf_resnet, hf_vit, timm_resnet, timm_vit, generic  # noqa: E402, F401, I001
from .cifar_resnet import CifarResNet, load_cifar_resnet  # noqa: E402
from .factory import build_model, model_source  # noqa: E402
from .generic import HEAD_POOLINGS, GenericBlockAdapter  # noqa: E402
from .verification import BlockSplitError, check_block_split  # noqa: E402
from .wrapper import ImageClassifierWrapper  # noqa: E402


def get_block_adapter(
    model: nn.Module,
    block_modules: list[str] | None = None,
    stem_modules: list[str] | None = None,
    head_modules: list[str] | None = None,
    head_pooling: str = "none",
    head: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> BlockAdapter:
    """Returns the block adapter for `model`.

    Args:
        model (`nn.Module`): A model of a supported family, or any model when `block_modules` is given.
        block_modules (`list[str]`, *optional*): Qualified names of the blocks, in forward order. Selects the generic
            adapter (see `GenericBlockAdapter` for what it needs of the model).
        stem_modules, head_modules (`list[str]`, *optional*): For the generic adapter: modules run before the first
            and after the last block. Without them the generic adapter can compute prefixes but not suffixes.
        head_pooling (`str`, *optional*, defaults to `"none"`), head (`Callable`, *optional*): For the generic adapter:
            pooling of the last block's output before the head (`"avg"`, `"cls"`, `"mean"`), and a function
            `head(model, hidden) -> logits` in place of `head_modules`.

    Raises:
        `ValueError`: when no registered family matches, naming the supported families and how to add one.
    """
    if block_modules:
        return GenericBlockAdapter(model, block_modules, stem_modules, head_modules, head_pooling, head)
    if stem_modules or head_modules or head_pooling != "none" or head is not None:
        raise ValueError(
            "stem_modules, head_modules, head_pooling and head describe a generic model and need block_modules, got "
            f"block_modules={block_modules!r}."
        )
    inner = model.model if isinstance(model, ImageClassifierWrapper) else model
    for name, adapter_cls in ADAPTERS:
        if name != GenericBlockAdapter.family and adapter_cls.matches(inner):
            adapter = adapter_cls(inner)
            if inner is not model:
                adapter.source = model_source(model)
            return adapter
    raise ValueError(
        f"No block adapter for {type(inner).__module__}.{type(inner).__name__}. Supported families: "
        f"{', '.join(n for n in ADAPTERS.names() if n != GenericBlockAdapter.family)}. For another model, pass its "
        "block module names (`block_modules=[...]`, flag `--block_modules`) to use the generic adapter, or add a "
        "`BlockAdapter` subclass decorated with `@register_adapter('my-family')` in hf_freezecache/models/."
    )


__all__ = [
    "ADAPTERS",
    "BlockAdapter",
    "BlockSplitError",
    "CifarResNet",
    "GenericBlockAdapter",
    "HEAD_POOLINGS",
    "ImageClassifierWrapper",
    "build_model",
    "check_block_split",
    "model_source",
    "get_block_adapter",
    "load_cifar_resnet",
    "register_adapter",
]
