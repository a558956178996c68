"""Each network switch of config.py is checked for what it promises, in the modules it builds or in
the output, so that a switch unet.py ignored would fail its test."""
import itertools
import math
from collections import Counter

import pytest
import torch
import torch.nn as nn

from config import make_config
from testkit import run_script
from unet import ConvBlock, ResBlock, SelfAttention, UNet, count_parameters

# tiny: channels (16, 32, 32, 32), three down levels and three up levels of two Stages each, and a
# middle of two Stages; every Stage is a ResBlock of two ConvBlocks.
LEVELS = 3
CONV_BLOCKS = 2 * (2 * LEVELS + 2 + 2 * LEVELS)  # 28
ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU}


def build(*overrides, seed=0):
    torch.manual_seed(seed)
    return UNet(make_config("tiny", list(overrides)))


def count(model, kind):
    return sum(isinstance(m, kind) for m in model.modules())


def output_sizes(modules, model, x, alpha_bar):
    """Run the model once; returns, for each module, the (channels, height) of each of its outputs."""
    seen = {m: [] for m in modules}
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen[mod].append(tuple(out.shape[1:3])))
             for m in modules]
    with torch.no_grad():
        model(x, alpha_bar)
    for h in hooks:
        h.remove()
    return [seen[m] for m in modules]


def test_seed_network_has_exactly_the_seeds_parameter_count():
    assert count_parameters(UNet(make_config("seed"))) == 138_624_003


@pytest.mark.slow
def test_unet_cli_prints_the_exact_count():
    result = run_script("unet.py", "--preset", "seed")
    assert result.returncode == 0, result.stderr
    assert "138,624,003" in result.stdout


@pytest.mark.parametrize("norm, noise_cond", itertools.product(["batch", "group", "none"], ["none", "film"]))
def test_every_norm_and_noise_cond_runs_forward_and_backward(norm, noise_cond):
    model = build(f"norm={norm}", f"noise_cond={noise_cond}")
    x, alpha_bar = torch.randn(4, 3, 32, 32), torch.rand(4)
    out = model(x, alpha_bar)
    assert out.shape == (4, 3, 32, 32)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("noise_cond", ["none", "film"])
