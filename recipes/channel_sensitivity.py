"""How much each channel of a frozen prefix commutes with a horizontal flip: the insight behind channel-flip.

For every position, runs the prefix F on calibration images x and their mirrors, scores each channel by the mean
SSIM between flip(F(x)) and F(flip x) (the `channel-flip` sidecar's calibration, same code), and writes:
- `channel_flip_position-XX.png`: like Figure 2 of the paper, for one image, the three most and the three least
  flip-equivariant channels (rows: F(x), flip(F(x)), F(flip x));
- `channel_ssim_histogram.png`: the per-channel SSIM at each position;
- `channel_ssim.json`: the scores and the channels `--channel_aug_gamma` 0.1 and 0.3 select.

    python recipes/channel_sensitivity.py --model resnet20 \\
        --pretrained_weights ../shared/models/resnet-cifar10/resnet20-12fca82f.th --output_dir docs/figures
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from hf_freezecache.cache import prefix_in_eval  # noqa: E402
from hf_freezecache.cache.sidecars import ChannelFlipSidecar  # noqa: E402
from hf_freezecache.data import EMBEDDED_CIFAR10, collate_image_batch, load_image_classification  # noqa: E402
from hf_freezecache.models import build_model, get_block_adapter  # noqa: E402


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet20", help="A CNN build_model knows (default resnet20).")
    parser.add_argument("--pretrained_weights", default=None, help="Checkpoint of the model (a trained prefix).")
    parser.add_argument("--dataset_name", default=EMBEDDED_CIFAR10, help="Dataset of the calibration images.")
    parser.add_argument("--positions", default="3,6", help="Comma-separated block positions (default 3,6).")
    parser.add_argument("--calibration_size", type=int, default=512, help="Calibration images (default 512).")
    parser.add_argument("--image_index", type=int, default=0, help="Calibration image shown in the figures.")
    parser.add_argument("--output_dir", default="docs/figures", help="Where the PNGs and JSON go.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_arguments(argv)
    positions = [int(p) for p in args.positions.split(",")]
    data = load_image_classification(args.dataset_name, max_train_samples=args.calibration_size, augment=False)
    model = build_model(args.model, data.num_labels, args.pretrained_weights).eval()
    adapter = get_block_adapter(model)
    images = collate_image_batch([data.train_unaugmented[i] for i in range(len(data.train_unaugmented))])
    batches = list(images["pixel_values"].split(128))
    os.makedirs(args.output_dir, exist_ok=True)
    results = {}
    for position in positions:

        def prefix(pixels: torch.Tensor, position: int = position) -> torch.Tensor:
            with torch.no_grad(), prefix_in_eval(adapter, position):
                return adapter.prefix(pixels, position)

        sidecar = ChannelFlipSidecar(gamma=0.1, calibration_size=len(images["pixel_values"]))
        sidecar.calibrate(prefix, batches)
        scores = torch.tensor(sidecar.scores)
        order = torch.argsort(scores, stable=True)
        results[position] = {
            "channel_ssim": sidecar.scores,
            "gamma_0.1": sidecar.channels,
            "gamma_0.3": ChannelFlipSidecar.select(scores, 0.3),
        }
        image = images["pixel_values"][args.image_index : args.image_index + 1]
        maps, of_mirror = prefix(image)[0], prefix(image.flip(-1))[0]
        shown = [*order[-3:].flip(0).tolist(), *order[:3].tolist()]
        figure, axes = plt.subplots(3, len(shown), figsize=(2 * len(shown), 6.4))
        for column, channel in enumerate(shown):
            rows = [maps[channel], maps[channel].flip(-1), of_mirror[channel]]
            low, high = min(float(r.min()) for r in rows), max(float(r.max()) for r in rows)
            for row, array in enumerate(rows):
                axes[row, column].imshow(array.numpy(), cmap="viridis", vmin=low, vmax=high)
                axes[row, column].set_xticks([])
                axes[row, column].set_yticks([])
            axes[0, column].set_title(f"ch {channel}\nSSIM {scores[channel]:.2f}", fontsize=9)
        for row, label in enumerate(["F(x)", "flip(F(x))", "F(flip x)"]):
            axes[row, 0].set_ylabel(label)
        figure.suptitle(f"{args.model}, block position {position}: 3 most and 3 least flip-equivariant channels")
        figure.tight_layout()
        figure.savefig(os.path.join(args.output_dir, f"channel_flip_position-{position:02d}.png"), dpi=110)
        plt.close(figure)
    figure, axes = plt.subplots(1, len(positions), figsize=(4.5 * len(positions), 3.4), squeeze=False)
    for axis, position in zip(axes[0], positions, strict=True):
        scores = results[position]["channel_ssim"]
        axis.hist(scores, bins=20, range=(min(0.0, min(scores)), 1.0), color="tab:blue")
        axis.set_title(f"position {position}: {len(scores)} channels")
        axis.set_xlabel("mean SSIM of flip(F(x)) vs F(flip x)")
    axes[0, 0].set_ylabel("channels")
    figure.tight_layout()
    figure.savefig(os.path.join(args.output_dir, "channel_ssim_histogram.png"), dpi=110)
    plt.close(figure)
    with open(os.path.join(args.output_dir, "channel_ssim.json"), "w") as f:
        json.dump({"model": args.model, "weights": args.pretrained_weights, "positions": results}, f, indent=1)
    print("| position | channels | mean SSIM | min | max | SSIM of the gamma=0.1 channels | gamma=0.3 |")
    print("|---|---|---|---|---|---|---|")
    for position, result in results.items():
        s = torch.tensor(result["channel_ssim"])
        picked = [f"{float(s[result[g]].max()):.3f}" for g in ("gamma_0.1", "gamma_0.3")]
        print(
            f"| {position} | {len(s)} | {float(s.mean()):.3f} | {float(s.min()):.3f} | {float(s.max()):.3f} | "
            f"<= {picked[0]} | <= {picked[1]} |"
        )
    return results


if __name__ == "__main__":
    main()
