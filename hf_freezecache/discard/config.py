"""`DiscardConfig`: where the frozen prefix is discarded, and the caches and augmentation training then reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..augmentation import AUGMENTATIONS
from ..cache import SIDECARS
from ..cache.config import CacheConfig, parse_storage_options
from ..cache.sidecars.base import SidecarConfig


@dataclass
class DiscardConfig:
    """The options of discarding: positions, cache folder, the cache's `CacheConfig`, every registered sidecar's
    config (those enabled are stored with the cache) and every registered augmentation's config (the one for the
    cache's layout augments its batches).

    `FreezeCacheArguments.discard_config()` builds it from the flat flags; a sidecar or augmentation left out keeps
    its config's defaults.
    """

    positions: str | None = field(
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
            "<output_dir>/activation_cache. A URL (s3://bucket/path, gs://, hf://, file://) puts them on that store "
            "(see --cache_storage_options), reachable from machines that share no file system."
        },
    )
    cache_storage_options: str | None = field(
        default=None,
        metadata={
            "help": "With a URL in --cache_dir: the store's fsspec options as a JSON object (credentials, endpoint, "
            'profile...), as datasets and huggingface_hub take them, e.g. \'{"profile": "training"}\'.'
        },
    )
    cache_local_dir: str | None = field(
        default=None,
        metadata={
            "help": "With a URL in --cache_dir: the local folder where each process stages its share of a build "
            "before uploading it, and where caches are downloaded to be read; default $HF_HOME/hf_freezecache."
        },
    )
    augmentation: str = field(
        default="auto",
        metadata={
            "help": "Augmentation of cached activations: 'auto' ('feature-maps' for CNN maps, 'tokens' for "
            "transformer tokens), 'feature-maps', 'tokens' or 'none'."
        },
    )
    cache: CacheConfig = field(default_factory=CacheConfig)
    sidecars: dict[str, Any] = field(default_factory=dict)
    augmentations: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.parsed_positions()
        self.storage_options()
        if self.augmentation != "auto" and self.augmentation not in AUGMENTATIONS:
            raise ValueError(
                f"--feature_augmentation {self.augmentation!r} is not known; choose 'auto' or "
                f"one of {', '.join(AUGMENTATIONS.names())}."
            )
        # Every registered component has its config; the ones not given keep their defaults (off for sidecars).
        self.sidecars = {name: self.sidecars.get(name) or cls() for name, cls in SIDECARS.config_classes().items()}
        self.augmentations = {
            name: self.augmentations.get(name) or cls() for name, cls in AUGMENTATIONS.config_classes().items()
        }
        for sidecar in self.enabled_sidecars():
            if self.augmentation not in ("auto", sidecar.layout):
                raise ValueError(
                    f"--{sidecar.flag} is used by the {sidecar.layout!r} feature augmentation, but "
                    f"--feature_augmentation is {self.augmentation!r}: use 'auto' or {sidecar.layout!r}."
                )
        if self.sidecars["channel-flip"].enabled and self.augmentations["feature-maps"].flip_probability == 0:
            raise ValueError(
                "--channel_aug_gamma replaces channels of flipped maps: it needs --feature_flip_probability > 0."
            )
        if self.sidecars["token-replacement"].enabled and self.augmentations["tokens"].replace_probability == 0:
            raise ValueError("--token_aug_alpha stores tokens for replacement: it needs --token_aug_probability > 0.")

    def parsed_positions(self) -> list[int] | None:
        """`positions` as a sorted list of ints (None: discard whenever the frozen prefix grows)."""
        if self.positions is None:
            return None
        try:
            positions = sorted({int(p) for p in self.positions.split(",") if p.strip()})
        except ValueError:
            positions = []
        if not positions or positions[0] < 1:
            raise ValueError(
                f"--discard_positions must be a comma-separated list of block positions >= 1, e.g. '5,10'; "
                f"got {self.positions!r}."
            )
        return positions

    def storage_options(self) -> dict[str, Any]:
        """`cache_storage_options` parsed: the options of the store of a URL `cache_dir` (empty when not given).

        Raises:
            ValueError: `cache_storage_options` is not a JSON object.
        """
        return parse_storage_options(self.cache_storage_options)

    def enabled_sidecars(self) -> list[SidecarConfig]:
        """The configs of the sidecars these options store with a training cache."""
        return [config for config in self.sidecars.values() if config.enabled]
