"""The freezing-policy comparison of docs/results.md: a table like SmartFRZ's Tables 2-3 and a freeze-timeline PNG.

    python recipes/summarize_policies.py OUT/scratch-none OUT/scratch-freezeout OUT/scratch-autofreeze \
        --timeline docs/figures/freeze_timeline_scratch.png --title "ResNet-20, CIFAR-10 10k, from scratch"

Reads each run folder's `cost_report.json` and `eval_results.json` and prints one markdown row per run: accuracy,
training FLOPs and wall time (and their ratio to the first run), the policy's own time, and the frozen / discarded
blocks at the end. The PNG has one panel per run: block index against epoch, each block shaded from when it froze.
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _load(folder: str, name: str) -> dict:
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def _name(folder: str) -> str:
    return os.path.basename(os.path.normpath(folder))


def table(folders: list[str]) -> str:
    rows = [
        "| run | test accuracy | training FLOPs (x1e12) | vs first | training wall time (s) | vs first | "
        "policy time (s) | frozen at the end | discarded |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base_flops = base_wall = None
    for folder in folders:
        report, evaluation = _load(folder, "cost_report.json"), _load(folder, "eval_results.json")
        totals = report["totals"]
        flops, wall = totals["training_flops"], totals["wall_time_s"]
        base_flops, base_wall = base_flops or flops, base_wall or wall
        last = report["states"][-1]
        frozen = len(last["frozen_blocks"])
        rows.append(
            f"| {_name(folder)} | {100 * evaluation['eval_accuracy']:.2f}% | {flops / 1e12:.2f} | "
            f"{flops / base_flops:.2f} | {wall:.0f} | {wall / base_wall:.2f} | "
            f"{totals.get('policy_seconds', 0.0):.1f} | {frozen} of {report['num_blocks']} | "
            f"{last['discarded_prefix']} |"
        )
    return "\n".join(rows) + "\n"


def plot_timeline(folders: list[str], path: str, title: str) -> None:
    reports = [_load(folder, "cost_report.json") for folder in folders]
    epochs = max(r["states"][-1]["end_epoch"] for r in reports)
    fig, axes = plt.subplots(len(folders), 1, figsize=(7, 1.1 + 1.0 * len(folders)), sharex=True, squeeze=False)
    for ax, folder, report in zip(axes[:, 0], folders, reports, strict=True):
        n = report["num_blocks"]
        for event in report["freeze_events"]:
            ax.barh(event["block"], epochs - event["epoch"], left=event["epoch"], height=0.8, color="tab:blue")
        discards = [(s["start_epoch"], s["discarded_prefix"]) for s in report["states"] if s["discarded_prefix"]]
        for start, position in discards:
            ax.barh(
                (position - 1) / 2,
                epochs - start,
                left=start,
                height=position,
                color="none",
                hatch="//",
                edgecolor="tab:red",
                linewidth=0,
            )
        ax.set_ylim(-0.6, n - 0.4)
        ax.set_yticks(range(0, n, max(1, n // 4)))
        ax.set_ylabel("block")
        ax.set_title(_name(folder), fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlim(0, epochs)
    axes[-1, 0].set_xlabel("epoch (shaded: frozen; hatched: discarded)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="Output folders of train_image_classifier.py runs.")
    parser.add_argument("--timeline", help="Where to write the freeze-timeline PNG.")
    parser.add_argument("--title", default="Freeze timeline", help="Title of the PNG.")
    args = parser.parse_args()
    print(table(args.folders), end="")
    if args.timeline:
        plot_timeline(args.folders, args.timeline, args.title)


if __name__ == "__main__":
    main()
