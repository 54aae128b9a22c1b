"""Image-quality metrics as pure functions of tensors: PSNR, SSIM, Fréchet distance, accuracy.

Images are [B, C, H, W] in the model's range (default [-1, 1], so data_range = 2). Quantized samples are
compared with full-precision samples from the same noise, which is why PSNR / SSIM are per-image means.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from adatsq.errors import ConfigError


def _check_pair(x: torch.Tensor, ref: torch.Tensor) -> None:
    if x.shape != ref.shape or x.dim() != 4:
        raise ConfigError(
            f"expected two [B, C, H, W] tensors of equal shape, got {tuple(x.shape)} and {tuple(ref.shape)}"
        )


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean over the batch of per-image PSNR in dB.

    An image identical to its reference has infinite PSNR; it is capped at 100 dB so that one exact
    image does not make the batch mean infinite (a batch of identical images returns 100.0).
    """
    _check_pair(x, ref)
    mse = (x.double() - ref.double()).pow(2).flatten(1).mean(dim=1)
    per_image = 10.0 * torch.log10(data_range**2 / mse.clamp_min(data_range**2 * 1e-10))
    return float(per_image.mean())


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0, window: int = 7, sigma: float = 1.5
) -> float:
    """Mean SSIM (Wang et al. 2004) with a Gaussian window, over valid positions, channels and the batch.

    The window shrinks to the image size for small images (16×16 digits use 7×7 by default, not 11×11).
    """
    _check_pair(x, ref)
    size = min(window, x.shape[-1], x.shape[-2])
    if size % 2 == 0:
        size -= 1
    g = _gaussian_window(size, sigma, torch.float64)
    kernel = (g[:, None] * g[None, :]).expand(x.shape[1], 1, size, size)
    a, b = x.double(), ref.double()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=x.shape[1])

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return float((num / den).mean())


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, F] (FID on any features).

    sqrtm of a near-singular covariance product can fail or return tiny imaginary parts; as in the
    reference FID code, eps is added to both diagonals when sqrtm warns or fails, and the imaginary
    part is dropped.
    """
    if feats_a.dim() != 2 or feats_b.dim() != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ConfigError(
            f"expected [N, F] feature sets of equal F, got {tuple(feats_a.shape)}, {tuple(feats_b.shape)}"
        )
    if min(feats_a.shape[0], feats_b.shape[0]) < 2:
        raise ConfigError("each feature set needs at least 2 rows to estimate a covariance")
    a = feats_a.detach().double().cpu().numpy()
    b = feats_b.detach().double().cpu().numpy()
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov_a @ cov_b)
    if caught or not np.isfinite(covmean).all():
        offset = np.eye(cov_a.shape[0]) * eps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = np.real(covmean)
    diff = mu_a - mu_b
    value = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))
    return max(value, 0.0) if math.isfinite(value) else value


def accuracy(logits_or_preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of correct predictions; accepts logits [N, K] (argmax taken) or predicted ids [N]."""
    preds = logits_or_preds.argmax(dim=-1) if logits_or_preds.dim() == 2 else logits_or_preds
    if preds.shape != labels.shape:
        raise ConfigError(f"{tuple(preds.shape)} predictions for {tuple(labels.shape)} labels")
    return float((preds == labels).double().mean())
