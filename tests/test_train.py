import contextlib
import json
import math
import os
import signal
import subprocess
import time

import pytest
import torch

from testkit import PYTHON, REPO, make_avatar_folder, one_line_error, run_script, tiny_train_args


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return make_avatar_folder(root / "train", 64), make_avatar_folder(root / "val", 16, first_index=1_000_000)


def train(data, run_dir, *extra):
    result = run_script("train.py", *tiny_train_args(data[0], data[1], str(run_dir), *extra))
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def log_records(run_dir, kind):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


@pytest.mark.slow
def test_loss_falls_on_a_16_image_set(tmp_path):
    images = make_avatar_folder(tmp_path / "sixteen", 16)
    run = tmp_path / "run"
    train((images, images), run, "--max_steps", 60, "--log_every", 10, "--num_epochs", 1000, "--validate_every", 30)
    losses = [r["train_loss"] for r in log_records(run, "train")]
    assert [r["step"] for r in log_records(run, "train")] == list(range(10, 61, 10))
    # Measured here: about 3.0 over the first 10 steps and 0.2 over the last 10 of 100; 60 steps (as here) pass too.
    assert losses[-1] < losses[0] / 5, losses
    vals = [r["val_loss"] for r in log_records(run, "validation")]
    assert len(vals) == 2 and vals[1] < vals[0]
    assert os.path.getsize(run / "loss_curve.png") > 1000


def state_of(path):
    checkpoint = torch.load(path, weights_only=True)
    return checkpoint


def assert_same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}/{i}")
    else:
        assert a == b, where


@pytest.mark.slow
def test_interrupt_and_resume_is_exact(data, tmp_path):
    # 64 images in batches of 16: 4 steps an epoch, so a stop after 6 steps is mid-epoch.
    # Dropout and flips are on, so the RNG state has to be restored too, and the epoch's flips
    # redrawn at the same positions.
    extra = ("--set", "dropout=0.2", "--set", "hflip=true", "--seed", "3", "--log_every", 2)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(data, straight, "--max_steps", 10, *extra)
    train(data, resumed, "--max_steps", 6, *extra)
    assert state_of(resumed / "latest_model.pth")["step"] == 6
    result = train(data, resumed, "--max_steps", 10, *extra)
    assert "resuming" in result.stdout
    a, b = state_of(straight / "latest_model.pth"), state_of(resumed / "latest_model.pth")
    assert a["step"] == b["step"] == 10 and a["epoch"] == b["epoch"] == 2
    for key in ("model", "ema", "optimizer", "rng"):
        assert_same_tensors(a[key], b[key], key)
    # the resumed log has the same train records as the straight one, no duplicates
    assert [r["step"] for r in log_records(resumed, "train")] == [r["step"] for r in log_records(straight, "train")]
    assert [r["train_loss"] for r in log_records(resumed, "train")] == pytest.approx(
        [r["train_loss"] for r in log_records(straight, "train")], rel=1e-6)


@pytest.mark.slow
def test_an_epoch_checkpoint_written_while_training_went_on_resumes_exactly(data, tmp_path):
    # Checkpoints are written in the background; 1.pth must hold step 4's state, not a later one.
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(data, straight, "--max_steps", 8, "--save_every", 1, "--seed", 5)
    assert state_of(straight / "1.pth")["step"] == 4
    resumed.mkdir()
    (resumed / "latest_model.pth").write_bytes((straight / "1.pth").read_bytes())
    train(data, resumed, "--max_steps", 8, "--seed", 5)
    a, b = state_of(straight / "latest_model.pth"), state_of(resumed / "latest_model.pth")
    for key in ("model", "ema", "optimizer", "rng"):
        assert_same_tensors(a[key], b[key], key)


@pytest.mark.slow
def test_checkpoint_holds_everything_and_loads_weights_only(data, tmp_path):
    train(data, tmp_path, "--max_steps", 8, "--save_every", 1)
    checkpoint = torch.load(tmp_path / "latest_model.pth", weights_only=True)
    assert {"config", "model", "ema", "optimizer", "step", "epoch", "rng", "best_validation_loss"} <= checkpoint.keys()
    assert checkpoint["config"]["channels"] == [16, 32, 32, 32] or checkpoint["config"]["channels"] == (16, 32, 32, 32)
    assert sorted(os.listdir(tmp_path)) == ["1.pth", "2.pth", "best_validation_checkpoint.pth", "latest_model.pth",
                                            "log.jsonl", "loss_curve.png"]
    written = [(r["step"], r["name"]) for r in log_records(tmp_path, "checkpoint") if not r["name"].startswith("best")]
    assert written == [(4, "1.pth"), (4, "latest_model.pth"), (8, "2.pth"), (8, "latest_model.pth")]


