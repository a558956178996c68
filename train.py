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
from config import CPU_PRESET, PRESETS, config_text, config_to_dict, make_config
from dataset import augment, load_image_folder, normalise, to_uint8
from diffusion import check_noise_process, sample, sample_alpha_bar, training_loss, validation_loss
from plot_log import draw_loss_curve, read_log
from speed import (PROBE_BATCH, CompileLedger, Plan, autocast, choose_plan, compile_blocks, compile_plan, cpp_compiler,
                   machine, sampling_batch, time_network)
from unet import check_network, count_parameters, forward_flops, make_network, zero_init_kills_branches
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
    p.add_argument("--preset", help=f"a whole configuration: {', '.join(PRESETS)} (default: default on CUDA, "
                                    f"{CPU_PRESET} without it)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one configuration field (repeatable), e.g. --set norm=group")
    p.add_argument("--max_steps", type=non_negative_int, default=0, help="stop after this many optimiser steps (0: no limit)")
    p.add_argument("--max_kimg", type=non_negative_float, default=0,
                   help="stop once this many thousand images have been seen (0: no limit)")
    p.add_argument("--max_minutes", type=non_negative_float, default=0,
                   help="stop after this many minutes of training in all, resumes included (0: no limit)")
    p.add_argument("--save_minutes", type=positive_float, default=10,
                   help="minutes between writes of latest_model.pth (also written at every stop)")
    p.add_argument("--preview_minutes", type=positive_float, default=5,
                   help="minutes between visdom's previews of the EMA's samples, besides the one at each validation")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu | mps (under torchrun: cuda, each process its own GPU)")
    p.add_argument("--seed", type=random_seed, default=0)
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints and start over")
    p.add_argument("--no_visdom", action="store_true", help="no live plots")
    p.add_argument("--visdom_port", type=port, default=8097)
    p.add_argument("--skip_bad_images", action="store_true", help="skip undecodable images instead of stopping")
    p.add_argument("--compile", default="auto", choices=["auto", "whole", "regional", "off", "on"],
                   help="torch.compile the whole network, or each block (regional), or not; on = whole; "
                        "auto: the fastest for the run's known length (compile_plan)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast on CUDA; on the CPU, bf16 or fp32 and the activation layout by a "
                        "measurement of this network (speed.py), logged at the start. bf16 changes the numbers "
                        "slightly: a study pins one precision for all its rows")
    p.add_argument("--layout", default="auto", choices=["auto", "contiguous", "channels_last"],
                   help="the activations' memory layout; auto: channels_last on CUDA, on the CPU the faster by the "
                        "same measurement as --precision auto")
    p.add_argument("--log_every", type=positive_int, default=50, help="optimiser steps between loss read-backs")
    p.add_argument("--validation_images", type=positive_int, default=1000, help="size of the fixed validation set")
    p.add_argument("--no_best_checkpoint", action="store_true",
                   help="do not write best_validation_checkpoint.pth; validation is still measured and logged "
                        "(the ablation study scores the final weights)")
    args = p.parse_args(argv)
    args.schedule_epochs, args.num_epochs = args.num_epochs, args.num_epochs or SEED_NUM_EPOCHS
    return args


SEED_NUM_EPOCHS = 5000
IMAGE_SIZE = 32  # dataset.py refuses any other size


