"""What a cache folder holds and what it was built from: the manifest, its fingerprint, checksums, dataset card."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..models import BlockAdapter

MANIFEST_NAME = "freezecache_manifest.json"
CARD_NAME = "README.md"
FORMAT_VERSION = 1


class CacheMismatchError(ValueError):
    """A cache exists but was built for another model, position, dataset or codec configuration."""


class CorruptCacheError(OSError):
    """A cache file is missing, truncated or altered (its checksum does not match the manifest)."""


@dataclass
class CacheManifest:
    """Everything needed to trust, read and describe an activation cache.

    Args:
        fingerprint (`str`): Hash of `fingerprint_parts`; a cache is used only when this matches.
        fingerprint_parts (`dict[str, str]`): Hashes of what the cache depends on (prefix weights, position, dataset
            and preprocessing, codec, chunk size, layout), kept separately so a mismatch can say what differs.
        model_family, model_class (`str`): The block adapter family and the model's class.
        position (`int`): Block position of the activations (after blocks `0..position-1`).
        sample_shape (`list[int]`): Shape of one sample's activations.
        dtype (`str`): Their dtype before encoding.
        codec (`dict`): The codec's resolved configuration (`ActivationCodec.config()`).
        chunk_size (`int`): Consecutive samples per row.
        num_samples, num_chunks (`int`): Samples and rows.
        raw_bytes, stored_bytes (`int`): Activations before and after encoding.
        build_seconds (`float`): Time to run the prefix and write the cache.
        prefix_forward_flops_per_sample (`float`): FLOPs of one sample's pass through the prefix.
        build_prefix_passes (`float`): Prefix passes per sample the build ran: 1, plus the sidecars' passes over
            flipped or augmented views and their calibration (so the build cost `prefix_forward_flops_per_sample *
            num_samples * build_prefix_passes` FLOPs).
        source (`str`): What the prefix ran on (`"images"`).
        shards (`dict[str, str]`): sha256 of every data file, by file name.
        sidecars (`dict`): Per sidecar name (`cache.sidecars`): its `config`, the `summary` of its calibration
            (e.g. selected channels and their SSIM), and its `arrays` (per-sample `shape`, `dtype`,
            `stored_bytes`), stored in the `sidecar.<array>` columns.
    """

    fingerprint: str
    fingerprint_parts: dict[str, str]
    model_family: str
    model_class: str
    position: int
    sample_shape: list[int]
    dtype: str
    codec: dict[str, Any]
    chunk_size: int
    num_samples: int
    num_chunks: int
    raw_bytes: int
    stored_bytes: int
    build_seconds: float
    prefix_forward_flops_per_sample: float
    build_prefix_passes: float = 1.0
    source: str = "images"
    shards: dict[str, str] = field(default_factory=dict)
    sidecars: dict[str, dict[str, Any]] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def compression_ratio(self) -> float:
        """Raw bytes / stored bytes."""
        return self.raw_bytes / max(self.stored_bytes, 1)

    @property
    def sidecar_arrays(self) -> dict[str, dict[str, Any]]:
        """Every sidecar array (`shape`, `dtype`, `stored_bytes`) by array name, over all sidecars."""
        return {name: spec for sidecar in self.sidecars.values() for name, spec in sidecar["arrays"].items()}

    @property
    def sidecar_bytes(self) -> int:
        """Stored bytes of all sidecar arrays."""
        return sum(spec["stored_bytes"] for spec in self.sidecar_arrays.values())

    @property
    def sidecar_fraction(self) -> float:
        """Sidecar bytes as a fraction of the stored activations: the storage cost of the augmentation."""
        return self.sidecar_bytes / max(self.stored_bytes, 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "compression_ratio": self.compression_ratio}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CacheManifest:
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, folder: str | os.PathLike) -> None:
        """Writes the manifest and the dataset card into `folder`."""
        with open(os.path.join(folder, MANIFEST_NAME), "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        with open(os.path.join(folder, CARD_NAME), "w") as f:
            f.write(self.dataset_card())

    @classmethod
    def load(cls, folder: str | os.PathLike) -> CacheManifest:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"No activation cache at {folder}.")
        path = os.path.join(folder, MANIFEST_NAME)
        if not os.path.isfile(path):
            raise CorruptCacheError(f"{path} is missing: {folder} is not a complete activation cache.")
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def dataset_card(self) -> str:
        """A Hub dataset card describing the cache."""
        codec = ", ".join(f"{k}={v}" for k, v in self.codec.items() if k != "name")
        return (
            "---\ntags:\n- hf_freezecache\n- activation-cache\n---\n\n"
            f"# Activation cache: {self.model_class} ({self.model_family}) at block position {self.position}\n\n"
            "Outputs of the frozen prefix of a model, compressed, written by "
            "hf_freezecache so that training can continue on "
            "the remaining blocks without running the prefix again. Load it with "
            "`hf_freezecache.cache.ActivationCache.load(folder)`; `datasets.load_from_disk(folder)` shows the "
            "rows.\n\n"
            "| field | value |\n|---|---|\n"
            f"| fingerprint | `{self.fingerprint}` |\n"
            f"| samples / rows | {self.num_samples} / {self.num_chunks} (chunks of {self.chunk_size}) |\n"
            f"| activation shape per sample | {tuple(self.sample_shape)} {self.dtype} |\n"
            f"| codec | {self.codec['name']} ({codec or 'no parameters'}) |\n"
            f"| raw / stored bytes | {self.raw_bytes:,} / {self.stored_bytes:,} |\n"
            f"| compression ratio | {self.compression_ratio:.2f}x |\n"
            f"| build time | {self.build_seconds:.1f} s |\n"
            f"| built from | {self.source} |\n"
            f"{self._sidecar_card_rows()}\n"
            "Each row holds `data` (the encoded activations of `len(indices)` consecutive samples, shape "
            "`(len(indices), *sample_shape)`), `labels` and `indices` (row numbers in the training split)"
            f"{self._sidecar_card_columns()}.\n"
        )

    def _sidecar_card_rows(self) -> str:
        rows = ""
        for name, sidecar in self.sidecars.items():
            options = ", ".join(f"{k}={v}" for k, v in sidecar["config"].items())
            stored = sum(spec["stored_bytes"] for spec in sidecar["arrays"].values())
            rows += f"| sidecar | {name} ({options}): {stored:,} bytes |\n"
            if "channels" in sidecar["summary"]:
                rows += f"| flip-sensitive channels | {sidecar['summary']['channels']} |\n"
        if self.sidecars:
            rows += f"| sidecars / cache | {self.sidecar_fraction:.1%} |\n"
        return rows

    def _sidecar_card_columns(self) -> str:
        if not self.sidecars:
            return ""
        columns = ", ".join(
            f"`sidecar.{name}` (shape `(len(indices), {', '.join(map(str, spec['shape']))})`, {spec['dtype']})"
            for name, spec in self.sidecar_arrays.items()
        )
        return f", and the augmentation sidecars {columns}; float32 arrays use the same codec as `data`"


def file_sha256(path: str | os.PathLike, block_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block_size):
            digest.update(chunk)
    return digest.hexdigest()


def verify_shards(folder: str | os.PathLike, manifest: CacheManifest) -> None:
    """Checks every data file of the cache against the manifest; raises `CorruptCacheError` naming the file."""
    for name, expected in manifest.shards.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise CorruptCacheError(f"Cache shard {path} is missing.")
        if file_sha256(path) != expected:
            raise CorruptCacheError(
                f"Cache shard {path} does not match its checksum in {MANIFEST_NAME}: it was truncated or altered. "
                "Delete the cache folder to rebuild it."
            )


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
