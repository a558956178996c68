"""Sample n x m images from a checkpoint into one grid PNG, as the seed did.

    python generate.py                                    # checkpoints/latest_model.pth -> generated/generated_images_8x4.png
    python generate.py --n 16 --m 8 --sampler ddpm --steps 1000 --seed 1

The grid has n columns and m rows of 32x32 images and no padding: (32 n) x (32 m) pixels.
Unset sampler flags take the values saved in the checkpoint's configuration.
"""
import argparse
import contextlib
import glob
import hashlib
import json
import math
import os
import shutil
import sys
import time

import torch
from tqdm import tqdm

from checkpoint import load_for_sampling, sampling_checkpoint
from cli import (ArgumentParser, UserError, atomic_write, compile_cache_dir, make_folder,
                 parse_bool, pick_device, positive_int, random_seed, run_main, source_sha256)
from config import CHOICES, ConfigError, parse_value
from dataset import to_uint8
from diffusion import make_scheduler, sample, sampler_name
from speed import CompileLedger, choose_plan, compile_plan, cpp_compiler, sampling_batch

COMPILE_FROM = 2000  # fewer images do not repay compiling (about a minute)
SAMPLING_CODE = ("diffusion.py", "unet.py")  # the samplers and the network: part of KeptBatches's key


def add_sampler_arguments(parser):
    """The sampling flags shared by generate.py and evaluate.py."""
    parser.add_argument("--sampler", choices=CHOICES["sampler"], default=None,
                        help="ddpm (ancestral), ddim or dpm (DPM-Solver++ 2M); default: the checkpoint's")
    parser.add_argument("--steps", type=config_type("sampling_steps"), default=None,
                        help="sampling steps, 1 to 1000; default: the checkpoint's")
    parser.add_argument("--eta", type=config_type("eta"), default=None,
                        help="DDIM's eta, 0 to 1 (0: deterministic, 1: like DDPM); default: the checkpoint's")
    parser.add_argument("--clamp", type=parse_bool, default=None, metavar="on|off",
                        help="clamp the predicted x0 at each step; default: the checkpoint's")
    parser.add_argument("--timestep_spacing", choices=CHOICES["timestep_spacing"], default=None,
                        help="sampler: each sampler's own steps; trailing: every sampler from t = 999 down in equal "
                             "strides (Lin et al. 2024); default: the checkpoint's")
    parser.add_argument("--seed", type=random_seed, default=0,
                        help="same seed, same images, whatever --batch_size (image i has its own random stream), "
                             "except with norm=batch and bn_sampling_stats=batch, which normalise by the batch")
    parser.add_argument("--batch_size", type=positive_int, default=None,
                        help="images per network call (default: 1000 on CUDA, 128 on the CPU, where larger batches "
                             "run slower); it does not change the images")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                        help="auto: bf16 on CUDA; on the CPU the faster of bf16 and fp32 for this network, measured "
                             "(speed.py). bf16 changes the numbers slightly: a study pins one precision for all its rows")
    parser.add_argument("--layout", default="auto", choices=["auto", "contiguous", "channels_last"],
                        help="the activations' memory layout (auto: by the same measurement)")
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                        help=f"torch.compile the network (auto: on CUDA for {COMPILE_FROM:,} images or more; on the "
                             f"CPU when it saves more time than it costs, speed.compile_plan)")
    parser.add_argument("--no_ema", action="store_true", help="use the raw weights instead of their EMA")
    parser.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu | mps")


