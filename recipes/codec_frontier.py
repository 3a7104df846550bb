"""The ratio-accuracy frontier of the cache codecs (docs/results.md, "How small can a cache be"): trains the CPU
"from scratch" setup with the frozen prefix discarded, once per codec setting and seed, and summarises accuracy
against compression.

    python recipes/codec_frontier.py run OUT --seeds 0,1,2          # ~2 h on 2 cores (two runs at a time)
    python recipes/codec_frontier.py summarize OUT --plot docs/figures/codec_frontier.png \\
        --json docs/benchmarks/codec_frontier.json > docs/benchmarks/codec_frontier.md

Setup: CIFAR ResNet-20 from scratch on 10,000 CIFAR-10 images, 15 epochs, `fixed` 5:3,10:6, `--discard true`,
channel-flip gamma 0.3 (`recipes/configs/cpu/resnet20_cifar10_scratch.yaml`). Every setting trains the same network
up to the first discard (epoch 5), so per seed the `none` arm runs whole and saves a checkpoint at the end of epoch
4; every other arm resumes from it and differs from `none` only in its codec. Resuming is exact (a test in
tests/test_discard.py checks bit-identical weights), so the pairs are the same training but for the cache. Runs use
one thread each, worker `i` pinned to core `i`; a run whose `eval_results.json` exists is not run again, so the
command can be resumed and extended with more seeds or arms (`--arms`).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import queue
import statistics
import subprocess
import sys
import threading
import time

import yaml

CONFIG = "recipes/configs/cpu/resnet20_cifar10_scratch.yaml"
SCHEDULE = "5:3,10:6"
COMMON = ["--freeze_policy", "fixed", "--freeze_schedule", SCHEDULE, "--discard", "true", "--channel_aug_gamma", "0.3"]
COMMON += ["--cache_decode_threads", "1"]

# Arm name -> codec flags. `none` is the exact cache every other arm is paired with.
ARMS: dict[str, list[str]] = {
    "none": ["--cache_codec", "none"],
    # The same as `none`, resumed from its checkpoint: checks that the pairs differ only in their codec (delta 0).
    "none-resumed": ["--cache_codec", "none"],
    "zfp-0.05": ["--cache_codec", "zfp", "--cache_tolerance", "0.05"],
    "zfp-0.25": ["--cache_codec", "zfp", "--cache_tolerance", "0.25"],
    "zfp-1": ["--cache_codec", "zfp", "--cache_tolerance", "1.0"],
    "zfp-abs-0.25": ["--cache_codec", "zfp", "--cache_tolerance", "0.25", "--cache_tolerance_relative", "false"],
    "zfp-abs-1": ["--cache_codec", "zfp", "--cache_tolerance", "1.0", "--cache_tolerance_relative", "false"],
    "int8": ["--cache_codec", "int8"],
    "lowbit-8": ["--cache_codec", "lowbit", "--cache_bits", "8", "--cache_entropy", "zstd"],
    "lowbit-4": ["--cache_codec", "lowbit", "--cache_bits", "4", "--cache_entropy", "zstd"],
    "lowbit-2": ["--cache_codec", "lowbit", "--cache_bits", "2", "--cache_entropy", "zstd"],
    "codebook-4": ["--cache_codec", "codebook", "--cache_bits", "4", "--cache_entropy", "zstd"],
    "codebook-2": ["--cache_codec", "codebook", "--cache_bits", "2", "--cache_entropy", "zstd"],
}


def _first_discard_step() -> int:
    """Optimizer steps before the first freeze of SCHEDULE: where the `none` arm saves the shared checkpoint."""
    with open(CONFIG) as f:
        config = yaml.safe_load(f)
    per_epoch = math.ceil(config["max_train_samples"] / config["per_device_train_batch_size"])
    return per_epoch * int(SCHEDULE.split(":")[0])


def _run_dir(out: str, seed: int, arm: str) -> str:
    return os.path.join(out, f"seed{seed}", arm)


def _command(out: str, seed: int, arm: str, flags: list[str], step: int) -> list[str]:
    command = [sys.executable, "recipes/train_image_classifier.py", CONFIG, "--seed", str(seed), *COMMON, *flags]
    command += ["--output_dir", _run_dir(out, seed, arm)]
    if arm == "none":
        return command + ["--save_strategy", "steps", "--save_steps", str(step), "--save_total_limit", "100"]
    return command + ["--resume_from_checkpoint", os.path.join(_run_dir(out, seed, "none"), f"checkpoint-{step}")]


def run(out: str, seeds: list[int], arms: dict[str, list[str]], workers: int) -> None:
    """Runs every (arm, seed) not done yet, `workers` at a time; the `none` run of a seed goes first."""
    step = _first_discard_step()
    done = {seed: threading.Event() for seed in seeds}
    jobs: queue.Queue = queue.Queue()
    for seed in seeds:
        jobs.put((seed, "none"))
    for arm in arms:
        for seed in seeds:
            if arm != "none":
                jobs.put((seed, arm))
    failures: list[str] = []

    def work(core: int) -> None:
        while True:
            try:
                seed, arm = jobs.get_nowait()
            except queue.Empty:
                return
            folder = _run_dir(out, seed, arm)
            if arm != "none":
                done[seed].wait()
            if not os.path.exists(os.path.join(folder, "eval_results.json")):
                os.makedirs(os.path.dirname(folder), exist_ok=True)
                env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
                pin = ["taskset", "-c", str(core)] if hasattr(os, "sched_getaffinity") else []
                with open(folder + ".log", "w") as log:
                    code = subprocess.call(
                        pin + _command(out, seed, arm, arms[arm], step), stdout=log, stderr=log, env=env
                    )
                if code != 0:
                    failures.append(f"{arm} seed {seed} (exit {code}, see {folder}.log)")
            print(f"done: {arm} seed {seed}", flush=True)
            if arm == "none":
                done[seed].set()

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(workers))
    threads = [threading.Thread(target=work, args=(cores[i % len(cores)],)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        sys.exit("failed: " + "; ".join(failures))


def _load(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, "eval_results.json")) as f:
            accuracy = 100 * json.load(f)["eval_accuracy"]
    except FileNotFoundError:
        return None
    caches, folders = {}, {}
    for path in sorted(glob.glob(os.path.join(folder, "activation_cache", "position-*", "freezecache_manifest.json"))):
        position = int(path.split("position-")[1][:2])
        with open(path) as f:
            caches[position] = json.load(f)
        folders[position] = os.path.dirname(path)
    with open(os.path.join(folder, "cost_report.json")) as f:
        report = json.load(f)
    return {"accuracy": accuracy, "caches": caches, "folders": folders, "report": report}


def _decode_seconds(folder: str) -> float:
    """Seconds to decode every row of the cache in `folder` once on this CPU, one thread (host path)."""
    import torch

    from hf_freezecache.cache import ActivationCache

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cache = ActivationCache.load(folder)
    start = time.perf_counter()
    for row in range(cache.manifest.num_chunks):
        cache.decode(row)
    torch.set_num_threads(threads)
    return time.perf_counter() - start


def _mean_std(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}{spread}"


def _errors(run: dict, kind: str) -> str:
    """The codec's error `kind` at each position, measured by the build on its first samples (manifest)."""
    values = [(cache.get("codec_error") or {}).get(kind) for _, cache in sorted(run["caches"].items())]
    return " / ".join("-" if value is None else f"{value:.3f}" for value in values)