def main(argv=None):
    args = parse_args(argv)
    compile_cache_dir()  # before anything asks inductor for its cache folder
    procs = start_processes(args.device)
    latest_path = os.path.join(args.model_checkpoint_dir, "latest_model.pth")
    config, resume_from = configure(args, argv, latest_path, procs)
    check_compile(args.compile, procs.device)
    set_precision(procs.device)
    train_images, val_images = load_data(args, config, procs)
    plan = choose_training_plan(args, config, procs, resume_from)
    state = build_state(config, procs, args.seed, plan)
    state.plan = plan.record()
    if resume_from is not None:
        state.restore(resume_from)
        procs.say(f"resuming {latest_path}: epoch {state.epoch}, step {state.step}")
    validation = fixed_validation_set(val_images, config, procs.device)
    run = open_run_folder(args, config, procs, state)
    procs.say(f"configuration (preset {args.preset}):\n{config_text(config)}")
    procs.say(f"model: {count_parameters(state.model):,} parameters, {run.flops_per_image / 1e9:.1f} "
              f"GFLOP per training image; device {procs.device}{procs.describe()}")
    procs.say(f"precision and layout: {plan.describe()}")
    procs.say(f"data: {len(train_images):,} train images from {args.train_dataset_directory}, "
              f"{len(val_images):,} validation images from {args.validate_dataset_directory}; "
              f"{len(train_images) // config.batch_size} steps of {config.batch_size} per epoch")
    steps_per_epoch = len(train_images) // config.batch_size
    if procs.device.type == "cpu" and procs.master:
        warn_cpu_speed(step_seconds(config, procs, plan, state), plan, config, steps_per_epoch)

    train_step, compiled = distributed_compiled_step(args, config, procs, state, plan, steps_per_epoch)
    if procs.master:
        append_log(run.file("log.jsonl"), dict(kind="plan", step=state.step, device=str(procs.device),
                                               machine=machine(procs.device), torch=torch.__version__,
                                               compile=compiled, **plan.record()))
    stop_reason = train(args, config, procs, state, train_step, train_images, validation, run, plan)
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
    if args.preset is None:
        args.preset = "default" if torch.device(procs.device).type == "cuda" else CPU_PRESET
        if args.preset != "default" and (args.fresh or not os.path.exists(latest_path)):
            procs.say(f"train.py: no CUDA GPU, so preset {CPU_PRESET} (the default's recipe at the width the CPU "
                      f"study chose, ablations/cpu/REPORT.md); --preset default trains the 20.0M-parameter default")
    overrides = list(args.set)
    if args.learning_rate is not None:
        overrides.append(f"learning_rate={args.learning_rate}")
    if args.batch_size is not None:
        overrides.append(f"batch_size={args.batch_size}")
    config = make_config(args.preset, overrides)
    check_network(config, IMAGE_SIZE)  # before the data is read
    check_noise_process(config)
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


