"""What freezing does to parameters and the optimizer, and per-block learning-rate scaling."""

from .engine import FreezingEngine, unwrap_optimizer
from .update_scaling import BlockUpdateScaler

__all__ = ["BlockUpdateScaler", "FreezingEngine", "unwrap_optimizer"]
