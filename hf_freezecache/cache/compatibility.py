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


def check_eval_cache_matches(eval_cache: ActivationCache, train_cache: ActivationCache) -> None:
    """Checks that `eval_cache` holds activations of the same prefix as `train_cache`, so evaluating the suffix on it
    measures the model being trained.

    The two must agree on the model (family, class, number of blocks), the block position, the prefix weights and
    the shape of a sample. Their datasets, codecs, chunk sizes and sidecars may differ. ViT activations have the same
    shape at every position, so the shape alone would not catch an evaluation cache of another position.

    Raises:
        CacheMismatchError: naming every part that differs, with both caches' folders.
    """
    found, expected = eval_cache.manifest, train_cache.manifest

    def differs(part: str) -> bool:
        return found.fingerprint_parts.get(part) != expected.fingerprint_parts.get(part)

    differing = []
    if differs("model") or (found.model_family, found.model_class) != (expected.model_family, expected.model_class):
        differing.append(f"model ({found.model_class} vs {expected.model_class})")
    if found.model_num_blocks != expected.model_num_blocks:
        differing.append(f"number of blocks ({found.model_num_blocks} vs {expected.model_num_blocks})")
    if differs("position") or found.position != expected.position:
        differing.append(f"block position ({found.position} vs {expected.position})")
    if differs("prefix_weights"):
        differing.append("prefix weights")
    if found.sample_shape != expected.sample_shape:
        differing.append(f"sample shape ({tuple(found.sample_shape)} vs {tuple(expected.sample_shape)})")
    if differing:
        raise CacheMismatchError(
            f"The evaluation cache in {eval_cache.folder} was not built from the prefix of the training cache in "
            f"{train_cache.folder} (differs in: {', '.join(differing)}); evaluating on it would measure another "
            "model. Build both with the same model, prefix weights and position."
        )
