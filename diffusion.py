"""The noise process: which noise levels training sees, what the network predicts, the loss, and
the samplers. All noise-level maths lives in this file.

Notation (Ho et al. 2020): x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps, eps ~ N(0, I).
The network is given alpha_bar itself, never a step index, so one trained network works with every
sampler and number of steps.
"""
import functools
import math

import torch
from tqdm import tqdm

from config import ConfigError
from dataset import data_bounds

NUM_TRAIN_TIMESTEPS = 1000
LINEAR_BETA_START, LINEAR_BETA_END = 1e-4, 0.02  # DDPM's linear schedule (Ho et al. 2020, sec. 4)


@functools.lru_cache(maxsize=None)
def linear_alpha_bar(device=None, zero_terminal_snr=False):
    """alpha_bar_t for t = 0..999 of DDPM's linear beta schedule (one copy per device, so that the
    training step never copies it from the host). zero_terminal_snr: rescaled so that the last level
    is pure noise, alpha_bar_999 = 0 (Lin et al. 2024, Algorithm 1: sqrt(alpha_bar) shifted to end at 0
    and scaled to keep its first value); DDPM's own ends at 4e-5, so that some signal is left at the
    level where sampling starts from pure noise."""
    betas = torch.linspace(LINEAR_BETA_START, LINEAR_BETA_END, NUM_TRAIN_TIMESTEPS, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, dim=0)
    if zero_terminal_snr:
        root = alpha_bar.sqrt()
        alpha_bar = ((root - root[-1]) * root[0] / (root[0] - root[-1])).square()
    return alpha_bar.float().to(device)


def timestep_of(alpha_bar, config):
    """The step t, fractional, at which the training schedule (DDPM's linear one, rescaled where
    config.zero_terminal_snr) reaches alpha_bar: how diffusers' networks are told the noise level
    (arch=diffusers). Levels beyond the schedule's ends take t = 0 or t = 999."""
    table = linear_alpha_bar(str(alpha_bar.device), config.zero_terminal_snr)  # falling with t
    a = alpha_bar.float().clamp(table[-1], table[0])
    upper = torch.searchsorted(-table, -a).clamp(1, NUM_TRAIN_TIMESTEPS - 1)  # table[upper - 1] >= a >= table[upper]
    before, after = table[upper - 1], table[upper]
    return (upper - 1) + (before - a) / (before - after)


def cosine_alpha_bar(t):
    """Continuous cosine schedule, t in [0, 1] (Nichol & Dhariwal 2021, eq. 17, s = 0.008)."""
    s = 0.008
    return (torch.cos((t + s) / (1 + s) * math.pi / 2) / math.cos(s / (1 + s) * math.pi / 2)) ** 2


def check_noise_process(config):
    """A one-line ConfigError for noise fields that cannot work together. zero_terminal_snr puts the
    last level at pure noise: an eps prediction says nothing about x0 there (x0 = (x - eps) / 0), so
    it needs target v or x0 (Lin et al. 2024, sec. 3.2); and the schedule it rescales is the linear
    one, which training draws from only with noise_sampling=linear_beta_t and sampling uses only
    with sampling_schedule=linear."""
    if not config.zero_terminal_snr:
        return
    wrong = [f"{k}={getattr(config, k)}" for k, ok in (("target", ("v", "x0")), ("noise_sampling", ("linear_beta_t",)),
                                                      ("sampling_schedule", ("linear",))) if getattr(config, k) not in ok]
    if wrong:
        raise ConfigError(f"--set zero_terminal_snr=true needs target=v (or x0), noise_sampling=linear_beta_t and "
                          f"sampling_schedule=linear; drop --set {wrong[0]} or zero_terminal_snr")


# ---- training ----------------------------------------------------------------------------------

