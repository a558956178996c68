"""Train the denoiser. Resumes from <model_checkpoint_dir>/latest_model.pth when it exists.

    python train.py                                   # preset default, the default data set
    python train.py --preset seed                     # exactly the seed's model and training
    python train.py --set norm=batch --set noise_cond=none --model_checkpoint_dir checkpoints/ablation
    torchrun --nproc_per_node 4 train.py ...          # DistributedDataParallel on 4 GPUs

`main` reads as its phases: flags, processes and device, configuration (with the resume check),
data, the training state (checkpoint.TrainingState), the fixed validation set, the run folder, the
step function, and the loop. The helpers come after. Ctrl-C saves an exact checkpoint before it
exits.
"""
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
from checkpoint import TrainingState
from cli import (ArgumentParser, UserError, atomic_write, compile_cache_dir, make_folder, non_negative_float,
                 non_negative_int, pick_device, port, positive_float, positive_int, random_seed, run_main)
from config import PRESETS, config_text, config_to_dict, make_config
from dataset import augment, load_image_folder, normalise, to_uint8
from diffusion import sample, sample_alpha_bar, training_loss, validation_loss
from plot_log import draw_loss_curve, read_log
from unet import Stage, UNet, count_parameters, forward_flops
from visdom_logger import VisdomLogger


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    # the seed's flags
    p.add_argument("--train_dataset_directory", default="images/train_images_downsample")
    p.add_argument("--validate_dataset_directory", default="images/test_images_downsample")
    p.add_argument("--model_checkpoint_dir", default="checkpoints")
    p.add_argument("--learning_rate", type=positive_float, default=None, help="overrides the preset's learning_rate")
    p.add_argument("--batch_size", type=positive_int, default=None, help="global batch; overrides the preset's batch_size")
    p.add_argument("--num_epochs", type=positive_int, default=None,
                   help=f"stop after this many epochs (default {SEED_NUM_EPOCHS}, the seed's; only a given "
                        f"--num_epochs is an end for lr_schedule)")
    p.add_argument("--validate_every", type=positive_int, default=1, help="epochs between validations")
    p.add_argument("--save_every", type=positive_int, default=50,
                   help="epochs between numbered checkpoints <epoch>.pth (latest_model.pth is written then too)")
    # ours
    p.add_argument("--preset", default="default", help=f"a whole configuration: {', '.join(PRESETS)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one configuration field (repeatable), e.g. --set norm=group")
    p.add_argument("--max_steps", type=non_negative_int, default=0, help="stop after this many optimiser steps (0: no limit)")
    p.add_argument("--max_kimg", type=non_negative_float, default=0,
                   help="stop once this many thousand images have been seen (0: no limit)")
    p.add_argument("--max_minutes", type=non_negative_float, default=0,
                   help="stop after this many minutes of training in all, resumes included (0: no limit)")
    p.add_argument("--save_minutes", type=positive_float, default=10,
                   help="minutes between writes of latest_model.pth (also written at every stop)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu | mps (under torchrun: cuda, each process its own GPU)")
    p.add_argument("--seed", type=random_seed, default=0)
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints and start over")
    p.add_argument("--no_visdom", action="store_true", help="no live plots")
    p.add_argument("--visdom_port", type=port, default=8097)
    p.add_argument("--skip_bad_images", action="store_true", help="skip undecodable images instead of stopping")
    p.add_argument("--compile", default="auto", choices=["auto", "whole", "regional", "off", "on"],
                   help="torch.compile the whole network, or each block (regional), or not; on = whole; "
                        "auto: the fastest for the run's known length (compile_plan)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 autocast on CUDA")
    p.add_argument("--log_every", type=positive_int, default=50, help="optimiser steps between loss read-backs")
    p.add_argument("--validation_images", type=positive_int, default=1000, help="size of the fixed validation set")
    args = p.parse_args(argv)
    args.schedule_epochs, args.num_epochs = args.num_epochs, args.num_epochs or SEED_NUM_EPOCHS
    return args


SEED_NUM_EPOCHS = 5000


