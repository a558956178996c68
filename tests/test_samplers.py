"""The samplers are right, shown without any training: on data whose exact denoiser is known, each
sampler at its recommended number of steps must reproduce the data distribution.

Shown once by hand (see the issue note): giving the network the alpha_bar of the next step
instead of the current one makes the Gaussian variance and the K-point distance tests fail.
"""
import dataclasses
import math

import pytest
import torch
from scipy.stats import chisquare

from config import make_config
from diffusion import sample

RECOMMENDED_STEPS = {"ddpm": 1000, "ddim": 100, "dpm": 25}
# DDIM's steps are uniform in t, which leaves few steps at low noise: at 100 steps its samples are
# still about 5% under-dispersed on the Gaussian below (DPM-Solver's steps, uniform in log-SNR, are not).
VARIANCE_TOLERANCE = {"ddpm": 0.03, "ddim": 0.07, "dpm": 0.03}
D = 3 * 32 * 32


def sampler_config(sampler):
    """tiny (target eps, linear schedule, eta 0) with this sampler at its recommended steps, unclamped."""
    return dataclasses.replace(make_config("tiny"), sampler=sampler, sampling_steps=RECOMMENDED_STEPS[sampler],
                               clamp_x0=False)


class PointsDenoiser(torch.nn.Module):
    """Data: K images with equal probability. E[x0 | x_t] is the softmax-weighted mean of the K
    images with weights from the Gaussian likelihood N(x_t; sqrt(alpha_bar) x_k, (1 - alpha_bar) I).
    Returns the matching eps, the target of the configuration."""

    def __init__(self, points):
        super().__init__()
        self.points = points.double().flatten(1)

    def forward(self, x_t, alpha_bar):
        x = x_t.double().flatten(1)
        a = alpha_bar.double()[:, None]
        # |x - sqrt(a) x_k|^2 expanded (N x K); in double the expansion loses nothing that matters
        d2 = (x ** 2).sum(1, keepdim=True) - 2 * a.sqrt() * (x @ self.points.T) + a * (self.points ** 2).sum(1)
        w = torch.softmax(-d2 / (2 * (1 - a)), dim=1)
        x0 = w @ self.points
        return ((x - a.sqrt() * x0) / (1 - a).sqrt()).view_as(x_t).float()


class GaussianDenoiser(torch.nn.Module):
    """Data: independent pixels x0 ~ N(mu, s^2). E[x0 | x_t] = mu + c (x_t - sqrt(a) mu) with
    c = sqrt(a) s^2 / (a s^2 + 1 - a), so eps = (x_t - sqrt(a) x0) / sqrt(1 - a) = A x_t - sqrt(a) A mu
    with A = (1 - sqrt(a) c) / sqrt(1 - a): per-pixel coefficients, computed in double once per noise
    level (no cancellation near a = 1), then one multiply-add per pixel (broadcast when the batch
    shares one level, as in sampling: indexing would copy the coefficients once per image)."""

    def __init__(self, mu, s):
        super().__init__()
        self.mu, self.var = mu.double(), s.double() ** 2

    def forward(self, x_t, alpha_bar):
        levels, level_of_image = alpha_bar.double().unique(return_inverse=True)
        a = levels.view(-1, 1, 1, 1)
        c = a.sqrt() * self.var / (a * self.var + 1 - a)
        A = (1 - a.sqrt() * c) / (1 - a).sqrt()
        offset, A = (-a.sqrt() * A * self.mu).float(), A.float()
        if len(levels) > 1:
            offset, A = offset[level_of_image], A[level_of_image]
        return torch.addcmul(offset, A, x_t)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm"])
def test_samples_land_on_the_k_points_uniformly(sampler):
    K, N = 8, 200
    points = torch.rand(K, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    config = sampler_config(sampler)
    x = sample(PointsDenoiser(points), config, N, generator=torch.Generator().manual_seed(2))
    distances = torch.cdist(x.flatten(1).double(), points.flatten(1).double())
    nearest_rms, nearest = (distances / math.sqrt(D)).min(dim=1)
    # Points are about 0.8 (RMS per pixel) apart; a sample within 0.05 has found one.
    assert (nearest_rms < 0.05).float().mean() >= 0.99, nearest_rms.max()
    counts = torch.bincount(nearest, minlength=K).tolist()
    assert chisquare(counts).pvalue > 0.001, counts


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm"])
def test_gaussian_data_mean_and_covariance(sampler):
    N = 1000
    g = torch.Generator().manual_seed(3)
    mu = torch.rand(3, 32, 32, generator=g) - 0.5
    s = torch.rand(3, 32, 32, generator=g) * 0.35 + 0.25  # per-pixel std 0.25..0.6, like images in [-1, 1]
    config = sampler_config(sampler)
    x = sample(GaussianDenoiser(mu, s), config, N, generator=torch.Generator().manual_seed(4)).double()
    # Mean: the squared error of the sample mean, in units of its standard error, averages 1.
    z2 = ((x.mean(0) - mu) ** 2 / (s ** 2 / N)).mean().item()
    assert 0.85 < z2 < 1.2, z2
    # Variance: per-pixel sample variance over the true variance averages 1 (sampling std ~ 0.0006).
    ratio = (x.var(0) / s ** 2).mean().item()
    assert abs(ratio - 1) < VARIANCE_TOLERANCE[sampler], ratio
    # Covariance: pixels are independent; correlations of random pixel pairs have std 1/sqrt(N).
    flat = (x - x.mean(0)).flatten(1) / x.flatten(1).std(0)
    i, j = torch.randperm(D, generator=g)[:500], torch.randperm(D, generator=g)[:500]
    keep = i != j
    corr = (flat[:, i[keep]] * flat[:, j[keep]]).mean(0)
    assert corr.abs().mean().item() < 1.5 * math.sqrt(2 / math.pi) / math.sqrt(N)
