"""tools/loss_by_noise_level.py: the denoising error at each noise level, and its colour part."""
import os
import sys

import pytest
import torch

from checkpoint import write
from config import make_config
from dataset import normalise
from diffusion import linear_alpha_bar
from test_checkpoint import tiny_state
from testkit import make_avatar_folder, one_line_error, run_script

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
from loss_by_noise_level import error_parts  # noqa: E402


class Oracle(torch.nn.Module):
    """Knows the clean images, batch after batch, so it recovers the noise exactly; `spoil` then
    changes its answer."""

    def __init__(self, x0, spoil):
        super().__init__()
        self.x0, self.spoil, self.seen = x0, spoil, 0

    def forward(self, x_t, alpha_bar):
        a, x0 = alpha_bar.view(-1, 1, 1, 1), self.x0[self.seen:self.seen + len(x_t)]
        self.seen += len(x_t)
        return self.spoil((x_t - a.sqrt() * x0) / (1 - a).sqrt())


@pytest.mark.parametrize("t", [100, 900])
def test_the_colour_part_is_the_error_of_each_images_mean_per_channel(t):
    config = make_config("tiny")
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    eps = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x0, alpha_bar = normalise(images, config), linear_alpha_bar()[t]

    def parts(spoil):
        return error_parts(Oracle(x0, spoil), config, images, eps, alpha_bar, batch_size=4)  # two batches

    assert parts(lambda e: e) == pytest.approx((0, 0), abs=1e-8)
    means = eps.mean(dim=(2, 3), keepdim=True)  # the noise's own colour: variance 1/1024 a channel
    total, colour = parts(lambda e: e - e.mean(dim=(2, 3), keepdim=True))  # a network blind to each channel's mean
    assert total == pytest.approx(colour, rel=1e-4) and colour == pytest.approx(means.square().mean().item(), rel=1e-3)
    stripes = torch.where(torch.arange(32) % 2 == 0, 0.1, -0.1).view(1, 1, 1, 32)  # mean 0 in every channel
    total, colour = parts(lambda e: e + stripes)
    assert total == pytest.approx(0.01, rel=1e-4) and colour == pytest.approx(0, abs=1e-10)


def test_it_prints_one_row_a_step_for_every_checkpoint(tmp_path):
    config, state = tiny_state()
    write(tmp_path / "a.pth", state.to_checkpoint(config, "tiny"))
    test_dir = make_avatar_folder(tmp_path / "test", 3)
    result = run_script("tools/loss_by_noise_level.py", "--checkpoint", tmp_path / "a.pth", tmp_path / "a.pth",
                        "--test_dir", test_dir, "--steps", "0,999")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"3 images of {test_dir}, noise seed 0, EMA weights, fp32")
    rows = [line.strip("| ").split(" | ") for line in lines if line.startswith(("| 0 |", "| 999 |"))]
    assert [row[0] for row in rows] == ["0", "999"] and all(len(row) == 6 for row in rows)
    assert all(row[2:4] == row[4:6] for row in rows)  # the same checkpoint twice: the same numbers
    assert all(float(row[3]) <= float(row[2]) for row in rows)  # the colour part is part of the error


@pytest.mark.parametrize("args, message", [
    (["--steps", "0,1000"], "argument --steps: 0,1000: each step t must be in 0..999"),
    (["--steps", "a"], "argument --steps: a: write steps t as integers separated by commas"),
    (["--test_dir", "no_such_folder"], "--test_dir: "),
])
def test_bad_input_is_a_one_line_error(tmp_path, args, message):
    config, state = tiny_state()
    write(tmp_path / "a.pth", state.to_checkpoint(config, "tiny"))
    result = run_script("tools/loss_by_noise_level.py", "--checkpoint", tmp_path / "a.pth", *args)
    assert message in one_line_error(result)


def test_a_missing_checkpoint_is_a_one_line_error(tmp_path):
    test_dir = make_avatar_folder(tmp_path / "test", 2)
    result = run_script("tools/loss_by_noise_level.py", "--checkpoint", tmp_path / "none.pth", "--test_dir", test_dir)
    assert f"{tmp_path / 'none.pth'}: no such checkpoint" in one_line_error(result)
