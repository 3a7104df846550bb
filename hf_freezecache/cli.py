"""The `hf-freezecache` command line: train, build-cache, inspect, export, push, pull, report.

User mistakes (a missing file, a bad option, a cache that does not match) end with one line on stderr and exit
status 2; set `HF_FREEZECACHE_TRACEBACK=1` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from huggingface_hub.errors import HfHubHTTPError

from .accounting import CostReport
from .accounting.plots import save_report_plots
from .cache import (
    CacheManifest,
    CacheMismatchError,
    CorruptCacheError,
    export_cache,
    load_cache,
    push_cache_to_hub,
)
from .cache.config import parse_storage_options
from .cache.manifest import file_sha256
from .cache.store import is_url

#: Errors that come from what the user asked for, not from a bug: shown as one line.
USER_ERRORS = (ValueError, OSError, CacheMismatchError, CorruptCacheError, HfHubHTTPError, json.JSONDecodeError)


def _train(argv: list[str]) -> int:
    from .run import parse_run_arguments, run_training

    metrics = run_training(parse_run_arguments(argv))
    if metrics:
        print(json.dumps(metrics, indent=2))
    return 0


def _build_cache(argv: list[str]) -> int:
    from .run import parse_build_arguments, run_build_cache

    manifest = run_build_cache(parse_build_arguments(argv))
    print(
        f"Cached {manifest.num_samples} samples at block {manifest.position}: {manifest.raw_bytes / 2**20:.1f} MB raw "
        f"-> {manifest.stored_bytes / 2**20:.1f} MB stored ({manifest.compression_ratio:.2f}x)."
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    options = parse_storage_options(args.storage_options, "--storage_options")
    cache = load_cache(
        args.cache, revision=args.revision, verify=False, storage_options=options, download_dir=args.download_dir
    )
    manifest = cache.manifest
    if args.json:
        print(json.dumps(manifest.to_dict(), indent=2))
    else:
        where = f"{args.cache} (copy in {cache.folder})" if is_url(args.cache) else cache.folder
        print(describe_cache(where, manifest))
    if not args.verify:
        return 0
    failed = []
    print("\nChecksums:")
    for name, expected in manifest.shards.items():
        path = os.path.join(cache.folder, name)
        status = "missing" if not os.path.isfile(path) else "ok" if file_sha256(path) == expected else "MISMATCH"
        size = f" ({os.path.getsize(path) / 2**20:.1f} MB)" if status != "missing" else ""
        print(f"  {status:8s} {name}{size}")
        if status != "ok":
            failed.append(name)
    if failed:
        raise CorruptCacheError(
            f"{len(failed)} of {len(manifest.shards)} shards fail their checksum: {', '.join(failed)}."
        )
    return 0


def describe_cache(folder: str, manifest: CacheManifest) -> str:
    """A cache's manifest as a readable table: source, shape, codec, sizes, ratio, sidecars and their statistics."""
    codec = ", ".join(f"{k}={_short(v)}" for k, v in manifest.codec.items() if k != "name")
    revision = f" @ {manifest.source_revision}" if manifest.source_revision else ""
    rows = [
        ("folder", folder),
        ("source model", f"{manifest.source_model or 'not recorded'}{revision}"),
        ("model", f"{manifest.model_class} ({manifest.model_family})"),
        ("block position", f"{manifest.position} (after blocks 0-{manifest.position - 1})"),
        ("activation shape", f"{tuple(manifest.sample_shape)} {manifest.dtype} per sample"),
        ("samples / rows", f"{manifest.num_samples} / {manifest.num_chunks} (chunks of {manifest.chunk_size})"),
        ("codec", f"{manifest.codec['name']} ({codec or 'no parameters'})"),
        ("raw -> stored", f"{manifest.raw_bytes / 2**20:.2f} MB -> {manifest.stored_bytes / 2**20:.2f} MB"),
        ("compression ratio", f"{manifest.compression_ratio:.2f}x"),
        *_codec_rows(manifest),
        ("built", f"in {manifest.build_seconds:.1f} s by {manifest.num_processes} process(es), "
                  f"{manifest.build_prefix_passes:.2f} prefix passes per sample"),
        ("fingerprint", manifest.fingerprint),
    ]  # fmt: skip
    for name, sidecar in manifest.sidecars.items():
        stored = sum(spec["stored_bytes"] for spec in sidecar["arrays"].values())
        options = ", ".join(f"{k}={_short(v)}" for k, v in sidecar["config"].items())
        rows.append(
            (
                f"sidecar {name}",
                f"{options}; {stored / 2**20:.2f} MB ({stored / max(manifest.stored_bytes, 1):.1%} of activations)",
            )
        )
        for key, value in sidecar["summary"].items():
            rows.append((f"  {key}", _short(value)))
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def _codec_rows(manifest: CacheManifest) -> list[tuple[str, str]]:
    """What was asked of the codec, when it was resolved (a budget, a relative tolerance), and its measured error."""
    rows = []
    if manifest.codec_request and manifest.codec_request != manifest.codec:
        request = ", ".join(f"{k}={_short(v)}" for k, v in manifest.codec_request.items() if k != "name")
        rows.append(("codec requested", f"{manifest.codec_request['name']} ({request or 'no parameters'})"))
    if manifest.codec_error:
        e = manifest.codec_error
        rows.append(
            (
                "codec error",
                f"max {e['max_over_std']:.3g} x std, RMS {e['rms_over_std']:.3g} x std (std {e['std']:.3g}, first "
                f"{int(e['samples'])} samples)",
            )
        )
    return rows


