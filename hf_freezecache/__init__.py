"""hf_freezecache: progressive layer freezing for Hugging Face training, with cost accounting.

Public surface: `FreezeCacheArguments` (options), `FreezeCacheCallback` (the Trainer integration),
`get_block_adapter` (the stem -> blocks -> head view of a model), the policy and adapter registries.
"""

from .accounting import CostReport, measure_step_cost
from .config import FreezeCacheArguments
from .freezing import FreezingEngine
from .integrations import FreezeCacheCallback, compute_accuracy
from .models import BlockAdapter, CifarResNet, get_block_adapter, load_cifar_resnet, register_adapter
from .policies import POLICIES, FreezePolicy, register_policy

__version__ = "0.1.0"

__all__ = [
    "POLICIES",
    "BlockAdapter",
    "CifarResNet",
    "CostReport",
    "FreezeCacheArguments",
    "FreezeCacheCallback",
    "FreezePolicy",
    "FreezingEngine",
    "compute_accuracy",
    "get_block_adapter",
    "load_cifar_resnet",
    "measure_step_cost",
    "register_adapter",
    "register_policy",
]
