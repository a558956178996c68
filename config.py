"""The configuration: one field per ablation switch, and the presets.

Each field is read in exactly one module: the network's in unet.py, the noise process's and the
samplers' in diffusion.py, the data's in dataset.py, the optimisation's in train.py
(tests/test_config.py checks the source). Other modules pass the Config along, or change a field
with dataclasses.replace, as checkpoint.load_for_sampling does with the sampler flags. A preset is
a small dict of field values on top of the seed's; `--set key=value` changes any one field.

    python config.py --preset default --set norm=batch      # print a configuration
"""
import ast
import dataclasses
import json
from dataclasses import dataclass, fields

from cli import ArgumentParser, UserError, run_main


@dataclass
class Config:
    # ---- network (unet.py); defaults are the seed's -------------------------------------------
    arch: str = "ours"              # ours (UNet, the fields below) | diffusers (diffusers' UNet2DModel, DDPM's CIFAR-10 layout)
    channels: tuple = (128, 256, 512, 1024)  # head width, then the width of each down level
    noise_cond: str = "none"        # none | film: the noise level, embedded, scales and shifts each ResBlock
    norm: str = "batch"             # batch | group | none
    norm_groups: int = 0            # GroupNorm's groups, every layer; 0: gcd(32, width) (arch=diffusers: all widths)
    act: str = "silu"               # silu | relu | gelu
    dropout: float = 0.1
    down: str = "maxpool"           # maxpool | conv (strided 3x3)
    up: str = "nearest"             # nearest | transposed (transposed conv)
    attention: tuple = ()           # resolutions with self-attention, e.g. (8,) or (16, 8)
    tail: str = "conv"              # conv (unbounded output) | tanh
    bn_sampling_stats: str = "running"  # running | batch: BatchNorm statistics at sampling time
    zero_init: bool = False         # zero the output layer and the last layer of each residual branch (DDPM, ADM)
    # ---- data (dataset.py) --------------------------------------------------------------------
    data_range: str = "-1,1"        # -1,1 | 0,1
    hflip: bool = False             # random horizontal flips during training
    # ---- noise levels during training (diffusion.py) ------------------------------------------
    noise_sampling: str = "uniform_alpha_bar"  # uniform_alpha_bar | linear_beta_t | cosine | edm_lognormal
    target: str = "eps"             # eps | x0 | v
    loss_weighting: str = "none"    # none | min_snr_5 (Hang et al. 2023)
    zero_terminal_snr: bool = False # the linear-beta schedule rescaled so that its last level is pure noise (Lin et al. 2024), training and sampling
    # ---- optimisation (train.py) --------------------------------------------------------------
    optimizer: str = "adam"         # adam | adamw
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    batch_size: int = 230
    ema_decay: float = 0.0          # 0: no EMA (the EMA weights are the weights)
    warmup_steps: int = 0
    grad_clip: float = 0.0          # 0: no clipping
    lr_schedule: str = "constant"   # constant | cosine | linear: decay to 0 at the end of the run, when it is known
    # ---- sampling (diffusion.py) --------------------------------------------------------------
    sampler: str = "ddpm"           # ddpm | ddim | dpm (DPM-Solver++ 2M), all diffusers schedulers
    sampling_steps: int = 1000
    sampling_schedule: str = "linear"  # linear (betas 1e-4..0.02 over 1000 steps) | cosine
    eta: float = 0.0                # DDIM's eta (0: deterministic)
    clamp_x0: bool = False          # clamp the predicted x0 to the data range at each step
    timestep_spacing: str = "sampler"  # sampler (DDPM leading, DDIM linspace, DPM-Solver uniform in log-SNR) | trailing (equal strides in t from t = 999; Lin et al. 2024)


CHOICES = {
    "arch": ("ours", "diffusers"),
    "noise_cond": ("none", "film"),
    "norm": ("batch", "group", "none"),
    "act": ("silu", "relu", "gelu"),
    "down": ("maxpool", "conv"),
    "up": ("nearest", "transposed"),
    "tail": ("conv", "tanh"),
    "bn_sampling_stats": ("running", "batch"),
    "data_range": ("-1,1", "0,1"),
    "noise_sampling": ("uniform_alpha_bar", "linear_beta_t", "cosine", "edm_lognormal"),
    "target": ("eps", "x0", "v"),
    "loss_weighting": ("none", "min_snr_5"),
    "optimizer": ("adam", "adamw"),
    "lr_schedule": ("constant", "cosine", "linear"),
    "sampler": ("ddpm", "ddim", "dpm"),
    "sampling_schedule": ("linear", "cosine"),
    "timestep_spacing": ("sampler", "trailing"),
}

# Fields added after the study had rows, whose default is exactly what every run did before the
# field existed. The study's config_hash leaves such a field out while it is at its default, so that
# adding a switch does not make every finished row stale (ablations/rows.py). Add a new field here
# only when its default changes nothing.
NEUTRAL_AT_DEFAULT = ("arch", "zero_terminal_snr", "timestep_spacing", "norm_groups")