@pytest.mark.slow
def test_no_best_checkpoint_writes_none_and_still_validates(data, tmp_path):
    train(data, tmp_path, "--max_steps", 8, "--no_best_checkpoint")
    assert sorted(os.listdir(tmp_path)) == ["latest_model.pth", "log.jsonl", "loss_curve.png"]
    assert [r["step"] for r in log_records(tmp_path, "validation")] == [4, 8]
    assert [r["name"] for r in log_records(tmp_path, "checkpoint")] == ["latest_model.pth"]


@pytest.mark.slow
def test_truncated_checkpoint_is_one_line_and_older_ones_still_load(data, tmp_path):
    run = tmp_path / "run"
    train(data, run, "--max_steps", 8, "--save_every", 1)
    latest = run / "latest_model.pth"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    line = one_line_error(run_script("train.py", *tiny_train_args(data[0], data[1], str(run), "--max_steps", 12)))
    assert str(latest) in line and "truncated" in line
    line = one_line_error(run_script("generate.py", "--checkpoint", latest, "--generated_image_save_dir", tmp_path / "g",
                                     "--device", "cpu"))
    assert str(latest) in line
    result = run_script("generate.py", "--checkpoint", run / "2.pth", "--generated_image_save_dir", tmp_path / "g",
                        "--device", "cpu", "--steps", 3)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_resume_with_another_configuration_is_refused(data, tmp_path):
    train(data, tmp_path, "--max_steps", 2)
    line = one_line_error(run_script("train.py", *tiny_train_args(data[0], data[1], str(tmp_path), "--max_steps", 4,
                                                                  "--set", "norm=batch")))
    assert "norm" in line and "--fresh" in line
    result = train(data, tmp_path, "--max_steps", 3, "--set", "norm=batch", "--fresh")
    assert "resuming" not in result.stdout
    assert torch.load(tmp_path / "latest_model.pth", weights_only=True)["config"]["norm"] == "batch"


@pytest.mark.parametrize("extra, expected", [
    (("--set", "norm=layer"), "--set norm=layer: choose one of batch, group, none"),
    (("--preset", "huge"), "--preset 'huge' is unknown"),
    (("--batch_size", 1000), "--batch_size 1000 is larger than the 64 images"),
    (("--batch_size", 0), "argument --batch_size: 0 must be at least 1 (see --help)"),
    (("--set", "batch_size=0"), "--set batch_size=0: must be in [1, inf)"),
    (("--log_every", 0), "argument --log_every: 0 must be at least 1 (see --help)"),
    (("--max_steps", -3), "argument --max_steps: -3 must be 0 or more (see --help)"),
    (("--learning_rate=-1e-4",), "argument --learning_rate: -1e-4 must be positive (see --help)"),
    (("--max_minutes", "nan"), "argument --max_minutes: nan must be 0 or more (see --help)"),
    (("--visdom_port", 70000), "argument --visdom_port: 70000 is not a TCP port (1 to 65535) (see --help)"),
    (("--num_epochs", "ten"), "argument --num_epochs: 'ten' is not an integer (see --help)"),
])
def test_bad_flags_are_one_line_errors(data, tmp_path, extra, expected):
    import train
    from cli import UserError
    with pytest.raises(UserError) as error:
        train.main(tiny_train_args(data[0], data[1], str(tmp_path / "run"), *extra))
    assert str(error.value).startswith(expected) and "\n" not in str(error.value), error.value
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_bad_flag_exits_2_with_one_line(data, tmp_path):
    result = run_script("train.py", *tiny_train_args(data[0], data[1], str(tmp_path), "--batch_size", 0))
    assert result.returncode == 2
    assert one_line_error(result) == "error: argument --batch_size: 0 must be at least 1 (see --help)"


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_is_a_one_line_error(data, tmp_path):
    # A folder where latest_model.pth should go: the write fails as a full disk would, after training.
    (tmp_path / "latest_model.pth").mkdir()
    (tmp_path / "latest_model.pth" / "keep").write_text("mine")
    result = run_script("train.py", *tiny_train_args(data[0], data[1], str(tmp_path), "--fresh", "--max_steps", 2))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().split("\n")[-1]  # after the progress bar, on a line of its own
    assert last.startswith("error: ") and "latest_model.pth: cannot write the checkpoint" in last, last
    assert (tmp_path / "latest_model.pth" / "keep").read_text() == "mine"
    assert not [name for name in os.listdir(tmp_path) if ".tmp" in name]


