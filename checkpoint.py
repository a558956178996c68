"""The checkpoint: one file that holds a run's whole state. This module alone writes and reads it.

A checkpoint is a dict that `torch.load(path, weights_only=True)` opens, so a file from a stranger
cannot run code:
    format                 FORMAT, the tag that says the file is ours
    config, preset         the full configuration (config.py) and the preset it came from
    model, ema, optimizer  state dicts (ema equals model when the run keeps no EMA)
    step, epoch, batch_in_epoch, best_validation_loss
    train_seconds          training time so far, resumes included (--max_minutes and the lr schedule's clock)
    plan                   the precision and layout the run trains in (speed.Plan.record()), which a resume keeps
    rng                    torch's global state (dropout), the training noise generator's, and CUDA's
It is written atomically, and in the background: a run killed at any moment leaves the last
good file, and training does not wait for the disk.
"""
import dataclasses
import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from cli import UserError, atomic_write, check_sha256, write_sha256
from config import config_from_dict, config_to_dict
from unet import make_network

FORMAT = 1
LATEST = os.path.join("checkpoints", "latest_model.pth")  # train.py's, in its default --model_checkpoint_dir
# A model to sample without training first: a checkpoint that holds only its EMA weights, in half
# precision, with `info` on how it was trained (tools/export_pretrained.py), and its sha256 beside it.
PRETRAINED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "pretrained_small.pth")