# Numeric fields: (lowest, highest, whether the bounds themselves are allowed).
RANGES = {
    "norm_groups": (0, None, "[)"),
    "dropout": (0.0, 1.0, "[)"),
    "learning_rate": (0.0, None, "()"),
    "weight_decay": (0.0, None, "[)"),
    "batch_size": (1, None, "[)"),
    "ema_decay": (0.0, 1.0, "[)"),
    "warmup_steps": (0, None, "[)"),
    "grad_clip": (0.0, None, "[)"),
    "sampling_steps": (1, 1000, "[]"),  # the 1,000 steps of the training noise schedule (diffusion.py)
    "eta": (0.0, 1.0, "[]"),  # above 1 DDIM's step variance exceeds what the step leaves (NaN)
}

PRESETS = {
    # Exactly the seed: 138,624,003 parameters, not told the noise level, Adam at 1e-5, batch 230.
    "seed": {},
    # The best configuration we know so far: a network a quarter of the seed's width that is told
    # the noise level and starts from a zero output (zero_init), group norm, EMA, AdamW with
    # warm-up, DDPM's own noise levels, and DPM-Solver++ for sampling. The ablation study revised
    # it with evidence (ablations/cpu/REPORT.md, "The default preset"): no horizontal flips (a
    # mirrored avatar is not one the data set has) and strided-conv downsampling; the study's
    # scales pin the old values (ablations/study.py, REVISED_FIELDS).
    "default": dict(
        channels=(64, 128, 256, 256), noise_cond="film", norm="group", attention=(8,), zero_init=True,
        down="conv", noise_sampling="linear_beta_t", optimizer="adamw", learning_rate=2e-4, batch_size=230,
        ema_decay=0.999, warmup_steps=500, grad_clip=1.0, hflip=False,
        sampler="dpm", sampling_steps=25, clamp_x0=True,
    ),
    # The default's recipe at a width that trains on a CPU in minutes: the `cpu` scale of the
    # ablation study, and what train.py trains on a machine without CUDA unless --preset is given.
    # Its width and budget were chosen by the curve, its learning rate by the sweep at batch 64
    # (ablations/cpu/REPORT.md): 2e-3 is the lower of the two best rates, 2e-3 and 4e-3, which
    # scored within 2% of each other on one seed.
    "small": dict(
        channels=(16, 32, 64, 64), noise_cond="film", norm="group", attention=(8,), zero_init=True,
        down="conv", noise_sampling="linear_beta_t", optimizer="adamw", learning_rate=2e-3, batch_size=64,
        ema_decay=0.999, warmup_steps=200, grad_clip=1.0, hflip=False,
        sampler="dpm", sampling_steps=25, clamp_x0=True,
    ),
    # Seconds per epoch on a CPU, for tests.
    "tiny": dict(
        channels=(16, 32, 32, 32), noise_cond="film", norm="group", dropout=0.0,
        noise_sampling="linear_beta_t", optimizer="adamw", learning_rate=1e-3, batch_size=16,
        ema_decay=0.9, sampler="ddim", sampling_steps=20,
    ),
}


CPU_PRESET = "small"  # train.py's preset on a machine without CUDA, when --preset is not given


class ConfigError(UserError):
    """A bad preset name or --set value."""


def make_config(preset="default", overrides=()):
    """A Config from a preset name and `key=value` strings; bad keys or values raise ConfigError."""
    if preset not in PRESETS:
        raise ConfigError(f"--preset {preset!r} is unknown: choose one of {', '.join(PRESETS)}")
    config = Config(**PRESETS[preset])
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"--set {item!r} is not KEY=VALUE")
        config = dataclasses.replace(config, **{key: parse_value(key, text.strip())})
    return config


def parse_value(key, text):
    """Parse one `--set` value into the field's type, and check it against the field's choices."""
    types = {f.name: type(f.default) for f in fields(Config)}
    if key not in types:
        raise ConfigError(f"--set {key}: unknown key; known keys: {', '.join(types)}")
    kind = types[key]
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "on", "off", "yes", "no"):
                raise ValueError
            value = text.lower() in ("true", "1", "on", "yes")
        elif kind is tuple:
            value = () if text.lower() in ("", "none", "()") else ast.literal_eval(text)
            value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
            if not all(isinstance(v, int) and v > 0 for v in value):
                raise ValueError
        elif kind is float:
            value = float(text)
        elif kind is int:
            value = int(text)
        else:
            value = text
    except (ValueError, SyntaxError):
        raise ConfigError(f"--set {key}={text}: expected a {kind.__name__}") from None
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"--set {key}={text}: choose one of {', '.join(CHOICES[key])}")
    if key in RANGES and not in_range(value, *RANGES[key]):
        low, high, bounds = RANGES[key]
        raise ConfigError(f"--set {key}={text}: must be in {bounds[0]}{low}, {'inf' if high is None else high}{bounds[1]}")
    return value


def in_range(value, low, high, bounds):
    above = value >= low if bounds[0] == "[" else value > low
    below = high is None or (value <= high if bounds[1] == "]" else value < high)
    return above and below  # False for NaN


def config_to_dict(config):
    return dataclasses.asdict(config)


def config_from_dict(d):
    """Rebuild a Config saved in a checkpoint; lists become tuples again, unknown keys are ignored."""
    names = {f.name: f for f in fields(Config)}
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
    return Config(**values)


def config_text(config):
    return json.dumps(config_to_dict(config), indent=1)


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="default", help=f"one of {', '.join(PRESETS)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    print(config_text(make_config(args.preset, args.set)))


if __name__ == "__main__":
    run_main(main)
