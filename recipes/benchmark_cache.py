"""Benchmarks of the activation cache against the limit: the data path per codec and memory mode, the build, and
a chunk-size sweep. (Longer than most modules: one script per benchmark family keeps every command in one place.)

    # Per shape, in one process: the prefix pass with its outputs kept in memory (the build's limit) against each
    # codec's build; then the same suffix trained (a) from those fp32 activations already on the training device, in
    # the sampler's order, with the same augmentation (the limit) and (b) through the real path (cache, sampler,
    # collator, packed batch decoded on the device, augmentation), alternately; decode speed, ratio and error.
    python recipes/benchmark_cache.py data-path --shapes resnet32x2-p5,resnet32x2-p10 --samples 10000 \\
        --codecs zfp,lowbit4,int8 --memory device,host,disk --output_dir bench/data-path
    # ImageNet-sized shapes on synthetic images and random weights (speed only): ResNet-50 at 224 after its first
    # and second stage, DeiT-S at 224 after block 9.
    python recipes/benchmark_cache.py data-path --shapes resnet50-s1,resnet50-s2,deit-s-b9 --samples 2048 ...

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
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hf_freezecache.augmentation import FeatureMapAugmentationConfig, TokenAugmentationConfig
from hf_freezecache.cache import (
    ActivationCache,
    CachedActivationDataset,
    ChunkShuffleSampler,
    build_activation_cache,
    build_codec,
    fingerprint_parts,
)
from hf_freezecache.cache.builder import prefix_in_eval
from hf_freezecache.data import collate_image_batch, load_image_classification
from hf_freezecache.discard import FreezeCacheCollator
from hf_freezecache.model import ACTIVATIONS_KEY, FreezeCacheModel
from hf_freezecache.models import build_model

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")
CODECS = {
    "codebook2": {"name": "codebook", "bits": 2, "entropy": "zstd"},
    "codebook4": {"name": "codebook", "bits": 4, "entropy": "zstd"},
    "zfp": {"name": "zfp", "tolerance": 0.05, "relative": True},
    "lowbit8": {"name": "lowbit", "bits": 8, "entropy": "none"},
    "lowbit4": {"name": "lowbit", "bits": 4, "entropy": "none"},
    "lowbit2": {"name": "lowbit", "bits": 2, "entropy": "none"},
    "lowbit4-zstd": {"name": "lowbit", "bits": 4, "entropy": "zstd"},
    "int8": {"name": "int8"},
    "fp16": {"name": "fp16"},
    "bf16": {"name": "bf16"},
    "none": {"name": "none"},
}


@dataclass(frozen=True)
class Shape:
    """A model, a block position and the images it runs on (CIFAR-10, or synthetic images of `image_size`)."""

    model: str
    position: int
    image_size: int = 32
    timm_kwargs: dict | None = None

    @property
    def synthetic(self) -> bool:
        return self.image_size != 32


SHAPES = {
    # The paper's 2x-wide ResNet-32: 32x32x32 maps (128 KiB per sample) after stage 1, 64x16x16 after stage 2.
    "resnet32x2-p5": Shape("resnet32-paper", 5),
    "resnet32x2-p10": Shape("resnet32-paper", 10),
    # ResNet-50 at 224: 256x56x56 after its first stage (3 blocks), 512x28x28 after its second (4 more).
    "resnet50-s1": Shape("timm:resnet50", 3, 224),
    "resnet50-s2": Shape("timm:resnet50", 7, 224),
    # DeiT-S at 224: 197 tokens of 384 after block 9.
    "deit-s-b9": Shape("timm:deit_small_patch16_224", 9, 224),
}


class SyntheticImages(Dataset):
    """`count` random normalised images of `size` x `size` (seeded per index) with random labels."""

    def __init__(self, count: int, size: int, num_labels: int = 10) -> None:
        self.count, self.size, self.num_labels = count, size, num_labels

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        rng = torch.Generator().manual_seed(index)
        pixels = torch.randn(3, self.size, self.size, generator=rng)
        return {"pixel_values": pixels, "labels": int(torch.randint(self.num_labels, (), generator=rng))}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prefix_pass(model: FreezeCacheModel, position: int, images: Dataset, batch_size: int, device) -> torch.Tensor:
    """The build's limit: the prefix over every image, outputs kept uncompressed in one tensor on `device`."""
    loader = DataLoader(images, batch_size=batch_size, collate_fn=collate_image_batch)
    outputs = []
    with torch.no_grad(), prefix_in_eval(model.adapter, position):
        for batch in loader:
            outputs.append(model.adapter.prefix(batch["pixel_values"].to(device), position).float())
    _synchronize(device)
    return torch.cat(outputs)