def test_only_film_networks_are_told_the_noise_level(noise_cond):
    model = build(f"noise_cond={noise_cond}").eval()
    for m in model.modules():  # FiLM starts at zero (identity); perturb it so the level matters
        if getattr(m, "film", None) is not None:
            torch.nn.init.normal_(m.film.weight, std=0.1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = model(x, torch.full((2,), 0.1))
        b = model(x, torch.full((2,), 0.9))
    assert torch.equal(a, b) == (noise_cond == "none")


@pytest.mark.parametrize("act", ["silu", "relu", "gelu"])
def test_act_is_the_activation_of_every_conv_block_and_no_other_is_used(act):
    model = build(f"act={act}")
    blocks = [m for m in model.modules() if isinstance(m, ConvBlock)]
    assert len(blocks) == CONV_BLOCKS
    assert all(type(b.act) is ACTIVATIONS[act] for b in blocks)
    # Outside the noise embedding's MLP (always SiLU) the network has exactly these activations.
    outside = Counter(type(m) for name, m in model.named_modules()
                      if not name.startswith("noise_embedding") and type(m) in ACTIVATIONS.values())
    assert outside == {ACTIVATIONS[act]: CONV_BLOCKS}


def test_act_changes_the_output_of_identical_weights():
    x, alpha_bar = torch.randn(2, 3, 32, 32), torch.rand(2)
    with torch.no_grad():
        outs = {act: build(f"act={act}").eval()(x, alpha_bar) for act in ACTIVATIONS}
    # Activations have no parameters: the same seed gives the same weights, only the act differs.
    for a, b in itertools.combinations(ACTIVATIONS, 2):
        assert (outs[a] - outs[b]).abs().max() > 1e-3, (a, b)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dropout_is_the_rate_of_every_dropout_and_acts_in_training_only(dropout):
    model = build(f"dropout={dropout}")
    rates = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert rates == [dropout] * CONV_BLOCKS
    x, alpha_bar = torch.randn(2, 3, 32, 32), torch.rand(2)
    with torch.no_grad():
        train_a, train_b = model.train()(x, alpha_bar), model(x, alpha_bar)
        eval_a, eval_b = model.eval()(x, alpha_bar), model(x, alpha_bar)
    assert torch.equal(eval_a, eval_b)
    # tiny uses group norm, so train and eval differ by dropout alone.
    assert torch.equal(train_a, train_b) == (dropout == 0)
    assert torch.equal(train_a, eval_a) == (dropout == 0)


@pytest.mark.parametrize("channels", [(16, 32, 32, 32), (8, 16, 24, 40)])
def test_channels_are_the_head_width_then_each_levels_width(channels):
    model = build(f"channels={channels}")
    levels = [model.head] + [level["res2"] for level in model.down] + [model.middle[-1]] \
        + [level["res2"] for level in model.up]
    sizes = output_sizes(levels, model, torch.randn(2, 3, 32, 32), torch.rand(2))
    widths = [s[0][0] for s in sizes]
    c = list(channels)
    assert widths == c + [c[-1]] + c[-2::-1]  # head, down levels, middle, up levels back to the head's width
    # Every conv of a down level produces that level's width.
    for level, width in zip(model.down, c[1:]):
        assert {m.out_channels for m in level.modules() if isinstance(m, nn.Conv2d)} == {width}


def test_channels_change_the_parameter_count():
    counts = {c: count_parameters(build(f"channels={c}")) for c in ["(16,32,32,32)", "(8,16,24,40)", "(16,32,32,64)"]}
    assert len(set(counts.values())) == 3, counts


@pytest.mark.parametrize("down", ["maxpool", "conv"])
def test_down_is_max_pooling_or_a_strided_conv_that_halves_the_size(down):
    model = build(f"down={down}")
    pools = [level["pool"] for level in model.down]
    if down == "maxpool":
        assert all(type(p) is nn.MaxPool2d for p in pools)
    else:
        assert all(type(p) is nn.Conv2d and p.stride == (2, 2) for p in pools)
        assert count(model, nn.MaxPool2d) == 0
    sizes = output_sizes(pools, model, torch.randn(2, 3, 32, 32), torch.rand(2))
    assert [s[0][1] for s in sizes] == [16, 8, 4]


@pytest.mark.parametrize("up", ["nearest", "transposed"])
def test_up_is_nearest_upsampling_or_a_transposed_conv_that_doubles_the_size(up):
    model = build(f"up={up}")
    if up == "nearest":
        assert count(model, nn.Upsample) == LEVELS and count(model, nn.ConvTranspose2d) == 0
        assert all(level["upsample"].mode == "nearest" for level in model.up)
    else:
        assert count(model, nn.ConvTranspose2d) == LEVELS and count(model, nn.Upsample) == 0
    sizes = output_sizes([level["upsample"] for level in model.up], model, torch.randn(2, 3, 32, 32), torch.rand(2))
    assert [s[0][1] for s in sizes] == [8, 16, 32]


@pytest.mark.parametrize("attention", [(), (8,), (16, 8), (4,)])
def test_self_attention_sits_exactly_at_the_listed_resolutions(attention):
    model = build(f"attention={attention}")
    layers = [m for m in model.modules() if isinstance(m, SelfAttention)]
    # Resolutions 32, 16 and 8 have two Stages going down and two coming up; 4 is the middle's two.
    per_resolution = {32: 4, 16: 4, 8: 4, 4: 2}
    assert len(layers) == sum(per_resolution[r] for r in attention)
    sizes = output_sizes(layers, model, torch.randn(2, 3, 32, 32), torch.rand(2))
    assert all(len(s) == 1 for s in sizes)  # each one runs once a forward pass
    assert Counter(s[0][1] for s in sizes) == {r: per_resolution[r] for r in attention}


def test_tail_tanh_is_tanh_of_the_conv_tails_output():
    x, alpha_bar = torch.randn(2, 3, 32, 32), torch.rand(2)
    conv, tanh = build("tail=conv").eval(), build("tail=tanh").eval()
    assert type(conv.tail) is nn.Conv2d
    assert type(list(tanh.modules())[-1]) is nn.Tanh and count(tanh, nn.Tanh) == 1
    for model in (conv, tanh):  # a tail 20x larger than initialised pushes the output far beyond 1
        tail_conv = model.tail if isinstance(model.tail, nn.Conv2d) else model.tail[0]
        tail_conv.weight.data *= 20
    with torch.no_grad():
        free, bounded = conv(x, alpha_bar), tanh(x, alpha_bar)
    assert free.abs().max() > 2
    assert bounded.abs().max() <= 1
    # Same seed, same weights: the tanh tail is exactly the conv tail followed by tanh.
    assert torch.allclose(bounded, torch.tanh(free), atol=1e-6)


NORMS = {"batch": nn.BatchNorm2d, "group": nn.GroupNorm, "none": nn.Identity}


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_norm_is_the_normalisation_of_every_block_and_attention(norm):
    model = build(f"norm={norm}", "attention=(8,)")
    owners = [m for m in model.modules() if isinstance(m, (ConvBlock, SelfAttention))]
    assert len(owners) == CONV_BLOCKS + 4
    assert all(type(m.norm) is NORMS[norm] for m in owners)
    for kind in (nn.BatchNorm2d, nn.GroupNorm):
        assert count(model, kind) == (len(owners) if kind is NORMS[norm] else 0)
    if norm == "group":  # groups of at most 32, dividing the width
        assert all(m.norm.num_groups == {16: 16, 32: 32}[m.norm.num_channels] for m in owners)


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_only_batch_norm_makes_an_image_depend_on_its_batch_in_training(norm):
    model = build(f"norm={norm}").train()
    x, alpha_bar = torch.randn(4, 3, 32, 32), torch.rand(4)
    with torch.no_grad():
        together = model(x, alpha_bar)[:2]
        apart = model(x[:2], alpha_bar[:2])
    assert torch.allclose(together, apart, atol=1e-5) == (norm != "batch")


def test_batchnorm_statistics_at_sampling_time():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32) * 3 + 1
    outs = {}
    for stats in ("running", "batch"):
        model = build("norm=batch", f"bn_sampling_stats={stats}")
        with torch.no_grad():
            outs[stats] = model.sampling_mode()(x, torch.rand(8))
        assert not model.training or stats == "batch"
    assert not torch.allclose(outs["running"], outs["batch"])


