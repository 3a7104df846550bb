"""Materializes an activation cache for a model, a block position and a dataset, without training (`build-cache`)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from accelerate import PartialState
from transformers import HfArgumentParser

from ..cache import CacheManifest
from ..config import FreezeCacheArguments
from ..data import collate_image_batch
from ..discard import CacheBuildSettings, reuse_or_build_cache
from ..model import FreezeCacheModel
from ..models import build_model, check_block_split, get_block_adapter
from .arguments import DataTrainingArguments, ModelArguments, expand_config_file

logger = logging.getLogger(__name__)


@dataclass
class CacheBuildArguments:
    """Where the cache goes and what it covers."""

    output_dir: str = field(
        metadata={
            "help": "Folder or URL (s3://bucket/path, gs://, hf://, file://; see --cache_storage_options) to write "
            "the cache to (kept if it holds this cache already, replaced otherwise)."
        }
    )
    position: int = field(
        metadata={"help": "Block position: the cache holds the activations after blocks 0..position-1."}
    )
    split: str = field(
        default="train",
        metadata={
            "help": "'train' (--train_split, with the augmentation sidecars the options ask for) or 'eval' "
            "(--eval_split, no sidecars: for evaluating a suffix trained from caches)."
        },
    )
    batch_size: int = field(default=256, metadata={"help": "Images per prefix batch (per process)."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers reading images."})
    seed: int = field(default=42, metadata={"help": "Seed of sidecar calibration and augmented views."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bar."})

    def __post_init__(self) -> None:
        if self.split not in ("train", "eval"):
            raise ValueError(f"--split must be 'train' or 'eval', got {self.split!r}.")
        for name in ("position", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")


BuildArguments = tuple[ModelArguments, DataTrainingArguments, FreezeCacheArguments, CacheBuildArguments]


def parse_build_arguments(argv: list[str] | None = None) -> BuildArguments:
    """Parses `build-cache` flags, or a config file (`.yaml`, `.yml`, `.json`) optionally followed by flags."""
    argv = expand_config_file(argv)
    parser = HfArgumentParser(
        (ModelArguments, DataTrainingArguments, FreezeCacheArguments, CacheBuildArguments),
        prog="hf-freezecache build-cache",
    )
    # The sidecar options are checked as for a training run that discards.
    parser.set_defaults(discard=True)
    return parser.parse_args_into_dataclasses(args=argv)


def run_build_cache(arguments: BuildArguments) -> CacheManifest:
    """Runs the model's prefix over a dataset split and writes the cache; returns its manifest.

    Under `accelerate launch` with several processes, each builds its share (`build_activation_cache`). The
    training split's cache has the fingerprint training with the same options computes, so a run with
    `--cache_dir` pointing at its parent (and the cache in `position-<NN>`) reuses it instead of building it; and a
    cache already in `--output_dir` with that fingerprint is kept (verified) rather than built again. `--output_dir`
    may be a URL: the processes, on one machine or several, then need no shared file system.
    """
    model_args, data_args, freeze_args, build_args = arguments
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    processes = PartialState(cpu=not torch.cuda.is_available()) if launched else None
    device = (
        processes.device if processes is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    data = data_args.load()
    base = build_model(
        model_args.model, data.num_labels, model_args.pretrained_weights, model_args.parsed_timm_kwargs()
    )
    model = FreezeCacheModel(base, get_block_adapter(base, **freeze_args.adapter_modules())).to(device)
    if build_args.position >= model.num_blocks:
        raise ValueError(
            f"--position {build_args.position} leaves no block to train: this {model.adapter.family} model has "
            f"{model.num_blocks} blocks, so positions go from 1 to {model.num_blocks - 1}."
        )
    training = build_args.split == "train"
    images = data.train_unaugmented if training else data.eval
    # A cache is only useful to a suffix that continues the model's forward: refuse a split that does not.
    probe = collate_image_batch([images[i] for i in range(min(4, len(images)))])["pixel_values"].to(device)
    check_block_split(model.adapter, probe, positions=[build_args.position])
    settings = CacheBuildSettings(
        device=device,
        batch_size=build_args.batch_size,
        num_workers=build_args.num_workers,
        seed=build_args.seed,
        progress=not build_args.disable_tqdm,
        processes=processes,
    )
    cache, reused = reuse_or_build_cache(
        model,
        build_args.position,
        build_args.output_dir,
        freeze_args.discard_config(),
        images,
        settings,
        augmented_images=data.train if training else None,
        collate_fn=collate_image_batch,
        with_sidecars=training,
    )
    if reused:
        logger.info("%s already holds this cache (same fingerprint): kept.", build_args.output_dir)
    return cache.manifest
