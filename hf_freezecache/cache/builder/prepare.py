"""The first stage of a build: what every process must agree on before any runs the prefix over its share.

That is the shape of one sample's activations, the sidecars' calibration, the codec resolved on the first samples
of the dataset (a relative tolerance becomes an absolute one), and the prefix's FLOPs per sample.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.flop_counter import FlopCounterMode

from ..._random import seeded
from ...data.sample_ids import check_same_samples
from ...models import BlockAdapter
from ..codecs import ActivationCodec, measure_codec_error
from ..sidecars import Sidecar, SidecarArray

# Samples a relative codec tolerance is resolved on (the first ones of the dataset).
_RESOLVE_SAMPLES = 256


@contextlib.contextmanager
def prefix_in_eval(adapter: BlockAdapter, position: int) -> Iterator[None]:
    """Within the block, the stem and blocks `0..position-1` are in eval mode (no BatchNorm statistics updates)."""
    modules = [m for index in range(position) for m in adapter.block_modules(index)]
    modes = [m.training for m in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.train(mode)


def prefix_forward_flops(adapter: BlockAdapter, pixel_values: torch.Tensor, position: int) -> float:
    """FLOPs of one sample's forward pass through the stem and blocks `0..position-1`."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        adapter.prefix(pixel_values, position)
    return counter.get_total_flops() / pixel_values.shape[0]


@dataclass(frozen=True)
class PrefixRun:
    """The frozen prefix (stem and blocks `0..position-1`) over a dataset, as every stage of a build runs it.

    Args:
        adapter (`BlockAdapter`): Block view of the model.
        position (`int`): Block position of the activations.
        dataset (`Dataset`): Items `{"pixel_values": tensor, "labels": int}`, without random augmentation.
        collate (`Callable`): Batches items.
        batch_size (`int`): Prefix batch size.
        num_workers (`int`): DataLoader workers reading images.
        device (`torch.device`): Where the prefix runs.
        seed (`int`): Seeds the DataLoaders and the global random streams of the stages.
    """

    adapter: BlockAdapter
    position: int
    dataset: Dataset
    collate: Callable[[list[Any]], dict[str, torch.Tensor]]
    batch_size: int
    num_workers: int
    device: torch.device
    seed: int

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.adapter.prefix(pixels, self.position)

    def loader(self, indices: Sequence[int]) -> DataLoader:
        """Batches of the samples `indices` of the dataset, in that order."""
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            Subset(self.dataset, indices),
            batch_size=self.batch_size,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            generator=generator,
        )

    def pixels(self, indices: Sequence[int]) -> Iterator[torch.Tensor]:
        """The preprocessed images of the samples `indices`, a batch at a time, on the prefix's device."""
        return (batch["pixel_values"].to(self.device) for batch in self.loader(indices))


#: A batch of the prefix pass (`PrefixRun.loader`) and its activations.
ComputedBatch = tuple[dict[str, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class BuildPlan:
    """What every process of a build agrees on before running the prefix over its share.

    Args:
        sample_shape (`tuple[int, ...]`): Shape of one sample's activations.
        codec (`ActivationCodec`): The codec, resolved on the first samples of the dataset.
        arrays (`dict[str, SidecarArray]`): The sidecars' per-sample arrays, by name, in column order.
        flops_per_sample (`float`): FLOPs of one sample's pass through the prefix.
        codec_error (`dict[str, float]`): The codec's error on the first samples (`measure_codec_error`).
        codec_request (`dict`): The codec's config as requested, before `resolve`.
    """

    sample_shape: tuple[int, ...]
    codec: ActivationCodec
    arrays: dict[str, SidecarArray]
    flops_per_sample: float
    codec_error: dict[str, float]
    codec_request: dict[str, Any]


def prepare_build(
    run: PrefixRun, codec: ActivationCodec, sidecars: Sequence[Sidecar], chunk_size: int
) -> tuple[BuildPlan, list[ComputedBatch]]:
    """Calibrates the sidecars, resolves the codec and measures its error: the same on every process, whatever its
    share.

    Returns:
        The plan, and the dataset's first whole batches of `run.batch_size` samples with their activations,
        computed to resolve the codec: the prefix pass over a share that starts at sample 0 takes them instead of
        reading and computing them again (the same batches, so the same values).
    """
    num_samples = len(run.dataset)
    with seeded(run.seed), prefix_in_eval(run.adapter, run.position):
        sample_shape = tuple(run(run.dataset[0]["pixel_values"].unsqueeze(0).to(run.device)).shape[1:])
        for sidecar in sidecars:
            if sidecar.calibration_size > 0:
                subset = torch.randperm(num_samples, generator=torch.Generator().manual_seed(run.seed))
                sidecar.calibrate(run, run.pixels(subset[: sidecar.calibration_size].sort().values.tolist()))
        # Every process resolves the codec on the same first samples, whatever the batch size, so that all shares
        # (and builds with other batch sizes) are encoded alike.
        references = [
            (batch, run(batch["pixel_values"].to(run.device)).float())
            for batch in run.loader(range(min(_RESOLVE_SAMPLES, num_samples)))
        ]
        reference = torch.cat([activations for _, activations in references]).cpu().numpy()
        resolved = codec.resolve(reference)
        first = run.collate([run.dataset[0]])["pixel_values"].to(run.device)
        flops = prefix_forward_flops(run.adapter, first, run.position)
    arrays = {name: spec for sidecar in sidecars for name, spec in sidecar.arrays(sample_shape).items()}
    # Only the last batch may be short, and the pass's batch there holds more samples: that one is not the same.
    whole = [(batch, activations) for batch, activations in references if len(activations) == run.batch_size]
    error = measure_codec_error(resolved, reference, chunk_size)
    return BuildPlan(sample_shape, resolved, arrays, float(flops), error, codec.config()), whole


def check_build_options(
    dataset: Dataset,
    chunk_size: int,
    batch_size: int,
    sidecars: Sequence[Sidecar],
    augmented_dataset: Dataset | None,
) -> Dataset | None:
    """Refuses options a build cannot run with; returns `augmented_dataset` when a sidecar needs it, else None.

    `augmented_dataset` must hold the samples of `dataset` in the same order (`check_same_samples`: the same stored
    rows): a sidecar stores its arrays beside the activations of the same sample.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if not any(sidecar.needs_augmented_view for sidecar in sidecars):
        return None
    if augmented_dataset is None:
        raise ValueError(
            "The token-replacement sidecar needs `augmented_dataset`: the training images through their random "
            "augmentation, the same samples in the same order as `dataset`."
        )
    check_same_samples(dataset, augmented_dataset, "`augmented_dataset`")
    return augmented_dataset
