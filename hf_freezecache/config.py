"""`FreezeCacheArguments`: every hf_freezecache option, parseable by `HfArgumentParser` next to `TrainingArguments`."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from ._flat_options import component_config, flat_option
from .augmentation import AUGMENTATIONS, FeatureMapAugmentationConfig, TokenAugmentationConfig
from .cache.config import CacheConfig
from .cache.sidecars import SIDECARS, ChannelFlipConfig, TokenReplacementConfig
from .discard.config import DiscardConfig
from .policies import (
    POLICIES,
    AutoFreezeConfig,
    CKAConfig,
    EgeriaConfig,
    FixedScheduleConfig,
    FreezeOutConfig,
    PolicyConfig,
    SmartFRZConfig,
)

logger = logging.getLogger(__name__)


@dataclass
class FreezeCacheArguments:
    """What to freeze and when. Policy-specific options carry the policy's name as a prefix.

    All values are checked when the object is created, so a bad flag fails before any model or data is loaded.
    """

    freeze_policy: str = field(
        default="none",
        metadata={
            "help": "Freezing policy: 'none' (baseline), 'freezeout' (Brock et al. 2017), 'fixed' (a schedule), "
            "'autofreeze' (Liu et al. 2021), 'smartfrz' (Li et al. 2024, shipped predictor), 'cka' (oracle: needs a "
            "trained reference model), 'egeria' (Wang et al. 2023)."
        },
    )
    # Each policy's flags feed its config (`policy_config()`), which owns their defaults, help and checks.
    freezeout_t0: float = flat_option(FreezeOutConfig, "t0")
    freezeout_scaling: str = flat_option(FreezeOutConfig, "scaling")
    freezeout_anneal_lr: bool = flat_option(FreezeOutConfig, "anneal_lr")
    freezeout_anneal_mode: str = flat_option(FreezeOutConfig, "anneal_mode")
    freezeout_scale_lr: bool = flat_option(FreezeOutConfig, "scale_lr")
    freeze_schedule: str | None = flat_option(FixedScheduleConfig, "schedule")
    autofreeze_evaluations_per_epoch: int = flat_option(AutoFreezeConfig, "evaluations_per_epoch")
    autofreeze_percentile: float = flat_option(AutoFreezeConfig, "percentile")
    smartfrz_predictor: str | None = flat_option(SmartFRZConfig, "predictor")
    smartfrz_records_per_epoch: int = flat_option(SmartFRZConfig, "records_per_epoch")
    smartfrz_window: int = flat_option(SmartFRZConfig, "window")
    smartfrz_min_records: int = flat_option(SmartFRZConfig, "min_records")
    smartfrz_threshold: float = flat_option(SmartFRZConfig, "threshold")
    smartfrz_seed: int = flat_option(SmartFRZConfig, "seed")
    cka_reference: str | None = flat_option(CKAConfig, "reference")
    cka_evaluations_per_epoch: int = flat_option(CKAConfig, "evaluations_per_epoch")
    cka_window: int = flat_option(CKAConfig, "window")
    cka_tolerance: float = flat_option(CKAConfig, "tolerance")
    egeria_evaluations_per_epoch: int = flat_option(EgeriaConfig, "evaluations_per_epoch")
    egeria_window: int = flat_option(EgeriaConfig, "window")
    egeria_slope_threshold: float = flat_option(EgeriaConfig, "slope_threshold")
    policy_probe_size: int = flat_option(
        CKAConfig,
        "probe_size",
        also=[(EgeriaConfig, "probe_size")],
        help="Policies 'cka' and 'egeria': training images in the fixed probe batch they evaluate on.",
    )
    block_modules: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated qualified names of the freezable blocks, in forward order, for a model that no "
            "built-in adapter supports (selects the generic adapter)."
        },
    )
    stem_modules: str | None = field(
        default=None,
        metadata={"help": "With --block_modules: comma-separated modules that run before the first block, in order."},
    )
    head_modules: str | None = field(
        default=None,
        metadata={"help": "With --block_modules: comma-separated modules that run after the last block, in order."},
    )
    head_pooling: str = field(
        default="none",
        metadata={
            "help": "With --block_modules: pooling the model's forward applies to the last block's output before the "
            "head modules: none, avg (mean over H, W of (B, C, H, W) maps, as ConvNext), cls (token 0 of (B, T, D) "
            "tokens) or mean (mean over tokens)."
        },
    )
    cost_report: bool = field(
        default=True,
        metadata={
            "help": "Measure FLOPs and memory of every freeze state and write cost_report.json/.md and its plots "
            "(freeze_timeline.png, state_costs.png, compression.png) at the end."
        },
    )
    discard: bool = field(
        default=False,
        metadata={
            "help": "Discard the frozen prefix: at the first epoch boundary after the frozen prefix grows, run it "
            "once over the training set, cache its compressed outputs, and train the remaining blocks from the cache. "
            "Needs FreezeCacheTrainer."
        },
    )
    # The cache's, sidecars' and augmentations' flags feed their configs (`discard_config()`).
    discard_positions: str | None = flat_option(DiscardConfig, "positions")
    cache_dir: str | None = flat_option(DiscardConfig, "cache_dir")
    cache_storage_options: str | None = flat_option(DiscardConfig, "cache_storage_options")
    cache_local_dir: str | None = flat_option(DiscardConfig, "cache_local_dir")
    cache_codec: str = flat_option(CacheConfig, "codec")
    cache_budget: float | None = flat_option(CacheConfig, "budget")
    cache_bits: int | None = flat_option(CacheConfig, "bits")
    cache_entropy: str | None = flat_option(CacheConfig, "entropy")
    cache_tolerance: float = flat_option(CacheConfig, "tolerance")
    cache_tolerance_relative: bool = flat_option(CacheConfig, "tolerance_relative")
    cache_chunk_size: int = flat_option(CacheConfig, "chunk_size")
    cache_batch_size: int | None = flat_option(CacheConfig, "batch_size")
    cache_decode_threads: int = flat_option(CacheConfig, "decode_threads")
    cache_max_shard_size: str = flat_option(CacheConfig, "max_shard_size")
    cache_memory: str = flat_option(CacheConfig, "memory")
    feature_augmentation: str = flat_option(DiscardConfig, "augmentation")
    feature_flip_probability: float = flat_option(FeatureMapAugmentationConfig, "flip_probability")
    feature_crop_padding: float = flat_option(FeatureMapAugmentationConfig, "crop_padding")
    feature_noise_std: float = flat_option(
        FeatureMapAugmentationConfig, "noise_std", also=[(TokenAugmentationConfig, "noise_std")]
    )
    feature_blur_sigma: float = flat_option(FeatureMapAugmentationConfig, "blur_sigma")
    feature_blur_probability: float = flat_option(FeatureMapAugmentationConfig, "blur_probability")
    token_drop_rate: float = flat_option(TokenAugmentationConfig, "drop_rate")
    channel_aug_gamma: float = flat_option(ChannelFlipConfig, "gamma")
    channel_aug_calibration_size: int = flat_option(ChannelFlipConfig, "calibration_size")
    token_aug_alpha: float = flat_option(TokenReplacementConfig, "alpha")
    token_aug_matching: str = flat_option(TokenReplacementConfig, "matching")
    token_aug_probability: float = flat_option(TokenAugmentationConfig, "replace_probability")

    def __post_init__(self) -> None:
        if self.freeze_policy not in POLICIES:
            raise ValueError(
                f"--freeze_policy {self.freeze_policy!r} is not a known policy; choose one of "
                f"{', '.join(POLICIES.names())}."
            )
        if self.freeze_schedule is not None and self.freeze_policy != "fixed":
            raise ValueError(
                f"--freeze_schedule is only used by --freeze_policy fixed, but the policy is {self.freeze_policy!r}."
            )
        self.policy_config()  # the policy's config checks its options, before any model or data is loaded
        from .models.generic import HEAD_POOLINGS

        if self.head_pooling not in HEAD_POOLINGS:
            raise ValueError(f"--head_pooling must be one of {', '.join(HEAD_POOLINGS)}, got {self.head_pooling!r}.")
        if (self.stem_modules or self.head_modules or self.head_pooling != "none") and not self.block_modules:
            raise ValueError(
                "--stem_modules, --head_modules and --head_pooling describe a generic model and need --block_modules."
            )
        if self.discard_positions is not None and not self.discard:
            # Not an error: a recipe config lists the positions, and its no-discard rows only switch --discard off.
            logger.warning("--discard_positions %s is ignored without --discard true.", self.discard_positions)
        for sidecar in self.discard_config().enabled_sidecars():  # the configs check their own options
            if not self.discard:
                raise ValueError(f"--{sidecar.flag} augments cached activations: it needs --discard true.")

    def policy_config(self) -> PolicyConfig:
        """The options of `--freeze_policy` as its config, e.g. `FreezeOutConfig` from the `--freezeout_*` flags:
        what `build_policy` takes."""
        return component_config(self, POLICIES.config_class(self.freeze_policy))

    def discard_config(self) -> DiscardConfig:
        """The options of discarding as a `DiscardConfig`: positions and folder, the `CacheConfig` (codec, chunks,
        build and read resources), every registered sidecar's config and every registered augmentation's config."""
        return DiscardConfig(
            positions=self.discard_positions,
            cache_dir=self.cache_dir,
            cache_storage_options=self.cache_storage_options,
            cache_local_dir=self.cache_local_dir,
            augmentation=self.feature_augmentation,
            cache=component_config(self, CacheConfig),
            sidecars={name: component_config(self, cls) for name, cls in SIDECARS.config_classes().items()},
            augmentations={name: component_config(self, cls) for name, cls in AUGMENTATIONS.config_classes().items()},
        )

    def adapter_modules(self) -> dict[str, list[str] | str | None]:
        """The generic-adapter options, module names as lists: the keyword arguments of `get_block_adapter`."""
        names = {
            "block_modules": self.block_modules,
            "stem_modules": self.stem_modules,
            "head_modules": self.head_modules,
        }
        lists = {
            key: [n.strip() for n in value.split(",") if n.strip()] if value else None for key, value in names.items()
        }
        return {**lists, "head_pooling": self.head_pooling}

    def to_dict(self) -> dict:
        return asdict(self)
