"""The fault campaign over activation caches and their Hub exports: seeded faults (byte flips, truncation, deletion,
renames and extra files in every kind of file; every manifest field edited to wrong, huge, negative, mistyped and
hostile values; edits of the fields that say how the rows are used; swaps between caches of other models, positions
and codecs) and `kill -9`s during builds, each on a fresh copy of a valid cache.

    python recipes/fault_campaign.py --faults 300 --kills 15 --seed 0 --output docs/benchmarks/fault_campaign.md

Each fault must be refused with one of the documented errors and a one-line message (at load, or at the latest
when the rows are read), or be provably harmless (every row, label, index, sidecar array and augmented batch read
back equals the original's); a kill must leave the previous complete cache, the new one, or nothing loadable. The
faults run in a child process (a crash or a hang there is a TRACEBACK, and the child restarts). Writes the tally by
fault kind and outcome, every failure in full, the harmless faults with what proves them harmless, and the first
line of every distinct error message; and every result as JSON beside it. The machinery is in tests/faults/ (the
test suite runs a slice of it, tests/test_fault_campaign.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import datasets

import hf_freezecache

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from faults.bases import TARGETS, build_bases  # noqa: E402
from faults.damage import read_manifest  # noqa: E402
from faults.generator import KINDS, faults  # noqa: E402
from faults.isolation import IsolatedRunner  # noqa: E402
from faults.kills import kill_faults  # noqa: E402
from faults.runner import FAILURES, OUTCOMES, Result, tally  # noqa: E402


def _revision() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    location = Path(hf_freezecache.__file__).parent
    if location != ROOT / "hf_freezecache":
        return f"{location} (not this checkout's)"
    changed = git("status", "--porcelain", "--", "hf_freezecache")
    return git("rev-parse", "--short", "HEAD") + (" with uncommitted changes to hf_freezecache" if changed else "")


def _cell(text: str, limit: int = 400) -> str:
    if len(text) > limit:  # an overlong message is a failure (UNCLEAR) and shown as such, not in full
        text = f"{text[:limit]}... ({len(text)} characters)"
    return text.replace("|", "\\|").replace("\n", " ")


def report(results: list[Result], command: str, seconds: float) -> str:
    """The campaign's tally, failures, harmless faults and error messages, as markdown."""
    table = tally(results)
    lines = [
        "# Fault campaign over activation caches",
        "",
        f"`{command}`: {sum(r.kind != 'kill' for r in results)} faults and {sum(r.kind == 'kill' for r in results)} "
        f"kills in {seconds:.0f} s, hf_freezecache at {_revision()}, Python {platform.python_version()}.",
        "",
        "Outcomes: *refused* with a documented error (`CorruptCacheError`, `CacheMismatchError`, "
        "`FileNotFoundError`, `ValueError`) and a one-line message, at load or when the rows are read; *harmless*: "
        "everything read back (rows, labels, indices, sidecars, an augmented batch) and the manifest fields that say "
        "how the rows are used equal the original's; *SILENT*: accepted with something different; *TRACEBACK*: "
        "another exception, a crash or a hang; *UNCLEAR*: a documented error without a one-line message.",
        "",
        "| kind | faults | " + " | ".join(OUTCOMES) + " |",
        "|---|---:|" + "---:|" * len(OUTCOMES),
    ]
    for kind in [*KINDS, "kill"]:
        if kind in table:
            counts = table[kind]
            lines.append(f"| {kind} | {sum(counts.values())} | " + " | ".join(str(counts[o]) for o in OUTCOMES) + " |")
    totals = Counter(r.outcome for r in results)
    lines.append(f"| **all** | **{len(results)}** | " + " | ".join(f"**{totals[o]}**" for o in OUTCOMES) + " |")

    failures = [r for r in results if r.outcome in FAILURES]
    lines += ["", f"## Failures ({len(failures)})", ""]
    lines += [
        f"- **{r.outcome}** ({r.kind}) {_cell(r.description)}: {_cell(r.detail)}"
        + (f"; `{r.error}: {_cell(r.message)}`" if r.error else "")
        for r in failures
    ] or ["None."]

    lines += ["", "## Harmless faults, and what shows it", ""]
    lines += [
        f"- ({r.kind}) {_cell(r.description)}: {_cell(r.detail) or 'same rows, same manifest'}"
        for r in results
        if r.outcome == "harmless"
    ]

    messages = Counter((r.error, r.message) for r in results if r.outcome.startswith("refused"))
    lines += ["", f"## Error messages ({len(messages)} distinct, first line, paths shortened to `<scratch>`)", ""]
    lines += ["| times | error | message |", "|---:|---|---|"]
    lines += [f"| {count} | {error} | {_cell(message)} |" for (error, message), count in messages.most_common()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faults", type=int, default=300, help="Faults to draw (every kind, in turn).")
    parser.add_argument("--kills", type=int, default=15, help="Builds to kill with SIGKILL at random points.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="docs/benchmarks/fault_campaign.md", help="The report; JSON beside it.")
    parser.add_argument("--timeout", type=float, default=300.0, help="Wall-clock seconds per fault before a hang.")
    args = parser.parse_args()
    command = f"python recipes/fault_campaign.py --faults {args.faults} --kills {args.kills} --seed {args.seed}"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fault-campaign-") as root:
        # Parquet shards are converted into the `datasets` cache when read: keep that in the scratch folder.
        # (The environment reaches the child process that runs the faults.)
        os.environ.update(
            HF_DATASETS_CACHE=os.path.join(root, "datasets-cache"), HF_DATASETS_DISABLE_PROGRESS_BARS="1"
        )
        datasets.config.HF_DATASETS_CACHE = os.environ["HF_DATASETS_CACHE"]
        datasets.disable_progress_bars()
        bases = build_bases(Path(root) / "bases")
        manifests = {name: read_manifest(bases[name].folder) for name in TARGETS}
        jobs = faults(args.seed, args.faults, manifests) + kill_faults(args.seed, args.kills)
        runner = IsolatedRunner(bases, Path(root) / "scratch", timeout=args.timeout)
        results = []
        for index, fault in enumerate(jobs):
            results.append(runner.run(fault, index))
            if results[-1].outcome in FAILURES:
                print(f"{results[-1].outcome}: {fault.description}: {results[-1].detail}", flush=True)
        runner.close()
    seconds = time.perf_counter() - start
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report(results, command, seconds))
    summary = {
        "command": command,
        "revision": _revision(),
        "seconds": seconds,
        "tally": {kind: dict(counts) for kind, counts in tally(results).items()},
        "results": [dataclasses.asdict(r) for r in results],
    }
    output.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    totals = Counter(r.outcome for r in results)
    print(f"{len(results)} faults and kills: " + ", ".join(f"{totals[o]} {o}" for o in OUTCOMES) + f"; {output}")


if __name__ == "__main__":
    main()
