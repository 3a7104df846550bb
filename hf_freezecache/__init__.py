"""hf_freezecache: progressive layer freezing for Hugging Face training, with cost accounting.

Public surface: `FreezeCacheArguments` (options), `FreezeCacheTrainer` (Trainer with freezing and discarding),
`FreezeCacheCallback` (freezing with a plain Trainer), `get_block_adapter` (the stem -> blocks -> head view of a
model), the activation cache (`ActivationCache`, `build_activation_cache`; shared on the Hub with `export_cache`,
`push_cache_to_hub` and `load_cache`), and the registries of policies, codecs, augmentations and adapters.
"""

from .accounting import CostReport, measure_step_cost
from .augmentation import AUGMENTATIONS, FeatureAugmentation, register_augmentation
from .cache import (
    CODECS,
    ActivationCache,
    ActivationCodec,
    build_activation_cache,
    export_cache,
    load_cache,
    push_cache_to_hub,
    register_codec,
)
from .config import FreezeCacheArguments
from .freezing import FreezingEngine
from .integrations import FreezeCacheCallback, FreezeCacheTrainer, compute_accuracy
from .models import BlockAdapter, CifarResNet, get_block_adapter, load_cifar_resnet, register_adapter
from .policies import POLICIES, FreezePolicy, register_policy

__version__ = "0.1.0"

__all__ = [
    "AUGMENTATIONS",
    "CODECS",
    "POLICIES",
    "ActivationCache",
    "ActivationCodec",
    "BlockAdapter",
    "CifarResNet",
    "CostReport",
    "FreezeCacheArguments",
    "FreezeCacheCallback",
    "FreezeCacheTrainer",
    "FeatureAugmentation",
    "FreezePolicy",
    "FreezingEngine",
    "build_activation_cache",
    "compute_accuracy",
    "export_cache",
    "get_block_adapter",
    "load_cache",
    "load_cifar_resnet",
    "measure_step_cost",
    "push_cache_to_hub",
    "register_adapter",
    "register_augmentation",
    "register_codec",
    "register_policy",
]
