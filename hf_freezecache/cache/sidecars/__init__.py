"""Sidecars: per-sample extras stored next to the cached activations, for augmentation after the prefix is gone.

A sidecar runs at cache-build time, where the prefix and the images still exist (`channel-flip`: activations of the
flipped image for the channels a flip does not commute with; `token-replacement`: the augmented view's tokens that
differ most from the original's). The reader hands its arrays to the feature augmentation, which uses them.
"""

from __future__ import annotations

from ..._registry import Registry
from .base import SIDECAR_COLUMN_PREFIX, Sidecar, SidecarArray

SIDECARS: Registry[Sidecar] = Registry("cache sidecar")
register_sidecar = SIDECARS.register

from .channel_flip import FLIPPED_CHANNELS, ChannelFlipConfig, ChannelFlipSidecar  # noqa: E402
from .ssim import channel_ssim  # noqa: E402
from .token_replacement import (  # noqa: E402
    REPLACEMENT_POSITIONS,
    REPLACEMENT_TOKENS,
    TokenReplacementConfig,
    TokenReplacementSidecar,
)


def build_sidecar(name: str, **options: object) -> Sidecar:
    """Instantiates the sidecar registered as `name` with `options`; unknown names raise a `ValueError`."""
    return SIDECARS.get(name)(**options)


__all__ = [
    "FLIPPED_CHANNELS",
    "REPLACEMENT_POSITIONS",
    "REPLACEMENT_TOKENS",
    "SIDECARS",
    "SIDECAR_COLUMN_PREFIX",
    "ChannelFlipConfig",
    "ChannelFlipSidecar",
    "Sidecar",
    "SidecarArray",
    "TokenReplacementConfig",
    "TokenReplacementSidecar",
    "build_sidecar",
    "channel_ssim",
    "register_sidecar",
]