def set_precision(device):
    """TF32 and cuDNN's autotuner on CUDA (the autocast precision is the Plan's: speed.choose_plan)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def choose_training_plan(args, config, procs, resume_from):
    """speed.choose_plan on rank 0 (which says first what it measures), the same plan for every
    process. A resumed run keeps the precision and layout it started with, unless the flags ask
    for others, so that it continues exactly."""
    saved = (resume_from or {}).get("plan") or {}  # absent before 2026-12-02
    if saved and args.precision == "auto" and args.layout == "auto":
        return Plan(saved["precision"], saved["layout"] == "channels_last", "resumed: the plan this run started with",
                    {name: ms / 1e3 for name, ms in saved.get("timings_ms_per_image", {}).items()})
    plan = None
    if procs.master:
        if procs.device.type == "cpu" and "auto" in (args.precision, args.layout):
            print("precision and layout: timing a few passes of this network for each candidate (speed.py; "
                  "remembered for the next run)", flush=True)
        plan = choose_plan(args.precision, config, procs.device, config.batch_size // procs.world_size,
                           layout=args.layout)
    if procs.ddp:
        shared = [plan]
        dist.broadcast_object_list(shared, src=0)
        plan = shared[0]
    return plan


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


def build_state(config, procs, seed, plan):
    """A fresh model in the plan's layout, its EMA, the optimiser and the training noise generator,
    each random stream seeded from --seed by its purpose (stream_seed)."""
    torch.manual_seed(stream_seed(seed, "init"))
    model = plan.apply(make_network(config).to(procs.device))
    # Dropout draws from torch's global generator; re-seeded here, its masks do not depend on how
    # many draws the network's shape took to initialise it.
    torch.manual_seed(stream_seed(seed, "dropout"))
    if zero_init_kills_branches(config):
        procs.say("warning: act=relu with zero_init: every residual branch starts at 0 just before its ReLU, whose "
                  "gradient there is 0, so the branches never train; set zero_init=false")
    if procs.ddp and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        if procs.device.type == "cuda":  # statistics over the global batch, as one process would compute them
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            procs.say("warning: SyncBatchNorm needs GPUs; on the CPU each process normalises by its own share of the batch")
    return TrainingState(model, make_ema(model, config), make_optimizer(model, config, fused=procs.device.type == "cuda"),
                         torch.Generator(device=procs.device).manual_seed(stream_seed(seed, "noise")))


def stream_seed(seed, purpose, *index):
    """The seed of one random stream of a run: the first 63 bits of sha256("<seed>:<purpose>[:<index>...]").
    Each purpose has a stream of its own, so that two runs on the same --seed share every stream a
    variant does not change (a paired ablation), and no stream repeats another's numbers:
        init            the initial weights
        dropout         torch's global generator during training: the dropout masks
        data, <epoch>   the epoch's order of the images and its flip draws (epoch_draws)
        noise           the training noise levels alpha_bar and the noise eps (batch_draws), saved
                        in the checkpoint
    The validation set is fixed apart from --seed (fixed_validation_set), so that every run's
    validation losses compare."""
    text = ":".join(str(part) for part in (seed, purpose, *index))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


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
    previewed_at: float = dataclasses.field(default_factory=time.time)     # --preview_minutes counts from here
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


def distributed_compiled_step(args, config, procs, state, plan, steps_per_epoch):
    """(step, compile mode): make_train_step on the model wrapped in DistributedDataParallel under
    torchrun, and torch.compile'd as --compile says (auto: compile_plan)."""
    train_model = state.model
    if procs.ddp:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[procs.device.index] if procs.device.type == "cuda" else None)
    ledger = CompileLedger(state.model, procs.device, config.batch_size // procs.world_size, plan, procs.world_size)
    mode, why = {"on": ("whole", "--compile on"), "auto": (None, None)}.get(args.compile, (args.compile, "--compile"))
    if mode is None:
        end = RunEnd.of(args, config, steps_per_epoch)
        eager = measured_step_seconds(config, procs, plan)
        mode, why = compile_plan(procs.device, remaining_seconds(end, state, config, procs, plan),
                                 ledger.expected_seconds, lambda: ledger.expected_gain(eager))
    if procs.ddp:  # every process compiles as rank 0 decided
        shared = [(mode, why)]
        dist.broadcast_object_list(shared, src=0)
        mode, why = shared[0]
    procs.say(f"torch.compile: {mode} ({why}); cache {compile_cache_dir()}")
    if mode == "whole":
        train_model = torch.compile(train_model)
    elif mode == "regional":
        compile_blocks(state.model)  # in place: DistributedDataParallel holds the same module
    step = make_train_step(train_model, state.model, state.ema, state.optimizer, config, plan.autocast_dtype)
    return ledger.timing(step, mode, record=procs.master), mode


def check_compile(flag, device):
    """--compile whole|regional|on where torch.compile cannot work: a one-line error, up front."""
    if flag in ("auto", "off"):
        return
    if device.type == "cpu" and cpp_compiler() is None:
        raise UserError(f"--compile {flag} --device cpu: inductor's CPU backend needs a C++ compiler (g++ or clang++) "
                        f"and none is on PATH; install one or pass --compile off")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--compile {flag}: torch.compile is not supported here on {device.type}; pass --compile off")


STEP_OVERHEAD = 1.2  # a training step (optimiser, EMA, the batch) over the network's forward and backward


def step_seconds(config, procs, plan, state):
    """Expected seconds of one training step: the plan's measurement on the CPU, else (CUDA, or
    the CPU with --precision and --layout given) three eager steps of a copy of the model, timed
    here, at most PROBE_BATCH images on the CPU; times STEP_OVERHEAD."""
    measured = measured_step_seconds(config, procs, plan)
    if measured is not None:
        return measured
    batch = config.batch_size // procs.world_size
    timed = batch if procs.device.type == "cuda" else min(batch, PROBE_BATCH)
    per_image = time_network(state.model, timed, procs.device, "train", plan.autocast_dtype, plan.channels_last,
                             timed_steps=3) / timed
    return per_image * batch * STEP_OVERHEAD


def measured_step_seconds(config, procs, plan):
    """A training step's seconds from the plan's probe (times STEP_OVERHEAD), None when it timed nothing."""
    per_image = plan.seconds_per_image
    return None if per_image is None else per_image * (config.batch_size // procs.world_size) * STEP_OVERHEAD


def remaining_seconds(end, state, config, procs, plan):
    """The run's known remaining length in seconds, None when unknown: --max_minutes directly;
    steps at the expected speed of a step (step_seconds)."""
    candidates = []
    if end.seconds:
        candidates.append(end.seconds - state.train_seconds)
    step_ends = [n for n in (end.steps, end.epoch_steps) if n]
    if step_ends:
        candidates.append((min(step_ends) - state.step) * step_seconds(config, procs, plan, state))
    return min(candidates) if candidates else None


# ---- the loop ----------------------------------------------------------------------------------------

def train(args, config, procs, state, train_step, train_images, validation, run, plan):
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
    start_step, start_seconds = state.step, state.train_seconds
    estimate = measured_step_seconds(config, procs, plan)
    total = lambda per_step: end.last_step(state.step, state.train_seconds, steps_per_epoch * args.num_epochs, per_step)
    with tqdm(total=total(estimate), initial=state.step, disable=not procs.master, unit="step",
              dynamic_ncols=True) as bar:
        while state.epoch < args.num_epochs and stop_reason is None:
            order, flips = epoch_draws(args.seed, state.epoch, len(train_images))
            # once an epoch: a copy from the host inside the loop would sync every step
            order, flips = order.to(train_images.device), flips.to(device)
            while state.batch_in_epoch < steps_per_epoch:
                # Every process draws the whole batch and takes its own slice, so that K processes
                # train exactly as one process with the same global batch.
                batch, u_flip, alpha_bar, eps = (t[mine] for t in batch_draws(config, state.noise_generator, order,
                                                                              flips, state.batch_in_epoch, device))
                x0 = normalise(train_images[batch].to(device, non_blocking=True), config)
                x0 = augment(x0, config, u_flip)
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
                    if end.seconds:  # --max_minutes: the end in steps, at the speed so far
                        bar.total = total((state.train_seconds - start_seconds) / (state.step - start_step))
                if stop_reason:
                    break
                if time.time() - run.latest_saved_at >= 60 * args.save_minutes:
                    save(run, "latest_model.pth", state, config, args.preset, procs)
                if procs.master and run.vis.online and time.time() - run.previewed_at >= 60 * args.preview_minutes:
                    # A CPU epoch takes many minutes: samples in between, from their own noise.
                    run.vis.log_samples(state.step * config.batch_size,
                                        preview_samples(state.ema, config, procs.device, plan))
                    run.previewed_at = time.time()
            if state.batch_in_epoch == steps_per_epoch:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                end_epoch(args, config, procs, state, validation, run, bar, plan)
        if stop_reason not in (None, "interrupted") and run.validated_step != state.step:
            validate(args, config, procs, state, validation, run, bar, plan)  # a limit ends the run measured
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

    def last_step(self, step, seconds, all_epochs_steps, seconds_per_step=None):
        """The step the run will end at, for the progress bar: the first of --max_steps, --max_kimg,
        the epochs, and --max_minutes at seconds_per_step (unknown: not counted)."""
        ends = [n for n in (self.steps, all_epochs_steps) if n]
        if self.seconds and seconds_per_step:
            ends.append(step + math.ceil(max(0.0, self.seconds - seconds) / seconds_per_step))
        return min(ends)

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


def end_epoch(args, config, procs, state, validation, run, bar, plan):
    """Validation every --validate_every epochs (and after the last); a numbered checkpoint and
    latest_model.pth every --save_every epochs."""
    epoch = state.epoch
    if epoch % args.validate_every == 0 or epoch == args.num_epochs:
        validate(args, config, procs, state, validation, run, bar, plan)
    if epoch % args.save_every == 0:
        save(run, f"{epoch}.pth", state, config, args.preset, procs)
        save(run, "latest_model.pth", state, config, args.preset, procs)


def validate(args, config, procs, state, validation, run, bar, plan):
    """The fixed validation set's loss for the weights and their EMA, logged, and the best EMA
    checkpoint (unless --no_best_checkpoint)."""
    epoch, images_seen = state.epoch, state.step * config.batch_size
    val_loss = evaluate_loss(state.model, *validation, config, plan.autocast_dtype)
    val_loss_ema = evaluate_loss(state.ema, *validation, config, plan.autocast_dtype)
    if procs.master:
        append_log(run.file("log.jsonl"), dict(kind="validation", step=state.step, epoch=epoch,
                                                images_seen=images_seen, val_loss=val_loss, val_loss_ema=val_loss_ema))
        samples = preview_samples(state.ema, config, procs.device, plan) if run.vis.online else None
        run.vis.log_validation(images_seen, val_loss, val_loss_ema, samples)
        run.previewed_at = time.time()
        draw_loss_curve(read_log(run.file("log.jsonl")), run.file("loss_curve.png"))
        bar.write(f"epoch {epoch} step {state.step}: validation loss {val_loss:.4f} (EMA {val_loss_ema:.4f})")
    if val_loss_ema < state.best_validation_loss:
        state.best_validation_loss = val_loss_ema
        if not args.no_best_checkpoint:
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

def epoch_draws(seed, epoch, num_images):
    """(order, flip draws) of one epoch, from its own stream (stream_seed "data"): a permutation of
    the images and one uniform draw per position in it, which flips the image there when < 0.5
    (dataset.augment). A function of (seed, epoch) alone, so a resume needs no state for them."""
    generator = torch.Generator().manual_seed(stream_seed(seed, "data", epoch))
    order = torch.randperm(num_images, generator=generator)
    return order, torch.rand(num_images, generator=generator)


def batch_draws(config, noise_generator, order, flips, batch_in_epoch, device):
    """(image indices, flip draws, alpha_bar, eps) of the whole global batch at batch_in_epoch:
    the epoch's slice of order and flips (epoch_draws), then the noise levels and the noise from
    the noise generator, which nothing else draws from."""
    part = slice(batch_in_epoch * config.batch_size, (batch_in_epoch + 1) * config.batch_size)
    alpha_bar = sample_alpha_bar(config, config.batch_size, device, noise_generator)
    eps = torch.randn((config.batch_size, 3, IMAGE_SIZE, IMAGE_SIZE), device=device, generator=noise_generator)
    return order[part], flips[part], alpha_bar, eps


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
        with autocast(x0.device, autocast_dtype):
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
def evaluate_loss(model, x0, eps, alpha_bar, config, autocast_dtype, batch_size=None):
    was_training = model.training
    model.eval()
    total = 0.0
    # Eager: with --compile regional the model's blocks are compiled for training, not for this.
    batch_size = batch_size or sampling_batch(x0.device)
    with torch.compiler.set_stance("force_eager"), autocast(x0.device, autocast_dtype):
        for i in range(0, len(x0), batch_size):
            part = slice(i, i + batch_size)
            total += validation_loss(model, x0[part], eps[part], alpha_bar[part], config).item() * len(x0[part])
    model.train(was_training)
    return total / len(x0)


def preview_samples(ema, config, device, plan, n=16):
    """Samples for visdom, from a copy: sampling_mode with bn_sampling_stats=batch drops the
    BatchNorm running statistics, which training and the checkpoint still need."""
    sampler = copy.deepcopy(ema).sampling_mode()
    return to_uint8(sample(sampler, config, n, generator=torch.Generator().manual_seed(0), device=device,
                           autocast_dtype=plan.autocast_dtype), config).cpu()


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


def warn_cpu_speed(seconds_per_step, plan, config, steps_per_epoch):
    """The expected time of an epoch on the CPU (step_seconds), when it is long."""
    seconds = seconds_per_step * steps_per_epoch
    if seconds > 60:
        duration = f"{seconds / 3600:.1f} hours" if seconds > 5400 else f"{seconds / 60:.0f} minutes"
        print(f"warning: training on the CPU: about {duration} per epoch ({steps_per_epoch} steps of "
              f"{config.batch_size}, {plan.precision}, {plan.layout}); a CUDA GPU is 100x faster "
              f"(preset {CPU_PRESET}, train.py's choice without CUDA, draws avatars after about 75 thousand images; "
              f"visdom shows its samples every --preview_minutes)",
              file=sys.stderr)


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
