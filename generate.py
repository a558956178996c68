"""Sample n x m images from a checkpoint into one grid PNG, as the seed did.

    python generate.py                                    # checkpoints/latest_model.pth -> generated/generated_images_8x4.png
    python generate.py --n 16 --m 8 --sampler ddpm --steps 1000 --seed 1

The grid has n columns and m rows of 32x32 images and no padding: (32 n) x (32 m) pixels.
Unset sampler flags take the values saved in the checkpoint's configuration.
"""
import os

import torch
from tqdm import tqdm

from checkpoint import load_for_sampling
from cli import (ArgumentParser, UserError, atomic_write, compile_cache_dir, make_folder, non_negative_float,
                 parse_bool, pick_device, positive_int, random_seed, run_main)
from config import CHOICES
from dataset import to_uint8
from diffusion import sample, sampler_name

COMPILE_FROM = 2000  # fewer images do not repay compiling (about a minute)


def add_sampler_arguments(parser):
    """The sampling flags shared by generate.py and evaluate.py."""
    parser.add_argument("--sampler", choices=CHOICES["sampler"], default=None,
                        help="ddpm (ancestral), ddim or dpm (DPM-Solver++ 2M); default: the checkpoint's")
    parser.add_argument("--steps", type=positive_int, default=None, help="sampling steps; default: the checkpoint's")
    parser.add_argument("--eta", type=non_negative_float, default=None,
                        help="DDIM's eta (0: deterministic, 1: like DDPM); default: the checkpoint's")
    parser.add_argument("--clamp", type=parse_bool, default=None, metavar="on|off",
                        help="clamp the predicted x0 at each step; default: the checkpoint's")
    parser.add_argument("--seed", type=random_seed, default=0, help="same seed and --batch_size, same images")
    parser.add_argument("--batch_size", type=positive_int, default=1000, help="images sampled at once")
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                        help=f"torch.compile the network (auto: on CUDA for {COMPILE_FROM:,} images or more)")
    parser.add_argument("--no_ema", action="store_true", help="use the raw weights instead of their EMA")
    parser.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu | mps")


def load_model(args, device):
    """The checkpoint's network and configuration, with the sampler flags applied to it."""
    return load_for_sampling(args.checkpoint, device, use_ema=not args.no_ema, sampler=args.sampler,
                             sampling_steps=args.steps, eta=args.eta, clamp_x0=args.clamp)


def generate_images(model, config, num_images, seed=0, batch_size=1000, device="cpu", progress=True, compile="off"):
    """num_images samples with the configuration's sampler, as a uint8 tensor N x 3 x 32 x 32 on
    the CPU. Every batch is sampled whole, the last one too (and cut), so a compiled network sees
    one shape, and more images with the same seed and batch size extend fewer."""
    batch_size = min(batch_size, num_images)
    if compile == "on" or (compile == "auto" and torch.device(device).type == "cuda" and num_images >= COMPILE_FROM):
        compile_cache_dir()
        model = torch.compile(model.to(memory_format=torch.channels_last), dynamic=False)
    generator = torch.Generator().manual_seed(seed)
    images = []
    with tqdm(total=num_images, desc="sampling", unit="img", disable=not progress) as bar:
        for start in range(0, num_images, batch_size):
            n = min(batch_size, num_images - start)
            x = sample(model, config, batch_size, generator=generator, device=device, progress=progress)
            images.append(to_uint8(x[:n], config).cpu())
            bar.update(n)
    return torch.cat(images)


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
    parser.add_argument("--checkpoint", default="checkpoints/latest_model.pth")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing grid of the same size")
    add_sampler_arguments(parser)
    args = parser.parse_args(argv)
    path = os.path.join(args.generated_image_save_dir, f"generated_images_{args.n}x{args.m}.png")
    if os.path.exists(path) and not args.overwrite:
        raise UserError(f"{path} exists: pass --overwrite to replace it, or another --generated_image_save_dir")

    device = pick_device(args.device)
    model, config = load_model(args, device)
    make_folder(args.generated_image_save_dir, "--generated_image_save_dir")
    print(f"{args.checkpoint}: sampling {args.n * args.m} images with {sampler_name(config)} on {device}")
    images = generate_images(model, config, args.n * args.m, seed=args.seed, batch_size=args.batch_size,
                             device=device, compile=args.compile)
    save_grid(images, args.n, args.m, path)
    print(f"wrote {path} ({32 * args.n}x{32 * args.m} pixels)")
    return 0


if __name__ == "__main__":
    run_main(main)
