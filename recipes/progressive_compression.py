"""Progressive compression (the paper's Table A.1): the compression ratio of every codec setting at every block
position of a model, for one absolute zfp tolerance and for the std-relative and quantising codecs.

    python recipes/progressive_compression.py --output_dir docs/benchmarks \\
        --trained_resnet20 OUT/seed0/none --figure docs/figures/progressive_compression.png

Models: the shared pretrained CIFAR ResNet-20 (`--resnet20_weights`), optionally a ResNet-20 trained from scratch by
this library (`--trained_resnet20`, a run's output folder, e.g. the `none` run of recipes/codec_frontier.py), the
paper's 2x-wide ResNet-32 (`resnet32-paper`, random initialisation) and the CPU-sized DeiT-Tiny of
recipes/configs/cpu (32x32 input, patch 4, random initialisation). Activations of `--samples` images of the CIFAR-10
subset that ships in the package, in eval mode, chunks of 4. Writes `progressive_compression.{json,md}` to
`--output_dir` and a plot of ratio against depth.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from hf_freezecache import get_block_adapter
from hf_freezecache.cache import build_codec
from hf_freezecache.cache.codecs import measure_codec_error
from hf_freezecache.data import collate_image_batch, load_image_classification
from hf_freezecache.models import build_model

# Setting name -> codec config. `zfp-abs` is the paper's scheme: one absolute tolerance at every position.
SETTINGS = {
    "zfp-abs-0.1": {"name": "zfp", "tolerance": 0.1, "relative": False},
    "zfp-rel-0.05": {"name": "zfp", "tolerance": 0.05},
    "int8": {"name": "int8"},
    "lowbit-8": {"name": "lowbit", "bits": 8, "entropy": "zstd"},
    "lowbit-4": {"name": "lowbit", "bits": 4, "entropy": "zstd"},
    "lowbit-2": {"name": "lowbit", "bits": 2, "entropy": "zstd"},
    "codebook-4": {"name": "codebook", "bits": 4, "entropy": "zstd"},
    "codebook-2": {"name": "codebook", "bits": 2, "entropy": "zstd"},
}


def _models(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    models = {"ResNet-20 (pretrained)": build_model("resnet20", 10, weights=args.resnet20_weights)}
    if args.trained_resnet20:
        from safetensors.torch import load_file

        model = build_model("resnet20", 10)
        model.load_state_dict(load_file(os.path.join(args.trained_resnet20, "model.safetensors")))
        models["ResNet-20 (from scratch, 15 epochs)"] = model
    models["ResNet-32 2x wide (random)"] = build_model("resnet32-paper", 10)
    models["DeiT-Tiny 32x32 (random)"] = build_model(
        "timm:deit_tiny_patch16_224", 10, timm_kwargs={"img_size": 32, "patch_size": 4}
    )
    return models


def measure(args: argparse.Namespace) -> list[dict]:
    """One row per (model, position, setting): ratio, error over std, and the activations' statistics."""
    data = load_image_classification(max_train_samples=args.samples, augment=False)
    pixels = collate_image_batch([data.train_unaugmented[i] for i in range(args.samples)])["pixel_values"]
    rows = []
    for model_name, model in _models(args).items():
        adapter = get_block_adapter(model.eval())
        for position in range(1, adapter.num_blocks):
            with torch.no_grad():
                activations = adapter.prefix(pixels, position).float().numpy()
            stats = {"std": float(activations.std()), "zeros": float((activations == 0).mean())}
            for setting, config in SETTINGS.items():
                codec = build_codec(config).resolve(activations)
                error = measure_codec_error(codec, activations, 4)
                rows.append({"model": model_name, "position": position, "setting": setting, **stats, **error})
                print(f"{model_name:38} {position:3} {setting:14} {error['ratio']:6.2f}x", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    """Per model: a table of ratio per position (rows) and setting (columns), with the activations' std and zeros."""
    lines = []
    for model_name in dict.fromkeys(row["model"] for row in rows):
        mine = [row for row in rows if row["model"] == model_name]
        positions = sorted({row["position"] for row in mine})
        lines += [f"**{model_name}**", ""]
        lines.append("| position | std | zeros | " + " | ".join(SETTINGS) + " |")
        lines.append("|---" * (3 + len(SETTINGS)) + "|")
        for position in positions:
            at = {row["setting"]: row for row in mine if row["position"] == position}
            first = next(iter(at.values()))
            cells = " | ".join(f"{at[setting]['ratio']:.2f}" for setting in SETTINGS)
            lines.append(f"| {position} | {first['std']:.3f} | {first['zeros']:.0%} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(row["model"] for row in rows))
    figure, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), sharey=True)
    for axis, model_name in zip(np.atleast_1d(axes), models, strict=True):
        for setting in SETTINGS:
            mine = sorted(
                (r["position"], r["ratio"]) for r in rows if r["model"] == model_name and r["setting"] == setting
            )
            axis.plot(*zip(*mine, strict=True), marker="o", markersize=3, label=setting)
        axis.set_title(model_name, fontsize=9)
        axis.set_xlabel("block position (depth)")
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("compression ratio (float32 / stored)")
    np.atleast_1d(axes)[-1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="docs/benchmarks")
    parser.add_argument("--figure", default="docs/figures/progressive_compression.png")
    parser.add_argument("--samples", type=int, default=256, help="Images whose activations are compressed.")
    parser.add_argument("--resnet20_weights", default="../shared/models/resnet-cifar10/resnet20-12fca82f.th")
    parser.add_argument("--trained_resnet20", default=None, help="A run folder with a ResNet-20 model.safetensors.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = measure(args)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "progressive_compression.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(args.output_dir, "progressive_compression.md"), "w") as f:
        f.write(markdown(rows))
    plot(rows, args.figure)


if __name__ == "__main__":
    main()
