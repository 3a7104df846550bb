"""`tokens`: noise and patch-token dropout for cached transformer tokens (ViT, DeiT)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..cache.sidecars import REPLACEMENT_POSITIONS, REPLACEMENT_TOKENS
from . import register_augmentation
from .base import FeatureAugmentation, check_activations, check_range

if TYPE_CHECKING:
    from ..cache import CacheManifest
    from ..models import BlockAdapter


@dataclass
class TokenAugmentationConfig:
    """Options of the `tokens` augmentation (flags `--feature_noise_std`, `--token_*`), validated by the augmentation
    itself."""

    noise_std: float = field(
        default=0.0, metadata={"help": "Maps and tokens: std of added Gaussian noise, in activation units (0: off)."}
    )
    drop_rate: float = field(
        default=0.0, metadata={"help": "Tokens: fraction of patch tokens dropped per sample (0: off)."}
    )
    replace_probability: float = field(
        default=0.5, metadata={"help": "Token replacement: probability per sample that the stored tokens replace."}
    )

    def __post_init__(self) -> None:
        TokenAugmentation(**asdict(self))

    def build(self, adapter: BlockAdapter, manifest: CacheManifest) -> TokenAugmentation:
        """The augmentation of batches read from the cache of `manifest`, keeping `adapter`'s special tokens."""
        return TokenAugmentation(**asdict(self), num_special_tokens=adapter.num_special_tokens)


@register_augmentation("tokens", config=TokenAugmentationConfig)
class TokenAugmentation(FeatureAugmentation):
    """Augmentation of `(B, T, D)` token sequences: special tokens first, then the patch tokens.

    Flips and crops of the token order mean nothing here: the positional embeddings are already added and attention
    is permutation-equivariant. The options, in the order applied: token replacement (paper, section 3.3) when the
    cache stores a `token-replacement` sidecar (`cache.sidecars.TokenReplacementSidecar`: tokens of an augmented
    view of the image and the positions they replace), patch-token dropout, noise. Dropout changes T, so use it only
    when the remaining blocks accept any token count (plain ViT / DeiT encoders, not models that reshape the tokens
    back to a grid).

    Args:
        noise_std (`float`, *optional*, defaults to 0.0):
            Standard deviation of Gaussian noise added to every token, special ones included, in activation units.
            0 disables it.
        drop_rate (`float`, *optional*, defaults to 0.0):
            Fraction in [0, 1) of the patch tokens to drop: `round(drop_rate * num_patch_tokens)` (Python's round)
            per sample, the same count for every sample so the batch stays rectangular but different tokens. The
            special tokens stay first and the kept patch tokens keep their order. 0 disables it.
        num_special_tokens (`int`, *optional*, defaults to 1):
            Tokens before the patch grid that are never dropped: 1 for ViT's CLS token, 2 for DeiT's CLS and
            distillation tokens.
        replace_probability (`float`, *optional*, defaults to 0.5):
            Probability, per sample, that the stored augmented tokens replace the tokens at their stored positions,
            when the batch comes with the `replacement_tokens` and `replacement_positions` sidecar (without it
            nothing is drawn, so a cache without the sidecar gives exactly the batches of plain discard).
    """

    name = "tokens"

    def __init__(
        self,
        noise_std: float = 0.0,
        drop_rate: float = 0.0,
        num_special_tokens: int = 1,
        replace_probability: float = 0.5,
    ) -> None:
        self.noise_std = check_range("noise_std", noise_std, 0.0)
        self.drop_rate = check_range("drop_rate", drop_rate, 0.0, 1.0, high_inclusive=False)
        if isinstance(num_special_tokens, bool) or not isinstance(num_special_tokens, int) or num_special_tokens < 0:
            raise ValueError(f"num_special_tokens={num_special_tokens!r} must be an integer >= 0.")
        self.num_special_tokens = num_special_tokens
        self.replace_probability = check_range("replace_probability", replace_probability, 0.0, 1.0)

    def __call__(
        self,
        activations: torch.Tensor,
        sidecar: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        check_activations(activations, 3, "(B, T, D) token", "feature-maps")
        batch, num_tokens, dim = activations.shape
        num_patches = num_tokens - self.num_special_tokens
        if num_patches < 0:
            raise ValueError(
                f"Got {num_tokens} tokens per sample, fewer than num_special_tokens={self.num_special_tokens}."
            )
        out = activations
        if sidecar is not None and REPLACEMENT_TOKENS in sidecar and self.replace_probability > 0:
            out = self.replace_tokens(out, sidecar[REPLACEMENT_TOKENS], sidecar[REPLACEMENT_POSITIONS], generator)
        num_dropped = round(self.drop_rate * num_patches)
        if num_dropped > 0:
            scores = torch.rand(batch, num_patches, generator=generator, device=activations.device)
            # Sorting the kept indices restores the original order of the surviving tokens.
            kept = scores.argsort(dim=1)[:, : num_patches - num_dropped].sort(dim=1).values + self.num_special_tokens
            patches = out.gather(1, kept[:, :, None].expand(-1, -1, dim))
            out = torch.cat([out[:, : self.num_special_tokens], patches], dim=1)
        if self.noise_std > 0:
            noise = torch.randn(out.shape, generator=generator, dtype=out.dtype, device=out.device)
            out = out + self.noise_std * noise
        return out

    def replace_tokens(
        self,
        tokens: torch.Tensor,
        stored: torch.Tensor,
        positions: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """With probability `replace_probability` per sample, puts the `(B, m, D)` `stored` tokens at the `(B, m)`
        `positions` of `tokens`; the other tokens and samples are left as they are."""
        batch, num_tokens, dim = tokens.shape
        if stored.shape[0] != batch or stored.shape[-1] != dim or tuple(positions.shape) != tuple(stored.shape[:2]):
            raise ValueError(
                f"Token replacement got stored tokens {tuple(stored.shape)} and positions {tuple(positions.shape)} "
                f"for a batch of {tuple(tokens.shape)}."
            )
        positions = positions.to(tokens.device, torch.long)
        if bool((positions < self.num_special_tokens).any()) or bool((positions >= num_tokens).any()):
            raise ValueError(
                f"Token replacement positions must be patch tokens, in [{self.num_special_tokens}, {num_tokens})."
            )
        chosen = torch.rand(batch, generator=generator, device=tokens.device) < self.replace_probability
        replaced = tokens.scatter(1, positions[:, :, None].expand(-1, -1, dim), stored.to(tokens.dtype))
        return torch.where(chosen[:, None, None], replaced, tokens)

    def config(self) -> dict[str, Any]:
        return {
            "noise_std": self.noise_std,
            "drop_rate": self.drop_rate,
            "num_special_tokens": self.num_special_tokens,
            "replace_probability": self.replace_probability,
        }

    def describe(self) -> str:
        return (
            f"{self.name}(noise {self.noise_std:g}, drop {self.drop_rate:g}, replace {self.replace_probability:g}, "
            f"{self.num_special_tokens} special token{'s' if self.num_special_tokens != 1 else ''})"
        )
