"""SmartFRZ predictor pipeline: record weight histories with CKA labels, then fit and evaluate the predictor.

    # 1. a recorded run: trains like train_image_classifier.py and writes the history (reference: a finished run)
    python recipes/train_smartfrz_predictor.py record --reference REF_DIR --history run.npz -- \
        --model resnet32 --output_dir out/run ...
    # 2. fit on some runs, keep the best epoch on held-out runs, measure on runs of another model or dataset
    python recipes/train_smartfrz_predictor.py fit --train a.npz b.npz --validation c.npz --test d.npz \
        --output predictor.safetensors --report predictor.json

`recipes/train_smartfrz_predictor.sh` runs the whole pipeline at the scale documented in docs/results.md.
Labels use the `cka` policy's rule with `--cka_window` / `--cka_tolerance`; windows use `--window` and start at
`--min_records`, like the policy's `--smartfrz_window` and `--smartfrz_min_records`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from train_image_classifier import main as train_main

from hf_freezecache.policies import CKAConfig, SmartFRZConfig
from hf_freezecache.policies.smartfrz.training import (
    HistoryRecorder,
    HistoryWindows,
    evaluate_predictor,
    fit_predictor,
)


def record(args: argparse.Namespace, train_argv: list[str]) -> None:
    recorder = HistoryRecorder(
        args.reference,
        probe_size=args.probe_size,
        output_path=args.history,
        records_per_epoch=args.records_per_epoch,
        metadata={"train_args": train_argv},
    )
    train_main(train_argv, callbacks=[recorder])


def fit(args: argparse.Namespace) -> None:
    def windows(paths: list[str]) -> HistoryWindows | None:
        if not paths:
            return None
        return HistoryWindows.from_files(paths, args.window, args.min_records, args.cka_window, args.cka_tolerance)

    train, validation = windows(args.train), windows(args.validation)
    predictor, curve = fit_predictor(train, validation, epochs=args.epochs, seed=args.seed)
    results = {
        "labels": {"cka_window": args.cka_window, "cka_tolerance": args.cka_tolerance},
        "window": args.window,
        "min_records": args.min_records,
        "train": {"runs": args.train, **evaluate_predictor(predictor, train)},
        "curve": curve,
    }
    if validation is not None:
        results["validation"] = {"runs": args.validation, **evaluate_predictor(predictor, validation)}
    for path in args.test:
        results.setdefault("test", {})[path] = evaluate_predictor(predictor, windows([path]))
    if args.test:
        results["test_all"] = {"runs": args.test, **evaluate_predictor(predictor, windows(args.test))}
    predictor.save(
        args.output,
        trained_on=[os.path.basename(p) for p in args.train],
        labels=results["labels"],
        validation=results.get("validation"),
        test=results.get("test_all"),
    )
    with open(args.report, "w") as f:
        json.dump(results, f, indent=2)
    summary = {k: results[k] for k in ("train", "validation", "test_all") if k in results}
    print(json.dumps(summary, indent=2))


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("record", help="train with a HistoryRecorder; training flags follow '--'")
    rec.add_argument("--reference", required=True, help="output_dir of the reference run (same model and data)")
    rec.add_argument("--history", required=True, help="where to write the .npz history")
    # The defaults are the policies': histories are recorded and windowed as the smartfrz policy reads them, and
    # labelled with the cka policy's rule.
    rec.add_argument("--records_per_epoch", type=int, default=SmartFRZConfig.records_per_epoch)
    rec.add_argument("--probe_size", type=int, default=CKAConfig.probe_size)
    fitp = commands.add_parser("fit", help="fit the predictor on recorded histories")
    fitp.add_argument("--train", nargs="+", required=True)
    fitp.add_argument("--validation", nargs="*", default=[])
    fitp.add_argument("--test", nargs="*", default=[])
    fitp.add_argument("--output", required=True, help="predictor .safetensors")
    fitp.add_argument("--report", required=True, help="metrics .json")
    fitp.add_argument("--window", type=int, default=SmartFRZConfig.window)
    fitp.add_argument("--min_records", type=int, default=SmartFRZConfig.min_records)
    fitp.add_argument("--cka_window", type=int, default=CKAConfig.window)
    fitp.add_argument("--cka_tolerance", type=float, default=CKAConfig.tolerance)
    fitp.add_argument("--epochs", type=int, default=30)
    fitp.add_argument("--seed", type=int, default=0)
    cut = argv.index("--") if "--" in argv else len(argv)
    return parser.parse_args(argv[:cut]), argv[cut + 1 :]


if __name__ == "__main__":
    arguments, training_argv = parse(sys.argv[1:])
    if arguments.command == "record":
        record(arguments, training_argv)
    else:
        fit(arguments)