@pytest.mark.parametrize("norm", ["group", "batch", "none"])
def test_zero_init_makes_the_output_and_every_residual_branch_exactly_zero(norm):
    config = make_config("default", [f"norm={norm}", "zero_init=true", "attention=(16,8)"])
    torch.manual_seed(0)
    model = UNet(config).train()
    x, alpha_bar = torch.randn(4, 3, 32, 32), torch.rand(4)
    assert torch.equal(model(x, alpha_bar), torch.zeros(4, 3, 32, 32))
    branches = []  # every residual branch adds exactly 0: a ResBlock returns its skip, attention its input
    for m in model.modules():
        if isinstance(m, ResBlock):
            m.register_forward_hook(lambda m, inputs, out: branches.append(torch.equal(out, m.skip(inputs[0]))))
        elif isinstance(m, SelfAttention):
            m.register_forward_hook(lambda m, inputs, out: branches.append(torch.equal(out, inputs[0])))
    model(x, alpha_bar)
    assert len(branches) == 14 + 8 and all(branches)  # 14 ResBlocks, 8 attentions at 16x16 and 8x8
    # and training moves them: the output layer gets a gradient at once
    (model(x, alpha_bar) - torch.randn(4, 3, 32, 32)).square().mean().backward()
    assert model.tail.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("act", ["silu", "relu", "gelu"])