@pytest.mark.slow
def test_ctrl_c_saves_an_exact_checkpoint(data, tmp_path):
    args = [PYTHON, os.path.join(REPO, "train.py"), *tiny_train_args(data[0], data[1], str(tmp_path), "--num_epochs",
                                                                     10000, "--log_every", 2)]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(proc, tmp_path, 4)
    assert not (tmp_path / "latest_model.pth").exists()  # --save_minutes 10 has not come round: the stop writes it
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in out
    checkpoint = torch.load(tmp_path / "latest_model.pth", weights_only=True)
    assert checkpoint["step"] >= 4
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


@pytest.mark.slow
def test_a_decaying_schedule_resumes_exactly_after_ctrl_c(data, tmp_path):
    """Stopped anywhere by Ctrl-C and resumed with the same flags, a cosine schedule to --max_kimg
    ends exactly where an uninterrupted run does."""
    extra = ("--max_kimg", 0.512, "--set", "lr_schedule=cosine", "--set", "warmup_steps=4", "--seed", 2,
             "--log_every", 2, "--num_epochs", 1000)  # 0.512 kimg in batches of 16: 32 steps
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(data, straight, *extra)
    proc = subprocess.Popen([PYTHON, os.path.join(REPO, "train.py"),
                             *tiny_train_args(data[0], data[1], str(resumed), *extra)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(proc, resumed, 6)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    stopped_at = state_of(resumed / "latest_model.pth")["step"]
    assert 6 <= stopped_at < 32, stopped_at
    assert "resuming" in train(data, resumed, *extra).stdout
    a, b = state_of(straight / "latest_model.pth"), state_of(resumed / "latest_model.pth")
    assert a["step"] == b["step"] == 32
    for key in ("model", "ema", "optimizer"):
        assert_same_tensors(a[key], b[key], key)
    lrs = [r["lr"] for r in log_records(straight, "train")]
    assert lrs == [r["lr"] for r in log_records(resumed, "train") if r["step"] != stopped_at or r["step"] % 2 == 0]
    # warm-up to 1e-3 (tiny's rate) at step 4, then half a cosine to 0 at step 32
    assert lrs[1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 32)))
    assert lrs[-1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 31 / 32))) and lrs[-1] < 1e-4


@pytest.mark.slow
def test_latest_checkpoint_is_written_on_the_clock(data, tmp_path):
    """A run killed outright (no Ctrl-C handler runs) loses at most --save_minutes of training."""
    args = [PYTHON, os.path.join(REPO, "train.py"),
            *tiny_train_args(data[0], data[1], str(tmp_path), "--num_epochs", 10000, "--log_every", 2,
                             "--save_minutes", 0.002, "--save_every", 10000, "--validate_every", 10000)]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(proc, tmp_path, 8)
    time.sleep(1)  # the background writer finishes the file it started
    proc.kill()
    proc.communicate(timeout=60)
    assert state_of(tmp_path / "latest_model.pth")["step"] >= 4


