"""`FreezeCacheArguments`: every hf_freezecache option, parseable by `HfArgumentParser` next to `TrainingArguments`."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

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
    freezeout_t0: float = field(
        default=0.5,
        metadata={
            "help": "FreezeOut: fraction of training, in (0, 1], at which block 0 freezes; the other blocks are "
            "spaced from there to the end of training."
        },
    )
    freezeout_scaling: str = field(
        default="linear",
        metadata={
            "help": "FreezeOut: spacing of the freeze times, 'linear' or 'cubic' (t_i = (t_0 + (1-t_0) i/n)^3)."
        },
    )
    freezeout_anneal_lr: bool = field(
        default=True,
        metadata={
            "help": "FreezeOut: cosine-anneal each block's learning rate to zero at its freeze time, on top of the "
            "Trainer's schedule. False keeps the global schedule and only freezes at t_i."
        },
    )
    freezeout_scale_lr: bool = field(
        default=False,
        metadata={"help": "FreezeOut: multiply block i's learning rate by 1/t_i (FreezeOut's scale_lr option)."},
    )
    freeze_schedule: str | None = field(
        default=None,
        metadata={
            "help": "Policy 'fixed': 'EPOCH:POSITION,...', e.g. '30:5,60:10' freezes blocks 0-4 at epoch 30 and "
            "blocks 0-9 at epoch 60. Epochs may be fractional."
        },
    )
    autofreeze_evaluations_per_epoch: int = field(
        default=4, metadata={"help": "AutoFreeze: evaluations of the gradient-norm change rate per epoch (M)."}
    )
    autofreeze_percentile: float = field(
        default=50.0,
        metadata={
            "help": "AutoFreeze: blocks whose change rate is at or below this percentile (N) of the unfrozen blocks' "
            "rates are candidates; they freeze from the front only."
        },
    )
    smartfrz_predictor: str | None = field(
        default=None,
        metadata={"help": "SmartFRZ: predictor file (FreezePredictor.save); default: the one shipped in the package."},
    )
    smartfrz_records_per_epoch: int = field(
        default=4,
        metadata={"help": "SmartFRZ: freezing stages per epoch; each records the tailored weights and decides."},
    )
    smartfrz_window: int = field(default=30, metadata={"help": "SmartFRZ: attention window, in records."})
    smartfrz_min_records: int = field(
        default=8, metadata={"help": "SmartFRZ: records a block needs before the predictor decides for it."}
    )
    smartfrz_threshold: float = field(
        default=0.5, metadata={"help": "SmartFRZ: freeze when the predicted freeze probability exceeds this."}
    )
    smartfrz_seed: int = field(default=0, metadata={"help": "SmartFRZ: seed of the tailored weights' selection."})
    cka_reference: str | None = field(
        default=None,
        metadata={
            "help": "Policy 'cka': output_dir or weights file of the same model trained to the end on the same data."
        },
    )
    cka_evaluations_per_epoch: int = field(
        default=4, metadata={"help": "CKA: evaluations of every unfrozen block's CKA to the reference per epoch."}
    )
    cka_window: int = field(
        default=4,
        metadata={"help": "CKA: a block freezes when its last this-many CKA values lie within --cka_tolerance."},
    )
    cka_tolerance: float = field(
        default=0.02,
        metadata={"help": "CKA: largest range (max - min) of the last --cka_window values of a stable block."},
    )
    egeria_evaluations_per_epoch: int = field(
        default=4, metadata={"help": "Egeria: plasticity evaluations (and reference refreshes) per epoch."}
    )
    egeria_window: int = field(default=5, metadata={"help": "Egeria: plasticity values the slope is fitted over."})
    egeria_slope_threshold: float = field(
        default=0.02,
        metadata={
            "help": "Egeria: the front block freezes when its plasticity's slope per evaluation, relative to its "
            "mean, is above minus this value (plasticity stopped decreasing)."
        },
    )
    policy_probe_size: int = field(
        default=256,
        metadata={"help": "Policies 'cka' and 'egeria': training images in the fixed probe batch they evaluate on."},
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
    discard_positions: str | None = field(
        default=None,
        metadata={
            "help": "With --discard: discard only at these block positions, e.g. '5,10' (the largest one the frozen "
            "prefix has reached). Default: whenever the frozen prefix grows."
        },
    )
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of the activation caches (one subfolder per position); default "
            "<output_dir>/activation_cache."
        },
    )
    cache_codec: str = field(
        default="zfp",
        metadata={
            "help": "Codec of cached activations: 'zfp' (lossy, error <= tolerance), 'int8', 'fp16', 'bf16', "
            "'none' (raw float32)."
        },
    )
    cache_tolerance: float = field(
        default=0.05,
        metadata={
            "help": "zfp error tolerance, the same at every position (the paper's progressive compression). Relative "
            "to the standard deviation of the position's activations unless --cache_tolerance_relative false."
        },
    )
    cache_tolerance_relative: bool = field(
        default=True,
        metadata={"help": "Whether --cache_tolerance is relative to the activations' std (true) or absolute (false)."},
    )
    cache_chunk_size: int = field(
        default=4,
        metadata={"help": "Consecutive samples compressed together (one cache row); chunks are shuffled as units."},
    )
    cache_batch_size: int | None = field(
        default=None,
        metadata={"help": "Batch size of the one-off prefix pass; default per_device_eval_batch_size."},
    )
    cache_decode_threads: int = field(
        default=2,
        metadata={
            "help": "Threads decoding the chunks of a batch (per DataLoader worker), and encoding chunks while a "
            "cache is built."
        },
    )
    cache_max_shard_size: str = field(default="500MB", metadata={"help": "Largest Arrow shard of a cache."})
    feature_augmentation: str = field(
        default="auto",
        metadata={
            "help": "Augmentation of cached activations: 'auto' ('feature-maps' for CNN maps, 'tokens' for "
            "transformer tokens), 'feature-maps', 'tokens' or 'none'."
        },
    )
    feature_flip_probability: float = field(
        default=0.5, metadata={"help": "Feature maps: probability of a horizontal flip per sample (0: off)."}
    )
    feature_crop_padding: float = field(
        default=0.125,
        metadata={"help": "Feature maps: random crop after zero padding of this fraction of the map side (0: off)."},
    )
    feature_noise_std: float = field(
        default=0.0, metadata={"help": "Maps and tokens: std of added Gaussian noise, in activation units (0: off)."}
    )
    feature_blur_sigma: float = field(
        default=0.0, metadata={"help": "Feature maps: sigma of a random Gaussian blur, in map pixels (0: off)."}
    )
    feature_blur_probability: float = field(
        default=0.5, metadata={"help": "Feature maps: probability that a sample is blurred when blur is on."}
    )
    token_drop_rate: float = field(
        default=0.0, metadata={"help": "Tokens: fraction of patch tokens dropped per sample (0: off)."}
    )
    channel_aug_gamma: float = field(
        default=0.0,
        metadata={
            "help": "CNN caches: similarity-aware channel augmentation. Fraction of the channels (those whose "
            "response to a flipped image is least like a flipped map, by SSIM) whose flipped-image activations are "
            "cached and replace the flipped map when a sample is flipped. 0: plain discard."
        },
    )
    channel_aug_calibration_size: int = field(
        default=512, metadata={"help": "Training images the per-channel SSIM is averaged over to select channels."}
    )
    token_aug_alpha: float = field(
        default=0.0,
        metadata={
            "help": "ViT/DeiT caches: token replacement. Fraction of the patch tokens of an augmented view (the "
            "training image augmentation) cached per sample: those least similar to their best match among the "
            "original tokens. 0: plain discard."
        },
    )
    token_aug_matching: str = field(
        default="max",
        metadata={
            "help": "Token replacement: match each original token to the augmented token of 'max' (highest, the "
            "paper's text) or 'min' (lowest, the paper's Algorithm 1) cosine similarity."
        },
    )
    token_aug_probability: float = field(
        default=0.5, metadata={"help": "Token replacement: probability per sample that the stored tokens replace."}
    )

    def __post_init__(self) -> None:
        from .policies import POLICIES

        if self.freeze_policy not in POLICIES:
            raise ValueError(
                f"--freeze_policy {self.freeze_policy!r} is not a known policy; choose one of "
                f"{', '.join(POLICIES.names())}."
            )
        if not 0.0 < self.freezeout_t0 <= 1.0:
            raise ValueError(f"--freezeout_t0 must be in (0, 1], got {self.freezeout_t0}.")
        if self.freezeout_scaling not in ("linear", "cubic"):
            raise ValueError(f"--freezeout_scaling must be 'linear' or 'cubic', got {self.freezeout_scaling!r}.")
        if self.freeze_schedule is not None and self.freeze_policy != "fixed":
            raise ValueError(
                f"--freeze_schedule is only used by --freeze_policy fixed, but the policy is {self.freeze_policy!r}."
            )
        if self.policy_probe_size < 2:
            raise ValueError(f"--policy_probe_size must be at least 2, got {self.policy_probe_size}.")
        if (self.stem_modules or self.head_modules) and not self.block_modules:
            raise ValueError("--stem_modules and --head_modules describe a generic model and need --block_modules.")
        self._check_discard_arguments()
        POLICIES.get(self.freeze_policy).check_arguments(self)

    def _check_discard_arguments(self) -> None:
        from .augmentation import AUGMENTATIONS, build_feature_augmentation
        from .cache import CODECS

        if self.discard_positions is not None and not self.discard:
            # Not an error: a recipe config lists the positions, and its no-discard rows only switch --discard off.
            logger.warning("--discard_positions %s is ignored without --discard true.", self.discard_positions)
        self.parsed_discard_positions()
        if self.cache_codec not in CODECS:
            raise ValueError(
                f"--cache_codec {self.cache_codec!r} is not a known codec; choose one of {', '.join(CODECS.names())}."
            )
        if not self.cache_tolerance > 0:
            raise ValueError(f"--cache_tolerance must be > 0, got {self.cache_tolerance}.")
        if self.cache_chunk_size < 1:
            raise ValueError(f"--cache_chunk_size must be at least 1, got {self.cache_chunk_size}.")
        if self.cache_batch_size is not None and self.cache_batch_size < 1:
            raise ValueError(f"--cache_batch_size must be at least 1, got {self.cache_batch_size}.")
        if self.cache_decode_threads < 1:
            raise ValueError(f"--cache_decode_threads must be at least 1, got {self.cache_decode_threads}.")
        if self.feature_augmentation != "auto" and self.feature_augmentation not in AUGMENTATIONS:
            raise ValueError(
                f"--feature_augmentation {self.feature_augmentation!r} is not known; choose 'auto' or "
                f"one of {', '.join(AUGMENTATIONS.names())}."
            )
        for layout in ("feature-maps", "tokens"):  # the augmentations validate their own ranges
            build_feature_augmentation(layout, **self.augmentation_options(layout))
        self._check_sidecar_arguments()

    def _check_sidecar_arguments(self) -> None:
        for name, value in (("channel_aug_gamma", self.channel_aug_gamma), ("token_aug_alpha", self.token_aug_alpha)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"--{name} must be in [0, 1], got {value}.")
        if self.channel_aug_calibration_size < 1:
            raise ValueError(
                f"--channel_aug_calibration_size must be at least 1, got {self.channel_aug_calibration_size}."
            )
        if self.token_aug_matching not in ("max", "min"):
            raise ValueError(f"--token_aug_matching must be 'max' or 'min', got {self.token_aug_matching!r}.")
        for name, value, layout in (
            ("channel_aug_gamma", self.channel_aug_gamma, "feature-maps"),
            ("token_aug_alpha", self.token_aug_alpha, "tokens"),
        ):
            if value == 0:
                continue
            if not self.discard:
                raise ValueError(f"--{name} augments cached activations: it needs --discard true.")
            if self.feature_augmentation not in ("auto", layout):
                raise ValueError(
                    f"--{name} {value} is used by the {layout!r} feature augmentation, but --feature_augmentation is "
                    f"{self.feature_augmentation!r}: use 'auto' or {layout!r}."
                )
        if self.channel_aug_gamma > 0 and self.feature_flip_probability == 0:
            raise ValueError(
                "--channel_aug_gamma replaces channels of flipped maps: it needs --feature_flip_probability > 0."
            )
        if self.token_aug_alpha > 0 and self.token_aug_probability == 0:
            raise ValueError("--token_aug_alpha stores tokens for replacement: it needs --token_aug_probability > 0.")

    def parsed_discard_positions(self) -> list[int] | None:
        """`--discard_positions` as a sorted list of ints (None: discard whenever the frozen prefix grows)."""
        if self.discard_positions is None:
            return None
        try:
            positions = sorted({int(p) for p in self.discard_positions.split(",") if p.strip()})
        except ValueError:
            positions = []
        if not positions or positions[0] < 1:
            raise ValueError(
                f"--discard_positions must be a comma-separated list of block positions >= 1, e.g. '5,10'; "
                f"got {self.discard_positions!r}."
            )
        return positions

    def codec_config(self) -> dict:
        """The requested cache codec as a `build_codec` config."""
        if self.cache_codec == "zfp":
            return {"name": "zfp", "tolerance": self.cache_tolerance, "relative": self.cache_tolerance_relative}
        return {"name": self.cache_codec}

    def augmentation_options(self, layout: str) -> dict:
        """Keyword options of the built-in augmentation for `layout` ('feature-maps' or 'tokens')."""
        if layout == "tokens":
            return {
                "noise_std": self.feature_noise_std,
                "drop_rate": self.token_drop_rate,
                "replace_probability": self.token_aug_probability,
            }
        return {
            "flip_probability": self.feature_flip_probability,
            "crop_padding": self.feature_crop_padding,
            "noise_std": self.feature_noise_std,
            "blur_sigma": self.feature_blur_sigma,
            "blur_probability": self.feature_blur_probability,
        }

    def adapter_modules(self) -> dict[str, list[str] | None]:
        """The generic-adapter module names as lists: the keyword arguments of `get_block_adapter`."""
        names = {
            "block_modules": self.block_modules,
            "stem_modules": self.stem_modules,
            "head_modules": self.head_modules,
        }
        return {
            key: [n.strip() for n in value.split(",") if n.strip()] if value else None for key, value in names.items()
        }

    def to_dict(self) -> dict:
        return asdict(self)