def sample_alpha_bar(config, n, device, generator=None):
    """The noise levels a training batch sees (config.noise_sampling)."""
    u = torch.rand(n, device=device, generator=generator)
    if config.noise_sampling == "uniform_alpha_bar":  # the seed's: alpha_bar ~ U[0, 1]
        alpha_bar = u
    elif config.noise_sampling == "linear_beta_t":  # DDPM: t ~ U{0..999} on the linear-beta schedule
        t = (u * NUM_TRAIN_TIMESTEPS).long().clamp_(max=NUM_TRAIN_TIMESTEPS - 1)
        alpha_bar = linear_alpha_bar(str(device), config.zero_terminal_snr)[t]
    elif config.noise_sampling == "cosine":  # t ~ U[0, 1] on the cosine schedule
        alpha_bar = cosine_alpha_bar(u)
    else:  # edm_lognormal: ln sigma ~ N(-1.2, 1.2^2) (Karras et al. 2022, Table 1), alpha_bar = 1 / (1 + sigma^2)
        log_sigma = -1.2 + 1.2 * math.sqrt(2) * torch.erfinv(2 * u.clamp(1e-6, 1 - 1e-6) - 1)
        alpha_bar = torch.sigmoid(-2 * log_sigma)
    # Pure noise stays pure where the schedule ends there (zero_terminal_snr); elsewhere the levels keep
    # a little signal, as DDPM's schedule does.
    return alpha_bar.clamp(0 if config.zero_terminal_snr else 1e-5, 1 - 1e-5)


def add_noise(x0, eps, alpha_bar):
    a = alpha_bar.view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def target_of(config, x0, eps, alpha_bar):
    """What the network learns to predict (config.target)."""
    a = alpha_bar.view(-1, 1, 1, 1)
    if config.target == "eps":
        return eps
    if config.target == "x0":
        return x0
    return a.sqrt() * eps - (1 - a).sqrt() * x0  # v (Salimans & Ho 2022, sec. 4)


def x0_and_eps_of(config, prediction, x_t, alpha_bar):
    """Both x0 and eps implied by a network output of kind config.target."""
    a = alpha_bar.view(-1, 1, 1, 1)
    if config.target == "eps":
        eps = prediction
        x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    elif config.target == "x0":
        x0 = prediction
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
    else:
        x0 = a.sqrt() * x_t - (1 - a).sqrt() * prediction
        eps = (1 - a).sqrt() * x_t + a.sqrt() * prediction
    return x0, eps


def loss_weight(config, alpha_bar):
    """Per-image weight of the squared error (config.loss_weighting)."""
    if config.loss_weighting == "none":
        return torch.ones_like(alpha_bar)
    # Min-SNR-5 (Hang et al. 2023): weight min(SNR, 5) on the x0 error, expressed for the target.
    snr = (alpha_bar / (1 - alpha_bar)).clamp(min=1e-12)  # at pure noise (SNR 0), the weights' limits
    clipped = snr.clamp(max=5.0)
    return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[config.target]


def training_loss(model, x0, eps, alpha_bar, config):
    """The denoising loss of one batch (Ho et al. 2020, Algorithm 1): noise the images to the
    drawn levels (sample_alpha_bar), denoise, and take the weighted squared error. A scalar."""
    x_t = add_noise(x0, eps, alpha_bar)
    prediction = model(x_t, alpha_bar).float()
    squared_error = (prediction - target_of(config, x0, eps, alpha_bar)).square().mean(dim=(1, 2, 3))
    return (loss_weight(config, alpha_bar) * squared_error).mean()


def eps_error(model, x0, eps, alpha_bar, config):
    """The error of the eps that the network's output implies, whatever its target, image by image:
    eps_hat - eps for the images noised to the given levels."""
    x_t = add_noise(x0, eps, alpha_bar)
    _, eps_hat = x0_and_eps_of(config, model(x_t, alpha_bar).float(), x_t, alpha_bar)
    return eps_hat - eps


def validation_loss(model, x0, eps, alpha_bar, config):
    """Mean squared error of the implied eps on fixed (image, noise, noise level) triples. Measured
    in eps whatever the target, so runs with different targets are compared on one scale."""
    return eps_error(model, x0, eps, alpha_bar, config).square().mean()


# ---- sampling, through diffusers' schedulers -----------------------------------------------------