def wait_for_step(proc, run_dir, step, timeout=120):
    """Until the run's log holds a train record at `step` or later."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError, ValueError):  # absent, or a line being written
            if any(r["step"] >= step for r in log_records(run_dir, "train")):
                return
        time.sleep(0.2)
    raise AssertionError(f"no train record at step {step} within {timeout} s")


# ---- the optimisation fields, each tested through train.py's own step -------------------------------

def one_step(overrides, step=0, seed=0):
    """(model before, model after, EMA after, optimiser) of one train_step on a fixed tiny batch."""
    import copy
    from config import make_config
    from train import make_ema, make_optimizer, make_train_step
    from unet import UNet
    config = make_config("tiny", ["dropout=0", *overrides])
    torch.manual_seed(seed)
    model = UNet(config)
    before = copy.deepcopy(model)
    ema = make_ema(model, config)
    optimizer = make_optimizer(model, config, fused=False)
    g = torch.Generator().manual_seed(1)
    x0, eps, alpha_bar = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1, torch.randn(4, 3, 32, 32, generator=g), \
        torch.rand(4, generator=g)
    make_train_step(model, model, ema, optimizer, config, None)(x0, eps, alpha_bar, step)
    return before, model, ema, optimizer


def weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("step, expected", [(0, 1e-3 / 10), (4, 5e-3 / 10), (9, 1e-3), (500, 1e-3)])
def test_warmup_ramps_the_learning_rate_linearly(step, expected):
    _, _, _, optimizer = one_step(["warmup_steps=10", "learning_rate=1e-3"], step=step)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    _, _, _, optimizer = one_step(["warmup_steps=0", "learning_rate=1e-3"], step=step)
    assert optimizer.param_groups[0]["lr"] == 1e-3


def test_grad_clip_bounds_the_gradient_norm():
    _, model, _, _ = one_step(["grad_clip=0"])
    free = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    _, model, _, _ = one_step(["grad_clip=0.01"])
    clipped = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert free > 1 and clipped == pytest.approx(0.01, rel=1e-4)  # measured: free about 30


def test_weight_decay_shrinks_the_weights_as_adamw_says():
    # AdamW (Loshchilov & Hutter 2019, Algorithm 2): p <- p - lr * (adam_update + weight_decay * p).
    before, plain, _, _ = one_step(["optimizer=adamw", "learning_rate=1e-3", "weight_decay=0"])
    _, decayed, _, _ = one_step(["optimizer=adamw", "learning_rate=1e-3", "weight_decay=0.5"])
    assert torch.allclose(weights(decayed) - weights(plain), -1e-3 * 0.5 * weights(before), atol=1e-7)
    assert (weights(decayed) - weights(plain)).abs().max() > 1e-5


def test_the_optimizer_field_picks_adam_or_adamw():
    # With weight decay, Adam adds it to the gradient (L2) instead of decaying the weights.
    assert type(one_step(["optimizer=adam"])[3]) is torch.optim.Adam
    assert type(one_step(["optimizer=adamw"])[3]) is torch.optim.AdamW


def test_ema_follows_the_weights_with_its_ramped_decay():
    from train import ema_decay_at
    from config import make_config
    before, model, ema, _ = one_step(["ema_decay=0.999"], step=20)
    decay = ema_decay_at(make_config("tiny", ["ema_decay=0.999"]), 20)
    assert decay == pytest.approx(21 / 30)  # (1 + step) / (10 + step), below 0.999 this early
    assert torch.allclose(weights(ema), decay * weights(before) + (1 - decay) * weights(model), atol=1e-7)
    _, model, ema, _ = one_step(["ema_decay=0"])
    assert ema is model


# ---- bad input: one line, exit status 2 --------------------------------------------------------------

@pytest.mark.slow
def test_a_checkpoint_folder_that_cannot_be_created_is_a_one_line_error(data, tmp_path):
    (tmp_path / "a_file").write_text("mine")
    result = run_script("train.py", *tiny_train_args(data[0], data[1], str(tmp_path / "a_file" / "run"), "--max_steps", 1))
    assert result.returncode == 2
    line = one_line_error(result)
    assert line.startswith(f"error: --model_checkpoint_dir {tmp_path / 'a_file' / 'run'}: cannot create this folder"), line
    assert (tmp_path / "a_file").read_text() == "mine"


def test_a_sample_preview_leaves_the_batchnorm_statistics_in_place():
    # bn_sampling_stats=batch samples with the batch's statistics; the EMA that training goes on
    # with, and that the checkpoint saves, must keep its running ones.
    from config import make_config
    from train import preview_samples
    from unet import UNet
    config = make_config("tiny", ["norm=batch", "bn_sampling_stats=batch", "sampling_steps=2"])
    ema = UNet(config)
    keys = set(ema.state_dict())
    from speed import Plan
    assert preview_samples(ema, config, "cpu", Plan("fp32", False, "test"), n=2).shape == (2, 3, 32, 32)
    assert set(ema.state_dict()) == keys and ema.training


def test_a_resumed_run_keeps_the_preset_it_was_started_with(tmp_path):
    import checkpoint
    from test_checkpoint import tiny_state
    from train import Processes, configure, parse_args
    config, state = tiny_state()
    checkpoint.write(tmp_path / "latest_model.pth", state.to_checkpoint(config, "tiny"))
    argv = ["--model_checkpoint_dir", str(tmp_path)]  # no --preset: args.preset is the default's name
    args = parse_args(argv)
    resumed_config, resume_from = configure(args, argv, str(tmp_path / "latest_model.pth"), Processes("cpu"))
    assert (resumed_config, args.preset, resume_from["step"]) == (config, "tiny", 7)


def test_without_cuda_and_without_preset_it_trains_the_cpu_preset_and_says_so(tmp_path, capsys):
    """A newcomer's `bash train_UNet.sh` on a laptop trains preset small (the CPU study's network),
    not the 20.0M-parameter default; an explicit --preset still wins, and so does a run folder's
    own checkpoint (test above)."""
    from config import CPU_PRESET, make_config
    from train import Processes, configure, parse_args
    argv = ["--model_checkpoint_dir", str(tmp_path)]
    args = parse_args(argv)
    config, _ = configure(args, argv, str(tmp_path / "latest_model.pth"), Processes("cpu"))
    assert (args.preset, config) == (CPU_PRESET, make_config(CPU_PRESET)) and CPU_PRESET == "small"
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and said[0].startswith("train.py: no CUDA GPU, so preset small") and "--preset default" in said[0]
    argv = ["--model_checkpoint_dir", str(tmp_path), "--preset", "default"]
    args = parse_args(argv)
    config, _ = configure(args, argv, str(tmp_path / "latest_model.pth"), Processes("cpu"))
    assert (args.preset, config) == ("default", make_config("default")) and capsys.readouterr().out == ""


# ---- the learning-rate schedule and where the run ends ------------------------------------------------

@pytest.mark.parametrize("schedule, at_half, at_end", [("constant", 1.0, 1.0), ("cosine", 0.5, 0.0),
                                                        ("linear", 0.5, 0.0)])
def test_lr_schedule_decays_to_the_end_of_the_run(schedule, at_half, at_end):
    from config import make_config
    from train import learning_rate_at
    config = make_config("tiny", [f"lr_schedule={schedule}", "learning_rate=1e-3", "warmup_steps=10"])
    assert learning_rate_at(config, 100, 0.0) == pytest.approx(1e-3)
    assert learning_rate_at(config, 100, 0.5) == pytest.approx(1e-3 * at_half)
    assert learning_rate_at(config, 100, 1.0) == pytest.approx(1e-3 * at_end)
    assert learning_rate_at(config, 4, 0.5) == pytest.approx(1e-3 * 0.5 * at_half)  # warm-up times the decay
    if schedule == "cosine":
        assert learning_rate_at(config, 100, 0.25) == pytest.approx(1e-3 * (1 + math.sqrt(0.5)) / 2)


def run_end(*argv, batch_size=16, steps_per_epoch=4):
    from config import make_config
    from train import RunEnd, parse_args
    return RunEnd.of(parse_args([str(a) for a in argv]), make_config("tiny", [f"batch_size={batch_size}"]), steps_per_epoch)


def test_the_run_ends_at_the_first_limit_known():
    assert run_end().progress(1000, 1e6) == 0  # no limit: the schedule stays constant
    assert run_end("--max_kimg", 1).steps == 63  # ceil(1000 / 16)
    end = run_end("--max_kimg", 1, "--max_steps", 50)
    assert (end.steps, end.steps_flag) == (50, "--max_steps 50")
    assert end.progress(25, 0) == 0.5
    end = run_end("--max_steps", 100, "--max_minutes", 2)
    assert end.progress(10, 60) == 0.5 and end.progress(80, 60) == 0.8 and end.progress(100, 300) == 1
    assert run_end("--num_epochs", 10).progress(20, 0) == 0.5  # 10 epochs of 4 steps
    assert run_end().epoch_steps == 0  # the seed's 5000 epochs, not given, are a cap but not an end


def test_the_progress_bar_counts_to_the_runs_known_end():
    """The bar's total is the first end: the step limits, all epochs, or --max_minutes at the speed so far."""
    all_epochs = 5000 * 4  # the seed's 5,000 epochs of 4 steps: the bar's total when nothing else ends the run
    assert run_end().last_step(0, 0, all_epochs) == all_epochs
    assert run_end("--max_kimg", 1).last_step(0, 0, all_epochs) == 63
    end = run_end("--max_minutes", 5)
    assert end.last_step(0, 0, all_epochs) == all_epochs  # the speed is not known yet
    assert end.last_step(0, 0, all_epochs, seconds_per_step=0.5) == 600  # 300 s at 0.5 s a step
    assert end.last_step(100, 100, all_epochs, seconds_per_step=0.5) == 500  # 200 s left
    assert end.last_step(100, 400, all_epochs, seconds_per_step=0.5) == 100  # past the end
    assert run_end("--max_minutes", 5, "--max_steps", 50).last_step(0, 0, all_epochs, 0.5) == 50


