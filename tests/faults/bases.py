"""The valid caches a fault campaign damages: tiny CIFAR ResNet prefixes over a few dozen random images.

Every base is built the same way by `build_base`, in this process or in `build_worker.py` (which the kill faults
run and kill): the same seeds give the same rows.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hf_freezecache.cache import (
    build_activation_cache,
    build_codec,
    build_sidecar,
    dataset_fingerprint,
    export_cache,
    fingerprint_parts,
)
from hf_freezecache.cache.manifest import cache_fingerprint
from hf_freezecache.models import CifarResNet, get_block_adapter

SAMPLES, CHUNK = 30, 4  # 8 rows, the last one of 2 samples
ZFP = {"name": "zfp", "tolerance": 0.05, "relative": True}


@dataclass(frozen=True)
class BaseSpec:
    """One base cache: a model (`model` with weights seeded by `model_seed`), a position and a codec.

    `export_of` names an Arrow base that this one is the parquet export of (`export_cache`), in `export_shards`
    shards; the other fields are then that base's.
    """

    model: str = "resnet20"
    model_seed: int = 0
    position: int = 3
    codec: dict[str, Any] = field(default_factory=lambda: {"name": "codebook"})
    channel_flip: bool = False
    max_shard_size: int | None = None
    export_of: str | None = None
    export_shards: int = 3


#: The targets of the faults (the first four) and the donors of the swaps.
BASES: dict[str, BaseSpec] = {
    # Two Arrow shards, so that shards can be swapped, renamed or dropped one at a time.
    "codebook": BaseSpec(max_shard_size=50_000),
    "zfp-flip": BaseSpec(codec=ZFP, channel_flip=True),
    "parquet": BaseSpec(export_of="zfp-flip"),
    "fp16": BaseSpec(codec={"name": "fp16"}),
    # Donors: the same shapes from another model and other weights, another position, another codec.
    "fp16-other-weights": BaseSpec(model_seed=1, codec={"name": "fp16"}),
    "codebook-resnet32": BaseSpec(model="resnet32", max_shard_size=50_000),
    "codebook-position-6": BaseSpec(position=6),
    "zfp-plain": BaseSpec(codec=ZFP),
    "zfp-flip-other-weights": BaseSpec(model_seed=1, codec=ZFP, channel_flip=True),
    "parquet-other-weights": BaseSpec(export_of="zfp-flip-other-weights"),
}
TARGETS = ("codebook", "zfp-flip", "parquet", "fp16")


class RandomImages(torch.utils.data.Dataset):
    """`SAMPLES` seeded random 32x32 images with random labels, as the builder reads them."""

    def __init__(self, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.pixels = torch.randn(SAMPLES, 3, 32, 32, generator=generator)
        self.labels = torch.randint(0, 10, (SAMPLES,), generator=generator).tolist()

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"pixel_values": self.pixels[index], "labels": self.labels[index]}


def model_adapter(spec: BaseSpec):
    """The block adapter of the spec's model, its weights drawn from `model_seed`."""
    torch.manual_seed(spec.model_seed)
    return get_block_adapter(CifarResNet.from_name(spec.model, num_classes=10).eval())


def build_base(spec: BaseSpec, folder: str | os.PathLike) -> dict[str, str]:
    """Builds the Arrow cache of `spec` into `folder`; returns its fingerprint parts."""
    adapter = model_adapter(spec)
    images = RandomImages()
    sidecars = [build_sidecar("channel-flip", gamma=0.25, calibration_size=8)] if spec.channel_flip else []
    extra = {"sidecars": {s.name: s.config() for s in sidecars}} if sidecars else None
    parts = fingerprint_parts(adapter, spec.position, dataset_fingerprint(images), spec.codec, CHUNK, extra)
    build_activation_cache(
        adapter,
        spec.position,
        images,
        folder,
        build_codec(spec.codec),
        CHUNK,
        parts,
        batch_size=8,
        encode_threads=1,
        progress=False,
        sidecars=sidecars,
        max_shard_size=spec.max_shard_size or "500MB",
    )
    return parts


@dataclass
class Base:
    """A built base cache: where it is, its layout, the spec of its model and codec (the exported cache's for an
    export), its fingerprint and parts, and how long it took to build."""

    name: str
    folder: Path
    layout: str
    spec: BaseSpec
    parts: dict[str, str]
    build_seconds: float

    @property
    def fingerprint(self) -> str:
        return cache_fingerprint(self.parts)


def build_bases(root: str | os.PathLike) -> dict[str, Base]:
    """Builds every base of `BASES` (exports after their source).

    Args:
        root (`str` or `os.PathLike`): Where; each base gets the subfolder of its name.

    Returns:
        `dict[str, Base]`: The bases by name, with how long each took to build.
    """
    root = Path(root)
    bases: dict[str, Base] = {}
    for name, spec in sorted(BASES.items(), key=lambda item: item[1].export_of is not None):
        start = time.perf_counter()
        if spec.export_of is None:
            bases[name] = Base(name, root / name, "arrow", spec, build_base(spec, root / name), 0.0)
        else:
            source = bases[spec.export_of]
            stored = sum(p.stat().st_size for p in source.folder.glob("*.arrow"))
            export_cache(source.folder, root / name, max_shard_size=stored // spec.export_shards, progress=False)
            bases[name] = Base(name, root / name, "parquet", source.spec, source.parts, 0.0)
        bases[name].build_seconds = time.perf_counter() - start
    return bases