def _short(value, limit: int = 12) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and len(value) > limit:
        shown = ", ".join(_short(v) for v in value[:limit])
        return f"[{shown}, ... ({len(value)} values)]"
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)


def _export(args: argparse.Namespace) -> int:
    options = parse_storage_options(args.storage_options, "--storage_options")
    folder = export_cache(args.cache, args.output_dir, split=args.split, storage_options=options)
    print(f"Exported {args.cache} to {folder} in the Hub dataset layout (datasets.load_dataset({folder!r}) loads it).")
    return 0


def _push(args: argparse.Namespace) -> int:
    info = push_cache_to_hub(
        args.cache, args.repo_id, private=args.private, token=args.token, revision=args.revision,
        commit_message=args.commit_message, create_pr=args.create_pr,
    )  # fmt: skip
    print(
        f"Pushed {args.cache} to https://huggingface.co/datasets/{args.repo_id} ({getattr(info, 'commit_url', info)})."
    )
    return 0


def _pull(args: argparse.Namespace) -> int:
    options = parse_storage_options(args.storage_options, "--storage_options")
    cache = load_cache(
        args.repo_id, revision=args.revision, token=args.token, download_dir=args.download_dir, storage_options=options
    )
    print(describe_cache(cache.folder, cache.manifest))
    print(f"\nTrain the suffix from it: hf-freezecache train --train_from_cache {args.repo_id} --model ...")
    return 0