@dataclasses.dataclass
class TrainingState:
    """Everything that changes while training; exactly what a checkpoint saves and restores."""
    model: torch.nn.Module
    ema: torch.nn.Module  # the model itself when the configuration keeps no EMA
    optimizer: torch.optim.Optimizer
    noise_generator: torch.Generator  # the noise levels and the noise (the order and flips: train.epoch_draws)
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_validation_loss: float = math.inf
    train_seconds: float = 0.0  # wall-clock time spent training, over every resume
    plan: dict = dataclasses.field(default_factory=dict)  # speed.Plan.record() of the run's precision and layout

    def to_checkpoint(self, config, preset):
        """The checkpoint dict, copied to the CPU now: training may go on while it is written."""
        device = self.noise_generator.device
        return on_cpu({
            "format": FORMAT, "config": config_to_dict(config), "preset": preset,
            "model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "best_validation_loss": self.best_validation_loss, "train_seconds": self.train_seconds, "plan": self.plan,
            "rng": {"torch": torch.get_rng_state(), "noise": self.noise_generator.get_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
        })

    def restore(self, checkpoint):
        """Continue exactly where the checkpoint stopped: weights, optimiser, counters, RNGs."""
        self.model.load_state_dict(checkpoint["model"])
        if self.ema is not self.model:
            self.ema.load_state_dict(checkpoint["ema"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.step, self.epoch = checkpoint["step"], checkpoint["epoch"]
        self.batch_in_epoch = checkpoint["batch_in_epoch"]
        self.best_validation_loss = checkpoint["best_validation_loss"]
        self.train_seconds = checkpoint.get("train_seconds", 0.0)  # absent before 2026-11-27
        rng = checkpoint["rng"]
        torch.set_rng_state(rng["torch"])
        try:
            self.noise_generator.set_state(rng["noise"])
        except RuntimeError:  # a CUDA generator's state does not fit a CPU generator, and back
            trained_on = "a CUDA GPU" if rng.get("cuda") is not None else "the CPU"
            raise UserError(f"this checkpoint was trained on {trained_on} and its random state does not fit "
                            f"--device {self.noise_generator.device.type}: resume it on {trained_on}, or pass "
                            f"--fresh (generate.py samples from it anywhere)") from None
        if rng.get("cuda") is not None and self.noise_generator.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.noise_generator.device)


def on_cpu(state):
    """A copy of a (nested) state with every tensor on the CPU, which training cannot change."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: on_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(on_cpu(v) for v in state)
    return state


def write(path, checkpoint):
    """Write atomically and fsync'd; a failed write (a full disk) is a one-line UserError."""
    try:
        with atomic_write(path, fsync=True) as f:
            torch.save(checkpoint, f)
    except (OSError, RuntimeError) as e:  # torch's writer may report a full disk as a RuntimeError
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise UserError(f"{path}: cannot write the checkpoint ({reason}); free some disk space or "
                        f"pass another --model_checkpoint_dir") from None


class BackgroundWriter:
    """Writes checkpoints one at a time on a thread, so that training does not wait for the disk.
    save() returns at once; finish() waits for the writes and raises a failed write's UserError."""

    def __init__(self):
        self.pool, self.pending = ThreadPoolExecutor(max_workers=1), []

    def save(self, path, state, config, preset):
        self.finish()  # one file at a time: the copy of the state is made after the last one is written
        self.pending.append(self.pool.submit(write, path, state.to_checkpoint(config, preset)))

    def finish(self):
        while self.pending:
            self.pending.pop().result()


def read(path):
    """A checkpoint dict, or a one-line UserError. weights_only: a checkpoint cannot run code."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such checkpoint; train first (bash train_UNet.sh) or pass --checkpoint") from None
    except Exception as e:
        raise UserError(f"{path}: cannot read this checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                        f"it may be truncated: use an older <epoch>.pth or best_validation_checkpoint.pth beside it, "
                        f"or pass --fresh to train from scratch") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise UserError(f"{path}: not a checkpoint of this project (format {FORMAT})")
    return checkpoint


def saved_config(checkpoint):
    return config_from_dict(checkpoint["config"])


def sampling_checkpoint(path):
    """The checkpoint generate.py and evaluate.py sample: `path` when given; else checkpoints/
    latest_model.pth once training has written it; else the committed pretrained model, its sha256
    checked first, and said in one line."""
    if path:
        return path
    if os.path.exists(LATEST):
        return LATEST
    shown = os.path.relpath(PRETRAINED)
    if not os.path.exists(PRETRAINED):
        raise UserError(f"no {LATEST} and no pretrained model ({shown}): train one with bash train_UNet.sh, "
                        f"restore the pretrained one with git checkout {shown}, or pass --checkpoint")
    print(f"no {LATEST} yet (bash train_UNet.sh trains one): sampling the pretrained model {shown}")
    return shown


def export_pretrained(source, path, info):
    """Write `source`'s EMA weights as a pretrained model (see PRETRAINED): half precision, its
    configuration, steps and training time, and `info`; its sha256 in path + ".sha256"."""
    checkpoint = read(source)
    write(path, {"format": FORMAT, "config": checkpoint["config"], "preset": checkpoint["preset"],
                 "ema": {k: v.half() if v.is_floating_point() else v for k, v in checkpoint["ema"].items()},
                 "step": checkpoint["step"], "train_seconds": checkpoint.get("train_seconds"), "info": info})
    write_sha256(path)


def load_for_sampling(path, device, use_ema=True, **sampling):
    """(network, configuration) of a checkpoint, ready to sample. Keyword arguments override the
    saved sampling fields, for example sampler="ddim", sampling_steps=50; None keeps the saved
    value. This is the one place where command-line sampler flags meet the configuration."""
    if os.path.exists(f"{path}.sha256"):  # committed weights (the pretrained model): never used unchecked
        check_sha256(str(path), f"restore it with git checkout {path}, or pass another --checkpoint")
    checkpoint = read(path)
    config = dataclasses.replace(saved_config(checkpoint), **{k: v for k, v in sampling.items() if v is not None})
    if not use_ema and "model" not in checkpoint:
        raise UserError(f"{path}: a pretrained model holds only its EMA weights; drop --no_ema")
    model = make_network(config)
    model.load_state_dict(checkpoint["ema" if use_ema else "model"])  # half-precision weights become float32
    return model.to(device).sampling_mode(), config
