import itertools

import pytest
import torch

from config import make_config
from testkit import run_script
from unet import UNet, count_parameters


def test_seed_network_has_exactly_the_seeds_parameter_count():
    assert count_parameters(UNet(make_config("seed"))) == 138_624_003


def test_unet_cli_prints_the_exact_count():
    result = run_script("unet.py", "--preset", "seed")
    assert result.returncode == 0, result.stderr
    assert "138,624,003" in result.stdout


@pytest.mark.parametrize("norm, noise_cond", itertools.product(["batch", "group", "none"], ["none", "film"]))
def test_every_norm_and_noise_cond_runs_forward_and_backward(norm, noise_cond):
    torch.manual_seed(0)
    model = UNet(make_config("tiny", [f"norm={norm}", f"noise_cond={noise_cond}"]))
    x, alpha_bar = torch.randn(4, 3, 32, 32), torch.rand(4)
    out = model(x, alpha_bar)
    assert out.shape == (4, 3, 32, 32)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("noise_cond", ["none", "film"])
def test_only_film_networks_are_told_the_noise_level(noise_cond):
    torch.manual_seed(0)
    model = UNet(make_config("tiny", [f"noise_cond={noise_cond}"])).eval()
    for m in model.modules():  # FiLM starts at zero (identity); perturb it so the level matters
        if getattr(m, "film", None) is not None:
            torch.nn.init.normal_(m.film.weight, std=0.1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = model(x, torch.full((2,), 0.1))
        b = model(x, torch.full((2,), 0.9))
    assert torch.equal(a, b) == (noise_cond == "none")


@pytest.mark.parametrize("override", ["act=relu", "act=gelu", "down=conv", "up=transposed", "attention=(16,8)",
                                      "tail=tanh", "dropout=0.3", "channels=(8,16,24,32)"])
def test_other_switches_build_and_run(override):
    model = UNet(make_config("tiny", [override]))
    out = model(torch.randn(2, 3, 32, 32), torch.rand(2))
    assert out.shape == (2, 3, 32, 32)
    if override == "tail=tanh":
        assert out.abs().max() <= 1


def test_switches_change_the_modules():
    names = lambda m: {type(x).__name__ for x in m.modules()}
    assert "MaxPool2d" in names(UNet(make_config("tiny"))) and "MaxPool2d" not in names(UNet(make_config("tiny", ["down=conv"])))
    assert "ConvTranspose2d" in names(UNet(make_config("tiny", ["up=transposed"])))
    assert "SelfAttention" in names(UNet(make_config("tiny", ["attention=(8,)"])))
    assert "BatchNorm2d" in names(UNet(make_config("tiny", ["norm=batch"])))
    assert "GELU" in names(UNet(make_config("tiny", ["act=gelu"])))


def test_batchnorm_statistics_at_sampling_time():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32) * 3 + 1
    outs = {}
    for stats in ("running", "batch"):
        torch.manual_seed(0)
        model = UNet(make_config("tiny", ["norm=batch", f"bn_sampling_stats={stats}"]))
        with torch.no_grad():
            outs[stats] = model.sampling_mode()(x, torch.rand(8))
        assert not model.training or stats == "batch"
    assert not torch.allclose(outs["running"], outs["batch"])