def _report(args: argparse.Namespace) -> int:
    path = os.path.join(args.run, "cost_report.json") if os.path.isdir(args.run) else args.run
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No cost report at {path}: give a run's output_dir or its cost_report.json.")
    with open(path) as f:
        report = CostReport.from_dict(json.load(f))
    print(report.to_markdown())
    output = args.output_dir or os.path.dirname(os.path.abspath(path))
    for written in save_report_plots(report, output):
        print(f"Wrote {written}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-freezecache",
        description="Progressive layer freezing with the frozen prefix discarded and its activations cached.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, text in (
        ("train", "Train with a freezing policy (the recipe): flags or a YAML/JSON config; 'train --help' lists all."),
        ("build-cache", "Materialize an activation cache for a model, position and dataset, without training; "
                        "'build-cache --help' lists all options."),
    ):  # fmt: skip
        commands.add_parser(name, help=text, description=text, add_help=False)

    inspect = commands.add_parser("inspect", help="Print a cache's manifest, sizes, ratios and sidecar statistics, "
                                                  "and verify its checksums.")  # fmt: skip
    inspect.add_argument("cache", help="Cache folder (builder or Hub layout), Hub dataset id, or URL (s3://...).")
    inspect.add_argument("--no-verify", dest="verify", action="store_false", help="Skip the checksums.")
    inspect.add_argument("--json", action="store_true", help="Print the manifest as JSON instead of a table.")
    inspect.add_argument("--revision", help="Hub revision, for a dataset id.")
    inspect.add_argument("--download_dir", help="Where a Hub or URL cache is downloaded (default: the Hub's cache, "
                                                "or $HF_HOME/hf_freezecache/downloads for a URL).")  # fmt: skip

    export = commands.add_parser("export", help="Write a cache in the Hub dataset layout (parquet shards + card) "
                                                "to a local folder, without uploading.")  # fmt: skip
    export.add_argument("cache", help="Cache folder or URL.")
    export.add_argument("output_dir", help="New (or empty) folder or URL to write.")
    export.add_argument("--split", default="train", help="Split name of the shards (default: train).")

    push = commands.add_parser("push", help="Upload a cache to the Hub as a dataset repository (parquet + card).")
    push.add_argument("cache", help="Cache folder.")
    push.add_argument("repo_id", help="Dataset repository, 'user/name'; created if missing.")
    push.add_argument("--private", action="store_true", default=None, help="Create the repository private.")
    push.add_argument("--token", help="Hub token (default: the logged-in one, or HF_TOKEN).")
    push.add_argument("--revision", help="Branch to push to.")
    push.add_argument("--commit_message", help="Commit message.")
    push.add_argument("--create_pr", action="store_true", help="Open a pull request instead of committing.")

    pull = commands.add_parser("pull", help="Download a cache from the Hub, validate it and describe it.")
    pull.add_argument("repo_id", help="Dataset repository, 'user/name', or the URL of a cache (s3://...).")
    pull.add_argument("--revision", help="Branch, tag or commit.")
    pull.add_argument("--token", help="Hub token, for a private repository.")
    pull.add_argument("--download_dir", help="Hub cache folder to download into (default: the Hub's cache).")

    for command in (inspect, export, pull):
        command.add_argument("--storage_options", help="For a URL: the store's fsspec options, a JSON object.")

    report = commands.add_parser("report", help="Render a run's cost report as the paper-style table and plots.")
    report.add_argument("run", help="A run's output_dir, or its cost_report.json.")
    report.add_argument("--output_dir", help="Where to write the PNGs (default: beside the report).")
    return parser


_PASS_THROUGH = ("train", "build-cache")

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": lambda args: _train(args.arguments),
    "build-cache": lambda args: _build_cache(args.arguments),
    "inspect": _inspect,
    "export": _export,
    "push": _push,
    "pull": _pull,
    "report": _report,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hf-freezecache` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in _PASS_THROUGH:
        # Their options (and --help) belong to HfArgumentParser, not to this parser.
        args = argparse.Namespace(command=argv[0], arguments=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    return run_reporting_user_errors(f"hf-freezecache {args.command}", lambda: COMMANDS[args.command](args))


def run_reporting_user_errors(prog: str, function: Callable[[], Any]) -> int:
    """Calls `function()`; a user mistake (one of `USER_ERRORS`) ends as one line `<prog>: error: <message>` on
    stderr instead of a traceback, unless `HF_FREEZECACHE_TRACEBACK=1` is set. The recipes' entry point too.

    Returns:
        `int`: The exit status: what `function` returned when it is an `int`, else 0; 2 after a user mistake.
    """
    try:
        status = function()
    except USER_ERRORS as error:
        if os.environ.get("HF_FREEZECACHE_TRACEBACK"):
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