# ---- torch.compile where it pays ------------------------------------------------------------------------

def test_the_compile_cache_is_persistent_and_movable(monkeypatch, tmp_path):
    from cli import compile_cache_dir
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache_dir() == str(tmp_path / "simple_ddpm" / "torchinductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
    assert compile_cache_dir() == "/somewhere/else"


@pytest.mark.slow
def test_a_run_that_stops_at_a_limit_mid_epoch_is_validated_there(data, tmp_path):
    train(data, tmp_path, "--max_kimg", 0.096, "--validate_every", 1000)  # 6 steps: an epoch is 4
    assert [r["step"] for r in log_records(tmp_path, "validation")] == [6]


# ---- the random streams: one per purpose, derived from --seed ---------------------------------------------

def first_draws(overrides=(), seed=0, steps=3, num_images=64):
    """What a fresh run of train.py draws: the initial weights, torch's global stream after the
    model is built (dropout), and the first `steps` batches' (indices, flips, alpha_bar, eps) of
    epoch 0, through build_state, epoch_draws and batch_draws, the functions the loop calls."""
    from config import make_config
    from speed import Plan
    from train import Processes, batch_draws, build_state, epoch_draws
    config = make_config("tiny", ["hflip=true", "noise_sampling=uniform_alpha_bar", *overrides])
    state = build_state(config, Processes(torch.device("cpu")), seed, Plan("fp32", False, "test"))
    dropout = torch.rand(8)
    order, flips = epoch_draws(seed, 0, num_images)
    batches = [batch_draws(config, state.noise_generator, order, flips, i, torch.device("cpu")) for i in range(steps)]
    return weights(state.model), dropout, batches


def test_networks_of_other_shapes_on_one_seed_draw_the_same_data_and_noise():
    """A paired ablation: a variant that changes the network's shape (and so how many draws its
    initialisation takes) sees the same order, flips, noise levels, noise and dropout stream."""
    small_weights, small_dropout, small = first_draws(["channels=(8,8,8,8)"])
    large_weights, large_dropout, large = first_draws(["channels=(16,32,32,32)"])
    assert len(small_weights) < len(large_weights)
    assert torch.equal(small_dropout, large_dropout)
    for step, (a, b) in enumerate(zip(small, large)):
        for name, x, y in zip(("order", "flips", "alpha_bar", "eps"), a, b):
            assert torch.equal(x, y), (step, name)
    assert not torch.equal(small[0][3], small[1][3])  # each step draws new noise
    # The order and flips are the epoch's at their position, whatever the noise generator drew before
    # (a variant that draws more noise, or a resume, keeps them).
    from config import make_config
    from train import batch_draws, epoch_draws
    order, flips, _, _ = batch_draws(make_config("tiny"), torch.Generator(), *epoch_draws(0, 0, 64), 2, torch.device("cpu"))
    assert torch.equal(order, small[2][0]) and torch.equal(flips, small[2][1])


def correlation(a, b):
    return torch.corrcoef(torch.stack([a[:len(b)], b[:len(a)]]))[0, 1].item()


def test_the_first_layers_weights_and_the_first_batchs_draws_are_uncorrelated():
    # One seed for both once made the first layer's uniform initialisation an affine map of the
    # first batch's flip draws (correlation 1.0). A batch of 256, so that independent streams'
    # correlation is about N(0, 1/256); the first layer has 1024 weights.
    initial, _, [(_, flips, alpha_bar, eps)] = first_draws(["batch_size=256"], steps=1, num_images=256)
    # uniform_alpha_bar: alpha_bar is the noise stream's uniform draws themselves
    for draws in (flips, alpha_bar, eps.flatten()):
        assert abs(correlation(initial, draws)) < 0.25  # 4 standard deviations
    assert abs(correlation(flips, alpha_bar)) < 0.25


def test_another_seed_draws_other_streams():
    initial_0, dropout_0, (a, *_) = first_draws(seed=0)
    initial_1, dropout_1, (b, *_) = first_draws(seed=1)
    assert not torch.equal(initial_0, initial_1) and not torch.equal(dropout_0, dropout_1)
    for name, x, y in zip(("order", "flips", "alpha_bar", "eps"), a, b):
        assert not torch.equal(x, y), name
    from train import epoch_draws, stream_seed
    assert not torch.equal(epoch_draws(0, 0, 64)[0], epoch_draws(0, 1, 64)[0])  # and each epoch its own order
    assert len({stream_seed(0, purpose) for purpose in ("init", "dropout", "noise", "data")}) == 4
    assert 0 <= stream_seed(2 ** 32 - 1, "noise") < 2 ** 63
