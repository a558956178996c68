"""checkpoint.py: the format, its round trip, its errors, and files written before the module existed."""
import dataclasses
import math
import os
import re

import pytest
import torch

import checkpoint
from checkpoint import TrainingState
from cli import UserError
from config import config_from_dict, config_to_dict, make_config
from train import make_ema, make_optimizer
from unet import UNet


def tiny_state(seed=0, overrides=("ema_decay=0.9",)):
    config = make_config("tiny", ["channels=(8,8,8,8)", *overrides])
    torch.manual_seed(seed)
    model = UNet(config)
    optimizer = make_optimizer(model, config, fused=False)
    model(torch.randn(2, 3, 32, 32), torch.rand(2)).square().mean().backward()
    optimizer.step()  # so that the optimiser has state to save
    return config, TrainingState(model, make_ema(model, config), optimizer, torch.Generator().manual_seed(seed),
                                 step=7, epoch=1, batch_in_epoch=3, best_validation_loss=0.25)


def same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_a_checkpoint_restores_the_whole_training_state(tmp_path):
    config, state = tiny_state(seed=0)
    with torch.no_grad():
        for p in state.ema.parameters():
            p.add_(1.0)  # an EMA that differs from the model, to catch one loaded into the other
    state.noise_generator.manual_seed(123)
    torch.randn(5, generator=state.noise_generator)
    checkpoint.write(tmp_path / "c.pth", state.to_checkpoint(config, "tiny"))
    expected_noise = torch.randn(3, generator=state.noise_generator)
    expected_global = torch.randn(3)

    _, other = tiny_state(seed=1)
    other.restore(checkpoint.read(tmp_path / "c.pth"))
    assert same(other.model.state_dict(), state.model.state_dict())
    assert same(other.ema.state_dict(), state.ema.state_dict())
    assert same(other.optimizer.state_dict(), state.optimizer.state_dict())
    assert (other.step, other.epoch, other.batch_in_epoch, other.best_validation_loss) == (7, 1, 3, 0.25)
    assert torch.equal(torch.randn(3, generator=other.noise_generator), expected_noise)
    assert torch.equal(torch.randn(3), expected_global)


def test_a_checkpoint_as_main_wrote_it_before_this_module_still_loads(tmp_path):
    """Format 1, exactly as train.py's save() built it before checkpoint.py existed (commit
    1cfbe83), written with a plain torch.save: training resumes from it and sampling reads it."""
    config, state = tiny_state()
    old = {
        "format": 1, "config": config_to_dict(config), "preset": "tiny",
        "model": state.model.state_dict(), "ema": state.ema.state_dict(), "optimizer": state.optimizer.state_dict(),
        "step": 7, "epoch": 1, "batch_in_epoch": 3, "best_validation_loss": math.inf,
        "rng": {"torch": torch.get_rng_state(), "noise": state.noise_generator.get_state(), "cuda": None},
    }
    torch.save(old, tmp_path / "latest_model.pth")
    loaded = checkpoint.read(tmp_path / "latest_model.pth")
    assert checkpoint.saved_config(loaded) == config
    _, resumed = tiny_state(seed=1)
    resumed.restore(loaded)
    assert same(resumed.model.state_dict(), state.model.state_dict()) and resumed.step == 7
    model, sampling = checkpoint.load_for_sampling(tmp_path / "latest_model.pth", "cpu", sampling_steps=3)
    assert same(model.state_dict(), state.ema.state_dict()) and not model.training
    assert sampling == dataclasses.replace(config, sampling_steps=3)


def test_sampler_overrides_replace_only_what_is_given(tmp_path):
    config, state = tiny_state()
    checkpoint.write(tmp_path / "c.pth", state.to_checkpoint(config, "tiny"))
    _, kept = checkpoint.load_for_sampling(tmp_path / "c.pth", "cpu", sampler=None, sampling_steps=None)
    assert kept == config
    _, changed = checkpoint.load_for_sampling(tmp_path / "c.pth", "cpu", sampler="dpm", eta=0.5, clamp_x0=True)
    assert changed == dataclasses.replace(config, sampler="dpm", eta=0.5, clamp_x0=True)
    raw, _ = checkpoint.load_for_sampling(tmp_path / "c.pth", "cpu", use_ema=False)
    assert same(raw.state_dict(), state.model.state_dict())


def test_the_state_to_write_is_a_copy_that_training_cannot_change():
    weights = torch.zeros(3)
    state = {"model": {"w": weights}, "optimizer": {"state": {0: {"exp_avg": weights}}, "param_groups": [{"params": [0]}]}}
    copied = checkpoint.on_cpu(state)
    weights += 1
    assert copied["model"]["w"].sum() == 0 and copied["optimizer"]["state"][0]["exp_avg"].sum() == 0
    assert copied["optimizer"]["param_groups"] == [{"params": [0]}]


def test_a_failed_write_keeps_the_last_good_file_and_no_temporary(tmp_path):
    path = tmp_path / "latest_model.pth"
    path.write_bytes(b"the last good checkpoint")
    with pytest.raises(Exception):
        checkpoint.write(path, {"unpicklable": lambda: None})
    assert path.read_bytes() == b"the last good checkpoint"
    assert os.listdir(tmp_path) == ["latest_model.pth"]


def test_the_background_writer_reports_a_failed_write(tmp_path):
    config, state = tiny_state()
    (tmp_path / "taken.pth").mkdir()  # a folder where the file should go, as a full disk would fail
    writer = checkpoint.BackgroundWriter()
    writer.save(tmp_path / "ok.pth", state, config, "tiny")
    writer.save(tmp_path / "taken.pth", state, config, "tiny")
    with pytest.raises(UserError, match="taken.pth: cannot write the checkpoint"):
        writer.finish()
    assert checkpoint.read(tmp_path / "ok.pth")["step"] == 7


