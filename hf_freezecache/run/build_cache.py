"""Materializes an activation cache for a model, a block position and a dataset, without training (`build-cache`)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from accelerate import PartialState
from transformers import HfArgumentParser

from ..cache import CacheManifest, build_activation_cache, build_codec, dataset_fingerprint
from ..config import FreezeCacheArguments
from ..data import collate_image_batch
from ..integrations.cache_request import requested_fingerprint, requested_sidecars
from ..models import build_model, get_block_adapter
from .arguments import DataTrainingArguments, ModelArguments, expand_config_file


@dataclass
class CacheBuildArguments:
    """Where the cache goes and what it covers."""

    output_dir: str = field(metadata={"help": "Folder to write the cache to (replaced if it exists)."})
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
    `--cache_dir` pointing at its parent (and the cache in `position-<NN>`) reuses it instead of building it.
    """
    model_args, data_args, freeze_args, build_args = arguments
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    processes = PartialState(cpu=not torch.cuda.is_available()) if launched else None
    device = (
        processes.device if processes is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    data = data_args.load()
    model = build_model(
        model_args.model, data.num_labels, model_args.pretrained_weights, model_args.parsed_timm_kwargs()
    )
    model.to(device)
    adapter = get_block_adapter(model, **freeze_args.adapter_modules())
    if build_args.position >= adapter.num_blocks:
        raise ValueError(
            f"--position {build_args.position} leaves no block to train: this {adapter.family} model has "
            f"{adapter.num_blocks} blocks, so positions go from 1 to {adapter.num_blocks - 1}."
        )
    training = build_args.split == "train"
    images = data.train_unaugmented if training else data.eval
    sidecars = requested_sidecars(freeze_args, adapter) if training else []
    parts = requested_fingerprint(
        adapter,
        build_args.position,
        freeze_args,
        dataset_fingerprint(images),
        sidecars,
        data.train if training else None,
        build_args.seed,
    )
    return build_activation_cache(
        adapter,
        build_args.position,
        images,
        build_args.output_dir,
        build_codec(freeze_args.codec_config()),
        freeze_args.cache_chunk_size,
        parts,
        collate_fn=collate_image_batch,
        batch_size=build_args.batch_size,
        device=device,
        num_workers=build_args.num_workers,
        encode_threads=freeze_args.cache_decode_threads,
        max_shard_size=freeze_args.cache_max_shard_size,
        progress=not build_args.disable_tqdm,
        sidecars=sidecars,
        augmented_dataset=data.train if training else None,
        seed=build_args.seed,
        processes=processes,
    )
