"""Fidelity to the dense model: relative L1 (DiTFastAttn's definition), MSE, PSNR, SSIM (LPIPS, which needs
local weights: :mod:`ditplan.evaluators.lpips`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ditplan.evaluators.base import Evaluator, Metric

# PSNR of identical samples is infinite; it is reported as this cap so that searches and tables stay
# finite. Any two float32 samples that differ at all score below it.
PSNR_CAP_DB = 100.0


def relative_l1(output: torch.Tensor, reference: torch.Tensor) -> float:
    """DiTFastAttn's loss: mean of clip(|O − O'| / (max(|O|, |O'|) + 1e-6), 0, 10)."""
    diff = (output - reference).abs()
    scale = torch.maximum(output.abs(), reference.abs()) + 1e-6
    return (diff / scale).clamp(0, 10).mean().item()


def mse(output: torch.Tensor, reference: torch.Tensor) -> float:
    return F.mse_loss(output.double(), reference.double()).item()


def psnr(output: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0) -> float:
    """PSNR in dB for images in [-1, 1] (range 2); identical inputs give ``PSNR_CAP_DB``."""
    error = mse(output, reference)
    if error == 0:
        return PSNR_CAP_DB
    return min(PSNR_CAP_DB, 10 * math.log10(data_range**2 / error))


def ssim(output: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean SSIM (Wang et al. 2004: 11×11 Gaussian window, σ = 1.5, K1 = 0.01, K2 = 0.03) per channel."""
    x, y = output.double(), reference.double()  # (N, C, H, W)
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(x.shape[1], 1, 11, 11)
    pad = min(5, (x.shape[-1] - 1) // 2)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, padding=pad, groups=x.shape[1])

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return index.mean().item()


class FidelityEvaluator(Evaluator):
    """How close a plan's final samples are to the dense model's samples of the same seeds."""

    name = "fidelity"

    def evaluate(self, samples: torch.Tensor, reference: torch.Tensor) -> list[Metric]:
        return [
            Metric("rel_l1", relative_l1(samples, reference), "minimize"),
            Metric("mse", mse(samples, reference), "minimize"),
            Metric("psnr", psnr(samples, reference), "maximize"),
            Metric("ssim", ssim(samples, reference), "maximize"),
        ]
