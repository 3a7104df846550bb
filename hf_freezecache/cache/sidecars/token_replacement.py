"""`token-replacement`: augmentation of transformer caches by token replacement (paper, section 3.3, Algorithm 1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from . import register_sidecar
from .base import Prefix, Sidecar, SidecarArray

if TYPE_CHECKING:
    from ...models import BlockAdapter

#: `(m, D)` tokens of the augmented view, stored for replacement.
REPLACEMENT_TOKENS = "replacement_tokens"
#: `(m,)` token indices (special tokens included in the count) that `REPLACEMENT_TOKENS` replace, int32.
REPLACEMENT_POSITIONS = "replacement_positions"


@dataclass
class TokenReplacementConfig:
    """Options of the `token-replacement` sidecar (flags `--token_aug_*`); `alpha = 0` stores none."""

    alpha: float = field(
        default=0.0,
        metadata={
            "help": "ViT/DeiT caches: token replacement. Fraction of the patch tokens of an augmented view (the "
            "training image augmentation) cached per sample: those least similar to their best match among the "
            "original tokens. 0: plain discard."
        },
    )
    matching: str = field(
        default="max",
        metadata={
            "help": "Token replacement: match each original token to the augmented token of 'max' (highest, the "
            "paper's text) or 'min' (lowest, the paper's Algorithm 1) cosine similarity."
        },
    )

    layout: ClassVar[str] = "tokens"
    flag: ClassVar[str] = "token_aug_alpha"

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"--token_aug_alpha must be in [0, 1], got {self.alpha}.")
        if self.matching not in ("max", "min"):
            raise ValueError(f"--token_aug_matching must be 'max' or 'min', got {self.matching!r}.")

    @property
    def enabled(self) -> bool:
        return self.alpha > 0

    @property
    def stored_fraction(self) -> float:
        """About what the sidecar stores, as a fraction of the cached activations (the replacement tokens)."""
        return self.alpha

    def build(self, adapter: BlockAdapter) -> TokenReplacementSidecar:
        """The sidecar these options ask for, for the special tokens of `adapter`'s model."""
        return TokenReplacementSidecar(self.alpha, self.matching, adapter.num_special_tokens)


@register_sidecar("token-replacement", config=TokenReplacementConfig)
class TokenReplacementSidecar(Sidecar):
    """Stores, per sample, the augmented view's tokens that differ most from the original's, and where they go.

    For each sample, T_ori = F(x) and T_aug = F(aug(x)), where aug is the training set's own random image
    augmentation (one view per sample, drawn once when the cache is built). Every original patch token i is
    matched by content to the augmented patch token j of highest cosine similarity (position embeddings move with
    the content under crops and flips, so index i of T_aug is not i's counterpart); the `m = round(alpha * N)` pairs
    (at least one when alpha > 0; N patch tokens) with the *lowest* matched similarity are kept: the places where
    the augmented view says something the original does not. Training replaces token i by T_aug[j] there.

    `matching="min"` is the other reading of the paper: its Algorithm 1 picks, for each i, the j of *lowest*
    similarity (its prose says highest). Both then keep the lowest-scoring alpha fraction.

    Special tokens (ViT's CLS, DeiT's distillation token, timm's register tokens) take no part: they are never
    replaced, nor used as replacements. The head reads them at fixed positions, and they summarise the whole image
    rather than a region, so a similarity to patch tokens ranks nothing meaningful.

    Args:
        alpha (`float`): Fraction of the patch tokens stored per sample, in (0, 1].
        matching (`str`, *optional*, defaults to `"max"`): `"max"` (the paper's prose) or `"min"` (Algorithm 1).
        num_special_tokens (`int`, *optional*, defaults to 1): Tokens before the patch tokens.
    """

    name = "token-replacement"
    needs_augmented_view = True
    extra_prefix_passes = 1

    def __init__(self, alpha: float, matching: str = "max", num_special_tokens: int = 1) -> None:
        alpha = float(alpha)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"token-replacement alpha={alpha!r} must be in (0, 1] (alpha = 0 stores no sidecar).")
        if matching not in ("max", "min"):
            raise ValueError(f"token-replacement matching={matching!r} must be 'max' or 'min'.")
        if isinstance(num_special_tokens, bool) or not isinstance(num_special_tokens, int) or num_special_tokens < 0:
            raise ValueError(f"num_special_tokens={num_special_tokens!r} must be an integer >= 0.")
        self.alpha = alpha
        self.matching = matching
        self.num_special_tokens = num_special_tokens

    def _count(self, num_tokens: int) -> int:
        patches = num_tokens - self.num_special_tokens
        if patches < 1:
            raise ValueError(f"{num_tokens} tokens per sample leave no patch token after {self.num_special_tokens}.")
        return min(patches, max(1, round(self.alpha * patches)))

    def arrays(self, sample_shape: tuple[int, ...]) -> dict[str, SidecarArray]:
        if len(sample_shape) != 2:
            raise ValueError(
                f"token replacement needs (T, D) token activations, but the prefix gives {tuple(sample_shape)} per "
                "sample: use --channel_aug_gamma for CNN caches."
            )
        count = self._count(sample_shape[0])
        return {
            REPLACEMENT_TOKENS: SidecarArray((count, sample_shape[1]), "float32"),
            REPLACEMENT_POSITIONS: SidecarArray((count,), "int32"),
        }

    def compute(
        self,
        prefix: Prefix,
        pixels: torch.Tensor,
        activations: torch.Tensor,
        augmented_pixels: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        if augmented_pixels is None:
            raise ValueError("token replacement needs the augmented view of every sample.")
        tokens, stored = self.select(activations, prefix(augmented_pixels).float())
        return {REPLACEMENT_TOKENS: tokens, REPLACEMENT_POSITIONS: stored}

    def select(self, original: torch.Tensor, augmented: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Algorithm 1 on a batch of `(B, T, D)` token sets: the `(B, m, D)` tokens to store and their `(B, m)`
        positions (int32, sorted by matched similarity, lowest first)."""
        s = self.num_special_tokens
        count = self._count(original.shape[1])
        similarity = F.normalize(original[:, s:], dim=-1) @ F.normalize(augmented[:, s:], dim=-1).transpose(1, 2)
        scores, match = similarity.max(-1) if self.matching == "max" else similarity.min(-1)
        kept = torch.argsort(scores, dim=1, stable=True)[:, :count]
        tokens = augmented[:, s:].gather(1, match.gather(1, kept)[:, :, None].expand(-1, -1, augmented.shape[-1]))
        return tokens, (kept + s).to(torch.int32)

    def config(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "matching": self.matching, "num_special_tokens": self.num_special_tokens}