def config_type(field):
    """An argparse type that checks a sampler flag as --set checks its configuration field."""
    def check(text):
        try:
            return parse_value(field, text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None
    return check


def load_model(args, device):
    """The checkpoint's network and configuration, with the sampler flags applied to it."""
    return load_for_sampling(args.checkpoint, device, use_ema=not args.no_ema, sampler=args.sampler,
                             sampling_steps=args.steps, eta=args.eta, clamp_x0=args.clamp,
                             timestep_spacing=args.timestep_spacing)


def sampling_plan(args, config, device, num_images):
    """speed.choose_plan for the sampling flags (--precision, --batch_size)."""
    batch_size = min(args.batch_size or sampling_batch(device), num_images)
    return choose_plan(args.precision, config, device, batch_size, kind="sample", layout=args.layout)


def generate_images(model, config, num_images, seed=0, batch_size=None, device="cpu", progress=True, compile="off",
                    plan=None, keep=None):
    """num_images samples with the configuration's sampler, as a uint8 tensor N x 3 x 32 x 32 on
    the CPU. Image i comes from its own random stream (image_generators), so the same seed gives
    the same images whatever the batch size, and more images extend fewer. The network runs in
    the plan's precision and layout (default: speed.choose_plan's auto). Every batch is sampled whole,
    the last one too (and cut), so a compiled network sees one shape. keep (KeptBatches): each
    finished batch is saved there, and a batch saved by an earlier run of the same key is read back
    instead of sampled."""
    device = torch.device(device)
    batch_size = min(batch_size or sampling_batch(device), num_images)
    plan = plan or choose_plan("auto", config, device, batch_size, kind="sample")
    model = plan.apply(model)
    ledger = CompileLedger(model, device, batch_size, plan, kind="sample")
    compiled, why = sampling_compile(compile, config, num_images, batch_size, device, plan, ledger)
    if progress:
        print(f"torch.compile: {'on' if compiled else 'off'} ({why})", flush=True)
    if compiled:
        compile_cache_dir()
        if device.type == "cpu" and cpp_compiler() is None:
            raise UserError("--compile on --device cpu: inductor's CPU backend needs a C++ compiler (g++ or clang++) "
                            "and none is on PATH; install one or pass --compile off")
    if keep is not None:
        keep.open(batch_size=batch_size, precision=plan.precision, layout=plan.layout, compiled=compiled,
                  device=device.type, threads=torch.get_num_threads() if device.type == "cpu" else None)
    network = ledger.timing(torch.compile(model, dynamic=False) if compiled else model, "whole" if compiled else "off")
    images = []
    with tqdm(total=num_images, desc="sampling", unit="img", disable=not progress) as bar:
        for start in range(0, num_images, batch_size):
            n = min(batch_size, num_images - start)
            batch = keep.get(start, batch_size) if keep is not None else None
            if batch is None:
                wall, cpu = time.perf_counter(), time.process_time()
                x = sample(network, config, batch_size, generator=image_generators(seed, start, batch_size),
                           device=device, progress=progress, autocast_dtype=plan.autocast_dtype)
                batch = to_uint8(x, config).cpu()
                if keep is not None:
                    keep.put(start, batch, time.perf_counter() - wall, time.process_time() - cpu)
            images.append(batch[:n])
            bar.update(n)
            if keep is not None and keep.read["batches"]:
                bar.set_postfix_str(f"{keep.read['batches']} read back")  # shown at once: reading is quicker than tqdm's refresh
    if keep is not None and keep.read["batches"] and progress:
        read = keep.read["batches"]
        print(f"read {read} batches back from {keep.dir} (sampled there in {keep.read['wall_seconds']:.0f} s); "
              f"sampled the other {len(images) - read}")
    return torch.cat(images)


class KeptBatches:
    """generate_images's finished batches, one file each, so that a stopped run (Ctrl-C, a session's
    end) continues where it stopped with the same images: <folder>/<the key's hash>/batch_<first
    image>.pt holds the batch's images, whole (uint8), and the seconds it took. A batch of another key
    is never read. The caller gives the checkpoint's sha256, the configuration and the seed;
    generate_images adds the batch size, the precision, the layout, compile, the device type and (on
    the CPU) the thread count, whose rounding differs; and the key always holds the sha256 of the
    samplers' and the network's code (SAMPLING_CODE) and torch's version. The CPU's model is not in
    it: continue on the machine that began. read: the batches read back and the seconds (wall, CPU)
    they had taken."""

    def __init__(self, folder, **key):
        code = source_sha256(*SAMPLING_CODE)
        self.folder, self.key, self.dir = folder, {**key, "code_sha256": code, "torch": torch.__version__}, None
        self.read = {"batches": 0, "wall_seconds": 0.0, "cpu_seconds": 0.0}

    def open(self, **more):
        self.key.update(more)
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:20]
        self.dir = make_folder(os.path.join(self.folder, digest), "--resume_dir")
        with atomic_write(os.path.join(self.dir, "key.json"), "w") as f:
            json.dump(self.key, f, indent=1, sort_keys=True)

    def path(self, start):
        return os.path.join(self.dir, f"batch_{start:07d}.pt")

    @staticmethod
    def most_kept(folder):
        """The most batches kept under one key in folder (0 where none): what a rerun of that key reads back."""
        return max((len(glob.glob(os.path.join(key, "batch_*.pt"))) for key in glob.glob(os.path.join(folder, "*"))),
                   default=0)

    def get(self, start, batch_size):
        """The batch of images start .. start + batch_size - 1, or None where none was kept (or its
        file cannot be read: one warning line, and it is sampled again)."""
        path = self.path(start)
        if not os.path.exists(path):
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            images = saved["images"]
            if images.dtype != torch.uint8 or tuple(images.shape) != (batch_size, 3, 32, 32):
                raise ValueError(f"{images.dtype} {tuple(images.shape)}")
        except Exception as e:  # truncated, garbage, or not ours: sample it again
            print(f"warning: {path}: cannot read it ({type(e).__name__}); sampling that batch again", file=sys.stderr)
            return None
        self.read["batches"] += 1
        self.read["wall_seconds"] += float(saved["wall_seconds"])
        self.read["cpu_seconds"] += float(saved["cpu_seconds"])
        return images

    def put(self, start, images, wall_seconds, cpu_seconds):
        with atomic_write(self.path(start)) as f:
            torch.save({"images": images, "wall_seconds": wall_seconds, "cpu_seconds": cpu_seconds}, f)

    def remove(self):
        """Once the images are used: their folder, and the parent folder if nothing else is left in it."""
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.rmdir(self.folder)


