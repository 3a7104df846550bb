"""Per-channel SSIM of feature maps, batched in torch, matching `skimage.metrics.structural_similarity`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: scikit-image's defaults: 7 x 7 uniform window, K1 = 0.01, K2 = 0.03, sample covariance.
_WIN_SIZE, _K1, _K2 = 7, 0.01, 0.03


def _window(height: int, width: int) -> int:
    side = min(height, width, _WIN_SIZE)
    side -= 1 - side % 2  # the largest odd window that fits, as scikit-image requires odd sizes
    if side < 3:
        raise ValueError(f"SSIM needs maps of at least 3 x 3, got {height} x {width}.")
    return side


def channel_ssim(a: torch.Tensor, b: torch.Tensor, data_range: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of every channel of every sample: `a`, `b` are `(B, C, H, W)`, the result `(B, C)` float64.

    Equal, up to float64 rounding, to `structural_similarity(a[n, c], b[n, c], data_range=data_range[c])` of
    scikit-image with its defaults (a 7 x 7 uniform window, or the largest odd window that fits smaller maps; K1 =
    0.01, K2 = 0.03; sample covariance; the mean over the positions where the window lies inside the map, which is
    what scikit-image's cropping of `(win - 1) / 2` border pixels leaves).

    Args:
        a, b (`torch.Tensor`): Two batches of feature maps of one shape.
        data_range (`torch.Tensor`): `(C,)` value range of each channel (its max minus min over the data). A
            channel whose range is 0 is constant in both batches, so they agree: its SSIM is 1.
    """
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"channel_ssim needs two (B, C, H, W) batches of one shape, got {a.shape} and {b.shape}.")
    win = _window(*a.shape[-2:])
    a, b = a.double(), b.double()
    data_range = data_range.to(a.device, torch.float64)

    def mean(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, win, stride=1)  # no padding: the valid positions only, the crop above

    ua, ub = mean(a), mean(b)
    cov_norm = win * win / (win * win - 1)
    va = cov_norm * (mean(a * a) - ua * ua)
    vb = cov_norm * (mean(b * b) - ub * ub)
    vab = cov_norm * (mean(a * b) - ua * ub)
    c1 = ((_K1 * data_range) ** 2).view(1, -1, 1, 1)
    c2 = ((_K2 * data_range) ** 2).view(1, -1, 1, 1)
    ssim = ((2 * ua * ub + c1) * (2 * vab + c2)) / ((ua * ua + ub * ub + c1) * (va + vb + c2))
    score = ssim.flatten(2).mean(-1)
    return torch.where(data_range.view(1, -1) > 0, score, torch.ones_like(score))
