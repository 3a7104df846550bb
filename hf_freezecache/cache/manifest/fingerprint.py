"""What a cache was built from: the hashes of its fingerprint, and in words what differs when two do not match."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch
from torch import nn

from ...models import BlockAdapter
from .schema import FORMAT_VERSION


class CacheMismatchError(ValueError):
    """A cache exists but was built for another model, position, dataset or codec configuration."""


def _hash(*items: Any) -> str:
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()


def prefix_weights_hash(adapter: BlockAdapter, position: int) -> str:
    """sha256 of the parameters and buffers of the stem and blocks `0..position-1` (names, shapes, dtypes, values)."""
    digest = hashlib.sha256()
    names = {id(t): n for n, t in [*adapter.model.named_parameters(), *adapter.model.named_buffers()]}
    seen: set[int] = set()
    for index in range(position):
        modules: list[nn.Module] = adapter.block_modules(index)
        tensors = adapter.block_parameters(index) + [b for m in modules for b in m.buffers()]
        for tensor in tensors:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            data = tensor.detach().to("cpu", copy=False).contiguous()
            digest.update(f"{names.get(id(tensor), '?')}|{tuple(data.shape)}|{data.dtype}|".encode())
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def dataset_fingerprint(dataset, probes: int = 8) -> str:
    """Identifies a training dataset and its preprocessing.

    Combines the `datasets` fingerprint (when the dataset has one), its length, and a hash of a few preprocessed
    items spread over the dataset: a different split, subset, image size or normalisation changes it.
    """
    n = len(dataset)
    digest = hashlib.sha256(f"{type(dataset).__name__}|{n}|{getattr(dataset, '_fingerprint', '')}".encode())
    for index in np.linspace(0, n - 1, num=min(probes, n), dtype=np.int64):
        item = dataset[int(index)]
        for key in sorted(item):
            value = item[key]
            value = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            digest.update(f"{key}|{value.shape}|{value.dtype}|".encode())
            digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def cache_fingerprint(parts: dict[str, str]) -> str:
    """The fingerprint a cache built from `parts` (`fingerprint_parts`) records: 32 hex digits."""
    return _hash(parts)[:32]


def fingerprint_parts(
    adapter: BlockAdapter,
    position: int,
    dataset_hash: str,
    codec_config: dict[str, Any],
    chunk_size: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, str]:
    """The components of a cache's fingerprint, each hashed on its own."""
    return {
        "model": _hash(adapter.family, type(adapter.model).__name__),
        "prefix_weights": prefix_weights_hash(adapter, position),
        "position": str(position),
        "dataset": dataset_hash,
        "codec": _hash(codec_config),
        "chunk_size": str(chunk_size),
        "format": str(FORMAT_VERSION),
        **({"extra": _hash(extra)} if extra else {}),
    }


def describe_mismatch(expected: dict[str, str], found: dict[str, str]) -> str:
    """Names the fingerprint components that differ, in words."""
    words = {
        "model": "model family/class",
        "prefix_weights": "prefix weights",
        "position": "block position",
        "dataset": "dataset or preprocessing",
        "codec": "codec configuration",
        "chunk_size": "chunk size",
        "format": "cache format version",
        "extra": "sidecar configuration",
    }
    differing = [words.get(k, k) for k in sorted(set(expected) | set(found)) if expected.get(k) != found.get(k)]
    return ", ".join(differing) or "nothing (fingerprint algorithm changed)"
