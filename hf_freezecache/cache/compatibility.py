"""Whether a cache built elsewhere (downloaded, shared) can feed the suffix of a given model."""

from __future__ import annotations

import torch

from ..models import BlockAdapter
from .manifest import CacheMismatchError
from .reader import ActivationCache


def check_cache_fits_model(cache: ActivationCache, adapter: BlockAdapter) -> None:
    """Checks that the suffix of `adapter`'s model can train from `cache`, without its prefix weights or images.

    The model family, class and number of blocks must be the cache's, the position must leave a block to train,
    and the suffix (blocks `position..n-1` and the head) must accept one cached sample's shape: it is run once on
    zeros, in eval mode and without gradients, so a model of another width or resolution is refused before
    training starts.

    Raises:
        CacheMismatchError: naming what differs.
    """
    manifest = cache.manifest
    model_class = type(adapter.model).__name__
    if (manifest.model_family, manifest.model_class) != (adapter.family, model_class):
        raise CacheMismatchError(
            f"The cache in {cache.folder} holds activations of a {manifest.model_class} ({manifest.model_family}) "
            f"from {manifest.source_model or 'an unrecorded source'}; this model is a {model_class} "
            f"({adapter.family})."
        )
    if manifest.model_num_blocks is not None and manifest.model_num_blocks != adapter.num_blocks:
        raise CacheMismatchError(
            f"The cache in {cache.folder} was built from a {manifest.model_num_blocks}-block "
            f"{manifest.source_model or manifest.model_class}; this model has {adapter.num_blocks} blocks."
        )
    if not 0 < manifest.position < adapter.num_blocks:
        raise CacheMismatchError(
            f"The cache in {cache.folder} is at block position {manifest.position}; this model has "
            f"{adapter.num_blocks} blocks, so a cache must be at a position from 1 to {adapter.num_blocks - 1}."
        )
    reference = next(adapter.blocks[manifest.position].parameters())
    sample = torch.zeros(1, *manifest.sample_shape, dtype=reference.dtype, device=reference.device)
    modules = [m for index in range(manifest.position, adapter.num_blocks) for m in adapter.block_modules(index)]
    modes = [m.training for m in modules]
    try:
        for module in modules:
            module.eval()
        with torch.no_grad():
            adapter.suffix(sample, manifest.position)
    except RuntimeError as error:
        raise CacheMismatchError(
            f"The cache in {cache.folder} holds activations of shape {tuple(manifest.sample_shape)} at block "
            f"{manifest.position}, which this model's blocks {manifest.position}-{adapter.num_blocks - 1} do not "
            f"accept ({str(error).splitlines()[0]}): it was built for another size of this model."
        ) from error
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.train(mode)