def collect(out: str, arms: list[str], decode_timing: bool = True) -> list[dict]:
    """Per arm with results: seeds, ratio / error / stored bytes per position, decode time, accuracies, paired
    differences to `none` (same seed)."""
    seeds = sorted(
        int(path.rsplit("seed", 1)[1]) for path in glob.glob(os.path.join(out, "seed*")) if path[-1].isdigit()
    )
    runs = {(arm, seed): _load(_run_dir(out, seed, arm)) for arm in ["none", *arms] for seed in seeds}
    rows = []
    for arm in arms:
        found = {seed: runs[arm, seed] for seed in seeds if runs[arm, seed]}
        if not found:
            continue
        first = next(iter(found.values()))
        positions = sorted(first["caches"])
        caches = [first["caches"][p] for p in positions]
        rows.append(
            {
                "arm": arm,
                "seeds": sorted(found),
                "positions": positions,
                "codec": [cache["codec"] for cache in caches],
                "ratio": [cache["compression_ratio"] for cache in caches],
                "stored_mb": statistics.mean(
                    sum(c["stored_bytes"] for c in r["caches"].values()) / 2**20 for r in found.values()
                ),
                "max_over_std": [(cache.get("codec_error") or {}).get("max_over_std") for cache in caches],
                "rms_over_std": [(cache.get("codec_error") or {}).get("rms_over_std") for cache in caches],
                "decode_seconds": [_decode_seconds(first["folders"][p]) for p in positions] if decode_timing else None,
                "accuracy": [found[s]["accuracy"] for s in sorted(found)],
                "delta": [
                    found[s]["accuracy"] - runs["none", s]["accuracy"] for s in sorted(found) if runs["none", s]
                ],
            }
        )
    return rows