@pytest.mark.parametrize("norm", ["group", "none"])
def test_zero_init_kills_the_residual_branches_exactly_where_relu_meets_it(act, norm):
    """zero_init zeroes each residual branch just before its activation. ReLU's gradient at 0 is 0, so no
    gradient reaches the zeroed layers and the branches never train (the cpu study's act_relu, x2.6):
    zero_init_kills_branches says so exactly then, and train.py warns."""
    from unet import zero_init_kills_branches
    config = make_config("default", [f"act={act}", f"norm={norm}", "zero_init=true", "channels=(16,32)", "attention=()"])
    torch.manual_seed(0)
    model = UNet(config)
    torch.nn.init.normal_(model.tail.weight, std=0.1)  # as after the first step: the tail passes gradient back
    x = torch.randn(4, 3, 32, 32)
    (model(x, torch.rand(4)) - x).square().mean().backward()
    zeroed = [b.block2.conv if norm == "none" else b.block2.norm for b in model.modules() if isinstance(b, ResBlock)]
    alive = [float(m.weight.grad.abs().sum() + m.bias.grad.abs().sum()) > 0 for m in zeroed]
    assert alive == [not zero_init_kills_branches(config)] * len(zeroed)


def test_without_zero_init_the_output_is_far_from_zero():
    torch.manual_seed(0)
    out = UNet(make_config("default", ["zero_init=false"]))(torch.randn(4, 3, 32, 32), torch.rand(4))
    assert out.square().mean() > 1  # measured: about 15 (the issue saw a first loss of 18.7)


def test_the_default_starts_at_a_loss_of_about_one():
    """eps prediction from a zero output costs E[eps^2] = 1 (the issue measured 18.7 without it)."""
    from diffusion import sample_alpha_bar, training_loss
    config = make_config("default")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(64, 3, 32, 32, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    loss = training_loss(UNet(config).train(), x0, eps, sample_alpha_bar(config, 64, "cpu", g), config)
    assert 0.9 < loss.item() < 1.1


@pytest.mark.parametrize("overrides, message", [
    (["attention=(7,)"], r"attention=\(7,\): the network has no resolution 7; with channels \(16, 32, 32, 32\) it has "
                         r"32, 16, 8, 4"),
    (["channels=(16,32)", "attention=(8,)"], "no resolution 8"),
    (["channels=()"], "give 1 to 6 widths"),
    (["channels=(8,8,8,8,8,8,8)"], "give 1 to 6 widths"),  # a 7th level would pool a 1x1 map
])
def test_network_fields_that_cannot_work_together_are_one_line_errors(overrides, message):
    from config import ConfigError
    with pytest.raises(ConfigError, match=message):
        UNet(make_config("tiny", overrides))


def test_the_deepest_network_and_attention_at_any_width_run():
    """Six levels reach 1x1; attention splits any width into heads of at least 64 channels."""
    for overrides in (["channels=(8,8,8,8,8,8)", "attention=(1,)"], ["channels=(16,200)", "attention=(16,)"]):
        model = UNet(make_config("tiny", overrides))
        out = model(torch.randn(2, 3, 32, 32), torch.full((2,), 0.5))
        assert out.shape == (2, 3, 32, 32)


# ---- arch=diffusers: diffusers' own UNet2DModel, the peer --------------------------------------------

def test_arch_diffusers_is_unet2dmodel_in_ddpms_cifar10_layout():
    from diffusers import UNet2DModel
    from unet import DiffusersUNet, make_network
    config = make_config("small", ["arch=diffusers", "attention=(16,)"])
    model = make_network(config)
    assert isinstance(model, DiffusersUNet) and isinstance(model.unet, UNet2DModel)
    assert isinstance(make_network(make_config("small")), UNet)
    unet = model.unet.config
    assert tuple(unet.block_out_channels) == config.channels == (16, 32, 64, 64) and unet.layers_per_block == 2
    assert tuple(unet.down_block_types) == ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")  # 16x16
    assert tuple(unet.up_block_types) == ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    assert unet.time_embedding_type == "positional" and unet.dropout == config.dropout and unet.act_fn == "silu"
    # google/ddpm-cifar10-32's own settings: one attention head, its timestep features and padding
    assert (unet.attention_head_dim, unet.flip_sin_to_cos, unet.freq_shift, unet.downsample_padding, unet.norm_eps) == \
        (None, False, 1, 0, 1e-6)
    assert count(model, nn.GroupNorm) > 0 and count(model, nn.BatchNorm2d) == 0
    assert 1_000_000 < count_parameters(model) < 2_000_000


def test_arch_diffusers_is_told_the_step_of_its_own_schedule():
    """The noise level reaches UNet2DModel as the step t of DDPM's linear schedule at that level,
    and changes the output."""
    from diffusion import linear_alpha_bar
    from unet import make_network
    torch.manual_seed(0)
    model = make_network(make_config("small", ["arch=diffusers", "attention=(16,)"])).eval()
    seen = []
    model.unet.time_proj.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].tolist()))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        quiet = model(x, linear_alpha_bar()[torch.tensor([3, 3])])
        noisy = model(x, linear_alpha_bar()[torch.tensor([900, 900])])
    assert seen[0] == pytest.approx([3, 3], abs=1e-3) and seen[1] == pytest.approx([900, 900], abs=1e-3)
    assert not torch.allclose(quiet, noisy)


