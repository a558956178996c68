import math

import pytest
import torch

from config import make_config
from diffusion import (add_noise, linear_alpha_bar, loss_weight, make_scheduler, sample, sample_alpha_bar,
                       target_of, training_loss, x0_and_eps_of)


def test_linear_schedule_matches_diffusers():
    scheduler = make_scheduler(make_config("seed"), "ddpm", 1000, clamp=False)
    assert torch.allclose(scheduler.alphas_cumprod, linear_alpha_bar(), rtol=1e-5, atol=1e-7)
    assert abs(linear_alpha_bar()[-1].item() - 4.04e-5) < 1e-6


@pytest.mark.parametrize("scheme", ["uniform_alpha_bar", "linear_beta_t", "cosine", "edm_lognormal"])
def test_noise_sampling_schemes(scheme):
    config = make_config("tiny", [f"noise_sampling={scheme}"])
    alpha_bar = sample_alpha_bar(config, 20000, "cpu", torch.Generator().manual_seed(0))
    assert alpha_bar.min() > 0 and alpha_bar.max() < 1
    if scheme == "uniform_alpha_bar":
        assert abs(alpha_bar.mean().item() - 0.5) < 0.01
    if scheme == "linear_beta_t":
        assert torch.isin(alpha_bar, linear_alpha_bar().clamp(1e-5, 1 - 1e-5)).all()
    if scheme == "cosine":  # t ~ U[0,1] and alpha_bar(0.5) = about 0.5
        assert abs(alpha_bar.median().item() - 0.49) < 0.02
    if scheme == "edm_lognormal":  # median sigma = exp(-1.2)
        sigma = ((1 - alpha_bar) / alpha_bar).sqrt()
        assert abs(sigma.log().median().item() + 1.2) < 0.03


@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_each_target_implies_the_right_x0_and_eps(target):
    config = make_config("tiny", [f"target={target}"])
    g = torch.Generator().manual_seed(0)
    x0, eps, alpha_bar = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g), torch.rand(4, generator=g) * 0.9 + 0.05
    x_t = add_noise(x0, eps, alpha_bar)
    x0_hat, eps_hat = x0_and_eps_of(config, target_of(config, x0, eps, alpha_bar), x_t, alpha_bar)
    assert torch.allclose(x0_hat, x0, atol=1e-4) and torch.allclose(eps_hat, eps, atol=1e-4)


def test_min_snr_weight():
    config = make_config("tiny", ["loss_weighting=min_snr_5"])
    alpha_bar = torch.tensor([0.5, 0.99])  # SNR 1 and 99
    assert torch.allclose(loss_weight(config, alpha_bar), torch.tensor([1.0, 5 / 99]), rtol=1e-4)


def test_training_loss_of_a_perfect_eps_predictor_is_zero():
    config = make_config("tiny")
    x0, eps, alpha_bar = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32), torch.rand(3)
    oracle = lambda x_t, a: eps
    assert training_loss(oracle, x0, eps, alpha_bar, config).item() == 0
    assert abs(training_loss(lambda x_t, a: torch.zeros_like(x_t), x0, eps, alpha_bar, config).item()
               - eps.square().mean().item()) < 1e-6


class Recorder(torch.nn.Module):
    """Predicts zero and remembers the noise levels it was given."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, alpha_bar):
        self.seen.append(alpha_bar[0].item())
        return torch.zeros_like(x)


@pytest.mark.parametrize("sampler, steps", [("ddpm", 1000), ("ddpm", 50), ("ddim", 20), ("dpm", 15)])
def test_the_network_is_given_the_alpha_bar_of_each_step(sampler, steps):
    config = make_config("tiny")
    model = Recorder()
    sample(model, config, 2, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0))
    scheduler = make_scheduler(config, sampler, steps, clamp=False)
    expected = scheduler.alphas_cumprod[scheduler.timesteps].tolist()
    assert len(model.seen) == steps
    assert model.seen == pytest.approx(expected, rel=1e-6)
    assert model.seen[0] < 1e-3  # every sampler starts from (nearly) pure noise


def test_clamping_keeps_the_predicted_x0_in_range():
    config = make_config("tiny")
    wild = lambda x, a: torch.full_like(x, -50.0)  # an eps that implies a far-out x0
    with torch.no_grad():
        free = sample(wild, config, 2, sampler="ddim", steps=10, clamp=False, generator=torch.Generator().manual_seed(0))
        clamped = sample(wild, config, 2, sampler="ddim", steps=10, clamp=True, generator=torch.Generator().manual_seed(0))
    assert free.abs().max() > 10
    assert clamped.min() >= -1 - 1e-5 and clamped.max() <= 1 + 1e-5