def _cells(values: list | None, digits: int) -> str:
    if values is None:
        return "-"
    return " / ".join("-" if value is None else f"{value:.{digits}f}" for value in values)


def table(rows: list[dict]) -> str:
    """The frontier as a markdown table."""
    lines = [
        "| codec | seeds | ratio (pos 3 / 6) | stored MB | max error / std (3 / 6) | RMS error / std (3 / 6) | "
        "decode s per epoch (3 / 6) | test accuracy | paired Δ vs none |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        deltas = row["delta"]
        delta = "-" if row["arm"] == "none" else f"{_mean_std(deltas)} ({', '.join(f'{d:+.2f}' for d in deltas)})"
        lines.append(
            f"| {row['arm']} | {len(row['seeds'])} | {_cells(row['ratio'], 2)} | {row['stored_mb']:.1f} | "
            f"{_cells(row['max_over_std'], 3)} | {_cells(row['rms_over_std'], 3)} | "
            f"{_cells(row['decode_seconds'], 1)} | {_mean_std(row['accuracy'])} | {delta} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """Paired accuracy difference to `none` (mean and each seed) against the cache's compression ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for row in rows:
        if row["arm"] == "none" or not row["delta"]:
            continue
        ratio = statistics.mean(row["ratio"])
        axis.scatter([ratio] * len(row["delta"]), row["delta"], s=10, alpha=0.4)
        axis.errorbar(ratio, statistics.mean(row["delta"]), fmt="o", color="black", markersize=3)
        axis.annotate(
            row["arm"], (ratio, statistics.mean(row["delta"])), fontsize=7, xytext=(4, 4), textcoords="offset points"
        )
    axis.axhline(0, color="grey", linewidth=0.8)
    axis.set_xscale("log")
    axis.set_xlabel("compression ratio (float32 / stored), mean of positions 3 and 6")
    axis.set_ylabel("test accuracy - none codec (points, paired by seed)")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "summarize"):
        command = sub.add_parser(name)
        command.add_argument("output_dir")
        if name == "summarize":
            command.add_argument("--plot", default=None, help="Where to save the accuracy-ratio plot (png).")
            command.add_argument("--json", default=None, help="Where to save the rows (json).")
            command.add_argument("--no_decode_timing", action="store_true", help="Skip timing the decoding.")
        command.add_argument("--arms", default=",".join(ARMS), help=f"Comma-separated arms of {', '.join(ARMS)}.")
        if name == "run":
            command.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds.")
            command.add_argument("--workers", type=int, default=2, help="Runs at a time, each pinned to a core.")
    args = parser.parse_args()
    arms = args.arms.split(",")
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}.")
    if args.command == "run":
        seeds = [int(seed) for seed in args.seeds.split(",")]
        run(args.output_dir, seeds, {arm: ARMS[arm] for arm in ["none", *arms] if arm in ARMS}, args.workers)
    else:
        rows = collect(args.output_dir, arms, decode_timing=not args.no_decode_timing)
        print(table(rows))
        if args.plot:
            plot(rows, args.plot)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