@pytest.mark.parametrize("content, message", [
    (None, "no such checkpoint"),
    (b"garbage", "cannot read this checkpoint"),
    ({"format": 99}, "not a checkpoint of this project (format 1)"),
    ([1, 2, 3], "not a checkpoint of this project"),
])
def test_bad_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "c.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(UserError, match=re.escape(message)) as error:
        checkpoint.read(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_checkpoint_cannot_run_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))
    torch.save({"format": 1, "payload": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="cannot read this checkpoint"):
        checkpoint.read(tmp_path / "evil.pth")
    assert not (tmp_path / "ran").exists()


def test_a_random_state_from_another_kind_of_device_is_a_one_line_error(tmp_path):
    config, state = tiny_state()
    saved = state.to_checkpoint(config, "tiny")
    saved["rng"]["noise"] = torch.zeros(16, dtype=torch.uint8)  # not a CPU generator's state (as a CUDA one)
    saved["rng"]["cuda"] = torch.zeros(16, dtype=torch.uint8)
    with pytest.raises(UserError, match="trained on a CUDA GPU and its random state does not fit --device cpu"):
        state.restore(saved)


# ---- the pretrained model: EMA weights in half precision, its sha256 beside it ------------------------

def test_a_pretrained_model_is_the_ema_in_half_precision_and_samples_like_it(tmp_path):
    config, state = tiny_state()
    checkpoint.write(tmp_path / "run.pth", state.to_checkpoint(config, "tiny"))
    path = str(tmp_path / "pretrained.pth")
    checkpoint.export_pretrained(tmp_path / "run.pth", path, {"trained_by": "a test"})
    saved = torch.load(path, weights_only=True)
    assert set(saved) == {"format", "config", "preset", "ema", "step", "train_seconds", "info"}
    assert all(v.dtype == torch.float16 for v in saved["ema"].values() if v.is_floating_point())
    model, loaded = checkpoint.load_for_sampling(path, "cpu")
    assert loaded == config and next(model.parameters()).dtype == torch.float32
    ema, _ = checkpoint.load_for_sampling(tmp_path / "run.pth", "cpu")
    x, alpha_bar = torch.randn(2, 3, 32, 32), torch.full((2,), 0.5)
    with torch.no_grad():
        assert torch.allclose(model(x, alpha_bar), ema(x, alpha_bar), atol=2e-2)  # fp16 rounding of the weights
    with pytest.raises(UserError, match="a pretrained model holds only its EMA weights; drop --no_ema"):
        checkpoint.load_for_sampling(path, "cpu", use_ema=False)


def test_sampling_falls_back_to_the_pretrained_model_only_before_training(tmp_path, monkeypatch, capsys):
    config, state = tiny_state()
    checkpoint.write(tmp_path / "run.pth", state.to_checkpoint(config, "tiny"))
    pretrained = str(tmp_path / "models" / "pretrained.pth")
    os.makedirs(os.path.dirname(pretrained))
    checkpoint.export_pretrained(tmp_path / "run.pth", pretrained, {})
    monkeypatch.setattr(checkpoint, "PRETRAINED", pretrained)
    monkeypatch.chdir(tmp_path)
    assert checkpoint.sampling_checkpoint("mine.pth") == "mine.pth"  # asked for: never replaced
    assert checkpoint.sampling_checkpoint(None) == "models/pretrained.pth"
    assert capsys.readouterr().out == ("no checkpoints/latest_model.pth yet (bash train_UNet.sh trains one): "
                                       "sampling the pretrained model models/pretrained.pth\n")
    checkpoint.load_for_sampling("models/pretrained.pth", "cpu")
    data = bytearray(open(pretrained, "rb").read())
    data[-100] ^= 1  # one bit of the weights
    open(pretrained, "wb").write(data)
    for path in ("models/pretrained.pth", pretrained):  # chosen by default, or named with --checkpoint
        with pytest.raises(UserError) as error:
            checkpoint.load_for_sampling(path, "cpu")
        assert str(error.value) == (f"{path}: its sha256 does not match {path}.sha256; the file is damaged or was "
                                    f"replaced: restore it with git checkout {path}, or pass another --checkpoint")
    open(pretrained + ".sha256", "w").close()  # an empty record
    with pytest.raises(UserError, match="no .*pretrained.pth.sha256 beside it to check it against"):
        checkpoint.load_for_sampling(pretrained, "cpu")
    os.remove(pretrained)
    with pytest.raises(UserError, match="^no checkpoints/latest_model.pth and no pretrained model .models/pretrained.pth.: "
                                        "train one with bash train_UNet.sh"):
        checkpoint.sampling_checkpoint(None)
    os.makedirs("checkpoints")
    checkpoint.write("checkpoints/latest_model.pth", state.to_checkpoint(config, "tiny"))
    assert checkpoint.sampling_checkpoint(None) == checkpoint.LATEST  # training's own, once it exists


def test_the_committed_pretrained_model_is_small_checked_and_says_how_it_was_trained():
    from cli import check_sha256
    path = checkpoint.PRETRAINED
    assert os.path.getsize(path) <= 10 * 2**20
    check_sha256(path, "")
    saved = torch.load(path, weights_only=True)
    assert saved["info"]["trained_by"] and saved["info"]["machine"] and saved["info"]["images_seen"] > 0
    model, config = checkpoint.load_for_sampling(path, "cpu")
    assert config == config_from_dict(saved["config"]) and not model.training
