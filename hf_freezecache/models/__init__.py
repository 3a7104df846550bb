"""Block adapters: one file per model family, all behind `get_block_adapter`."""

from __future__ import annotations

from torch import nn

from .._registry import Registry
from .base import BlockAdapter

ADAPTERS: Registry[BlockAdapter] = Registry("block adapter")
register_adapter = ADAPTERS.register

# Registration order is matching order: specific families first; `generic` only matches when asked for by name.
from . import cifar_resnet, hf_resnet, hf_vit, timm_resnet, timm_vit, generic  # noqa: E402, F401, I001
from .cifar_resnet import CifarResNet, load_cifar_resnet  # noqa: E402
from .factory import build_model, model_source  # noqa: E402
from .generic import GenericBlockAdapter  # noqa: E402
from .wrapper import ImageClassifierWrapper  # noqa: E402


def get_block_adapter(
    model: nn.Module,
    block_modules: list[str] | None = None,
    stem_modules: list[str] | None = None,
    head_modules: list[str] | None = None,
) -> BlockAdapter:
    """Returns the block adapter for `model`.

    Args:
        model (`nn.Module`): A model of a supported family, or any model when `block_modules` is given.
        block_modules (`list[str]`, *optional*): Qualified names of the blocks, in forward order. Selects the generic
            adapter (see `GenericBlockAdapter` for what it needs of the model).
        stem_modules, head_modules (`list[str]`, *optional*): For the generic adapter: modules run before the first
            and after the last block. Without them the generic adapter can compute prefixes but not suffixes.

    Raises:
        `ValueError`: when no registered family matches, naming the supported families and how to add one.
    """
    if block_modules:
        return GenericBlockAdapter(model, block_modules, stem_modules, head_modules)
    inner = model.model if isinstance(model, ImageClassifierWrapper) else model
    for name, adapter_cls in ADAPTERS:
        if name != GenericBlockAdapter.family and adapter_cls.matches(inner):
            return adapter_cls(inner)
    raise ValueError(
        f"No block adapter for {type(inner).__module__}.{type(inner).__name__}. Supported families: "
        f"{', '.join(n for n in ADAPTERS.names() if n != GenericBlockAdapter.family)}. For another model, pass its "
        "block module names (`block_modules=[...]`, flag `--block_modules`) to use the generic adapter, or add a "
        "`BlockAdapter` subclass decorated with `@register_adapter('my-family')` in hf_freezecache/models/."
    )


__all__ = [
    "ADAPTERS",
    "BlockAdapter",
    "CifarResNet",
    "GenericBlockAdapter",
    "ImageClassifierWrapper",
    "build_model",
    "model_source",
    "get_block_adapter",
    "load_cifar_resnet",
    "register_adapter",
]