@pytest.mark.parametrize("overrides", [["noise_cond=none"], ["norm=batch"], ["norm=none"]])
def test_arch_diffusers_refuses_what_unet2dmodel_cannot_do(overrides):
    from config import ConfigError
    from unet import make_network
    with pytest.raises(ConfigError, match="--set arch=diffusers: UNet2DModel is told the noise level and uses GroupNorm"):
        make_network(make_config("small", ["arch=diffusers", *overrides]))


# ---- norm_groups: GroupNorm's number of groups ---------------------------------------------------

def test_norm_groups_sets_every_groupnorm_and_defaults_to_gcd_32():
    from unet import make_network
    for arch in (["arch=ours"], ["arch=diffusers", "attention=(16,)"]):
        default = make_network(make_config("small", arch))
        groups = {(m.num_groups, m.num_channels) for m in default.modules() if isinstance(m, nn.GroupNorm)}
        if arch == ["arch=ours"]:
            assert all(g == math.gcd(32, c) for g, c in groups) and (16, 16) in groups
        else:  # UNet2DModel takes one count for every layer: DDPM's 32 where the widths allow, here 16
            assert {g for g, _ in groups} == {16} and (16, 16) in groups
        four = make_network(make_config("small", [*arch, "norm_groups=4"]))
        assert {m.num_groups for m in four.modules() if isinstance(m, nn.GroupNorm)} == {4}


def test_unet2dmodel_at_width_16_erases_each_channels_mean_before_its_output_unless_groups_hold_several():
    """At the head's 16 channels DDPM's group count leaves one channel a group: the norm before
    UNet2DModel's last conv is then an instance norm, and a shift of any channel's mean before it
    changes nothing (the peer's colour error, tools/loss_by_noise_level.py). With 4 groups it does."""
    from unet import make_network
    x, alpha_bar = torch.randn(2, 3, 32, 32), torch.full((2,), 0.3)
    outputs = {}
    for groups in ("0", "4"):
        torch.manual_seed(0)
        config = make_config("small", ["arch=diffusers", "attention=(16,)", f"norm_groups={groups}"])
        model = make_network(config).eval()
        shift = torch.randn(1, 16, 1, 1)
        with torch.no_grad():
            plain = model(x, alpha_bar)
            handle = model.unet.conv_norm_out.register_forward_pre_hook(lambda mod, inp: (inp[0] + shift,))
            shifted = model(x, alpha_bar)
            handle.remove()
        outputs[groups] = (shifted - plain).abs().max().item()
    assert outputs["0"] < 1e-5 and outputs["4"] > 1e-2, outputs


@pytest.mark.parametrize("overrides, message", [
    (["norm_groups=3"], "--set norm_groups=3: every width of channels (16, 32, 64, 64) must be a multiple of it"),
    (["norm=batch", "norm_groups=4"], "--set norm_groups=4: it sets GroupNorm's groups and norm is batch"),
])
def test_norm_groups_that_cannot_apply_are_one_line_errors(overrides, message):
    from config import ConfigError
    from unet import make_network
    with pytest.raises(ConfigError) as error:
        make_network(make_config("small", overrides))
    assert str(error.value).startswith(message)
