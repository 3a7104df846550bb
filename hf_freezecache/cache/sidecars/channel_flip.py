"""`channel-flip`: similarity-aware channel augmentation (paper, section 3.2), the storage side."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from . import register_sidecar
from .base import Prefix, Sidecar, SidecarArray
from .ssim import channel_ssim

if TYPE_CHECKING:
    from ...models import BlockAdapter

#: `(x, H, W)` activations of the flipped image, for the selected channels in `summary()["channels"]` order.
FLIPPED_CHANNELS = "flipped_channels"


@dataclass
class ChannelFlipConfig:
    """Options of the `channel-flip` sidecar (flags `--channel_aug_*`); `gamma = 0` stores none."""

    gamma: float = field(
        default=0.0,
        metadata={
            "help": "CNN caches: similarity-aware channel augmentation. Fraction of the channels (those whose "
            "response to a flipped image is least like a flipped map, by SSIM) whose flipped-image activations are "
            "cached and replace the flipped map when a sample is flipped. 0: plain discard."
        },
    )
    calibration_size: int = field(
        default=512, metadata={"help": "Training images the per-channel SSIM is averaged over to select channels."}
    )

    layout: ClassVar[str] = "feature-maps"
    flag: ClassVar[str] = "channel_aug_gamma"

    def __post_init__(self) -> None:
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"--channel_aug_gamma must be in [0, 1], got {self.gamma}.")
        if self.calibration_size < 1:
            raise ValueError(f"--channel_aug_calibration_size must be at least 1, got {self.calibration_size}.")

    @property
    def enabled(self) -> bool:
        return self.gamma > 0

    @property
    def stored_fraction(self) -> float:
        """About what the sidecar stores, as a fraction of the cached activations (the selected channels)."""
        return self.gamma

    def build(self, adapter: BlockAdapter) -> ChannelFlipSidecar:
        """The sidecar these options ask for."""
        return ChannelFlipSidecar(self.gamma, self.calibration_size)


@register_sidecar("channel-flip", config=ChannelFlipConfig)
class ChannelFlipSidecar(Sidecar):
    """Stores, for the channels least equivariant to a horizontal flip, the activations of the flipped image.

    Calibration runs the prefix F on training images x and on their mirror images, and scores every channel c by
    the SSIM between flip(F(x))[c] and F(flip x)[c], averaged over the images. A channel whose response to a flip is
    the flip of its response scores 1: flipping the cached map is right for it. The `round(gamma * C)` channels with
    the lowest score (at least one when gamma > 0; Python's round) are selected, and every sample stores F(flip x)
    on them. At training time a flipped sample is flip(F(x)) with those channels replaced by the stored ones.

    Each channel's SSIM data range is its max minus min over the calibration activations (both views), not a
    constant: feature maps are not images in [0, 1], and a fixed range would make the constants of SSIM, and so
    the ranking, depend on each channel's scale.

    Args:
        gamma (`float`): Fraction of the channels to store, in (0, 1].
        calibration_size (`int`, *optional*, defaults to 512): Training images the scores are averaged over.
    """

    name = "channel-flip"
    extra_prefix_passes = 1
    calibration_passes = 4

    def __init__(self, gamma: float, calibration_size: int = 512) -> None:
        gamma = float(gamma)
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"channel-flip gamma={gamma!r} must be in (0, 1] (gamma = 0 stores no sidecar).")
        if isinstance(calibration_size, bool) or not isinstance(calibration_size, int) or calibration_size < 1:
            raise ValueError(f"calibration_size={calibration_size!r} must be an integer >= 1.")
        self.gamma = gamma
        self.calibration_size = calibration_size
        self.channels: list[int] | None = None
        self.scores: list[float] | None = None

    def calibrate(self, prefix: Prefix, images: Iterable[torch.Tensor]) -> None:
        images = list(images)
        # Two passes so that memory holds one batch of activations, not the calibration set's: the data range of
        # every channel first, then the SSIM against it.
        low = high = None
        for x in images:
            for maps in (prefix(x).float(), prefix(x.flip(-1)).float()):
                if maps.ndim != 4:
                    raise ValueError(
                        f"channel-flip augmentation needs (C, H, W) feature maps, but the prefix gives "
                        f"{tuple(maps.shape[1:])} per sample: use --token_aug_alpha for transformer caches."
                    )
                flat = maps.transpose(0, 1).flatten(1)
                low = flat.amin(1) if low is None else torch.minimum(low, flat.amin(1))
                high = flat.amax(1) if high is None else torch.maximum(high, flat.amax(1))
        data_range = (high - low).double()
        total = sum(
            channel_ssim(prefix(x).float().flip(-1), prefix(x.flip(-1)).float(), data_range).sum(0) for x in images
        )
        scores = (total / sum(len(x) for x in images)).cpu()
        self.scores = scores.tolist()
        self.channels = self.select(scores, self.gamma)

    @staticmethod
    def select(scores: torch.Tensor, gamma: float) -> list[int]:
        """The `round(gamma * C)` channels (at least one) of lowest SSIM `scores`, ties by index, sorted."""
        count = max(1, round(gamma * len(scores)))
        return sorted(torch.argsort(scores, stable=True)[:count].tolist())

    def arrays(self, sample_shape: tuple[int, ...]) -> dict[str, SidecarArray]:
        if self.channels is None:
            raise RuntimeError("ChannelFlipSidecar.calibrate must run before the cache is built.")
        return {FLIPPED_CHANNELS: SidecarArray((len(self.channels), *sample_shape[1:]), "float32")}

    def compute(
        self,
        prefix: Prefix,
        pixels: torch.Tensor,
        activations: torch.Tensor,
        augmented_pixels: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        index = torch.tensor(self.channels, device=pixels.device)
        return {FLIPPED_CHANNELS: prefix(pixels.flip(-1)).float().index_select(1, index)}

    def config(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "calibration_size": self.calibration_size}

    def summary(self) -> dict[str, Any]:
        """The selected channels, every channel's mean SSIM, and the selected channels' scores."""
        if self.channels is None or self.scores is None:
            return {}
        return {
            "channels": self.channels,
            "channel_ssim": self.scores,
            "selected_ssim": [self.scores[c] for c in self.channels],
        }
