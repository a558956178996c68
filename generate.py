"""Sample n x m images from a checkpoint into one grid PNG, as the seed did.

    python generate.py                                    # checkpoints/latest_model.pth -> generated/generated_images_8x4.png
    python generate.py --n 16 --m 8 --sampler ddpm --steps 1000 --seed 1

The grid has n columns and m rows of 32x32 images and no padding: (32 n) x (32 m) pixels.
Unset sampler flags take the values saved in the checkpoint's configuration.
"""
import argparse
import os
import sys

import torch
from tqdm import tqdm

from config import CHOICES, ConfigError, config_from_dict
from dataset import to_uint8
from diffusion import sample
from train import UserError, load_checkpoint, pick_device
from unet import UNet


def add_sampler_arguments(parser):
    """The sampling flags shared by generate.py and evaluate.py."""
    parser.add_argument("--sampler", choices=CHOICES["sampler"], default=None,
                        help="ddpm (ancestral), ddim or dpm (DPM-Solver++ 2M); default: the checkpoint's")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps; default: the checkpoint's")
    parser.add_argument("--eta", type=float, default=None, help="DDIM's eta (0: deterministic, 1: like DDPM)")
    parser.add_argument("--clamp", choices=["on", "off"], default=None, help="clamp the predicted x0 at each step")
    parser.add_argument("--seed", type=int, default=0, help="same seed and --batch_size, same images")
    parser.add_argument("--batch_size", type=int, default=1000, help="images sampled at once")
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                        help=f"torch.compile the network (auto: on CUDA for {COMPILE_FROM:,} images or more)")
    parser.add_argument("--no_ema", action="store_true", help="use the raw weights instead of their EMA")
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu | mps")


COMPILE_FROM = 2000  # fewer images do not repay compiling (about a minute)


def load_model(checkpoint_path, device, use_ema=True):
    """The network of a checkpoint, rebuilt from its saved configuration, ready to sample."""
    checkpoint = load_checkpoint(checkpoint_path)
    config = config_from_dict(checkpoint["config"])
    model = UNet(config)
    model.load_state_dict(checkpoint["ema" if use_ema else "model"])
    return model.to(device).sampling_mode(), config


def generate_images(model, config, num_images, sampler=None, steps=None, eta=None, clamp=None, seed=0,
                    batch_size=1000, device="cpu", progress=True, compile="off"):
    """num_images samples as a uint8 tensor N x 3 x 32 x 32 on the CPU.

    Every batch is sampled whole, the last one too (and cut), so a compiled network sees one shape."""
    if steps is not None and steps < 1:
        raise UserError(f"--steps {steps}: must be at least 1")
    if batch_size < 1:
        raise UserError(f"--batch_size {batch_size}: must be at least 1")
    if isinstance(clamp, str):
        clamp = clamp == "on"
    batch_size = min(batch_size, num_images)
    if compile == "on" or (compile == "auto" and torch.device(device).type == "cuda" and num_images >= COMPILE_FROM):
        model = torch.compile(model.to(memory_format=torch.channels_last), dynamic=False)
    generator = torch.Generator().manual_seed(seed)
    images = []
    with tqdm(total=num_images, desc="sampling", unit="img", disable=not progress) as bar:
        for start in range(0, num_images, batch_size):
            n = min(batch_size, num_images - start)
            x = sample(model, config, batch_size, sampler=sampler, steps=steps, eta=eta, clamp=clamp,
                       generator=generator, device=device, progress=progress)
            images.append(to_uint8(x[:n], config).cpu())
            bar.update(n)
    return torch.cat(images)


def save_grid(images, n, m, path):
    """n columns, m rows, no padding; written atomically."""
    from PIL import Image
    grid = images.reshape(m, n, 3, 32, 32).permute(0, 3, 1, 4, 2).reshape(32 * m, 32 * n, 3)
    tmp = path + ".tmp.png"
    Image.fromarray(grid.numpy()).save(tmp)
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generated_image_save_dir", default="generated")
    parser.add_argument("--n", type=int, default=8, help="columns")
    parser.add_argument("--m", type=int, default=4, help="rows")
    parser.add_argument("--checkpoint", default="checkpoints/latest_model.pth")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing grid of the same size")
    add_sampler_arguments(parser)
    args = parser.parse_args(argv)
    if args.n < 1 or args.m < 1:
        raise UserError(f"--n {args.n} --m {args.m}: both must be at least 1")
    path = os.path.join(args.generated_image_save_dir, f"generated_images_{args.n}x{args.m}.png")
    if os.path.exists(path) and not args.overwrite:
        raise UserError(f"{path} exists: pass --overwrite to replace it, or another --generated_image_save_dir")

    device = pick_device(args.device)
    model, config = load_model(args.checkpoint, device, use_ema=not args.no_ema)
    sampler, steps = args.sampler or config.sampler, args.steps or config.sampling_steps
    print(f"{args.checkpoint}: sampling {args.n * args.m} images with {sampler}-{steps} on {device}")
    images = generate_images(model, config, args.n * args.m, sampler=args.sampler, steps=args.steps, eta=args.eta,
                             clamp=args.clamp, seed=args.seed, batch_size=args.batch_size, device=device,
                             compile=args.compile)
    os.makedirs(args.generated_image_save_dir, exist_ok=True)
    save_grid(images, args.n, args.m, path)
    print(f"wrote {path} ({32 * args.n}x{32 * args.m} pixels)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (UserError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