def main(argv=None):
    args = parse_args(argv)
    compile_cache_dir()  # before anything asks inductor for its cache folder
    procs = start_processes(args.device)
    latest_path = os.path.join(args.model_checkpoint_dir, "latest_model.pth")
    config, resume_from = configure(args, argv, latest_path, procs)
    autocast_dtype = set_precision(args.precision, procs.device)
    torch.manual_seed(args.seed)
    train_images, val_images = load_data(args, config, procs)
    state = build_state(config, procs, args.seed)
    if resume_from is not None:
        state.restore(resume_from)
        procs.say(f"resuming {latest_path}: epoch {state.epoch}, step {state.step}")
    validation = fixed_validation_set(val_images, config, procs.device)
    run = open_run_folder(args, config, procs, state)
    procs.say(f"configuration (preset {args.preset}):\n{config_text(config)}")
    procs.say(f"model: {count_parameters(state.model):,} parameters, {run.flops_per_image / 1e9:.1f} "
              f"GFLOP per training image; device {procs.device}{procs.describe()}, "
              f"precision {'bf16' if autocast_dtype else 'fp32'}")
    procs.say(f"data: {len(train_images):,} train images from {args.train_dataset_directory}, "
              f"{len(val_images):,} validation images from {args.validate_dataset_directory}; "
              f"{len(train_images) // config.batch_size} steps of {config.batch_size} per epoch")
    if procs.device.type == "cpu" and procs.master:
        warn_cpu_speed(state.model, config, len(train_images) // config.batch_size)

    train_step = distributed_compiled_step(args, config, procs, state, autocast_dtype, len(train_images))
    stop_reason = train(args, config, procs, state, train_step, train_images, validation, run, autocast_dtype)
    procs.say(f"stopped: {stop_reason or f'finished {args.num_epochs} epochs'}; epoch {state.epoch}, "
              f"step {state.step}; checkpoint {latest_path}")
    if procs.ddp:
        dist.destroy_process_group()
    return 130 if stop_reason == "interrupted" else 0


# ---- the phases of main, in order ------------------------------------------------------------------

@dataclasses.dataclass
class Processes:
    """This process's place in the run: alone, or one of several launched by torchrun."""
    device: torch.device
    ddp: bool = False
    rank: int = 0
    world_size: int = 1

    @property
    def master(self):
        return self.rank == 0

    def say(self, *args, **kwargs):
        if self.master:
            print(*args, **kwargs)

    def describe(self):
        return f" x {self.world_size} processes" if self.ddp else ""


def start_processes(device_name):
    ddp = "RANK" in os.environ  # launched by torchrun
    rank, world_size = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = pick_device(device_name, local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    if ddp and device.type == "cuda" and device.index != int(os.environ.get("LOCAL_RANK", 0)):
        raise UserError(f"--device {device_name}: under torchrun each process uses the GPU of its local rank; "
                        f"pass --device cuda (and CUDA_VISIBLE_DEVICES to choose the GPUs)")
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(device, ddp, rank, world_size)


def configure(args, argv, latest_path, procs):
    """(configuration, checkpoint to resume from or None). A run folder that holds a checkpoint
    continues with the checkpoint's configuration and preset name; asking for a different
    configuration is refused."""
    overrides = list(args.set)
    if args.learning_rate is not None:
        overrides.append(f"learning_rate={args.learning_rate}")
    if args.batch_size is not None:
        overrides.append(f"batch_size={args.batch_size}")
    config = make_config(args.preset, overrides)
    resume_from = None
    if os.path.exists(latest_path) and not args.fresh:
        resume_from = checkpoint.read(latest_path)
        saved = checkpoint.saved_config(resume_from)
        asked_explicitly = overrides or "--preset" in (argv or sys.argv)
        if saved != config and asked_explicitly:
            differ = [k for k, v in config_to_dict(config).items() if config_to_dict(saved)[k] != v]
            raise UserError(f"{latest_path} was trained with a different configuration ({', '.join(differ)}): "
                            f"pass --fresh to start over, or use another --model_checkpoint_dir")
        config, args.preset = saved, resume_from.get("preset", args.preset)
    if config.batch_size % procs.world_size:
        raise UserError(f"--batch_size {config.batch_size} is not divisible by the {procs.world_size} processes")
    return config, resume_from


def set_precision(precision, device):
    """The autocast dtype (None: full fp32), and TF32 and cuDNN's autotuner on CUDA."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return torch.bfloat16 if precision == "bf16" or (precision == "auto" and device.type == "cuda") else None


def load_data(args, config, procs):
    """Train and validation images as uint8 tensors, on the device when they fit."""
    train_images = load_image_folder(args.train_dataset_directory, args.skip_bad_images)
    val_images = load_image_folder(args.validate_dataset_directory, args.skip_bad_images)[:args.validation_images]
    if len(train_images) < config.batch_size:
        raise UserError(f"--batch_size {config.batch_size} is larger than the {len(train_images)} images in "
                        f"{args.train_dataset_directory}: lower --batch_size")
    if fits_on_device(train_images, procs.device):
        train_images = train_images.to(procs.device)
    elif procs.device.type == "cuda":
        train_images = train_images.pin_memory()
    return train_images, val_images.to(procs.device)


def build_state(config, procs, seed):
    """A fresh model, its EMA, the optimiser and the training noise generator."""
    model = UNet(config).to(procs.device)
    if procs.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if procs.ddp and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        if procs.device.type == "cuda":  # statistics over the global batch, as one process would compute them
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            procs.say("warning: SyncBatchNorm needs GPUs; on the CPU each process normalises by its own share of the batch")
    return TrainingState(model, make_ema(model, config), make_optimizer(model, config, fused=procs.device.type == "cuda"),
                         torch.Generator(device=procs.device).manual_seed(seed))


def fixed_validation_set(val_images, config, device):
    """Fixed (image, noise, noise level) triples, independent of --seed, so that any two runs'
    validation curves compare."""
    generator = torch.Generator().manual_seed(1234)
    x0 = normalise(val_images, config)
    eps = torch.randn(x0.shape, generator=generator).to(device)
    alpha_bar = torch.rand(len(x0), generator=generator).clamp(1e-4, 1 - 1e-4).to(device)
    return x0, eps, alpha_bar


@dataclasses.dataclass
class RunFolder:
    """Where a run reports: its folder (checkpoints, log.jsonl, loss_curve.png), its visdom env,
    the checkpoint writer, and the FLOPs per image that the progress bar turns into TFLOP/s."""
    path: str
    vis: VisdomLogger
    flops_per_image: float
    writer: checkpoint.BackgroundWriter = dataclasses.field(default_factory=checkpoint.BackgroundWriter)
    latest_saved_at: float = dataclasses.field(default_factory=time.time)  # --save_minutes counts from here
    latest_saved_step: int = -1
    validated_step: int = -1

    def file(self, name):
        return os.path.join(self.path, name)


def open_run_folder(args, config, procs, state):
    """The run folder, created; its log cut back to the step we resume from (a fresh run's log
    and curve removed); the configuration logged."""
    path = args.model_checkpoint_dir
    name = os.path.basename(os.path.abspath(path))
    run = RunFolder(path, VisdomLogger(port=args.visdom_port, env=name, enabled=procs.master and not args.no_visdom),
                    flops_per_image=3 * forward_flops(state.model))  # forward + backward (2x forward)
    step = state.step
    if procs.master:
        make_folder(path, "--model_checkpoint_dir")
        if step == 0 and args.fresh:
            for stale in ("log.jsonl", "loss_curve.png"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(run.file(stale))
        truncate_log(run.file("log.jsonl"), step)
        if step == 0:
            append_log(run.file("log.jsonl"), {"kind": "config", "run": name, "preset": args.preset,
                                               "config": config_to_dict(config)})
        run.vis.log_config(config_to_dict(config))
    return run


def distributed_compiled_step(args, config, procs, state, autocast_dtype, num_train_images):
    """make_train_step on the model wrapped in DistributedDataParallel under torchrun, and
    torch.compile'd as --compile says (auto: compile_plan)."""
    train_model = state.model
    if procs.ddp:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[procs.device.index] if procs.device.type == "cuda" else None)
    ledger = CompileLedger(state.model, config, procs, autocast_dtype)
    mode, why = {"on": ("whole", "--compile on"), "auto": (None, None)}.get(args.compile, (args.compile, "--compile"))
    if mode is None:
        end = RunEnd.of(args, config, num_train_images // config.batch_size)
        mode, why = compile_plan(procs.device, remaining_seconds(end, state, config, procs, autocast_dtype),
                                 ledger.expected_seconds)
    procs.say(f"torch.compile: {mode} ({why}); cache {compile_cache_dir()}")
    if mode == "whole":
        train_model = torch.compile(train_model)
    elif mode == "regional":
        compile_blocks(state.model)  # in place: DistributedDataParallel holds the same module
    step = make_train_step(train_model, state.model, state.ema, state.optimizer, config, autocast_dtype)
    return step if mode == "off" else ledger.timing_first_call(step, mode)


# ---- torch.compile where it pays -----------------------------------------------------------------

# The whole default network compiled with an empty cache: its first 50 steps took 107 s on one
# H200 (issue 13). Until a graph has been compiled on this machine, auto expects this, for either
# mode; afterwards it expects what the CompileLedger measured.
COLD_COMPILE_SECONDS = 110
COMPILE_SHARE = 0.10  # auto spends at most this share of a run's known length compiling


def compile_plan(device, run_seconds, expected_seconds):
    """--compile auto: (mode, reason). Off CUDA: off (inductor's CPU code has not paid for these
    small convolutions). On CUDA: whole when its expected compile time is at most COMPILE_SHARE
    of the run's known length, else regional when its is, else off; a run with no known length
    compiles whole. whole comes first: compiled whole, the default network's step ran at 6,088
    img/s on an H100 (bench.py, row 4), against about 3,700 eager on an H200 (issue 13); regional's
    steady speed is not measured yet (tools/run_costs.py compile measures all three)."""
    if device.type != "cuda":
        return "off", f"auto: {device.type}"
    if run_seconds is None:
        return "whole", "auto: the run has no known end"
    for mode in ("whole", "regional"):
        if expected_seconds(mode) <= COMPILE_SHARE * run_seconds:
            return mode, (f"auto: expect {expected_seconds(mode):.0f} s of compiling in a run of "
                          f"{run_seconds:.0f} s")
    return "off", (f"auto: compiling (expect {expected_seconds('regional'):.0f} s) would take more than "
                   f"{COMPILE_SHARE:.0%} of this run's {run_seconds:.0f} s")


def remaining_seconds(end, state, config, procs, autocast_dtype):
    """The run's known remaining length in seconds, None when unknown: --max_minutes directly;
    steps at the speed of three eager steps of a copy of the model, timed here."""
    candidates = []
    if end.seconds:
        candidates.append(end.seconds - state.train_seconds)
    step_ends = [n for n in (end.steps, end.epoch_steps) if n]
    if step_ends:
        step = eager_step_seconds(state.model, config.batch_size // procs.world_size, procs.device, autocast_dtype)
        candidates.append((min(step_ends) - state.step) * step * 1.2)  # + optimiser and EMA
    return min(candidates) if candidates else None


def eager_step_seconds(model, batch, device, autocast_dtype=None, timed_steps=3):
    """Seconds of one eager forward and backward pass of a batch, timed on a copy of the model
    after one untimed pass (which also picks cuDNN's algorithms); the training's random streams
    are left untouched (exact resume)."""
    probe = copy.deepcopy(model).train()
    x = torch.zeros(batch, 3, 32, 32, device=device)
    alpha_bar = torch.full((batch,), 0.5, device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i in range(1 + timed_steps):
            if i == 1:
                synchronize(device)
                start = time.time()
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                loss = probe(x, alpha_bar).float().square().mean()
            loss.backward()
        synchronize(device)
    return (time.time() - start) / timed_steps


def compile_blocks(model):
    """Regional compilation: each Stage (ResBlock and its attention) compiled in place. Stages of
    the same widths and resolution share one compiled graph, so the network compiles once per
    distinct block instead of as one large graph."""
    import torch._dynamo
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # a graph per distinct block
    for module in model.modules():
        if isinstance(module, Stage):
            module.compile(dynamic=False)


class CompileLedger:
    """How long the first step took, per graph and mode, in <compile cache>/simple_ddpm_compile_seconds.json:
    what compile_plan expects next time, when the cache holds the graph. A graph is the network's
    layers (its repr: a learning rate or a sampler changes nothing compiled), the batch per
    process, the precision, the card and torch's version."""

    def __init__(self, model, config, procs, autocast_dtype):
        name = torch.cuda.get_device_name(procs.device) if procs.device.type == "cuda" else procs.device.type
        graph = [repr(model), config.batch_size // procs.world_size, str(autocast_dtype), name, torch.__version__,
                 procs.world_size]
        self.key = hashlib.sha256(json.dumps(graph, sort_keys=True).encode()).hexdigest()[:16]
        self.path = os.path.join(compile_cache_dir(), "simple_ddpm_compile_seconds.json")
        self.master = procs.master

    def read(self):
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def expected_seconds(self, mode):
        return self.read().get(self.key, {}).get(mode, COLD_COMPILE_SECONDS)

    def record(self, mode, seconds):
        if not self.master:
            return
        ledger = self.read()
        ledger.setdefault(self.key, {})[mode] = round(seconds, 1)
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with atomic_write(self.path, "w") as f:
                json.dump(ledger, f, indent=1)

    def timing_first_call(self, step, mode):
        """The step, whose first call (the one that compiles) is timed and recorded."""
        first = [True]

        def timed_step(*args):
            if not first:
                return step(*args)
            start = time.time()
            loss = step(*args)
            synchronize(loss.device)
            self.record(mode, time.time() - start)
            first.clear()
            return loss

        return timed_step


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- the loop ----------------------------------------------------------------------------------------

def train(args, config, procs, state, train_step, train_images, validation, run, autocast_dtype):
    """Train until --num_epochs, --max_steps, --max_kimg, --max_minutes or Ctrl-C; returns the reason
    to stop (None: all epochs done). latest_model.pth is written every --save_minutes, at every
    --save_every epoch, and at the stop; a stop at a limit validates the final weights too."""
    device, local_batch = procs.device, config.batch_size // procs.world_size
    mine = slice(procs.rank * local_batch, (procs.rank + 1) * local_batch)
    steps_per_epoch = len(train_images) // config.batch_size
    end = RunEnd.of(args, config, steps_per_epoch)
    stop_requested = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop_requested.append(True))
    window = LogWindow(device)
    clock = Clock(procs, state.train_seconds)
    stop_reason = None
    with tqdm(total=steps_per_epoch * args.num_epochs, initial=state.epoch * steps_per_epoch + state.batch_in_epoch,
              disable=not procs.master, unit="step", dynamic_ncols=True) as bar:
        while state.epoch < args.num_epochs and stop_reason is None:
            order = torch.randperm(len(train_images),
                                   generator=torch.Generator().manual_seed(args.seed * 1_000_003 + state.epoch))
            order = order.to(train_images.device)  # once an epoch: a copy from the host inside the loop would sync every step
            while state.batch_in_epoch < steps_per_epoch:
                batch = order[state.batch_in_epoch * config.batch_size:(state.batch_in_epoch + 1) * config.batch_size]
                # Every process draws the whole batch's noise and takes its own slice, so that K
                # processes train exactly as one process with the same global batch.
                noise = state.noise_generator
                x0 = normalise(train_images[batch][mine].to(device, non_blocking=True), config)
                x0 = augment(x0, config, torch.rand(config.batch_size, device=device, generator=noise)[mine])
                alpha_bar = sample_alpha_bar(config, config.batch_size, device, noise)[mine]
                eps = torch.randn((config.batch_size, *x0.shape[1:]), device=device, generator=noise)[mine]
                window.progress = end.progress(state.step, state.train_seconds)
                window.loss_sum += train_step(x0, eps, alpha_bar, state.step, window.progress)
                state.step, state.batch_in_epoch, window.steps = state.step + 1, state.batch_in_epoch + 1, window.steps + 1
                bar.update(1)

                log_step = state.step % args.log_every == 0
                state.train_seconds = clock.read(agreed=log_step)
                stop_reason = reason_to_stop(args, procs, state, end, stop_requested, log_step)
                last_step = state.epoch == args.num_epochs - 1 and state.batch_in_epoch == steps_per_epoch
                if log_step or stop_reason or last_step:
                    log_train(window, config, procs, state, run, bar)
                if stop_reason:
                    break
                if time.time() - run.latest_saved_at >= 60 * args.save_minutes:
                    save(run, "latest_model.pth", state, config, args.preset, procs)
            if state.batch_in_epoch == steps_per_epoch:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                end_epoch(args, config, procs, state, validation, run, bar, autocast_dtype)
        if stop_reason not in (None, "interrupted") and run.validated_step != state.step:
            validate(args, config, procs, state, validation, run, bar, autocast_dtype)  # a limit ends the run measured
        if run.latest_saved_step != state.step:  # the stop, unless the last epoch's end just wrote it
            save(run, "latest_model.pth", state, config, args.preset, procs)
        run.writer.finish()
    return stop_reason


@dataclasses.dataclass
class RunEnd:
    """Where the run ends, when that is known: the lr schedule decays to it. progress() is the
    share of the run done by the limit that will be reached first; 0 when no limit is known."""
    steps: int = 0              # --max_steps or --max_kimg in steps, whichever is fewer (0: none)
    steps_flag: str = ""
    seconds: float = 0.0        # --max_minutes (0: none)
    epoch_steps: int = 0        # a given --num_epochs, in steps (0: none)

    @classmethod
    def of(cls, args, config, steps_per_epoch):
        limits = [(n, flag) for n, flag in ((args.max_steps, f"--max_steps {args.max_steps}"),
                                             (math.ceil(args.max_kimg * 1000 / config.batch_size),
                                              f"--max_kimg {args.max_kimg:g}")) if n]
        steps, steps_flag = min(limits) if limits else (0, "")
        return cls(steps, steps_flag, 60 * args.max_minutes, (args.schedule_epochs or 0) * steps_per_epoch)

    def progress(self, step, seconds):
        shares = [step / self.steps if self.steps else 0.0, seconds / self.seconds if self.seconds else 0.0,
                  step / self.epoch_steps if self.epoch_steps else 0.0]
        return min(1.0, max(shares))


class Clock:
    """Seconds of training over every resume (checkpoint's train_seconds). Several processes use
    rank 0's clock, read at the log steps only, so that their learning rates never differ."""

    def __init__(self, procs, seconds_before):
        self.procs, self.started = procs, time.time() - seconds_before
        self.seconds = seconds_before

    def read(self, agreed):
        if not self.procs.ddp:
            self.seconds = time.time() - self.started
        elif agreed:
            shared = [time.time() - self.started]
            dist.broadcast_object_list(shared, src=0)
            self.seconds = shared[0]
        return self.seconds


@dataclasses.dataclass
class LogWindow:
    """The losses summed on the device since the last read-back, which is the only host sync."""
    device: torch.device
    steps: int = 0
    progress: float = 0.0  # of the run, at the last step (learning_rate_at)

    def __post_init__(self):
        self.loss_sum = torch.zeros((), device=self.device)
        self.window_start = time.time()

    def reset(self):
        self.loss_sum.zero_()
        self.window_start, self.steps = time.time(), 0


def reason_to_stop(args, procs, state, end, stop_requested, log_step):
    """A reason to stop after this step, or None. Several processes look at the clock and at
    Ctrl-C only at the log steps, where they agree (agree_on_stop)."""
    reason = None
    if end.steps and state.step >= end.steps:
        reason = f"reached {end.steps_flag}"
    elif procs.ddp and not log_step:
        pass
    elif end.seconds and state.train_seconds >= end.seconds:
        reason = f"reached --max_minutes {args.max_minutes:g}"
    elif stop_requested:
        reason = "interrupted"
    if procs.ddp and log_step:
        reason = agree_on_stop(reason)
    return reason


def log_train(window, config, procs, state, run, bar):
    if procs.ddp:  # the global batch's loss, not this process's share of it
        dist.all_reduce(window.loss_sum)
        window.loss_sum /= procs.world_size
    train_loss = window.loss_sum.item() / window.steps
    img_per_s = window.steps * config.batch_size / (time.time() - window.window_start)
    record = dict(kind="train", step=state.step, epoch=state.epoch, images_seen=state.step * config.batch_size,
                  train_loss=train_loss, lr=learning_rate_at(config, state.step - 1, window.progress),
                  img_per_s=img_per_s, time=state.train_seconds)
    if procs.master:
        append_log(run.file("log.jsonl"), record)
        run.vis.log_train(record["images_seen"], train_loss, record["lr"], img_per_s)
        bar.set_postfix(loss=f"{train_loss:.4f}", img_s=f"{img_per_s:,.0f}",
                        tflops=f"{img_per_s * run.flops_per_image / 1e12:.1f}")
    window.reset()


def end_epoch(args, config, procs, state, validation, run, bar, autocast_dtype):
    """Validation every --validate_every epochs (and after the last); a numbered checkpoint and
    latest_model.pth every --save_every epochs."""
    epoch = state.epoch
    if epoch % args.validate_every == 0 or epoch == args.num_epochs:
        validate(args, config, procs, state, validation, run, bar, autocast_dtype)
    if epoch % args.save_every == 0:
        save(run, f"{epoch}.pth", state, config, args.preset, procs)
        save(run, "latest_model.pth", state, config, args.preset, procs)


def validate(args, config, procs, state, validation, run, bar, autocast_dtype):
    """The fixed validation set's loss for the weights and their EMA, logged, and the best EMA
    checkpoint."""
    epoch, images_seen = state.epoch, state.step * config.batch_size
    val_loss = evaluate_loss(state.model, *validation, config, autocast_dtype)
    val_loss_ema = evaluate_loss(state.ema, *validation, config, autocast_dtype)
    if procs.master:
        append_log(run.file("log.jsonl"), dict(kind="validation", step=state.step, epoch=epoch,
                                                images_seen=images_seen, val_loss=val_loss, val_loss_ema=val_loss_ema))
        samples = preview_samples(state.ema, config, procs.device) if run.vis.online else None
        run.vis.log_validation(images_seen, val_loss, val_loss_ema, samples)
        draw_loss_curve(read_log(run.file("log.jsonl")), run.file("loss_curve.png"))
        bar.write(f"epoch {epoch} step {state.step}: validation loss {val_loss:.4f} (EMA {val_loss_ema:.4f})")
    if val_loss_ema < state.best_validation_loss:
        state.best_validation_loss = val_loss_ema
        save(run, "best_validation_checkpoint.pth", state, config, args.preset, procs)
    run.validated_step = state.step


def save(run, name, state, config, preset, procs):
    """Everything needed to continue exactly here; rank 0 alone writes, in the background."""
    if procs.master:
        run.writer.save(run.file(name), state, config, preset)
        append_log(run.file("log.jsonl"), dict(kind="checkpoint", step=state.step, name=name))  # bench.py's loop row
    if name == "latest_model.pth":
        run.latest_saved_at, run.latest_saved_step = time.time(), state.step


# ---- one training step: everything that happens per batch ------------------------------------------

def make_train_step(train_model, model, ema, optimizer, config, autocast_dtype):
    """A function (x0, eps, alpha_bar, step, progress) -> loss tensor that never waits for the GPU.
    The step number and the share of the run done set the learning rate (learning_rate_at) and the
    EMA's decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    ema_params = list(ema.parameters()) if ema is not model else None

    def train_step(x0, eps, alpha_bar, step, progress=0.0):
        train_model.train()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(config, step, progress)
        with torch.autocast(x0.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = training_loss(train_model, x0, eps, alpha_bar, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip, foreach=True)
        optimizer.step()
        if ema_params is not None:
            update_ema(model, ema, params, ema_params, ema_decay_at(config, step))
        return loss.detach()

    return train_step


@torch.no_grad()
def update_ema(model, ema, params, ema_params, decay):
    torch._foreach_lerp_(ema_params, params, 1 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):  # BatchNorm statistics follow the model
        b_ema.copy_(b)


def learning_rate_at(config, step, progress=0.0):
    """Linear warm-up over warmup_steps, times lr_schedule's decay at `progress`, the share of the
    run done (RunEnd): constant, cosine (Loshchilov & Hutter 2017, SGDR, without restarts) or
    linear, both to 0 at the end. With no known end, progress stays 0 and the rate constant."""
    lr = config.learning_rate
    if config.warmup_steps and step < config.warmup_steps:
        lr *= (step + 1) / config.warmup_steps
    if config.lr_schedule == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * progress))
    elif config.lr_schedule == "linear":
        lr *= 1 - progress
    return lr


def ema_decay_at(config, step):
    """The EMA's decay ramps up as (1 + step) / (10 + step) until it reaches ema_decay, so that
    a short run's EMA is not dominated by the random initial weights."""
    return min(config.ema_decay, (1 + step) / (10 + step))


def make_ema(model, config):
    """A frozen copy of the model whose weights follow it (update_ema); the model itself without EMA."""
    return copy.deepcopy(model).requires_grad_(False) if config.ema_decay > 0 else model


def make_optimizer(model, config, fused):
    kind = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[config.optimizer]
    return kind(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay,
                **({"fused": True} if fused else {}))


# ---- validation --------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_loss(model, x0, eps, alpha_bar, config, autocast_dtype, batch_size=500):
    was_training = model.training
    model.eval()
    total = 0.0
    # Eager: with --compile regional the model's blocks are compiled for training, not for this.
    with torch.compiler.set_stance("force_eager"), torch.autocast(x0.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        for i in range(0, len(x0), batch_size):
            part = slice(i, i + batch_size)
            total += validation_loss(model, x0[part], eps[part], alpha_bar[part], config).item() * len(x0[part])
    model.train(was_training)
    return total / len(x0)


def preview_samples(ema, config, device, n=16):
    """Samples for visdom, from a copy: sampling_mode with bn_sampling_stats=batch drops the
    BatchNorm running statistics, which training and the checkpoint still need."""
    sampler = copy.deepcopy(ema).sampling_mode()
    return to_uint8(sample(sampler, config, n, generator=torch.Generator().manual_seed(0), device=device), config).cpu()


# ---- small helpers -------------------------------------------------------------------------------------

def agree_on_stop(reason):
    """Any process's reason to stop, for all of them: a Ctrl-C or the clock can reach the processes
    at different steps, and one that stopped alone would leave the others waiting for it forever."""
    reasons = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, reason)
    return next((r for r in reasons if r), None)


def fits_on_device(images, device):
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return images.numel() < 0.25 * free


def warn_cpu_speed(model, config, steps_per_epoch):
    """Time a small step on a copy of the model and extrapolate to an epoch."""
    seconds = eager_step_seconds(model, 4, torch.device("cpu"), timed_steps=1) / 4 * config.batch_size
    seconds *= steps_per_epoch * 1.3  # + optimiser, EMA
    if seconds > 60:
        duration = f"{seconds / 3600:.1f} hours" if seconds > 5400 else f"{seconds / 60:.0f} minutes"
        print(f"warning: training on the CPU: about {duration} per epoch "
              f"({steps_per_epoch} steps of {config.batch_size}); a CUDA GPU is 100x faster "
              f"(--preset tiny trains in seconds)", file=sys.stderr)


def append_log(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path, step):
    """Drop records logged after the checkpoint we resume from, so the log has no duplicates."""
    if not os.path.exists(path):
        return
    records = read_log(path)
    kept = [r for r in records if r.get("kind") == "config" or r.get("step", 0) <= step]
    if len(kept) != len(records):
        with atomic_write(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)


if __name__ == "__main__":
    run_main(main)