def _train_steps(model, batches, optimizer, steps: int, finish, autocast: torch.dtype | None, device) -> float:
    """Seconds for `steps` optimizer steps over `batches` (each finished by `finish`, the device-side decode)."""
    model.train()
    _synchronize(device)
    start, done = time.perf_counter(), 0
    for batch in batches:
        batch = finish(batch)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done += 1
        if done == steps:
            break
    _synchronize(device)
    return time.perf_counter() - start


class _ResidentBatches:
    """The limit's batches: fp32 activations already on the device, in the sampler's order, augmented alike."""

    def __init__(self, activations, labels, sampler, collator, batch_size: int) -> None:
        self.activations, self.labels, self.sampler = activations, labels, sampler
        self.collator, self.batch_size = collator, batch_size

    def __iter__(self):
        order = torch.tensor(list(self.sampler), device=self.activations.device)
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            activations = self.collator.augmentation(self.activations.index_select(0, index))
            yield {ACTIVATIONS_KEY: activations, "labels": self.labels.index_select(0, index)}


def _decode_speed(cache: ActivationCache, device: torch.device) -> tuple[float, float]:
    """GB/s of decoded float32: the host half (`unpack` every row) and the device half (`expand` them all)."""
    start = time.perf_counter()
    rows = [cache.unpack(c) for c in range(cache.num_chunks)]
    host = time.perf_counter() - start
    reading = CachedActivationDataset(cache, memory="device", device=device, progress=False)
    packed = reading.pack(range(len(reading)))
    _synchronize(device)
    start = time.perf_counter()
    packed.to(device).decode()
    _synchronize(device)
    expand = time.perf_counter() - start
    del rows
    raw = cache.manifest.raw_bytes / 1e9
    return raw / host, raw / expand