PREDICTION_TYPE = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def make_scheduler(config):
    """A diffusers scheduler for config.sampler with config.sampling_steps steps, over the sampling
    noise schedule (config.sampling_schedule).

    With clamping (config.clamp_x0) the network's output is turned into a clamped x0 before the
    scheduler sees it (see `sample`), so the scheduler is told to expect x0."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    trailing = config.timestep_spacing == "trailing"
    common = dict(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_schedule={"linear": "linear", "cosine": "squaredcos_cap_v2"}[config.sampling_schedule],
        beta_start=LINEAR_BETA_START, beta_end=LINEAR_BETA_END,
        prediction_type="sample" if config.clamp_x0 else PREDICTION_TYPE[config.target],
        rescale_betas_zero_snr=config.zero_terminal_snr,
    )
    if config.sampler == "ddpm":
        scheduler = DDPMScheduler(**common, clip_sample=False, variance_type="fixed_small",
                                  timestep_spacing="trailing" if trailing else "leading")
    elif config.sampler == "ddim":
        # "linspace" runs from t = 999, the noisiest level (Lin et al. 2024, sec. 3.3), down to t = 0.
        scheduler = DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True,
                                  timestep_spacing="trailing" if trailing else "linspace")
    elif config.sampler == "dpm":
        # Steps uniform in log-SNR, as the DPM-Solver papers recommend (Lu et al. 2022, sec. 3.3): uniform
        # steps in t leave too few steps at low noise, and the samples come out too smooth.
        scheduler = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                                use_lu_lambdas=not trailing, final_sigmas_type="zero",
                                                **({"timestep_spacing": "trailing"} if trailing else {}))
    else:
        raise ValueError(f"unknown sampler {config.sampler!r}: choose ddpm, ddim or dpm")
    scheduler.set_timesteps(config.sampling_steps)
    return scheduler


def sampler_settings(config):
    """The sampling fields as a record for reports and logs, e.g. {"sampler": "dpm", "steps": 25, ...}."""
    return {"sampler": config.sampler, "steps": config.sampling_steps, "schedule": config.sampling_schedule,
            "eta": config.eta, "clamp_x0": config.clamp_x0, "timestep_spacing": config.timestep_spacing}


def sampler_name(config):
    return f"{config.sampler}-{config.sampling_steps}"


@torch.no_grad()
def sample(model, config, num_images, generator=None, device="cpu", progress=False, autocast_dtype=None):
    """Draw num_images samples in the data range with the configuration's sampler, steps, eta and
    clamping (to sample otherwise, pass dataclasses.replace(config, sampler=...)), the network under
    autocast_dtype (bf16, or None: fp32).

    generator: one generator for the batch, or a list of one per image: then image i's start
    noise and every step noise it gets come from generator[i] alone, so an image does not depend
    on the batch it is drawn in. The network is given alpha_bar of the scheduler's current step,
    whatever the sampler."""
    scheduler = make_scheduler(config)
    device = torch.device(device)
    alphas_cumprod = scheduler.alphas_cumprod.to(device, copy=True)
    if config.zero_terminal_snr:
        # DPM-Solver keeps the last level at 2^-24 so that its own sigma stays finite; the network is
        # told the level it was trained at there: pure noise.
        alphas_cumprod[-1] = 0
    low, high = data_bounds(config)
    autocast = torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None)
    step_kwargs = dict(eta=config.eta) if config.sampler == "ddim" else {}

    if isinstance(generator, (list, tuple)):
        if len(generator) != num_images:
            raise ValueError(f"{len(generator)} generators for {num_images} images")
        x = torch.cat([torch.randn((1, 3, 32, 32), generator=g, device=g.device) for g in generator])
        generator = list(generator)
    else:
        x = torch.randn((num_images, 3, 32, 32), generator=generator, device=generator.device if generator else device)
    x = x.to(device) * scheduler.init_noise_sigma
    for t in tqdm(scheduler.timesteps, desc=sampler_name(config), disable=not progress, leave=False):
        alpha_bar = alphas_cumprod[t].expand(num_images)
        with autocast:
            prediction = model(x, alpha_bar).float().contiguous()  # contiguous: from a channels_last network too
        if config.clamp_x0:
            x0, _ = x0_and_eps_of(config, prediction, x, alpha_bar)
            prediction = x0.clamp(low, high)
        x = scheduler.step(prediction, t, x, generator=generator, **step_kwargs).prev_sample
    return x
