"""Builds the SmartFRZ training-history corpus: trains every run of a plan, then packs the histories as a dataset.

    # train the references and record the runs (resumable: finished runs are kept; about an hour on 2 CPU cores)
    python recipes/build_smartfrz_corpus.py build OUT --jobs 2
    # pack OUT/runs into OUT/corpus: a `datasets` dataset in the Hub parquet layout, with its card
    python recipes/build_smartfrz_corpus.py pack OUT

The plan (`--plan`, default `recipes/configs/smartfrz_corpus.yaml`) lists setups (model family, dataset, regime),
each with a reference run and recorded runs. A recorded run trains like `train_image_classifier.py` with a
`HistoryRecorder` attached, which writes every block's tailored weights and its CKA to the reference at the policy's
rhythm. Each run lives in `OUT/runs/<setup>/<variant>/` (its `args.yaml`, log, and `history.npz` once complete);
runs go `--jobs` at a time, each on one thread pinned to its own core. Extend the corpus by adding setups or
variants to a plan and rerunning `build` and `pack`; `recipes/fit_smartfrz_predictor.py` fits the predictor on it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import yaml

from hf_freezecache.policies.smartfrz.corpus import collect_runs, write_corpus
from hf_freezecache.policies.smartfrz.plan import REFERENCE, CorpusRun, read_plan
from hf_freezecache.policies.smartfrz.recording import LABEL_TOLERANCE

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PLAN = os.path.join(HERE, "configs", "smartfrz_corpus.yaml")


def run_folder(out: str, setup: str, variant: str) -> str:
    return os.path.join(out, "runs", setup, variant)


def is_done(out: str, run: CorpusRun) -> bool:
    folder = run_folder(out, run.setup, run.variant)
    return os.path.exists(os.path.join(folder, "DONE" if run.is_reference else "history.npz"))


def reference_done(out: str, run: CorpusRun) -> bool:
    return os.path.exists(os.path.join(run_folder(out, run.setup, REFERENCE), "DONE"))


def command(out: str, run: CorpusRun) -> list[str]:
    folder = run_folder(out, run.setup, run.variant)
    config = [os.path.join(folder, "args.yaml"), "--output_dir", os.path.join(folder, "output")]
    if run.is_reference:
        return [sys.executable, os.path.join(HERE, "train_image_classifier.py"), *config]
    reference = os.path.join(run_folder(out, run.setup, REFERENCE), "output")
    recorder = ["--reference", reference, "--history", os.path.join(folder, "history.npz")]
    return [sys.executable, os.path.join(HERE, "train_smartfrz_predictor.py"), "record", *recorder, "--", *config]


def train(out: str, run: CorpusRun, core: int | None) -> bool:
    folder = run_folder(out, run.setup, run.variant)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "args.yaml"), "w") as f:
        yaml.safe_dump(run.args, f, sort_keys=False)
    spec = {
        "setup": run.setup,
        "variant": run.variant,
        "family": run.family,
        "dataset": run.dataset,
        "regime": run.regime,
        "args": run.args,
    }
    with open(os.path.join(folder, "run.json"), "w") as f:
        json.dump(spec, f, indent=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pin = (lambda: os.sched_setaffinity(0, {core})) if core is not None and hasattr(os, "sched_setaffinity") else None
    with open(os.path.join(folder, "train.log"), "w") as log:
        result = subprocess.run(command(out, run), stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=pin)
    if result.returncode == 0 and run.is_reference:
        open(os.path.join(folder, "DONE"), "w").close()
    return result.returncode == 0


def build(args: argparse.Namespace) -> int:
    runs = read_plan(args.plan)
    if args.setups:
        unknown = set(args.setups) - {r.setup for r in runs}
        if unknown:
            raise SystemExit(f"--setups {sorted(unknown)} are not in {args.plan}.")
        runs = [r for r in runs if r.setup in args.setups]
    todo = [r for r in runs if not is_done(args.out, r)]
    print(f"{len(runs) - len(todo)} of {len(runs)} runs already done; {len(todo)} to train, {args.jobs} at a time")
    lock, failed, finished, start = threading.Lock(), set(), [0], time.time()

    def next_run() -> CorpusRun | None:
        # A recorded run waits for its setup's reference; a failed reference fails its setup.
        with lock:
            while todo:
                for run in todo:
                    if run.is_reference or reference_done(args.out, run):
                        todo.remove(run)
                        return run
                    if f"{run.setup}/{REFERENCE}" in failed:
                        todo.remove(run)
                        failed.add(run.name)
                        break
                else:
                    lock.release()
                    time.sleep(2)
                    lock.acquire()
            return None

    def worker(core: int | None) -> None:
        while (run := next_run()) is not None:
            began = time.time()
            ok = train(args.out, run, core)
            with lock:
                finished[0] += 1
                if not ok:
                    failed.add(run.name)
                status = "done" if ok else f"FAILED (see {run_folder(args.out, run.setup, run.variant)}/train.log)"
                print(
                    f"[{finished[0]}] {run.name} {status} in {time.time() - began:.0f} s "
                    f"({(time.time() - start) / 60:.1f} min so far, {len(todo)} waiting)",
                    flush=True,
                )

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    threads = [
        threading.Thread(target=worker, args=(cores[i % len(cores)] if cores and not args.no_pin else None,))
        for i in range(args.jobs)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failed:
        print(
            f"{len(failed)} runs failed or were skipped: {sorted(failed)}; rerun build to retry them",
            file=sys.stderr,
        )
        return 1
    return 0


def pack(args: argparse.Namespace) -> int:
    runs = [r for r in read_plan(args.plan) if not r.is_reference]
    histories, missing = collect_runs({r.name: run_folder(args.out, r.setup, r.variant) for r in runs})
    if missing:
        print(f"{len(missing)} planned runs have no history yet and are left out: {missing}", file=sys.stderr)
    command = f"python recipes/build_smartfrz_corpus.py build OUT --plan {os.path.relpath(args.plan)}"
    folder = write_corpus(histories, os.path.join(args.out, "corpus"), args.label_tolerance, command=command)
    print(f"wrote the corpus of {len(histories)} recorded runs to {folder}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("build", "train and record the plan's runs"), ("pack", "write OUT/corpus from OUT/runs")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("out", help="the corpus folder (runs in OUT/runs, the dataset in OUT/corpus)")
        sub.add_argument("--plan", default=DEFAULT_PLAN, help="corpus plan (YAML)")
    commands.choices["pack"].add_argument(
        "--label_tolerance", type=float, default=LABEL_TOLERANCE, help="tolerance of the stored labels' rule"
    )
    build_parser = commands.choices["build"]
    build_parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread and core each")
    build_parser.add_argument("--setups", nargs="*", default=[], help="only these setups (default: all)")
    build_parser.add_argument("--no_pin", action="store_true", help="do not pin runs to cores")
    args = parser.parse_args(argv)
    return build(args) if args.command == "build" else pack(args)


if __name__ == "__main__":
    sys.exit(main())
