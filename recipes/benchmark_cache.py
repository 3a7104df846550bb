"""Benchmarks of the activation cache: data-path overhead per codec, and a chunk-size sweep.

    # Time per epoch of the suffix fed (a) by the frozen prefix from images (freeze-only training), (b) from tensors
    # already in memory (the limit), (c) from the cache through the real reader, sampler, collator and augmentation.
    python recipes/benchmark_cache.py overhead --dataset_name ../shared/data/cifar10 --max_train_samples 10000 \\
        --position 3 --codecs zfp,int8,fp16,bf16,none --output_dir bench/overhead

    # Compression ratio, build time, decode time per epoch and accuracy for chunk sizes 1..16 (training runs of the
    # recipe with --discard true, one per chunk size).
    python recipes/benchmark_cache.py chunk-sweep --output_dir bench/chunks -- --freeze_schedule 2:3 ...

Each writes `results.json` and `results.md` in `--output_dir`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from hf_freezecache.augmentation import build_feature_augmentation
from hf_freezecache.cache import (
    ActivationCache,
    CachedActivationDataset,
    ChunkShuffleSampler,
    build_activation_cache,
    build_codec,
    dataset_fingerprint,
    fingerprint_parts,
)
from hf_freezecache.cache.config import CacheConfig
from hf_freezecache.data import EMBEDDED_CIFAR10, collate_image_batch, load_image_classification
from hf_freezecache.discard import FreezeCacheCollator
from hf_freezecache.model import ACTIVATIONS_KEY, FreezeCacheModel
from hf_freezecache.models import build_model

SHARED_RESNET20 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "models", "resnet-cifar10")


def _train_epoch(model, batches, optimizer, steps: int | None = None) -> tuple[float, int]:
    """Trains over `batches` (an iterable of {prefix_activations|pixel_values, labels}); returns seconds and steps."""
    model.train()
    start, done = time.perf_counter(), 0
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done += 1
        if steps is not None and done == steps:
            break
    return time.perf_counter() - start, done


class _InMemoryBatches:
    """Batches of activations held in one tensor, in the sampler's order, augmented like the cache's batches."""

    def __init__(self, activations, labels, sampler, augmentation, batch_size: int) -> None:
        self.activations, self.labels, self.sampler = activations, labels, sampler
        self.augmentation, self.batch_size = augmentation, batch_size

    def __iter__(self):
        order = torch.tensor(list(self.sampler))
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            activations = self.augmentation(self.activations.index_select(0, index))
            yield {ACTIVATIONS_KEY: activations, "labels": self.labels[index]}


def overhead(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    data = load_image_classification(args.dataset_name, max_train_samples=args.max_train_samples, augment=True)
    model = FreezeCacheModel(build_model("resnet20", data.num_labels, args.pretrained_weights))
    adapter = model.adapter
    model.freeze_blocks(range(args.position))
    n = len(data.train)
    augmentation = build_feature_augmentation("feature-maps", flip_probability=0.5, crop_padding=0.125)

    def fresh_optimizer():
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)

    rows = []
    # (a) freeze-only: every step runs the frozen prefix (no_grad, eval) on augmented images.
    sampler = ChunkShuffleSampler(data.train, args.batch_size, seed=0)
    images = DataLoader(data.train, batch_size=args.batch_size, sampler=sampler, collate_fn=collate_image_batch)
    _train_epoch(model, images, fresh_optimizer(), steps=3)  # warm-up
    runs = [_train_epoch(model, images, fresh_optimizer()) for _ in range(args.repeats)]
    freeze_only, steps = float(np.median([t for t, _ in runs])), runs[0][1]

    model.discard(args.position)
    dataset_hash = dataset_fingerprint(data.train_unaugmented)
    for name in args.codecs.split(","):
        config = CacheConfig(codec=name, tolerance=args.tolerance).codec_config()
        folder = os.path.join(args.output_dir, f"cache-{name}-k{args.chunk_size}")
        parts = fingerprint_parts(adapter, args.position, dataset_hash, config, args.chunk_size)
        try:
            cache = ActivationCache.load(folder, expected_fingerprint=parts)
        except (FileNotFoundError, ValueError):
            build_activation_cache(
                adapter,
                args.position,
                data.train_unaugmented,
                folder,
                build_codec(config),
                args.chunk_size,
                parts,
                collate_fn=collate_image_batch,
                batch_size=500,
                encode_threads=args.threads,
                progress=False,
            )
            cache = ActivationCache.load(folder, expected_fingerprint=parts)
        dataset = CachedActivationDataset(cache, decode_threads=args.threads)
        sampler = ChunkShuffleSampler(dataset, args.batch_size, seed=0)
        collator = FreezeCacheCollator(collate_image_batch)
        collator.augmentation = augmentation
        loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, collate_fn=collator)

        # (b) the limit: the same decoded activations, already stacked in memory, same order and augmentation.
        resident = torch.from_numpy(np.concatenate([cache.decode(c) for c in range(cache.num_chunks)]))
        labels = torch.from_numpy(cache.labels)
        memory = _InMemoryBatches(resident, labels, sampler, augmentation, args.batch_size)
        _train_epoch(model, memory, fresh_optimizer(), steps=3)
        _train_epoch(model, loader, fresh_optimizer(), steps=3)
        memory_times, cache_times, decode_times = [], [], []
        for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits both
            memory_times.append(_train_epoch(model, memory, fresh_optimizer())[0])
            decode_before = cache.decode_seconds
            cache_times.append(_train_epoch(model, loader, fresh_optimizer())[0])
            decode_times.append(cache.decode_seconds - decode_before)
        del resident, memory
        memory_s, cached_s = float(np.median(memory_times)), float(np.median(cache_times))
        m = cache.manifest
        rows.append(
            {
                "codec": repr(cache.codec),
                "chunk_size": m.chunk_size,
                "compression_ratio": m.compression_ratio,
                "stored_mb": m.stored_bytes / 2**20,
                "raw_mb": m.raw_bytes / 2**20,
                "build_s": m.build_seconds,
                "decode_s_per_epoch": float(np.median(decode_times)),
                "epoch_s_in_memory": memory_s,
                "epoch_s_from_cache": cached_s,
                "overhead": cached_s / memory_s,
                "epoch_s_freeze_only": freeze_only,
                "speedup_vs_freeze_only": freeze_only / cached_s,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return {
        "setting": vars(args),
        "samples": n,
        "steps_per_epoch": steps,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }


def overhead_markdown(result: dict) -> str:
    s = result["setting"]
    lines = [
        f"ResNet-20, position {s['position']}, {result['samples']} samples, batch {s['batch_size']}, "
        f"{result['threads']} torch thread(s), {s['threads']} decode thread(s). Seconds per epoch (median of "
        f"{s['repeats']}).",
        "",
        "| codec | chunk | ratio | stored / raw (MB) | decode s/epoch | in memory (limit) | from cache | overhead | "
        "freeze-only | speed-up vs freeze-only |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['codec']} | {r['chunk_size']} | {r['compression_ratio']:.2f}x | {r['stored_mb']:.0f} / "
            f"{r['raw_mb']:.0f} | {r['decode_s_per_epoch']:.2f} | {r['epoch_s_in_memory']:.2f} | "
            f"{r['epoch_s_from_cache']:.2f} | {100 * (r['overhead'] - 1):+.1f}% | {r['epoch_s_freeze_only']:.2f} | "
            f"{r['speedup_vs_freeze_only']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def chunk_sweep(args: argparse.Namespace, recipe_args: list[str]) -> dict:
    sys.path.insert(0, os.path.dirname(__file__))
    from train_image_classifier import main as train

    rows = []
    for k in [int(c) for c in args.chunk_sizes.split(",")]:
        out = os.path.join(args.output_dir, f"chunk-{k}")
        metrics = train([*recipe_args, "--discard", "true", "--cache_chunk_size", str(k), "--output_dir", out])
        with open(os.path.join(out, "cost_report.json")) as f:
            report = json.load(f)
        cached = [s for s in report["states"] if s["cache"]]
        state = cached[-1]
        rows.append(
            {
                "chunk_size": k,
                "accuracy": metrics["eval_accuracy"],
                "compression_ratio": state["cache"]["compression_ratio"],
                "build_s": state["cache"]["build_seconds"],
                "decode_s_per_epoch": (state["decode_seconds"] or 0.0)
                / max(state["end_epoch"] - state["start_epoch"], 1e-9),
                "epoch_s_after_discard": state["wall_time_s"] / max(state["end_epoch"] - state["start_epoch"], 1e-9),
                "position": state["cache"]["position"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return {"recipe_args": recipe_args, "rows": rows}


def chunk_sweep_markdown(result: dict) -> str:
    lines = [
        "| chunk size | position | ratio | build (s) | decode s/epoch | s/epoch after discard | test accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['chunk_size']} | {r['position']} | {r['compression_ratio']:.2f}x | {r['build_s']:.1f} | "
            f"{r['decode_s_per_epoch']:.2f} | {r['epoch_s_after_discard']:.1f} | {100 * r['accuracy']:.2f}% |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    recipe_args: list[str] = []
    if "--" in argv:
        recipe_args = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    over = sub.add_parser("overhead", help="Data-path overhead of each codec against tensors in memory.")
    over.add_argument("--dataset_name", default=EMBEDDED_CIFAR10)
    over.add_argument("--max_train_samples", type=int, default=None)
    over.add_argument(
        "--pretrained_weights",
        default=os.path.join(SHARED_RESNET20, "resnet20-12fca82f.th"),
        help="ResNet-20 weights.",
    )
    over.add_argument("--position", type=int, default=3)
    over.add_argument("--codecs", default="zfp,int8,fp16,bf16,none")
    over.add_argument("--tolerance", type=float, default=0.05, help="zfp tolerance, relative to the activations' std.")
    over.add_argument("--chunk_size", type=int, default=4)
    over.add_argument("--batch_size", type=int, default=128)
    over.add_argument("--threads", type=int, default=1, help="Encode/decode threads.")
    over.add_argument("--repeats", type=int, default=3, help="Timed epochs per arm (the median is reported).")
    over.add_argument("--output_dir", required=True)
    sweep = sub.add_parser("chunk-sweep", help="Ratio, build/decode time and accuracy per chunk size (recipe runs).")
    sweep.add_argument("--chunk_sizes", default="1,2,4,8,16")
    sweep.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    if args.command == "overhead":
        result = overhead(args)
        markdown = overhead_markdown(result)
    else:
        result = chunk_sweep(args, recipe_args)
        markdown = chunk_sweep_markdown(result)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
