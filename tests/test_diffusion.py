import dataclasses
import math

import pytest
import torch

from config import ConfigError, make_config
from diffusion import (add_noise, check_noise_process, cosine_alpha_bar, linear_alpha_bar, loss_weight, make_scheduler,
                       sample, sample_alpha_bar, target_of, timestep_of, training_loss, x0_and_eps_of)


def sampling(config, **fields):
    """The configuration with other sampling fields, as callers of `sample` pass them."""
    return dataclasses.replace(config, **fields)


def test_linear_schedule_matches_diffusers():
    scheduler = make_scheduler(sampling(make_config("seed"), sampler="ddpm", sampling_steps=1000, clamp_x0=False))
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
    config = sampling(make_config("tiny"), sampler=sampler, sampling_steps=steps)
    model = Recorder()
    sample(model, config, 2, generator=torch.Generator().manual_seed(0))
    scheduler = make_scheduler(config)
    expected = scheduler.alphas_cumprod[scheduler.timesteps].tolist()
    assert len(model.seen) == steps
    assert model.seen == pytest.approx(expected, rel=1e-6)
    assert model.seen[0] < 1e-3  # every sampler starts from (nearly) pure noise


def test_clamping_keeps_the_predicted_x0_in_range():
    config = sampling(make_config("tiny"), sampler="ddim", sampling_steps=10)
    wild = lambda x, a: torch.full_like(x, -50.0)  # an eps that implies a far-out x0
    with torch.no_grad():
        free = sample(wild, sampling(config, clamp_x0=False), 2, generator=torch.Generator().manual_seed(0))
        clamped = sample(wild, sampling(config, clamp_x0=True), 2, generator=torch.Generator().manual_seed(0))
    assert free.abs().max() > 10
    assert clamped.min() >= -1 - 1e-5 and clamped.max() <= 1 + 1e-5


@pytest.mark.parametrize("sampler, scheduler_class", [("ddpm", "DDPMScheduler"), ("ddim", "DDIMScheduler"),
                                                      ("dpm", "DPMSolverMultistepScheduler")])
def test_make_scheduler_reads_sampler_steps_and_clamping_from_the_config(sampler, scheduler_class):
    config = sampling(make_config("tiny"), sampler=sampler, sampling_steps=7)
    assert type(make_scheduler(config)).__name__ == scheduler_class
    assert len(make_scheduler(config).timesteps) == 7
    # With clamping the network's output is turned into x0 before the scheduler sees it.
    assert make_scheduler(sampling(config, clamp_x0=False)).config.prediction_type == "epsilon"
    assert make_scheduler(sampling(config, clamp_x0=True)).config.prediction_type == "sample"


def zero_eps(x, alpha_bar):
    return torch.zeros_like(x)


def test_ddim_eta_scales_the_step_noise_linearly():
    # With eps = 0 a DDIM step is x_prev = sqrt(alpha_bar_prev / alpha_bar) x + sigma z, whatever eta,
    # and sigma is proportional to eta (Song et al. 2021, eq. 16). Started from the same noise with
    # the same step noise z, the outputs differ from eta = 0's by an amount proportional to eta.
    config = sampling(make_config("tiny"), sampler="ddim", sampling_steps=10, clamp_x0=False)
    x = {eta: sample(zero_eps, sampling(config, eta=eta), 4, generator=torch.Generator().manual_seed(0)).double()
         for eta in (0.0, 0.5, 1.0)}
    noise_1, noise_half = x[1.0] - x[0.0], x[0.5] - x[0.0]
    assert noise_1.std() > 10  # measured: 39, beside a deterministic part of std 100
    # Measured: equal to 1e-4, the float32 rounding of values up to 400.
    assert torch.allclose(noise_half, 0.5 * noise_1, rtol=0, atol=1e-3)


class GeneratorDrawer(torch.nn.Module):
    """Predicts eps = 0, and draws from the sampling generator when `draws`: that changes every step
    noise z that the sampler draws after it, but not the start noise drawn before the first step."""

    def __init__(self, generator, draws):
        super().__init__()
        self.generator, self.draws = generator, draws

    def forward(self, x, alpha_bar):
        if self.draws:
            torch.randn(7, generator=self.generator)
        return torch.zeros_like(x)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_with_eta_0_depends_on_the_start_noise_alone(eta):
    config = sampling(make_config("tiny"), sampler="ddim", sampling_steps=10, eta=eta)
    outputs = []
    for draws in (False, True):
        generator = torch.Generator().manual_seed(0)
        outputs.append(sample(GeneratorDrawer(generator, draws), config, 2, generator=generator))
    assert torch.equal(outputs[0], outputs[1]) == (eta == 0)


def test_cosine_sampling_schedule_is_nichol_and_dhariwals():
    config = sampling(make_config("tiny"), sampler="ddpm", sampling_steps=1000, sampling_schedule="cosine")
    alpha_bar = make_scheduler(config).alphas_cumprod.double()
    # diffusers' step t ends at time (t + 1) / 1000 of the continuous schedule. Measured: equal to a
    # relative 6e-7 (float32); at t / 1000 instead (one step off) they differ by up to 75%.
    t = torch.arange(999, dtype=torch.float64)
    assert torch.allclose(alpha_bar[:999], cosine_alpha_bar((t + 1) / 1000), rtol=1e-5, atol=0)
    assert alpha_bar[999] < 1e-8  # alpha_bar(1) = 0, kept just above by the last beta's cap of 0.999
    linear = make_scheduler(sampling(config, sampling_schedule="linear")).alphas_cumprod.double()
    assert (alpha_bar - linear).abs().max() > 0.4  # measured 0.45, at t = 408


