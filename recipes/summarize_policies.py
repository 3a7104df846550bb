"""The freezing-policy comparison of docs/results.md: a table like SmartFRZ's Tables 2-3 and a freeze-timeline PNG.

    python recipes/summarize_policies.py OUT/scratch-none OUT/scratch-freezeout OUT/scratch-autofreeze \
        --timeline docs/figures/freeze_timeline_scratch.png --title "ResNet-20, CIFAR-10 10k, from scratch"
    # over seeds: OUT/seed<S>/<which>-<run> (SEED=S bash recipes/run_results.sh WHICH OUT/seed<S> RUN ...),
    # with each run's paired difference (same seed) from --against
    python recipes/summarize_policies.py --root OUT --which scratch none freezeout autofreeze smartfrz \
        --against smartfrz

Reads each run folder's `cost_report.json` and `eval_results.json` and prints one markdown row per run: accuracy,
training FLOPs and wall time (and their ratio to the first run), the policy's own time, and the frozen / discarded
blocks at the end. The PNG has one panel per run (`hf_freezecache.accounting.plot_freeze_timeline`): block index
against epoch, each block grey while it trains, shaded once frozen and hatched once discarded, freeze events marked.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics

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


def seeds_table(root: str, which: str, runs: list[str], against: str) -> str:
    """One row per run over the seeds found: accuracy per seed, mean +- std, the paired difference `against - run`
    over the seeds both have, mean training FLOPs and wall time (and their ratio to the first run), the mean epoch
    of the first and last freeze, and the blocks frozen at the end."""

    def load(run: str) -> dict[int, tuple[dict, dict]]:
        found = {}
        for folder in glob.glob(os.path.join(root, "seed*", f"{which}-{run}")):
            if os.path.exists(os.path.join(folder, "eval_results.json")):
                seed = int(os.path.basename(os.path.dirname(folder))[len("seed") :])
                found[seed] = (_load(folder, "eval_results.json"), _load(folder, "cost_report.json"))
        return dict(sorted(found.items()))

    results = {run: load(run) for run in dict.fromkeys([*runs, against])}
    rows = [
        f"| run | seeds | accuracy per seed | mean +- std | `{against}` - run (paired) | training FLOPs (x1e12) | "
        "vs first | wall time (s) | vs first | first / last freeze (epoch) | frozen at the end |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = None
    for run in runs:
        found = results[run]
        if not found:
            continue
        accuracy = {seed: 100 * metrics["eval_accuracy"] for seed, (metrics, _) in found.items()}
        flops = statistics.mean(report["totals"]["training_flops"] for _, report in found.values())
        wall = statistics.mean(report["totals"]["wall_time_s"] for _, report in found.values())
        base = base or (flops, wall)
        paired = [
            100 * results[against][seed][0]["eval_accuracy"] - accuracy[seed]
            for seed in accuracy
            if seed in results[against]
        ]
        events = [[e["epoch"] for e in report["freeze_events"]] for _, report in found.values()]
        freezes = [(min(e), max(e)) for e in events if e]
        frozen = [len(report["states"][-1]["frozen_blocks"]) for _, report in found.values()]
        num_blocks = next(iter(found.values()))[1]["num_blocks"]
        rows.append(
            f"| {run} | {len(found)} | {' / '.join(f'{a:.2f}' for a in accuracy.values())} | "
            f"{_mean_std(list(accuracy.values()))} | {_mean_std(paired, sign=True) if run != against else '-'} | "
            f"{flops / 1e12:.2f} | {flops / base[0]:.2f} | {wall:.0f} | {wall / base[1]:.2f} | "
            + (
                f"{statistics.mean(f for f, _ in freezes):.1f} / {statistics.mean(t for _, t in freezes):.1f}"
                if freezes
                else "-"
            )
            + f" | {statistics.mean(frozen):.1f} of {num_blocks} |"
        )
    return "\n".join(rows) + "\n"


def _mean_std(values: list[float], sign: bool = False) -> str:
    if not values:
        return "-"
    form = "+.2f" if sign else ".2f"
    spread = f" +- {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):{form}}{spread}"


def plot_timeline(folders: list[str], path: str, title: str) -> None:
    reports = {_name(folder): CostReport.from_dict(_load(folder, "cost_report.json")) for folder in folders}
    plot_freeze_timeline(reports, path, title=title)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="Output folders of runs; with --root, run names.")
    parser.add_argument("--root", help="Folder holding seed<S>/<which>-<run> folders: summarise over seeds.")
    parser.add_argument("--which", help="With --root: the setup prefix of the run folders (scratch, finetune, ...).")
    parser.add_argument("--against", help="With --root: the run every other is paired with (default: the last).")
    parser.add_argument("--timeline", help="Where to write the freeze-timeline PNG (with --root: seed 0's runs).")
    parser.add_argument("--title", default="Freeze timeline", help="Title of the PNG.")
    args = parser.parse_args()
    folders = args.folders
    if args.root:
        if not args.which:
            parser.error("--root needs --which (the setup prefix of the run folders).")
        print(seeds_table(args.root, args.which, args.folders, args.against or args.folders[-1]), end="")
        folders = [os.path.join(args.root, "seed0", f"{args.which}-{run}") for run in args.folders]
        folders = [folder for folder in folders if os.path.exists(os.path.join(folder, "cost_report.json"))]
    else:
        print(table(folders), end="")
    if args.timeline:
        plot_timeline(folders, args.timeline, args.title)


if __name__ == "__main__":
    main()
