"""Cost accounting: FLOPs and memory per freeze state, and the run's report."""

from .measure import StepCost, measure_step_cost, optimizer_state_bytes
from .report import CostReport, FreezeStateRecord

__all__ = ["CostReport", "FreezeStateRecord", "StepCost", "measure_step_cost", "optimizer_state_bytes"]