def sampling_compile(compile, config, num_images, batch_size, device, plan, ledger):
    """(compile or not, why): --compile on|off; auto: on CUDA from COMPILE_FROM images; on the CPU
    by speed.compile_plan, for a run of this many network calls at the plan's measured speed."""
    if compile != "auto":
        return compile == "on", f"--compile {compile}"
    if device.type == "cuda":
        return num_images >= COMPILE_FROM, f"auto: on CUDA from {COMPILE_FROM:,} images"
    per_image = plan.seconds_per_image
    if per_image is None:
        return False, "auto: not measured (--precision and --layout given)"
    calls = math.ceil(num_images / batch_size) * len(make_scheduler(config).timesteps)
    mode, why = compile_plan(device, per_image * batch_size * calls, ledger.expected_seconds,
                             lambda: ledger.expected_gain(per_image * batch_size))
    return mode == "whole", why


def image_generators(seed, first, count):
    """One generator per image, images first .. first + count - 1 of `seed`: image i's stream is
    seeded from (seed, i) alone."""
    def stream(i):
        digest = hashlib.sha256(f"sample/{seed}/{i}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return [stream(i) for i in range(first, first + count)]


def check_grid_size(n, m):
    """A grid that fits in memory (the samples and the picture, about 3 x 3 KB an image) and in a PNG."""
    needed = 3 * 3 * 32 * 32 * n * m
    with contextlib.suppress(ValueError, OSError, AttributeError):
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if needed > memory / 2:
            raise UserError(f"--n {n} --m {m}: {n * m:,} images need about {needed / 2 ** 30:.0f} GiB, more than half "
                            f"of this machine's memory; ask for a smaller grid")
    if 32 * max(n, m) > 2 ** 31 - 1:
        raise UserError(f"--n {n} --m {m}: a PNG is at most 2**31 - 1 pixels on a side; ask for a smaller grid")


def save_grid(images, n, m, path):
    """n columns, m rows, no padding; written atomically."""
    from PIL import Image
    grid = images.reshape(m, n, 3, 32, 32).permute(0, 3, 1, 4, 2).reshape(32 * m, 32 * n, 3)
    with atomic_write(path) as f:
        Image.fromarray(grid.numpy()).save(f, format="PNG")


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--generated_image_save_dir", default="generated")
    parser.add_argument("--n", type=positive_int, default=8, help="columns")
    parser.add_argument("--m", type=positive_int, default=4, help="rows")
    parser.add_argument("--checkpoint", help="default: checkpoints/latest_model.pth, or, before any training, the "
                                             "pretrained model in models/ (checkpoint.sampling_checkpoint)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing grid of the same size")
    add_sampler_arguments(parser)
    args = parser.parse_args(argv)
    check_grid_size(args.n, args.m)
    path = os.path.join(args.generated_image_save_dir, f"generated_images_{args.n}x{args.m}.png")
    if os.path.exists(path) and not args.overwrite:
        raise UserError(f"{path} exists: pass --overwrite to replace it, or another --generated_image_save_dir")

    device = pick_device(args.device)
    args.checkpoint = sampling_checkpoint(args.checkpoint)
    model, config = load_model(args, device)
    make_folder(args.generated_image_save_dir, "--generated_image_save_dir")
    plan = sampling_plan(args, config, device, args.n * args.m)
    print(f"{args.checkpoint}: sampling {args.n * args.m} images with {sampler_name(config)} on {device}, "
          f"{plan.describe()}")
    images = generate_images(model, config, args.n * args.m, seed=args.seed, batch_size=args.batch_size,
                             device=device, compile=args.compile, plan=plan)
    save_grid(images, args.n, args.m, path)
    print(f"wrote {path} ({32 * args.n}x{32 * args.m} pixels)")
    return 0


if __name__ == "__main__":
    run_main(main)
