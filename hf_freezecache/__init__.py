"""hf_freezecache: progressive layer freezing for Hugging Face training, with the frozen prefix discarded and cached.

What users call: `FreezeCacheArguments` (the flags), `FreezeCacheTrainer` (a `Trainer` that freezes and discards),
`FreezeCacheCallback` with `FreezeCacheModel` (freezing with a plain `Trainer`), the models (`build_model`,
`get_block_adapter`, `check_block_split`), the activation cache (`ActivationCache`, `build_activation_cache`,
`export_cache`, `push_cache_to_hub`, `load_cache`), cost accounting (`CostReport`, `measure_step_cost`), and the
extension points: a base class and a `register_*` decorator for block adapters, policies, codecs, sidecars and
feature augmentations, with their registries.
"""

from .accounting import CostReport, measure_step_cost
from .augmentation import AUGMENTATIONS, FeatureAugmentation, register_augmentation
from .cache import (
    CODECS,
    SIDECARS,
    ActivationCache,
    ActivationCodec,
    Sidecar,
    build_activation_cache,
    export_cache,
    load_cache,
    push_cache_to_hub,
    register_codec,
)
from .cache.sidecars import register_sidecar
from .config import FreezeCacheArguments
from .freezing import FreezingEngine
from .integrations import FreezeCacheCallback, FreezeCacheTrainer, compute_accuracy, load_metric
from .model import FreezeCacheModel
from .models import (
    BlockAdapter,
    CifarResNet,
    build_model,
    check_block_split,
    get_block_adapter,
    load_cifar_resnet,
    register_adapter,
)
from .policies import POLICIES, FreezePolicy, PolicyConfig, register_policy

__version__ = "0.1.0"

__all__ = [
    "AUGMENTATIONS",
    "CODECS",
    "POLICIES",
    "SIDECARS",
    "ActivationCache",
    "ActivationCodec",
    "BlockAdapter",
    "CifarResNet",
    "CostReport",
    "FeatureAugmentation",
    "FreezeCacheArguments",
    "FreezeCacheCallback",
    "FreezeCacheModel",
    "FreezeCacheTrainer",
    "FreezePolicy",
    "FreezingEngine",
    "PolicyConfig",
    "Sidecar",
    "build_activation_cache",
    "build_model",
    "check_block_split",
    "compute_accuracy",
    "export_cache",
    "get_block_adapter",
    "load_cache",
    "load_cifar_resnet",
    "load_metric",
    "measure_step_cost",
    "push_cache_to_hub",
    "register_adapter",
    "register_augmentation",
    "register_codec",
    "register_policy",
    "register_sidecar",
]
