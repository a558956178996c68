"""The denoiser: one configurable UNet. Every network switch of config.py is read here, once.

The seed's network (preset `seed`): a head conv, three down levels of two ResBlocks and a
max-pool, two ResBlocks in the middle at 4x4, three up levels that concatenate both skips of the
matching down level, and a 1x1 tail with an unbounded output. It is not told the noise level.

    python unet.py --preset seed          # summary and exact parameter count (138,624,003)
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import ArgumentParser, run_main
from config import PRESETS, ConfigError, make_config


# ---- the switches: each field of the configuration is turned into modules in one place --------

def make_norm(config, channels):
    if config.norm == "batch":
        return nn.BatchNorm2d(channels)
    if config.norm == "group":
        return nn.GroupNorm(config.norm_groups or math.gcd(32, channels), channels)
    return nn.Identity()


def make_act(config):
    return {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU}[config.act]()


def make_down(config, channels):
    if config.down == "maxpool":
        return nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    return nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)


def make_up(config, channels):
    if config.up == "nearest":
        return nn.Upsample(scale_factor=2, mode="nearest")
    return nn.ConvTranspose2d(channels, channels, kernel_size=4, stride=2, padding=1)


def make_tail(config, channels):
    conv = nn.Conv2d(channels, 3, kernel_size=1)
    return conv if config.tail == "conv" else nn.Sequential(conv, nn.Tanh())


def noise_embedding_dim(config):
    """Width of the noise-level embedding; 0 when the network is not told the noise level."""
    return 4 * config.channels[0] if config.noise_cond == "film" else 0


MAX_LEVELS = 6  # channels: the head, then down levels at 32, 16, 8, 4, 2 (the middle at 1x1 after the last)


def check_network(config, image_size):
    """A one-line ConfigError for network fields that cannot work together: channels gives the
    levels, and with them the resolutions that attention can be at."""
    if not 1 <= len(config.channels) <= MAX_LEVELS:
        raise ConfigError(f"--set channels={config.channels}: give 1 to {MAX_LEVELS} widths (the head's, then one per "
                          f"down level of a {image_size}x{image_size} image)")
    resolutions = [image_size >> level for level in range(len(config.channels))]
    unused = [r for r in config.attention if r not in resolutions]
    if unused:
        raise ConfigError(f"--set attention={config.attention}: the network has no resolution {unused[0]}; with channels "
                          f"{config.channels} it has {', '.join(map(str, resolutions))}")
    if config.norm_groups and config.norm != "group":
        raise ConfigError(f"--set norm_groups={config.norm_groups}: it sets GroupNorm's groups and norm is "
                          f"{config.norm}; drop it or --set norm=group")
    if config.norm_groups and any(width % config.norm_groups for width in config.channels):
        raise ConfigError(f"--set norm_groups={config.norm_groups}: every width of channels {config.channels} "
                          f"must be a multiple of it; pick a divisor of {math.gcd(*config.channels)}, or 0 "
                          f"(DDPM's 32 where the widths allow)")
    if config.arch == "diffusers" and (config.noise_cond, config.norm) != ("film", "group"):
        # UNet2DModel is always told the noise level and always normalises by groups; its down, up, tail
        # and initialisation are its own, whatever those fields say (DiffusersUNet).
        raise ConfigError(f"--set arch=diffusers: UNet2DModel is told the noise level and uses GroupNorm; it cannot "
                          f"run with noise_cond={config.noise_cond}, norm={config.norm}")


# ---- building blocks ---------------------------------------------------------------------------

class NoiseEmbedding(nn.Module):
    """alpha_bar -> log-SNR -> sinusoidal features -> MLP. The log-SNR, log(alpha_bar / (1 -
    alpha_bar)), spreads the levels evenly where alpha_bar itself crowds near 0 and 1 (Kingma et al.
    2021, Variational Diffusion Models)."""

    def __init__(self, dim):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(1000), dim // 8)), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(dim // 4, dim), nn.SiLU(), nn.Linear(dim, dim), nn.SiLU())

    def forward(self, alpha_bar):
        alpha_bar = alpha_bar.float().clamp(1e-8, 1 - 1e-8)
        log_snr = (torch.log(alpha_bar) - torch.log1p(-alpha_bar)).clamp(-20, 20)
        angles = (log_snr / 20)[:, None] * self.freqs[None, :]
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=1))


class ConvBlock(nn.Module):
    """Conv3x3 -> norm -> (FiLM) -> activation -> dropout."""

    def __init__(self, config, c_in, c_out, emb_dim):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)
        self.norm = make_norm(config, c_out)
        # FiLM (Perez et al. 2018): the noise level scales and shifts the normalised features.
        # Zero-initialised, so training starts from the unconditioned block.
        self.film = nn.Linear(emb_dim, 2 * c_out) if emb_dim else None
        if self.film is not None:
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)
        self.act = make_act(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, emb):
        h = self.norm(self.conv(x))
        if self.film is not None:
            scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        return self.dropout(self.act(h))


class ResBlock(nn.Module):
    def __init__(self, config, c_in, c_out, emb_dim):
        super().__init__()
        self.block1 = ConvBlock(config, c_in, c_out, emb_dim)
        self.block2 = ConvBlock(config, c_out, c_out, emb_dim)
        self.skip = nn.Conv2d(c_in, c_out, kernel_size=1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        return self.block2(self.block1(x, emb), emb) + self.skip(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual."""

    def __init__(self, config, channels):
        super().__init__()
        self.heads = next(h for h in range(max(1, channels // 64), 0, -1) if channels % h == 0)  # heads of 64 or more
        self.norm = make_norm(config, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Stage(nn.Module):
    """A ResBlock followed by self-attention when its resolution is listed in `attention`."""

    def __init__(self, config, c_in, c_out, emb_dim, resolution):
        super().__init__()
        self.res = ResBlock(config, c_in, c_out, emb_dim)
        self.attn = SelfAttention(config, c_out) if resolution in config.attention else None

    def forward(self, x, emb):
        x = self.res(x, emb)
        return x if self.attn is None else self.attn(x)


# ---- the network -------------------------------------------------------------------------------

class UNet(nn.Module):
    def __init__(self, config, image_size=32):
        super().__init__()
        check_network(config, image_size)
        self.config = config
        c = config.channels
        emb_dim = noise_embedding_dim(config)
        self.noise_embedding = NoiseEmbedding(emb_dim) if emb_dim else None
        self.head = nn.Conv2d(3, c[0], kernel_size=5, padding=2)

        self.down = nn.ModuleList()
        res = image_size
        for c_in, c_out in zip(c[:-1], c[1:]):
            self.down.append(nn.ModuleDict(dict(
                res1=Stage(config, c_in, c_out, emb_dim, res),
                res2=Stage(config, c_out, c_out, emb_dim, res),
                pool=make_down(config, c_out),
            )))
            res //= 2
        self.middle = nn.ModuleList([Stage(config, c[-1], c[-1], emb_dim, res) for _ in range(2)])
        self.up = nn.ModuleList()
        for c_in, c_out in zip(c[:0:-1], c[-2::-1]):
            res *= 2
            # c_in is both the width coming up and the width of the skips h1 and h2 at this level.
            self.up.append(nn.ModuleDict(dict(
                upsample=make_up(config, c_in),
                res1=Stage(config, 2 * c_in, c_in, emb_dim, res),
                res2=Stage(config, 2 * c_in, c_out, emb_dim, res),
            )))
        self.tail = make_tail(config, c[0])

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
        if config.zero_init:
            zero_init_(self)

    def forward(self, x, alpha_bar):
        emb = self.noise_embedding(alpha_bar) if self.noise_embedding is not None else None
        h = self.head(x)
        skips = []
        for level in self.down:
            h1 = level["res1"](h, emb)
            h2 = level["res2"](h1, emb)
            skips.append((h1, h2))
            h = level["pool"](h2)
        for stage in self.middle:
            h = stage(h, emb)
        for level, (h1, h2) in zip(self.up, reversed(skips)):
            h = level["upsample"](h)
            h = level["res1"](torch.cat([h, h2], dim=1), emb)
            h = level["res2"](torch.cat([h, h1], dim=1), emb)
        return self.tail(h)

    def sampling_mode(self):
        """eval() for sampling: no dropout; BatchNorm uses its running statistics, or the statistics
        of the batch being sampled when bn_sampling_stats=batch."""
        self.eval()
        if self.config.bn_sampling_stats == "batch":
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.train()
                    m.track_running_stats = False  # use the batch's statistics, leave the running ones untouched
                    m.running_mean = m.running_var = None
        return self


class DiffusersUNet(nn.Module):
    """arch=diffusers: diffusers' own UNet2DModel, the peer of our UNet, in the layout of DDPM's
    CIFAR-10 network (Ho et al. 2020; diffusers' google/ddpm-cifar10-32): one level per width of
    config.channels, each with two ResBlocks, GroupNorm (DDPM's 32 groups: gcd(32, widths), or
    config.norm_groups), a strided-conv down and a nearest-plus-conv up, single-head self-attention at
    the resolutions of config.attention (DDPM's: 16) and always in the middle block, and a sinusoidal
    timestep embedding added in every ResBlock. It takes config.channels, attention, dropout, act and
    norm_groups; down, up, tail, zero_init and bn_sampling_stats describe our UNet and are not used,
    and check_network refuses noise_cond and norm values it cannot follow. It is told the noise level
    as diffusers' networks expect: the step of DDPM's linear schedule at that level
    (diffusion.timestep_of)."""

    def __init__(self, config, image_size=32):
        super().__init__()
        from diffusers import UNet2DModel
        check_network(config, image_size)
        self.config = config
        attention = [image_size >> level in config.attention for level in range(len(config.channels))]
        self.unet = UNet2DModel(  # google/ddpm-cifar10-32's settings, at config.channels' widths
            sample_size=image_size, in_channels=3, out_channels=3, block_out_channels=config.channels,
            layers_per_block=2, dropout=config.dropout, norm_eps=1e-6,
            norm_num_groups=config.norm_groups or math.gcd(32, *config.channels),
            act_fn=config.act, attention_head_dim=None, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)))

    def forward(self, x, alpha_bar):
        from diffusion import timestep_of
        return self.unet(x, timestep_of(alpha_bar, self.config)).sample

    def sampling_mode(self):
        return self.eval()  # no BatchNorm: only dropout changes


def make_network(config, image_size=32):
    """The denoiser that config.arch names."""
    return DiffusersUNet(config, image_size) if config.arch == "diffusers" else UNet(config, image_size)


def zero_init_kills_branches(config):
    """True where zero_init leaves every residual branch untrainable: it zeroes the branch just before
    its activation, and ReLU's gradient at 0 is 0, so nothing reaches the zeroed layer (SiLU's and
    GELU's is 1/2). The cpu study's act_relu measured this (x2.6); act_relu_zero_init_off is ReLU without it."""
    return config.arch == "ours" and config.zero_init and config.act == "relu"


def zero_init_(model):
    """The untrained network outputs exactly 0, and each residual branch (ResBlock, attention)
    adds exactly 0, as in DDPM and ADM (Ho et al. 2020; Dhariwal & Nichol 2021, zero_module).
    With the eps target the first loss is then E[eps^2] = 1 instead of whatever a random output
    costs. Our branches end in conv -> norm -> FiLM -> activation, so the layer to zero is the
    norm's affine scale and shift (a zeroed conv would be undone by the norm after it, as in
    Goyal et al. 2017's zero-gamma ResNets); without a norm, the conv itself."""
    def zero_(*modules):
        for m in modules:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    for m in model.modules():
        if isinstance(m, ResBlock):
            last = m.block2
            zero_(last.conv if isinstance(last.norm, nn.Identity) else last.norm)
        elif isinstance(m, SelfAttention):
            zero_(m.proj)
    zero_(model.tail if isinstance(model.tail, nn.Conv2d) else model.tail[0])


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def forward_flops(model, batch_size=1, image_size=32):
    """FLOPs of one forward pass, counted by torch (a multiply-add is 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode
    device = next(model.parameters()).device
    x = torch.zeros(batch_size, 3, image_size, image_size, device=device)
    alpha_bar = torch.full((batch_size,), 0.5, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, alpha_bar)
    model.train(was_training)
    return counter.get_total_flops() / batch_size


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="default", help=f"one of {', '.join(PRESETS)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one configuration field")
    parser.add_argument("--full", action="store_true", help="print every module")
    args = parser.parse_args(argv)
    config = make_config(args.preset, args.set)
    model = make_network(config)
    if args.full:
        print(model)
    print(f"preset {args.preset}: channels {config.channels}, noise_cond {config.noise_cond}, norm {config.norm}, "
          f"attention {config.attention or 'none'}")
    for name, child in model.named_children():
        print(f"  {name:<16} {count_parameters(child):>13,} parameters")
    print(f"  {'total':<16} {count_parameters(model):>13,} parameters")
    print(f"  forward pass: {forward_flops(model) / 1e9:.2f} GFLOP per 32x32 image "
          f"(a training step is about 3x that)")


if __name__ == "__main__":
    run_main(main)
