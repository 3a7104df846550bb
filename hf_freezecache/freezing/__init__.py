"""The freezing engine, per-block learning-rate scaling, and discarding a frozen prefix."""

from .discard import ACTIVATIONS_KEY, DiscardedPrefix
from .engine import FreezingEngine, unwrap_optimizer
from .update_scaling import BlockUpdateScaler

__all__ = ["ACTIVATIONS_KEY", "BlockUpdateScaler", "DiscardedPrefix", "FreezingEngine", "unwrap_optimizer"]
