"""Train the denoiser. Resumes from <model_checkpoint_dir>/latest_model.pth when it exists.

    python train.py                                   # preset default, the default data set
    python train.py --preset seed                     # exactly the seed's model and training
    python train.py --set norm=batch --set noise_cond=none --model_checkpoint_dir checkpoints/ablation
    torchrun --nproc_per_node 4 train.py ...          # DistributedDataParallel on 4 GPUs

Reads top to bottom: command line, set-up, resume, the loop, then the helpers it uses.
Ctrl-C saves an exact checkpoint before it exits.
"""
import argparse
import contextlib
import copy
import json
import math
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
from tqdm import tqdm

from config import PRESETS, ConfigError, config_from_dict, config_text, config_to_dict, make_config
from dataset import DatasetError, augment, load_image_folder, normalise, to_uint8
from diffusion import sample, sample_alpha_bar, training_loss, validation_loss
from plot_log import draw_loss_curve, read_log
from unet import UNet, count_parameters, forward_flops
from visdom_logger import VisdomLogger

CHECKPOINT_FORMAT = 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # the seed's flags
    p.add_argument("--train_dataset_directory", default="images/train_images_downsample")
    p.add_argument("--validate_dataset_directory", default="images/test_images_downsample")
    p.add_argument("--model_checkpoint_dir", default="checkpoints")
    p.add_argument("--learning_rate", type=float, default=None, help="overrides the preset's learning_rate")
    p.add_argument("--batch_size", type=int, default=None, help="global batch; overrides the preset's batch_size")
    p.add_argument("--num_epochs", type=int, default=5000)
    p.add_argument("--validate_every", type=int, default=1, help="epochs between validations")
    p.add_argument("--save_every", type=int, default=50, help="epochs between numbered checkpoints <epoch>.pth")
    # ours
    p.add_argument("--preset", default="default", help=f"a whole configuration: {', '.join(PRESETS)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one configuration field (repeatable), e.g. --set norm=group")
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many optimiser steps (0: no limit)")
    p.add_argument("--max_minutes", type=float, default=0, help="stop after this many minutes of training (0: no limit)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu | mps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints and start over")
    p.add_argument("--no_visdom", action="store_true", help="no live plots")
    p.add_argument("--visdom_port", type=int, default=8097)
    p.add_argument("--skip_bad_images", action="store_true", help="skip undecodable images instead of stopping")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="torch.compile (auto: on CUDA)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 autocast on CUDA")
    p.add_argument("--log_every", type=int, default=50, help="optimiser steps between loss read-backs")
    p.add_argument("--validation_images", type=int, default=1000, help="size of the fixed validation set")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    for flag in ("num_epochs", "validate_every", "save_every", "log_every", "validation_images"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if args.max_steps < 0 or args.max_minutes < 0:
        raise UserError("--max_steps and --max_minutes must be 0 (no limit) or positive")

    # ---- set-up: processes, device, configuration -----------------------------------------------
    ddp = "RANK" in os.environ  # launched by torchrun
    rank, world_size = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = pick_device(args.device, local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    say = print if master else (lambda *a, **k: None)

    ckpt_dir = args.model_checkpoint_dir
    latest_path = os.path.join(ckpt_dir, "latest_model.pth")
    overrides = list(args.set)
    if args.learning_rate is not None:
        overrides.append(f"learning_rate={args.learning_rate}")
    if args.batch_size is not None:
        overrides.append(f"batch_size={args.batch_size}")
    config = make_config(args.preset, overrides)
    checkpoint = None
    if os.path.exists(latest_path) and not args.fresh:
        checkpoint = load_checkpoint(latest_path)
        saved = config_from_dict(checkpoint["config"])
        asked_explicitly = args.set or args.learning_rate is not None or args.batch_size is not None or "--preset" in (argv or sys.argv)
        if saved != config and asked_explicitly:
            differ = [k for k, v in config_to_dict(config).items() if config_to_dict(saved)[k] != v]
            raise UserError(f"{latest_path} was trained with a different configuration ({', '.join(differ)}): "
                            f"pass --fresh to start over, or use another --model_checkpoint_dir")
        config = saved
    if config.batch_size % world_size:
        raise UserError(f"--batch_size {config.batch_size} is not divisible by the {world_size} processes")
    local_batch = config.batch_size // world_size
    use_cuda = device.type == "cuda"
    autocast_dtype = torch.bfloat16 if (args.precision == "bf16" or (args.precision == "auto" and use_cuda)) else None
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)

    # ---- data: uint8 on the device when it fits ---------------------------------------------------
    train_images = load_image_folder(args.train_dataset_directory, args.skip_bad_images)
    val_images = load_image_folder(args.validate_dataset_directory, args.skip_bad_images)[:args.validation_images]
    if len(train_images) < config.batch_size:
        raise UserError(f"--batch_size {config.batch_size} is larger than the {len(train_images)} images in "
                        f"{args.train_dataset_directory}: lower --batch_size")
    train_images = train_images.to(device) if fits_on_device(train_images, device) else train_images.pin_memory() if use_cuda else train_images
    val_images = val_images.to(device)
    steps_per_epoch = len(train_images) // config.batch_size

    # ---- model, EMA, optimiser ---------------------------------------------------------------------
    model = UNet(config).to(device)
    if use_cuda:
        model = model.to(memory_format=torch.channels_last)
    if ddp and config.norm == "batch":
        if use_cuda:  # statistics over the global batch, as one process would compute them
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            say("warning: SyncBatchNorm needs GPUs; on the CPU each process normalises by its own share of the batch")
    ema = copy.deepcopy(model).requires_grad_(False) if config.ema_decay > 0 else model
    optimizer = make_optimizer(model, config, fused=use_cuda)
    flops_per_image = 3 * forward_flops(model)  # forward + backward (2x forward)

    step, epoch, batch_in_epoch, best_val = 0, 0, 0, math.inf
    noise_generator = torch.Generator(device=device).manual_seed(args.seed)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        if ema is not model:
            ema.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step, epoch, batch_in_epoch = checkpoint["step"], checkpoint["epoch"], checkpoint["batch_in_epoch"]
        best_val = checkpoint["best_validation_loss"]
        restore_rng(checkpoint["rng"], noise_generator, device)
        say(f"resuming {latest_path}: epoch {epoch}, step {step}")
    elif master and args.fresh:
        for stale in ("log.jsonl", "loss_curve.png"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(ckpt_dir, stale))

    train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None) if ddp else model
    if args.compile == "on" or (args.compile == "auto" and use_cuda):
        train_model = torch.compile(train_model)
    train_step = make_train_step(train_model, model, ema, optimizer, config, autocast_dtype)

    # Fixed validation triples, independent of --seed, so that any two runs' curves compare.
    val_generator = torch.Generator().manual_seed(1234)
    val_x0 = normalise(val_images, config)
    val_eps = torch.randn(val_x0.shape, generator=val_generator).to(device)
    val_alpha_bar = torch.rand(len(val_x0), generator=val_generator).clamp(1e-4, 1 - 1e-4).to(device)

    run_name = os.path.basename(os.path.abspath(ckpt_dir))
    log_path = os.path.join(ckpt_dir, "log.jsonl")
    vis = VisdomLogger(port=args.visdom_port, env=run_name, enabled=master and not args.no_visdom)
    if master:
        os.makedirs(ckpt_dir, exist_ok=True)
        truncate_log(log_path, step)
        if step == 0:
            append_log(log_path, {"kind": "config", "run": run_name, "preset": args.preset, "config": config_to_dict(config)})
        vis.log_config(config_to_dict(config))
    say(f"configuration (preset {args.preset}):\n{config_text(config)}")
    say(f"model: {count_parameters(model):,} parameters, {flops_per_image / 1e9:.1f} GFLOP per training image; "
        f"device {device}{f' x {world_size} processes' if ddp else ''}, precision {'bf16' if autocast_dtype else 'fp32'}")
    say(f"data: {len(train_images):,} train images from {args.train_dataset_directory}, "
        f"{len(val_images):,} validation images from {args.validate_dataset_directory}; "
        f"{steps_per_epoch} steps of {config.batch_size} per epoch")
    if device.type == "cpu" and master:
        warn_cpu_speed(model, config, steps_per_epoch)

    # ---- the loop ------------------------------------------------------------------------------------
    writer, writing = ThreadPoolExecutor(max_workers=1), []

    def save(path):
        """Everything needed to continue exactly here; rank 0 alone writes. The state is copied to
        the CPU now and written to disk in the background while training goes on, one file at a time."""
        if master:
            finish_writing()
            state = on_cpu({
                "format": CHECKPOINT_FORMAT, "config": config_to_dict(config), "preset": args.preset,
                "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "best_validation_loss": best_val,
                "rng": {"torch": torch.get_rng_state(), "noise": noise_generator.get_state(),
                        "cuda": torch.cuda.get_rng_state(device) if use_cuda else None},
            })
            writing.append(writer.submit(save_checkpoint, path, state))

    def finish_writing():
        while writing:
            try:
                writing.pop().result()
            except UserError:  # a failed write: end the progress bar's line before the error's
                bar.close()
                raise

    stop_requested = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop_requested.append(True))
    start_time, window_start, window_steps = time.time(), time.time(), 0
    loss_sum = torch.zeros((), device=device)
    bar = tqdm(total=steps_per_epoch * args.num_epochs, initial=epoch * steps_per_epoch + batch_in_epoch,
               disable=not master, unit="step", dynamic_ncols=True)
    stop_reason = None
    while epoch < args.num_epochs and stop_reason is None:
        order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(args.seed * 1_000_003 + epoch))
        order = order.to(train_images.device)  # once an epoch: a copy from the host inside the loop would sync every step
        while batch_in_epoch < steps_per_epoch:
            batch = order[batch_in_epoch * config.batch_size:(batch_in_epoch + 1) * config.batch_size]
            # Every process draws the whole batch's noise and takes its own slice, so that K
            # processes train exactly as one process with the same global batch.
            mine = slice(rank * local_batch, (rank + 1) * local_batch)
            x0 = normalise(train_images[batch][mine].to(device, non_blocking=True), config)
            x0 = augment(x0, config, torch.rand(config.batch_size, device=device, generator=noise_generator)[mine])
            alpha_bar = sample_alpha_bar(config, config.batch_size, device, noise_generator)[mine]
            eps = torch.randn((config.batch_size, *x0.shape[1:]), device=device, generator=noise_generator)[mine]
            loss_sum += train_step(x0, eps, alpha_bar, learning_rate_at(config, step), ema_decay_at(config, step))
            step, batch_in_epoch, window_steps = step + 1, batch_in_epoch + 1, window_steps + 1
            bar.update(1)

            if args.max_steps and step >= args.max_steps:
                stop_reason = f"reached --max_steps {args.max_steps}"
            elif ddp and step % args.log_every:
                pass  # several processes look at the clock and Ctrl-C only where they agree, below
            elif args.max_minutes and time.time() - start_time >= 60 * args.max_minutes:
                stop_reason = f"reached --max_minutes {args.max_minutes}"
            elif stop_requested:
                stop_reason = "interrupted"
            if ddp and step % args.log_every == 0:
                stop_reason = agree_on_stop(stop_reason)

            last_step = epoch == args.num_epochs - 1 and batch_in_epoch == steps_per_epoch
            if step % args.log_every == 0 or stop_reason or last_step:
                if ddp:  # the global batch's loss, not this process's share of it
                    dist.all_reduce(loss_sum)
                    loss_sum /= world_size
                train_loss = loss_sum.item() / window_steps  # the only host sync, every log_every steps
                img_per_s = window_steps * config.batch_size / (time.time() - window_start)
                record = dict(kind="train", step=step, epoch=epoch, images_seen=step * config.batch_size,
                              train_loss=train_loss, lr=learning_rate_at(config, step - 1), img_per_s=img_per_s,
                              time=time.time() - start_time)
                if master:
                    append_log(log_path, record)
                    vis.log_train(record["images_seen"], train_loss, record["lr"], img_per_s)
                    bar.set_postfix(loss=f"{train_loss:.4f}", img_s=f"{img_per_s:,.0f}",
                                    tflops=f"{img_per_s * flops_per_image / 1e12:.1f}")
                loss_sum.zero_()
                window_start, window_steps = time.time(), 0
            if stop_reason:
                break
        if batch_in_epoch == steps_per_epoch:
            epoch, batch_in_epoch = epoch + 1, 0
            if epoch % args.validate_every == 0 or epoch == args.num_epochs:
                val_loss = evaluate_loss(model, val_x0, val_eps, val_alpha_bar, config, autocast_dtype)
                val_loss_ema = evaluate_loss(ema, val_x0, val_eps, val_alpha_bar, config, autocast_dtype)
                if master:
                    append_log(log_path, dict(kind="validation", step=step, epoch=epoch,
                                              images_seen=step * config.batch_size,
                                              val_loss=val_loss, val_loss_ema=val_loss_ema))
                    samples = preview_samples(ema, config, device) if vis.online else None
                    vis.log_validation(step * config.batch_size, val_loss, val_loss_ema, samples)
                    draw_loss_curve(read_log(log_path), os.path.join(ckpt_dir, "loss_curve.png"))
                    bar.write(f"epoch {epoch} step {step}: validation loss {val_loss:.4f} (EMA {val_loss_ema:.4f})")
                if val_loss_ema < best_val:
                    best_val = val_loss_ema
                    save(os.path.join(ckpt_dir, "best_validation_checkpoint.pth"))
            if epoch % args.save_every == 0:
                save(os.path.join(ckpt_dir, f"{epoch}.pth"))
        save(latest_path)
    finish_writing()
    bar.close()
    say(f"stopped: {stop_reason or f'finished {args.num_epochs} epochs'}; epoch {epoch}, step {step}; "
        f"checkpoint {latest_path}")
    if ddp:
        dist.destroy_process_group()
    return 130 if stop_reason == "interrupted" else 0


