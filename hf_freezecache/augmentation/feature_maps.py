"""`feature-maps`: flip, crop, blur and noise of cached CNN feature maps, the "Ours w/ Discard" recipe of the paper."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..cache.sidecars import FLIPPED_CHANNELS
from . import register_augmentation
from .base import FeatureAugmentation, check_activations, check_range

if TYPE_CHECKING:
    from ..cache import CacheManifest
    from ..models import BlockAdapter


@dataclass
class FeatureMapAugmentationConfig:
    """Options of the `feature-maps` augmentation (flags `--feature_*`), validated by the augmentation itself."""

    flip_probability: float = field(
        default=0.5, metadata={"help": "Feature maps: probability of a horizontal flip per sample (0: off)."}
    )
    crop_padding: float = field(
        default=0.125,
        metadata={"help": "Feature maps: random crop after zero padding of this fraction of the map side (0: off)."},
    )
    noise_std: float = field(
        default=0.0, metadata={"help": "Maps and tokens: std of added Gaussian noise, in activation units (0: off)."}
    )
    blur_sigma: float = field(
        default=0.0, metadata={"help": "Feature maps: sigma of a random Gaussian blur, in map pixels (0: off)."}
    )
    blur_probability: float = field(
        default=0.5, metadata={"help": "Feature maps: probability that a sample is blurred when blur is on."}
    )

    def __post_init__(self) -> None:
        FeatureMapAugmentation(**asdict(self))

    def build(self, adapter: BlockAdapter, manifest: CacheManifest) -> FeatureMapAugmentation:
        """The augmentation of batches read from the cache of `manifest`, with the channels its `channel-flip`
        sidecar stores."""
        channel_flip = manifest.sidecars.get("channel-flip")
        channels = channel_flip["summary"]["channels"] if channel_flip else None
        return FeatureMapAugmentation(**asdict(self), flipped_channels=channels)


@register_augmentation("feature-maps", config=FeatureMapAugmentationConfig)
class FeatureMapAugmentation(FeatureAugmentation):
    """Image-style augmentation applied to `(B, C, H, W)` feature maps, in the order flip, crop, blur, noise.

    Every step draws independently per sample. Blur comes before noise so that `noise_std` is the standard deviation
    of the noise that actually reaches the model.

    Similarity-aware channel augmentation (paper, section 3.2): for the channels whose response to a flipped image
    is not the flip of their response (`cache.sidecars.ChannelFlipSidecar`), the cache stores the activations of
    the flipped image, and a flipped sample takes them instead of the flipped map on those channels.

    Args:
        flip_probability (`float`, *optional*, defaults to 0.5):
            Probability, per sample, of a flip along W. 0 disables it.
        crop_padding (`float`, *optional*, defaults to 0.125):
            Random crop with zero padding, as a fraction of the map side in [0, 0.5]: `round(crop_padding * H)` zero
            rows (resp. `round(crop_padding * W)` columns, Python's round) are added on every side, then each sample
            keeps a random `H x W` window. This is `RandomCrop(32, padding=4)` scaled to the map (0.125 * 32 = 4);
            an 8 x 8 map gets 1. 0 disables it.
        noise_std (`float`, *optional*, defaults to 0.0):
            Standard deviation of additive Gaussian noise, in activation units (so its strength depends on the scale
            of the cached layer's outputs). 0 disables it.
        blur_sigma (`float`, *optional*, defaults to 0.0):
            Standard deviation, in map cells, of a depthwise Gaussian blur over H and W with kernel size
            `2 * ceil(2 * sigma) + 1` and reflect padding (a constant map stays constant up to its borders). The map
            sides must exceed `ceil(2 * sigma)`. 0 disables it.
        blur_probability (`float`, *optional*, defaults to 0.5):
            Probability, per sample, of blurring when `blur_sigma > 0`.
        flipped_channels (`list[int]`, *optional*):
            The channels whose flipped-image activations the sidecar `flipped_channels` holds, in its order (the
            cache manifest's `sidecars["channel-flip"]["summary"]["channels"]`). Then every call needs that sidecar.
    """

    name = "feature-maps"

    def __init__(
        self,
        flip_probability: float = 0.5,
        crop_padding: float = 0.125,
        noise_std: float = 0.0,
        blur_sigma: float = 0.0,
        blur_probability: float = 0.5,
        flipped_channels: list[int] | None = None,
    ) -> None:
        self.flip_probability = check_range("flip_probability", flip_probability, 0.0, 1.0)
        if flipped_channels is not None:
            channels = list(flipped_channels)
            if not channels or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in channels):
                raise ValueError(f"flipped_channels={flipped_channels!r} must be a non-empty list of channels >= 0.")
            if len(set(channels)) != len(channels):
                raise ValueError(f"flipped_channels={flipped_channels!r} lists a channel twice.")
            flipped_channels = channels
        self.flipped_channels = flipped_channels
        self.crop_padding = check_range("crop_padding", crop_padding, 0.0, 0.5)
        self.noise_std = check_range("noise_std", noise_std, 0.0)
        self.blur_sigma = check_range("blur_sigma", blur_sigma, 0.0)
        self.blur_probability = check_range("blur_probability", blur_probability, 0.0, 1.0)

    def __call__(
        self,
        activations: torch.Tensor,
        sidecar: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        check_activations(activations, 4, "(B, C, H, W) feature-map", "tokens")
        batch, device = activations.shape[0], activations.device
        out = activations
        if self.flip_probability > 0:
            flipped = torch.rand(batch, generator=generator, device=device) < self.flip_probability
            out = self.flip_maps(out, flipped, sidecar)
        if self.crop_padding > 0:
            out = self._crop(out, generator)
        if self.blur_sigma > 0 and self.blur_probability > 0:
            blurred = torch.rand(batch, generator=generator, device=device) < self.blur_probability
            indices = blurred.nonzero().squeeze(1)
            out = out.index_copy(0, indices, self._blur(out.index_select(0, indices)))
        if self.noise_std > 0:
            noise = torch.randn(out.shape, generator=generator, dtype=out.dtype, device=device)
            out = out + self.noise_std * noise
        return out

    def flip_maps(
        self, maps: torch.Tensor, flipped: torch.Tensor, sidecar: Mapping[str, torch.Tensor] | None
    ) -> torch.Tensor:
        """Flips along W the samples where the `(B,)` boolean mask `flipped` is set; with `flipped_channels`, their
        stored flipped-image activations (`sidecar["flipped_channels"]`) replace the flipped map on those channels."""
        mirrored = maps.flip(-1)
        if self.flipped_channels is not None:
            stored = (sidecar or {}).get(FLIPPED_CHANNELS)
            expected = (maps.shape[0], len(self.flipped_channels), *maps.shape[2:])
            if stored is None or tuple(stored.shape) != expected:
                found = "none" if stored is None else tuple(stored.shape)
                raise ValueError(
                    f"Channel-flip augmentation needs the cache sidecar {FLIPPED_CHANNELS!r} of shape {expected}, "
                    f"got {found}."
                )
            if max(self.flipped_channels) >= maps.shape[1]:
                raise ValueError(f"flipped_channels {self.flipped_channels} exceed the {maps.shape[1]} channels.")
            index = torch.tensor(self.flipped_channels, device=maps.device)
            mirrored = mirrored.index_copy(1, index, stored.to(maps.dtype))
        return torch.where(flipped[:, None, None, None], mirrored, maps)

    def _crop(self, maps: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        batch, channels, height, width = maps.shape
        pad_h, pad_w = round(self.crop_padding * height), round(self.crop_padding * width)
        if pad_h == 0 and pad_w == 0:
            return maps
        padded = F.pad(maps, (pad_w, pad_w, pad_h, pad_h))
        top = torch.randint(0, 2 * pad_h + 1, (batch, 1), generator=generator, device=maps.device)
        left = torch.randint(0, 2 * pad_w + 1, (batch, 1), generator=generator, device=maps.device)
        rows = top + torch.arange(height, device=maps.device)
        cols = left + torch.arange(width, device=maps.device)
        # Two gathers select each sample's window without a Python loop over the batch.
        padded = padded.gather(2, rows[:, None, :, None].expand(batch, channels, height, width + 2 * pad_w))
        return padded.gather(3, cols[:, None, None, :].expand(batch, channels, height, width))

    def _blur(self, maps: torch.Tensor) -> torch.Tensor:
        if maps.shape[0] == 0:
            return maps
        radius = math.ceil(2 * self.blur_sigma)
        height, width = maps.shape[-2:]
        if radius >= min(height, width):
            raise ValueError(
                f"blur_sigma={self.blur_sigma} needs a kernel of radius {radius}, which reflect padding cannot fit on "
                f"{height} x {width} maps: use blur_sigma < {min(height, width) / 2}."
            )
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=maps.device)
        kernel = torch.exp(-(offsets**2) / (2 * self.blur_sigma**2))
        kernel = (kernel / kernel.sum()).to(maps.dtype)
        # The 2-D Gaussian is separable: one pass along H then one along W, every channel on its own.
        flat = maps.reshape(-1, 1, height, width)
        flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
        flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
        return flat.view_as(maps)

    def config(self) -> dict[str, Any]:
        return {
            "flip_probability": self.flip_probability,
            "crop_padding": self.crop_padding,
            "noise_std": self.noise_std,
            "blur_sigma": self.blur_sigma,
            "blur_probability": self.blur_probability,
            "flipped_channels": self.flipped_channels,
        }

    def describe(self) -> str:
        parts = [f"flip {self.flip_probability:g}", f"crop {self.crop_padding:g}", f"noise {self.noise_std:g}"]
        if self.flipped_channels is not None:
            parts.insert(1, f"{len(self.flipped_channels)} stored flipped channels")
        if self.blur_sigma > 0:
            parts.append(f"blur {self.blur_sigma:g} p={self.blur_probability:g}")
        return f"{self.name}({', '.join(parts)})"
