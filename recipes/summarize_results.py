"""Turns recipe output folders into the comparison table of docs/results.md.

    python recipes/summarize_results.py OUT/scratch-none OUT/scratch-freezeout OUT/scratch-fixed

Reads each folder's `cost_report.json` and `eval_results.json` (written by `train_image_classifier.py`) and prints
one markdown row per run, with FLOPs relative to the first run. With `--remeasure_model NAME --batch_size N`, the
memory of every freeze state is measured again (`measure_step_cost`, a real forward+backward of that state with an
SGD-momentum optimizer) at batch size N, and the averages are recomputed from the run's epochs per state.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from hf_freezecache.accounting import measure_step_cost
from hf_freezecache.freezing import FreezingEngine
from hf_freezecache.model import FreezeCacheModel
from hf_freezecache.models import build_model


def _load(folder: str, name: str) -> dict:
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def state_memory(model_name: str, frozen_blocks: list[int], batch_size: int, image_size: int = 32) -> int:
    """Training memory in bytes of `model_name` with `frozen_blocks` frozen, at `batch_size`."""
    model = FreezeCacheModel(build_model(model_name, num_labels=10))
    batch = {
        "pixel_values": torch.randn(batch_size, 3, image_size, image_size),
        "labels": torch.zeros(batch_size).long(),
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(**batch).loss.backward()
    optimizer.step()
    FreezingEngine(model, optimizer).freeze(frozen_blocks)
    return measure_step_cost(model, batch, optimizer).memory_bytes


def summarize(folders: list[str], remeasure_model: str | None = None, batch_size: int = 128) -> str:
    rows = [
        "| run | policy | test accuracy | training FLOPs (x1e12) | vs first | avg memory (MB) | min memory (MB) "
        "| training wall time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    baseline = None
    for folder in folders:
        report, evaluation = _load(folder, "cost_report.json"), _load(folder, "eval_results.json")
        totals = report["totals"]
        if remeasure_model:
            memory = [state_memory(remeasure_model, st["frozen_blocks"], batch_size) for st in report["states"]]
            epochs = [st["end_epoch"] - st["start_epoch"] for st in report["states"]]
            totals["average_memory_bytes"] = sum(m * e for m, e in zip(memory, epochs, strict=True)) / sum(epochs)
            totals["minimum_memory_bytes"] = memory[-1]
        baseline = baseline or totals["training_flops"]
        rows.append(
            f"| {os.path.basename(os.path.normpath(folder))} | {report['policy']} | "
            f"{100 * evaluation['eval_accuracy']:.2f}% | {totals['training_flops'] / 1e12:.2f} | "
            f"{totals['training_flops'] / baseline:.2f} | {totals['average_memory_bytes'] / 2**20:.1f} | "
            f"{totals['minimum_memory_bytes'] / 2**20:.1f} | {totals['wall_time_s']:.0f} |"
        )
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="Output folders of train_image_classifier.py runs.")
    parser.add_argument("--remeasure_model", help="Model name (as in --model) to re-measure state memory with.")
    parser.add_argument("--batch_size", type=int, default=128, help="Batch size of the re-measured memory.")
    args = parser.parse_args()
    print(summarize(args.folders, args.remeasure_model, args.batch_size), end="")


if __name__ == "__main__":
    main()
