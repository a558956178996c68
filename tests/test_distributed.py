"""torchrun with DistributedDataParallel, on the CPU with 2 processes (gloo)."""
import json
import os

import pytest
import torch

from testkit import PYTHON, REPO, make_avatar_folder, run, tiny_train_args


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_avatar_folder(tmp_path_factory.mktemp("ddp") / "train", 64)


def train(images, run_dir, processes, *extra):
    launcher = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
        if processes > 1 else [PYTHON]
    result = run([*launcher, os.path.join(REPO, "train.py"),
                  *tiny_train_args(images, images, str(run_dir), "--log_every", 1, *extra)])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        losses = [r["train_loss"] for r in map(json.loads, f) if r["kind"] == "train"]
    return losses, torch.load(os.path.join(run_dir, "latest_model.pth"), weights_only=True)


def test_two_processes_train_like_one_with_the_same_global_batch(images, tmp_path):
    one, one_ckpt = train(images, tmp_path / "one", 1, "--max_steps", 6)
    two, two_ckpt = train(images, tmp_path / "two", 2, "--max_steps", 6)
    # Each process draws the whole batch's noise and keeps its half, and gradients are averaged:
    # the same maths, summed in another order. Measured here: losses agree to 1e-6.
    assert two == pytest.approx(one, rel=1e-4)
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))  # rank 0 alone writes
    diffs = torch.cat([(one_ckpt["model"][k].float() - two_ckpt["model"][k].float()).flatten() for k in one_ckpt["model"]])
    # Adam's first steps move each weight by about +-lr whatever the gradient's size, so a weight
    # whose gradient is ~0 may go either way; all but a few of them agree closely.
    assert (diffs.abs() < 1e-4).float().mean() > 0.99


def test_two_processes_resume_exactly(images, tmp_path):
    straight, a = train(images, tmp_path / "straight", 2, "--max_steps", 6)
    train(images, tmp_path / "resumed", 2, "--max_steps", 3)
    resumed, b = train(images, tmp_path / "resumed", 2, "--max_steps", 6)
    assert resumed == straight
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_processes_stop_together_on_the_clock(images, tmp_path):
    # Each process reads its own clock; they agree at the log steps (every 2 here) and stop there
    # together. (Processes in lock-step rarely disagree, so this mostly shows the stop is clean.)
    losses, checkpoint = train(images, tmp_path, 2, "--max_minutes", 0.05, "--num_epochs", 100000, "--log_every", 2)
    assert checkpoint["step"] % 2 == 0 and checkpoint["step"] == 2 * len(losses)
