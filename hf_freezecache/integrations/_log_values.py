"""The numbers `FreezeCacheCallback` adds to every Trainer log (and so to TensorBoard, W&B, ...)."""

from __future__ import annotations

from transformers import TrainerState

from ..accounting import CostReport
from ..discard import PrefixDiscarder
from ..freezing import FreezingEngine
from ..policies import FreezePolicy


def freeze_log_values(
    engine: FreezingEngine,
    policy: FreezePolicy,
    report: CostReport,
    discarder: PrefixDiscarder | None,
    state: TrainerState,
    decode_seconds: float | None,
) -> dict[str, float | int]:
    """Frozen and discarded blocks, FLOPs so far and saved, freeze events since the previous log, the cache being
    read, and the policy's evidence (see `FreezeCacheCallback`)."""
    values: dict[str, float | int] = {
        "frozen_blocks": len(engine.frozen),
        "frozen_prefix": engine.frozen_prefix,
        "trainable_parameters": engine.trainable_parameters(),
        "discarded_prefix": engine.model.discarded_position,
    }
    if report.total_training_flops is not None:
        values["training_flops"] = report.total_training_flops
    saved = report.training_flops_saved_fraction
    if saved is not None:
        values["training_flops_saved_fraction"] = float(saved)
    # The Trainer appends the entry being logged before calling on_log: the one before it is the previous log.
    previous_step = state.log_history[-2]["step"] if len(state.log_history) > 1 else -1
    events = report.freeze_events
    values["newly_frozen_blocks"] = sum(previous_step < e["step"] <= state.global_step for e in events)
    if events:
        values["last_frozen_block"] = int(events[-1]["block"])
    if discarder is not None and discarder.cache is not None and discarder.position:
        manifest = discarder.cache.manifest
        values["cache_compression_ratio"] = float(manifest.compression_ratio)
        values["cache_stored_mb"] = manifest.stored_bytes / 2**20
        values["cache_build_seconds"] = float(report.cache_build_seconds)
        if decode_seconds is not None:
            values["cache_decode_seconds"] = float(decode_seconds)
    values.update(policy.log_values())
    return values
