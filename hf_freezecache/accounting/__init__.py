"""Cost accounting: FLOPs and memory per freeze state, the run's report, and its plots."""

from .measure import StepCost, measure_step_cost, optimizer_state_bytes
from .plots import plot_compression, plot_freeze_timeline, plot_state_costs, save_report_plots
from .report import CostReport, FreezeStateRecord
from .tracker import CostTracker

__all__ = [
    "CostReport",
    "CostTracker",
    "FreezeStateRecord",
    "StepCost",
    "measure_step_cost",
    "optimizer_state_bytes",
    "plot_compression",
    "plot_freeze_timeline",
    "plot_state_costs",
    "save_report_plots",
]
