"""PNG figures of a cost report: the freeze timeline, what each freeze state costs, and the activation caches.

Figures are drawn on `matplotlib.figure.Figure` objects and saved with the Agg renderer, never through `pyplot`, so
plotting neither needs a display nor changes the backend of the caller (a notebook, say).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .report import CostReport, FreezeStateRecord, _blocks

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_MB = 2**20
_TRAINABLE, _FROZEN, _DISCARD_HATCH = "#dcdcdc", "#4c72b0", "white"
_STATUS_STYLE = {
    "trainable": {"facecolor": _TRAINABLE},
    "frozen": {"facecolor": _FROZEN},
    "discarded": {"facecolor": _FROZEN, "hatch": "////", "edgecolor": _DISCARD_HATCH, "linewidth": 0},
}
_STATUS_LABEL = {
    "trainable": "trainable",
    "frozen": "frozen (runs forward only)",
    "discarded": "discarded (read from the cache)",
}
#: The memory a `StepCost` measures, bottom to top of a stacked bar.
_MEMORY_PARTS = {
    "model_bytes": "parameters and buffers",
    "gradient_bytes": "gradients",
    "optimizer_bytes": "optimizer state",
    "activation_bytes": "activations saved for backward",
}


def plot_freeze_timeline(
    report: CostReport | Mapping[str, CostReport], path: str | os.PathLike, title: str | None = None
) -> str:
    """Draws which blocks were trainable, frozen and discarded over training, with the freeze events marked.

    Blocks are on the y axis and epochs on the x axis; each block's bar is grey while it trains, shaded from the
    freeze state it froze in, and hatched once it is discarded (training reads its output from the cache). A black
    tick marks each freeze event of `report.freeze_events`.

    Args:
        report (`CostReport` or `Mapping[str, CostReport]`): One run, or several runs by name (one panel each,
            sharing the epoch axis, e.g. to compare policies).
        path (`str` or `os.PathLike`): Where to write the PNG.
        title (`str`, *optional*): Title of the figure (default: "Freeze timeline").

    Returns:
        `str`: `path`.
    """
    runs = {"": report} if isinstance(report, CostReport) else dict(report)
    if not runs:
        raise ValueError("plot_freeze_timeline needs at least one report.")
    end = max((run.states[-1].end_epoch for run in runs.values() if run.states), default=0.0) or 1.0
    heights = [max(1.3, 0.16 * run.num_blocks) for run in runs.values()]
    fig = _figure(7.5, 1.2 + sum(heights))
    axes = fig.subplots(len(runs), 1, sharex=True, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, (name, run) in zip(axes, runs.items(), strict=True):
        _draw_timeline(ax, run)
        ax.set_title(name or f"{run.model}, policy {run.policy}", fontsize=9, loc="left")
    axes[-1].set_xlim(0, end)
    axes[-1].set_xlabel("training progress (epochs)")
    handles = [_patch(_STATUS_STYLE[status], label) for status, label in _STATUS_LABEL.items()]
    handles.append(_line_handle("black", "|", "freeze event"))
    fig.legend(handles=handles, loc="outside lower center", ncols=4, fontsize=8, frameon=False)
    fig.suptitle(title or "Freeze timeline", fontsize=11)
    return _save(fig, path)


def plot_state_costs(report: CostReport, path: str | os.PathLike) -> str | None:
    """Draws what a training step costs in each freeze state, against the first state (nothing frozen).

    Two panels of one bar per measured state: training FLOPs per sample (forward and backward stacked), and the
    memory training holds (parameters and buffers, gradients, optimizer state, activations saved for backward; the
    measured peak CUDA memory as a marker when training ran on GPU). A dashed line marks the first state, and each
    other bar is labelled with its change against it.

    Args:
        report (`CostReport`): The run.
        path (`str` or `os.PathLike`): Where to write the PNG.

    Returns:
        `str` or `None`: `path`, or None (nothing written) when no state was measured (`--cost_report false`).
    """
    states = [s for s in report.states if s.cost is not None]
    if not states:
        return None
    first = states[0]
    baseline_label = "nothing frozen (baseline)" if not first.frozen_blocks else "first state (baseline)"
    fig = _figure(max(9.0, 3.0 + 2.2 * len(states)), 4.8)
    flops_ax, memory_ax = fig.subplots(1, 2)
    x = list(range(len(states)))
    labels = [_state_label(s) for s in states]

    forward = [s.cost["forward_flops_per_sample"] / 1e9 for s in states]
    backward = [(s.cost["flops_per_sample"] - s.cost["forward_flops_per_sample"]) / 1e9 for s in states]
    flops_ax.bar(x, forward, color="#4c72b0", label="forward")
    flops_ax.bar(x, backward, bottom=forward, color="#dd8452", label="backward")
    totals = [f + b for f, b in zip(forward, backward, strict=True)]
    _mark_baseline(flops_ax, totals, first.cost["flops_per_sample"] / 1e9, baseline_label)
    flops_ax.set_title("Training FLOPs per sample", fontsize=10)
    flops_ax.set_ylabel("GFLOPs per sample (forward + backward)")

    bottom = [0.0] * len(states)
    colors = ["#8c8c8c", "#55a868", "#c44e52", "#8172b3"]
    for (key, label), color in zip(_MEMORY_PARTS.items(), colors, strict=True):
        values = [s.cost[key] / _MB for s in states]
        memory_ax.bar(x, values, bottom=bottom, color=color, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    peaks = [(i, s.peak_cuda_bytes / _MB) for i, s in zip(x, states, strict=True) if s.peak_cuda_bytes is not None]
    if peaks:
        memory_ax.scatter(*zip(*peaks, strict=True), marker="D", color="black", zorder=3, label="peak CUDA memory")
    _mark_baseline(memory_ax, bottom, first.cost["memory_bytes"] / _MB, baseline_label)
    memory_ax.set_title(f"Training memory (batch size {states[0].cost['batch_size']})", fontsize=10)
    memory_ax.set_ylabel("MB")

    for ax in (flops_ax, memory_ax):
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_xlabel("freeze state")
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(axis="y", alpha=0.3)
    title = f"What each freeze state costs: {report.model}, policy {report.policy}"
    saved = report.training_flops_saved_fraction
    if saved is not None:
        title += f"\nwhole run: training FLOPs {-saved:+.1%} against nothing frozen (cache builds included)"
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_compression(report: CostReport, path: str | os.PathLike) -> str | None:
    """Draws the activation caches the run trained from: compression ratio and size on disk per cache position.

    Args:
        report (`CostReport`): The run.
        path (`str` or `os.PathLike`): Where to write the PNG.

    Returns:
        `str` or `None`: `path`, or None (nothing written) when the run trained from no cache.
    """
    caches = _caches(report)
    if not caches:
        return None
    x = list(range(len(caches)))
    labels = [
        f"position {c['position']}\n{c['codec'].split('(')[0]}" + ("\n(reused)" if c.get("reused") else "")
        for c in caches
    ]
    fig = _figure(max(8.0, 3.0 + 2.0 * len(caches)), 4.2)
    ratio_ax, size_ax = fig.subplots(1, 2)

    ratios = [c["compression_ratio"] for c in caches]
    bars = ratio_ax.bar(x, ratios, color="#4c72b0")
    ratio_ax.bar_label(bars, labels=[f"{r:.2f}x" for r in ratios], fontsize=8)
    ratio_ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="1x: stored as is")
    ratio_ax.set_ylim(0, max(ratios) * 1.2)
    ratio_ax.set_title("Compression ratio", fontsize=10)
    ratio_ax.set_ylabel("raw bytes / stored bytes")

    width = 0.38
    raw = [c["raw_bytes"] / _MB for c in caches]
    stored = [c["stored_bytes"] / _MB for c in caches]
    size_ax.bar([i - width / 2 for i in x], raw, width, color="#8c8c8c", label="raw (before encoding)")
    bars = size_ax.bar([i + width / 2 for i in x], stored, width, color="#4c72b0", label="stored activations")
    sidecars = [c.get("sidecar_bytes", 0) / _MB for c in caches]
    if any(sidecars):
        bars = size_ax.bar(
            [i + width / 2 for i in x], sidecars, width, bottom=stored, color="#dd8452", label="sidecars"
        )
    sizes = [f"{s:.1f}" + (f" + {side:.1f}" if side else "") for s, side in zip(stored, sidecars, strict=True)]
    size_ax.bar_label(bars, labels=sizes, fontsize=8)
    size_ax.set_title("Size on disk", fontsize=10)
    size_ax.set_ylabel("MB")

    for ax in (ratio_ax, size_ax):
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_xlabel("cache position (activations entering that block)")
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Activation caches: {report.model}", fontsize=11)
    return _save(fig, path)


def save_report_plots(report: CostReport, folder: str | os.PathLike) -> list[str]:
    """Writes the plots that apply to the run into `folder`: `freeze_timeline.png`, `state_costs.png` (when states
    were measured) and `compression.png` (when training read a cache).

    Args:
        report (`CostReport`): The run.
        folder (`str` or `os.PathLike`): Where to write them (created if missing).

    Returns:
        `list[str]`: The paths written.
    """
    os.makedirs(folder, exist_ok=True)
    plots = {
        "freeze_timeline.png": plot_freeze_timeline,
        "state_costs.png": plot_state_costs,
        "compression.png": plot_compression,
    }
    written = [plot(report, os.path.join(folder, name)) for name, plot in plots.items()]
    return [path for path in written if path is not None]


# -- internals -------------------------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Figure, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _patch(style: dict[str, Any], label: str):
    from matplotlib.patches import Patch

    return Patch(label=label, **style)


def _line_handle(color: str, marker: str, label: str):
    from matplotlib.lines import Line2D

    return Line2D([], [], color=color, marker=marker, linestyle="none", markersize=10, markeredgewidth=2, label=label)


def _status(state: FreezeStateRecord, block: int) -> str:
    if block < state.discarded_prefix:
        return "discarded"
    return "frozen" if block in state.frozen_blocks else "trainable"


def _draw_timeline(ax: Axes, report: CostReport) -> None:
    n = report.num_blocks
    for block in range(n):
        spans: list[list[Any]] = []  # [start, end, status], neighbouring states of one status merged
        for state in report.states:
            status = _status(state, block)
            if spans and spans[-1][2] == status:
                spans[-1][1] = state.end_epoch
            else:
                spans.append([state.start_epoch, state.end_epoch, status])
        for status, style in _STATUS_STYLE.items():
            ranges = [(start, end - start) for start, end, s in spans if s == status]
            if ranges:
                ax.broken_barh(ranges, (block - 0.4, 0.8), **style)
    events = report.freeze_events
    if events:
        ax.vlines(
            [e["epoch"] for e in events],
            [e["block"] - 0.45 for e in events],
            [e["block"] + 0.45 for e in events],
            color="black",
            linewidth=2,
        )
    ax.set_ylim(-0.6, n - 0.4)
    ax.set_yticks(range(0, n, max(1, math.ceil(n / 8))))
    ax.set_ylabel("block")
    ax.grid(axis="x", alpha=0.3)


def _state_label(state: FreezeStateRecord) -> str:
    lines = [f"frozen: {_blocks(state.frozen_blocks)}"]
    if state.discarded_prefix:
        lines.append(f"discarded: {_blocks(list(range(state.discarded_prefix)))}")
    lines.append(f"epochs {state.start_epoch:.3g}-{state.end_epoch:.3g}")
    return "\n".join(lines)


def _mark_baseline(ax: Axes, totals: list[float], baseline: float, label: str) -> None:
    """A dashed line at the first bar (the baseline), and each other bar labelled with its change against it."""
    ax.axhline(baseline, color="black", linestyle="--", linewidth=1, label=label)
    for i, total in enumerate(totals[1:], start=1):
        change = f"{total / baseline - 1:+.0%}" if baseline else ""
        ax.annotate(change, (i, total), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    # Room above the bars for the labels and the legend.
    ax.set_ylim(0, max(*totals, baseline) * 1.45)


def _caches(report: CostReport) -> list[dict[str, Any]]:
    """The caches the run trained from, by position (a resumed run may record one position again: the last wins)."""
    by_position = {s.cache["position"]: s.cache for s in report.states if s.cache}
    return [by_position[p] for p in sorted(by_position)]