# ---- one training step: everything that happens per batch ------------------------------------------

def make_train_step(train_model, model, ema, optimizer, config, autocast_dtype):
    """A function (x0, eps, alpha_bar, lr, ema_decay) -> loss tensor that never waits for the GPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    ema_params = list(ema.parameters()) if ema is not model else None

    def train_step(x0, eps, alpha_bar, lr, ema_decay):
        train_model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(x0.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = training_loss(train_model, x0, eps, alpha_bar, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip, foreach=True)
        optimizer.step()
        if ema_params is not None:
            update_ema(model, ema, params, ema_params, ema_decay)
        return loss.detach()

    return train_step


@torch.no_grad()
def update_ema(model, ema, params, ema_params, decay):
    torch._foreach_lerp_(ema_params, params, 1 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):  # BatchNorm statistics follow the model
        b_ema.copy_(b)


def learning_rate_at(config, step):
    """Linear warm-up over warmup_steps, then constant."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    return config.learning_rate


def ema_decay_at(config, step):
    """The EMA's decay ramps up as (1 + step) / (10 + step) until it reaches ema_decay, so that
    a short run's EMA is not dominated by the random initial weights."""
    return min(config.ema_decay, (1 + step) / (10 + step))


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
    with torch.autocast(x0.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        for i in range(0, len(x0), batch_size):
            part = slice(i, i + batch_size)
            total += validation_loss(model, x0[part], eps[part], alpha_bar[part], config).item() * len(x0[part])
    model.train(was_training)
    return total / len(x0)


def preview_samples(ema, config, device, n=16):
    was_training = ema.training
    images = to_uint8(sample(ema.sampling_mode(), config, n, generator=torch.Generator().manual_seed(0), device=device), config)
    ema.train(was_training)
    return images.cpu()


# ---- checkpoints: one file, weights_only-loadable, written atomically ----------------------------------

def on_cpu(state):
    """A copy of a (nested) state with every tensor on the CPU, which training cannot change."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: on_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(on_cpu(v) for v in state)
    return state


def save_checkpoint(path, state):
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: a kill leaves either the old file or the new one
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise UserError(f"{path}: cannot write the checkpoint ({e.strerror or e}); free some disk space or "
                        f"pass another --model_checkpoint_dir") from None


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint dict, or a one-line UserError. weights_only: a checkpoint cannot run code."""
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such checkpoint; train first (bash train_UNet.sh) or pass --checkpoint") from None
    except Exception as e:
        raise UserError(f"{path}: cannot read this checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                        f"it may be truncated: use an older <epoch>.pth or best_validation_checkpoint.pth beside it, "
                        f"or pass --fresh to train from scratch") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a checkpoint of this project (format {CHECKPOINT_FORMAT})")
    return checkpoint


def restore_rng(rng, noise_generator, device):
    torch.set_rng_state(rng["torch"])
    noise_generator.set_state(rng["noise"])
    if rng.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


# ---- small helpers -------------------------------------------------------------------------------------

class UserError(Exception):
    """A user's mistake: printed as one line, exit status 2."""


def agree_on_stop(reason):
    """Any process's reason to stop, for all of them: a Ctrl-C or the clock can reach the processes
    at different steps, and one that stopped alone would leave the others waiting for it forever."""
    reasons = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, reason)
    return next((r for r in reasons if r), None)


def pick_device(name, local_rank=0):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is visible; use --device cpu (or auto)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name not in ("cpu", "mps"):
        raise UserError(f"--device {name}: choose auto, cuda, cpu or mps")
    return torch.device(name)


def fits_on_device(images, device):
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return images.numel() < 0.25 * free


def warn_cpu_speed(model, config, steps_per_epoch):
    """Time two small steps on a copy of the model and extrapolate to an epoch."""
    probe = copy.deepcopy(model).train()
    x = torch.zeros(4, 3, 32, 32)
    alpha_bar = torch.full((4,), 0.5)
    with torch.random.fork_rng():  # leave the training's random stream untouched (exact resume)
        for i in range(2):
            start = time.time()
            probe(x, alpha_bar).square().mean().backward()
    seconds = (time.time() - start) / 4 * config.batch_size * steps_per_epoch * 1.3  # + optimiser, EMA
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
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, path)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (UserError, ConfigError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
