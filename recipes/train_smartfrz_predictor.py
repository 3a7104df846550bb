"""SmartFRZ's predictor: record one run's weight history, or fit the predictor on a history corpus.

    # one recorded run: trains like train_image_classifier.py and writes its history (reference: a finished run)
    python recipes/train_smartfrz_predictor.py record --reference REF_DIR --history run.npz -- \
        --model resnet32 --output_dir out/run ...
    # model selection by leave-one-family-out validation, then the final fit on the whole corpus
    python recipes/train_smartfrz_predictor.py fit CORPUS --output predictor.safetensors --report predictor.json

`CORPUS` is written by `recipes/build_smartfrz_corpus.py`. `fit` scores every candidate recipe by leave-one-family-
out validation (fit on all families but one, score the held-out family's windows), keeps the recipe whose worst
held-out family scores best, fits it on every run, and writes the predictor with its card (corpus version, features,
recipe, validation scores) in the safetensors metadata; the report has every candidate's scores and decisions.
Ship it with `cp predictor.safetensors hf_freezecache/policies/smartfrz/predictor.safetensors`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace

from train_image_classifier import main as train_main

from hf_freezecache.policies import CKAConfig, SmartFRZConfig
from hf_freezecache.policies.smartfrz.corpus import load_corpus
from hf_freezecache.policies.smartfrz.fitting import (
    HistoryWindows,
    PredictorRecipe,
    cross_validate,
    evaluate_predictor,
    fit_predictor,
    freeze_decisions,
    summarize_decisions,
)
from hf_freezecache.policies.smartfrz.predictor import CONTEXT_FEATURES, WEIGHT_FEATURES
from hf_freezecache.policies.smartfrz.recording import LABEL_TOLERANCE, HistoryRecorder

#: The recipes model selection compares (overrides of `PredictorRecipe`): inputs with and without context, two
#: sizes, two lengths of training, more weight decay, a shorter window.
CANDIDATES = [
    {"context": False, "epochs": 10},
    {"context": False, "epochs": 30},
    {"context": True, "epochs": 10},
    {"context": True, "epochs": 30},
    {"context": True, "epochs": 10, "hidden_size": 64, "key_size": 32, "classifier_hidden_size": 32},
    {"context": True, "epochs": 10, "weight_decay": 1e-2},
    {"context": True, "epochs": 10, "window": 12},
]
#: Validated and reported, never shipped: what the context alone predicts, without the weight history.
ABLATIONS = [{"context": True, "epochs": 10, "weights": False}]


def record(args: argparse.Namespace, train_argv: list[str]) -> None:
    recorder = HistoryRecorder(
        args.reference,
        probe_size=args.probe_size,
        output_path=args.history,
        records_per_epoch=args.records_per_epoch,
        metadata={"train_args": train_argv},
    )
    train_main(train_argv, callbacks=[recorder])


def markdown(results: list[dict]) -> str:
    families = sorted(results[0]["families"])
    lines = [
        "| recipe | " + " | ".join(families) + " | worst | mean |",
        "|---|" + "---|" * (len(families) + 2),
    ]
    for result in results:
        changed = {k: v for k, v in result["recipe"].items() if v != asdict(PredictorRecipe())[k]}
        scores = " | ".join(f"{result['families'][f]['balanced_accuracy']:.3f}" for f in families)
        lines.append(
            f"| {json.dumps(changed) if changed else 'default'} | {scores} | "
            f"{result['worst']:.3f} | {result['mean']:.3f} |"
        )
    return "\n".join(lines)


def card(report: dict, args: argparse.Namespace) -> str:
    """The shipped predictor's card in markdown: corpus, features, recipe, validation, decisions."""
    corpus, chosen = report["corpus"], report["chosen"]
    best = next(r for r in report["candidates"] if r["recipe"] == chosen)
    features = list(WEIGHT_FEATURES) + (list(CONTEXT_FEATURES) if chosen["context"] else [])
    decisions = [
        "| held-out family | runs | windows | freeze share (labels / predicted) | balanced accuracy | "
        "blocks frozen by the predictor | distinct freeze epochs | mean abs. error (epochs) | frozen early |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for family, scores in best["families"].items():
        d = scores["decisions"]
        error = "-" if d["mean_abs_epoch_error"] is None else f"{d['mean_abs_epoch_error']:.2f}"
        early = "-" if d["frozen_early_fraction"] is None else f"{d['frozen_early_fraction']:.0%}"
        decisions.append(
            f"| {family} | {scores['runs']} | {scores['examples']} | {scores['freeze_fraction']:.2f} / "
            f"{scores['predicted_freeze_fraction']:.2f} | {scores['balanced_accuracy']:.3f} | "
            f"{d['frozen']} of {d['blocks']} | {d['distinct_freeze_epochs']} | {error} | "
            f"{early} |"
        )

    def counts(values: dict) -> str:
        return ", ".join(f"{name} {count}" for name, count in values.items())

    return f"""# The shipped SmartFRZ predictor

Written by `python recipes/train_smartfrz_predictor.py fit {args.corpus} --output {args.output} --report
{args.report} --card {args.card}`. The same card is in the safetensors metadata
(`FreezePredictor.from_file().metadata`).

- **Corpus** version `{corpus["version"]}`: {corpus["runs"]} recorded runs.
  - families: {counts(corpus["families"])};
  - datasets: {counts(corpus["datasets"])};
  - regimes: {counts(corpus["regimes"])}.
- **Labels**: a block freezes once its CKA to the reference stays within {chosen["label_tolerance"]} of its whole-run
  range, to the end of the run.
- **Inputs** per record: {", ".join(f"`{f}`" for f in features)}.
- **Recipe**, chosen by the worst held-out family's balanced accuracy:
  `{json.dumps({k: v for k, v in chosen.items() if k not in ("seed", "label_tolerance")})}`.
- **Fitted on the whole corpus**: balanced accuracy {report["final_training"]["balanced_accuracy"]:.3f} on its own
  windows.

## Leave-one-family-out validation: balanced accuracy on the held-out family

Every recipe is fitted on the runs of all families but one and scored on that family's windows. Recipes are written
as their changes from `PredictorRecipe()`. `"weights": false` is an ablation, never shipped: the same predictor with
the weight features zeroed, which measures what the context (training fraction, block depth) predicts alone.

{markdown(report["candidates"])}

## The chosen recipe's decisions on held-out families

A block's decision is the first window with P(freeze) > 0.5, as the policy takes it. The label's is the first record
at which the rule says "freeze". "Frozen early" is the share of blocks whose decision came before the label's.

{chr(10).join(decisions)}
"""


def fit(args: argparse.Namespace) -> None:
    histories, manifest = load_corpus(args.corpus)
    base = PredictorRecipe(
        window=args.window,
        min_records=args.min_records,
        label_tolerance=args.label_tolerance,
        seed=args.seed,
    )
    candidates = [replace(base, **overrides) for overrides in (CANDIDATES if not args.only_default else [{}])]
    ablations = [replace(base, **overrides) for overrides in (ABLATIONS if not args.only_default else [])]
    results = []
    for number, recipe in enumerate(candidates + ablations, 1):
        print(f"recipe {number}/{len(candidates) + len(ablations)}: {asdict(recipe)}", flush=True)
        results.append(cross_validate(histories, recipe))
    chosen = max(results[: len(candidates)], key=lambda r: (r["worst"], r["mean"]))
    recipe = PredictorRecipe(**chosen["recipe"])
    everything = HistoryWindows.from_histories(histories, recipe)
    predictor = fit_predictor(everything, recipe)
    training = {
        **evaluate_predictor(predictor, everything),
        "decisions": summarize_decisions(freeze_decisions(predictor, everything)),
    }
    validation = {family: round(scores["balanced_accuracy"], 4) for family, scores in chosen["families"].items()}
    predictor.save(
        args.output,
        corpus={
            "version": manifest["version"],
            "runs": manifest["runs"],
            "families": manifest["families"],
            "datasets": manifest["datasets"],
            "label_rule": manifest["label_rule"],
        },
        features=list(WEIGHT_FEATURES) + (list(CONTEXT_FEATURES) if recipe.context else []),
        recipe=asdict(recipe),
        leave_one_family_out_balanced_accuracy=validation,
        training_balanced_accuracy=round(training["balanced_accuracy"], 4),
    )
    report = {"corpus": manifest, "candidates": results, "chosen": chosen["recipe"], "final_training": training}
    with open(args.report, "w") as f:
        json.dump(report, f, indent=2)
    print(markdown(results))
    if args.card:
        with open(args.card, "w") as f:
            f.write(card(report, args))
    print(f"chosen: {json.dumps(chosen['recipe'])}\nleave-one-family-out: {validation}; wrote {args.output}")


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("record", help="train with a HistoryRecorder; training flags follow '--'")
    rec.add_argument("--reference", required=True, help="output_dir of the reference run (same model and data)")
    rec.add_argument("--history", required=True, help="where to write the .npz history")
    # The defaults are the policies': histories are recorded as the smartfrz policy reads them, and labelled with
    # the cka policy's rule.
    rec.add_argument("--records_per_epoch", type=int, default=SmartFRZConfig.records_per_epoch)
    rec.add_argument("--probe_size", type=int, default=CKAConfig.probe_size)
    fitp = commands.add_parser("fit", help="select a recipe by leave-one-family-out validation and fit it")
    fitp.add_argument("corpus", help="a corpus folder written by recipes/build_smartfrz_corpus.py pack")
    fitp.add_argument("--output", required=True, help="predictor .safetensors")
    fitp.add_argument("--report", required=True, help="validation report .json")
    fitp.add_argument("--window", type=int, default=SmartFRZConfig.window)
    fitp.add_argument("--min_records", type=int, default=SmartFRZConfig.min_records)
    fitp.add_argument("--label_tolerance", type=float, default=LABEL_TOLERANCE, help="the label rule's tolerance")
    fitp.add_argument("--seed", type=int, default=0)
    fitp.add_argument("--card", help="also write the predictor's card as markdown here (e.g. docs/...)")
    fitp.add_argument("--only_default", action="store_true", help="validate and fit the default recipe only")
    cut = argv.index("--") if "--" in argv else len(argv)
    return parser.parse_args(argv[:cut]), argv[cut + 1 :]


if __name__ == "__main__":
    arguments, training_argv = parse(sys.argv[1:])
    if arguments.command == "record":
        record(arguments, training_argv)
    else:
        fit(arguments)