def data_path(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    autocast = torch.bfloat16 if args.bf16 else None
    memories = args.memory.split(",")
    results = {"setting": vars(args), "device": str(device), "threads": torch.get_num_threads(), "shapes": {}}
    if device.type == "cuda":
        results["device_name"] = torch.cuda.get_device_name(device)
    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        torch.manual_seed(0)
        if shape.synthetic or args.synthetic:
            images = SyntheticImages(args.samples, shape.image_size)
        else:
            cifar = os.path.join(SHARED, "data", "cifar10")
            images = load_image_classification(cifar, max_train_samples=args.samples, augment=False).train_unaugmented
        model = FreezeCacheModel(build_model(shape.model, 10)).to(device)
        model.freeze_blocks(range(shape.position))
        builds, paths, decodes = [], [], []
        limit_pass_s, resident = [], None
        for codec_name in args.codecs.split(","):
            start = time.perf_counter()
            resident = _prefix_pass(model, shape.position, images, args.build_batch_size, device)
            limit_pass_s.append(time.perf_counter() - start)
            folder = os.path.join(args.output_dir, f"{shape_name}-{codec_name}")
            parts = fingerprint_parts(
                model.adapter, shape.position, f"{shape_name}-{args.samples}", CODECS[codec_name], 4
            )
            start = time.perf_counter()
            build_activation_cache(
                model.adapter,
                shape.position,
                images,
                folder,
                build_codec(CODECS[codec_name]),
                4,
                parts,
                collate_fn=collate_image_batch,
                batch_size=args.build_batch_size,
                device=device,
                encode_threads=args.threads,
                progress=False,
            )
            build_s = time.perf_counter() - start
            cache = ActivationCache.load(folder)
            builds.append({"codec": codec_name, "limit_s": limit_pass_s[-1], "build_s": build_s})
            decoded = torch.from_numpy(np.concatenate([cache.decode(c) for c in range(cache.num_chunks)]))
            error = (decoded - resident.cpu()).abs()
            host_gbs, device_gbs = _decode_speed(cache, device)
            decodes.append(
                {
                    "codec": repr(cache.codec),
                    "ratio": cache.manifest.compression_ratio,
                    "max_error": float(error.max()),
                    "rmse_over_std": float(error.square().mean().sqrt() / resident.std()),
                    "host_unpack_gbs": host_gbs,
                    "device_expand_gbs": device_gbs,
                }
            )
            del decoded, error
            for memory in memories:
                # A fresh reader each time: `host` loads the payloads of the cache object it is given into memory.
                fresh = ActivationCache.load(folder, verify=False)
                paths.append(
                    _time_path(model, shape_name, codec_name, fresh, resident, memory, device, autocast, args)
                )
                print(json.dumps(paths[-1]), flush=True)
        results["shapes"][shape_name] = {
            "sample_shape": list(resident.shape[1:]),
            "builds": builds,
            "decodes": decodes,
            "paths": paths,
        }
        del resident
    return results


def _time_path(model, shape_name, codec_name, cache, resident, memory, device, autocast, args) -> dict:
    """Suffix training from `resident` (the limit) and through the real path, alternately: samples/s of each."""
    reading = CachedActivationDataset(
        cache, decode_threads=args.threads, memory=memory, device=device, decode_on_device=True, progress=False
    )
    collator = FreezeCacheCollator()
    if len(cache.manifest.sample_shape) == 3:
        collator.augmentation = FeatureMapAugmentationConfig().build(model.adapter, cache.manifest)
    else:
        collator.augmentation = TokenAugmentationConfig(noise_std=0.05).build(model.adapter, cache.manifest)
    sampler = ChunkShuffleSampler(reading, args.batch_size, seed=0)
    loader = DataLoader(
        reading,
        batch_size=args.batch_size,
        sampler=sampler,
        collate_fn=collator,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
    )
    labels = torch.tensor(cache.labels, device=device)
    limit = _ResidentBatches(resident, labels, sampler, collator, args.batch_size)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    model.discard(cache.manifest.position)  # the prefix stays where it is: the next codec's build runs it

    def finish(batch):
        return collator.finish(batch, device)

    for batches in (limit, loader):  # warm-up: kernels, allocator, worker start
        _train_steps(model, batches, optimizer, args.warmup, finish, autocast, device)
    limit_s, real_s = [], []
    for _ in range(args.repeats):
        limit_s.append(_train_steps(model, limit, optimizer, args.steps, finish, autocast, device))
        real_s.append(_train_steps(model, loader, optimizer, args.steps, finish, autocast, device))
    samples = args.steps * args.batch_size
    limit_rate, real_rate = samples / float(np.median(limit_s)), samples / float(np.median(real_s))
    # Each alternation's pair of arms ran back to back: their ratio cancels the machine's slow spells.
    paired = np.array(limit_s) / np.array(real_s)
    summary = reading.memory_summary()
    return {
        "shape": shape_name,
        "codec": codec_name,
        "memory": reading.memory,
        "held_mb": summary["held_bytes"] / 2**20,
        "held_on": summary["held_on"],
        "limit_samples_s": limit_rate,
        "real_samples_s": real_rate,
        "fraction_of_limit": float(np.median(paired)),
        "fraction_range": [float(paired.min()), float(paired.max())],
    }


def data_path_markdown(result: dict) -> str:
    s = result["setting"]
    device = result.get("device_name", result["device"])
    lines = [
        f"Device: {device}; {result['threads']} torch thread(s), {s['threads']} decode thread(s), batch "
        f"{s['batch_size']}, {s['samples']} samples, {s['steps']} timed steps per arm, {s['repeats']} alternations, "
        f"{'bf16 autocast' if s['bf16'] else 'fp32'}, {s['workers']} DataLoader worker(s).",
        "",
        "Training from the cache against the limit (fp32 activations already on the device, same order and "
        "augmentation):",
        "",
        "| shape | sample shape | codec | memory | held (MB, where) | limit samples/s | real samples/s | % of limit "
        "(median of pairs) | range over pairs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, shape in result["shapes"].items():
        for p in shape["paths"]:
            lines.append(
                f"| {name} | {'x'.join(map(str, shape['sample_shape']))} | {p['codec']} | {p['memory']} | "
                f"{p['held_mb']:.0f} ({p['held_on']}) | {p['limit_samples_s']:.0f} | {p['real_samples_s']:.0f} | "
                f"{100 * p['fraction_of_limit']:.1f}% | {100 * p['fraction_range'][0]:.0f}-"
                f"{100 * p['fraction_range'][1]:.0f}% |"
            )
    lines += [
        "",
        "Builds against the limit (the same prefix pass with its outputs kept in memory uncompressed), and decoding:",
        "",
        "| shape | codec | ratio | max error | RMSE / std | prefix pass (s) | build (s) | build / limit | "
        "host unpack (GB/s) | device expand (GB/s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, shape in result["shapes"].items():
        for b, d in zip(shape["builds"], shape["decodes"], strict=True):
            lines.append(
                f"| {name} | {d['codec']} | {d['ratio']:.2f}x | {d['max_error']:.3g} | {d['rmse_over_std']:.3g} | "
                f"{b['limit_s']:.1f} | {b['build_s']:.1f} | {b['build_s'] / b['limit_s']:.2f}x | "
                f"{d['host_unpack_gbs']:.2f} | {d['device_expand_gbs']:.2f} |"
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
    path = sub.add_parser("data-path", help="Build and training from the cache, per codec and memory mode, vs limit.")
    path.add_argument("--shapes", default="resnet32x2-p5,resnet32x2-p10", help=f"Of: {', '.join(SHAPES)}.")
    path.add_argument("--samples", type=int, default=10000, help="Images (CIFAR-10, or synthetic at 224).")
    path.add_argument("--codecs", default="codebook2,zfp,lowbit4,int8", help=f"Of: {', '.join(CODECS)}.")
    path.add_argument("--memory", default="device,host,disk", help="Memory modes to time (auto, device, host, disk).")
    path.add_argument("--synthetic", action="store_true", help="Synthetic images for the CIFAR shapes too.")
    path.add_argument("--device", default=None, help="Training device (default: cuda when available, else cpu).")
    path.add_argument("--bf16", action="store_true", help="Train the suffix under bf16 autocast.")
    path.add_argument("--batch_size", type=int, default=128)
    path.add_argument("--build_batch_size", type=int, default=256)
    path.add_argument("--threads", type=int, default=2, help="Encode/unpack threads.")
    path.add_argument("--workers", type=int, default=0, help="DataLoader workers of the real path.")
    path.add_argument("--steps", type=int, default=20, help="Timed optimizer steps per arm.")
    path.add_argument("--warmup", type=int, default=3, help="Untimed steps per arm first.")
    path.add_argument("--repeats", type=int, default=3, help="Alternations of the two arms (the median is reported).")
    path.add_argument("--output_dir", required=True)
    sweep = sub.add_parser("chunk-sweep", help="Ratio, build/decode time and accuracy per chunk size (recipe runs).")
    sweep.add_argument("--chunk_sizes", default="1,2,4,8,16")
    sweep.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    if args.command == "data-path":
        unknown = [name for name in args.shapes.split(",") if name not in SHAPES]
        unknown += [name for name in args.codecs.split(",") if name not in CODECS]
        if unknown:
            parser.error(
                f"unknown shape or codec {unknown[0]!r}; shapes: {', '.join(SHAPES)}; codecs: {', '.join(CODECS)}."
            )
        result = data_path(args)
        markdown = data_path_markdown(result)
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
