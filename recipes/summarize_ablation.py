"""Summarises the augmentation ablation of docs/results.md over seeds: one markdown row per run.

    python recipes/summarize_ablation.py OUT scratch none fixed fixed-discard fixed-channel-0.1 fixed-channel-0.3

reads `OUT/seed*/<which>-<run>/` (written by `SEED=s bash recipes/run_results.sh <which> OUT/seed<s> <run>...`) and
prints, per run: the seeds found, test accuracy (mean and sample standard deviation), training FLOPs (per-step FLOPs
of every state plus the one-off prefix passes of the cache builds, sidecar passes included), the sidecars' stored
size as a fraction of the cache, cache build time, and seconds per epoch of each freeze state.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics


def _load(folder: str) -> tuple[dict, dict] | None:
    try:
        with open(os.path.join(folder, "eval_results.json")) as f:
            metrics = json.load(f)
        with open(os.path.join(folder, "cost_report.json")) as f:
            report = json.load(f)
    except FileNotFoundError:
        return None
    return metrics, report


def _build_passes(cache: dict, samples: int) -> float:
    # The builder's own formula (`CacheManifest.build_prefix_passes`), recomputed from the sidecar configs so that
    # reports written before that field existed are counted the same way.
    passes = 1.0
    for name, config in (cache.get("sidecars") or {}).items():
        passes += 1
        if name == "channel-flip":
            passes += 4 * min(config["calibration_size"], samples) / samples
    return passes


def summarize(root: str, which: str, runs: list[str]) -> str:
    lines = [
        "| run | seeds | test accuracy | training FLOPs (x1e12) | sidecars / cache | cache builds (s) | "
        "s/epoch per freeze state |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        found = [r for r in (_load(d) for d in sorted(glob.glob(os.path.join(root, "seed*", f"{which}-{run}")))) if r]
        if not found:
            continue
        accuracies = [100 * metrics["eval_accuracy"] for metrics, _ in found]
        spread = f" ± {statistics.stdev(accuracies):.2f}" if len(accuracies) > 1 else ""
        flops, fractions, builds, epochs = [], [], [], []
        for _, report in found:
            samples = report["train_samples"]
            total, build, per_state = 0.0, 0.0, []
            for state in report["states"]:
                span = state["end_epoch"] - state["start_epoch"]
                total += state["cost"]["flops_per_sample"] * samples * span
                cache = state.get("cache")
                if cache:
                    total += cache["prefix_forward_flops_per_sample"] * samples * _build_passes(cache, samples)
                    build += cache["build_seconds"]
                    if cache.get("sidecar_bytes"):
                        fractions.append(cache["sidecar_bytes"] / cache["stored_bytes"])
                per_state.append(state["wall_time_s"] / span if span else float("nan"))
            flops.append(total)
            builds.append(build)
            epochs.append(per_state)
        per_state_mean = [statistics.mean(column) for column in zip(*epochs, strict=False)]
        lines.append(
            f"| {run} | {len(found)} | {statistics.mean(accuracies):.2f}%{spread} | "
            f"{statistics.mean(flops) / 1e12:.2f} | "
            f"{f'{statistics.mean(fractions):.1%}' if fractions else '-'} | {statistics.mean(builds):.1f} | "
            f"{' / '.join(f'{s:.1f}' for s in per_state_mean)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", help="Folder holding seed*/ run folders.")
    parser.add_argument("which", help="Experiment prefix of the run folders: scratch, finetune or vit.")
    parser.add_argument("runs", nargs="+", help="Run names, in table order.")
    args = parser.parse_args(argv)
    table = summarize(args.root, args.which, args.runs)
    print(table)
    return table


if __name__ == "__main__":
    main()