def test_sample_follows_the_sampling_schedule():
    config = sampling(make_config("tiny"), sampler="ddim", sampling_steps=10)
    seen, outputs = {}, {}
    for schedule in ("linear", "cosine"):
        model = Recorder()
        outputs[schedule] = sample(model, sampling(config, sampling_schedule=schedule), 2,
                                   generator=torch.Generator().manual_seed(0))
        seen[schedule] = model.seen
    timesteps = make_scheduler(config).timesteps  # 999, 888, ..., 0 for both schedules
    assert seen["cosine"] == pytest.approx(cosine_alpha_bar((timesteps.double() + 1) / 1000).tolist(), rel=1e-5, abs=1e-8)
    assert seen["linear"] == pytest.approx(linear_alpha_bar()[timesteps].tolist(), rel=1e-5)
    assert not torch.allclose(outputs["linear"], outputs["cosine"])


def test_an_unknown_sampler_is_refused_not_replaced():
    # config_from_dict and dataclasses.replace skip config.py's checks; the scheduler is the last gate.
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        make_scheduler(dataclasses.replace(make_config("tiny"), sampler="euler"))


# ---- zero terminal SNR and trailing steps (Lin et al. 2024) ----------------------------------------

@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm"])
def test_the_zero_terminal_snr_schedule_is_diffusers_rescaled_one(sampler):
    """Training's table and every sampler's schedule are one schedule: DDPM's linear one, rescaled so
    that its last level is pure noise and its first is unchanged."""
    ours = linear_alpha_bar(None, True)
    assert ours[-1].item() == 0 and ours[0].item() == linear_alpha_bar()[0].item()
    assert (ours[1:] < ours[:-1]).all()
    config = make_config("small", ["zero_terminal_snr=true", "target=v", f"sampler={sampler}"])
    theirs = make_scheduler(config).alphas_cumprod
    # diffusers keeps DPM-Solver's last level at 2^-24, so that its sigma is finite
    assert torch.allclose(theirs[:-1], ours[:-1], rtol=1e-4, atol=1e-6) and theirs[-1].item() <= 2 ** -24
    draws = sample_alpha_bar(config, 20000, "cpu", torch.Generator().manual_seed(0))
    assert draws.min().item() == 0 and torch.isin(draws, ours.clamp(max=1 - 1e-5)).all()
    off = sample_alpha_bar(dataclasses.replace(config, zero_terminal_snr=False), 20000, "cpu", torch.Generator().manual_seed(0))
    assert off.min().item() >= 1e-5


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm"])
def test_trailing_steps_start_from_pure_noise_and_the_network_is_told_so(sampler):
    config = make_config("small", ["zero_terminal_snr=true", "target=v", f"sampler={sampler}", "sampling_steps=10",
                                   "timestep_spacing=trailing"])
    model = Recorder()
    x = sample(model, config, 2, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()
    assert len(model.seen) == 10 and model.seen[0] == 0 and all(a > 0 for a in model.seen[1:])
    assert list(make_scheduler(config).timesteps[:2]) == [999, 899]  # trailing: 999, 899, ..., 99
    # Each sampler's own spacing is unchanged: DDPM's leading steps start at 900, not at pure noise.
    own = make_scheduler(dataclasses.replace(config, timestep_spacing="sampler")).timesteps
    assert (own[0].item() == 900) == (sampler == "ddpm")


def test_min_snr_weights_are_their_limits_at_pure_noise():
    alpha_bar = torch.tensor([0.0, 0.5])
    for target, at_zero in (("eps", 1.0), ("x0", 0.0), ("v", 0.0)):
        weight = loss_weight(make_config("tiny", ["loss_weighting=min_snr_5", f"target={target}"]), alpha_bar)
        assert torch.isfinite(weight).all() and weight[0].item() == pytest.approx(at_zero, abs=1e-9), target


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_timestep_of_inverts_the_training_schedule(zero_terminal_snr):
    config = make_config("small", ["target=v", f"zero_terminal_snr={zero_terminal_snr}"])
    table = linear_alpha_bar(None, zero_terminal_snr)
    t = torch.tensor([0, 1, 10, 500, 950, 998, 999])
    assert torch.allclose(timestep_of(table[t], config), t.float(), atol=1e-3)
    between = timestep_of((table[10:11] + table[11:12]) / 2, config)
    assert 10 < between.item() < 11
    assert timestep_of(torch.tensor([1.0, 0.0]), config).tolist() == [0.0, 999.0]  # beyond the ends


@pytest.mark.parametrize("bad", ["target=eps", "noise_sampling=cosine", "sampling_schedule=cosine"])
def test_zero_terminal_snr_refuses_what_cannot_use_it(bad):
    """At pure noise an eps prediction says nothing about x0 (a division by 0); and the rescaled
    schedule is the linear one, which the other noise samplings and sampling schedules do not use."""
    config = make_config("small", ["zero_terminal_snr=true", "target=v", bad])
    with pytest.raises(ConfigError, match=f"--set zero_terminal_snr=true needs target=v .*; drop --set {bad} "):
        check_noise_process(config)
    check_noise_process(make_config("small", ["zero_terminal_snr=true", "target=v"]))
    check_noise_process(make_config("small", [bad]))  # without the rescaled schedule, anything goes
