"""The freezing-policy comparison of docs/results.md: a table like SmartFRZ's Tables 2-3 and a freeze-timeline PNG.

    python recipes/summarize_policies.py OUT/scratch-none OUT/scratch-freezeout OUT/scratch-autofreeze \
        --timeline docs/figures/freeze_timeline_scratch.png --title "ResNet-20, CIFAR-10 10k, from scratch"

Reads each run folder's `cost_report.json` and `eval_results.json` and prints one markdown row per run: accuracy,
training FLOPs and wall time (and their ratio to the first run), the policy's own time, and the frozen / discarded
blocks at the end. The PNG has one panel per run (`hf_freezecache.accounting.plot_freeze_timeline`): block index
against epoch, each block grey while it trains, shaded once frozen and hatched once discarded, freeze events marked.
"""

from __future__ import annotations

import argparse
import json
import os

from hf_freezecache.accounting import CostReport, plot_freeze_timeline


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
    reports = {_name(folder): CostReport.from_dict(_load(folder, "cost_report.json")) for folder in folders}
    plot_freeze_timeline(reports, path, title=title)


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
