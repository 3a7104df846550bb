"""What `FreezeCacheCallback` writes into every Trainer checkpoint (`trainer_state.json`) and finds there on resume."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerState

from ..accounting import CostTracker
from ..model import FreezeCacheModel
from ..policies import FreezePolicy


def resume_state(model: FreezeCacheModel, policy: FreezePolicy, tracker: CostTracker) -> dict[str, Any]:
    """The frozen blocks, the policy's state and latest evidence, the report so far, and the discarded prefix."""
    return {
        "frozen": sorted(model.frozen_blocks),
        "policy": policy.state_dict(),
        "evidence": {str(k): v for k, v in policy.evidence.items()},
        "report": tracker.report.to_dict(),
        "cost_pending": tracker.pending,
        "discarded_prefix": model.discarded_position,
    }


def saved_resume_state(callback: TrainerCallback, state: TrainerState) -> dict[str, Any] | None:
    """The `resume_state` of the checkpoint training resumes from (None when training starts afresh).

    Raises:
        ValueError: training resumes after step 0 from a checkpoint that a run without this callback wrote.
    """
    restored = getattr(callback, "resume_state", None)  # set by Trainer when restore_callback_states is on
    if restored is None and state.global_step > 0:
        name = type(callback).__name__
        entry = (state.stateful_callbacks or {}).get(name)
        entry = entry[0] if isinstance(entry, list) else entry
        restored = (entry or {}).get("attributes", {}).get("resume_state")
        if restored is None:
            raise ValueError(
                f"Resuming at step {state.global_step} but the checkpoint holds no {name} state: it was not written "
                "by a run using this callback, so the frozen blocks cannot be restored."
            )
    return restored
