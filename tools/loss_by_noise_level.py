"""The denoising error at each noise level: where along the noise process a network is good or bad.

The validation loss averages the error over the levels that training draws, so two networks with
about the same average can fail at different levels; and the levels near pure noise, the first
sampler steps, are the ones that decide a sample's colours and layout. For each checkpoint and each
step t of DDPM's linear schedule this prints the mean squared error of the implied eps on fixed test
images and noise (what diffusion.validation_loss measures), and its colour part: the error of each
image's mean per channel, the share of the error that tints a whole image. The two parts add up:
error = colour + the rest. fp32, the EMA weights unless --no_ema.

    python tools/loss_by_noise_level.py --checkpoint RUN_A/latest_model.pth RUN_B/latest_model.pth
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from checkpoint import load_for_sampling  # noqa: E402
from cli import ArgumentParser, pick_device, positive_int, random_seed, run_main  # noqa: E402
from dataset import load_folder, normalise  # noqa: E402
from diffusion import NUM_TRAIN_TIMESTEPS, eps_error, linear_alpha_bar  # noqa: E402

STEPS = "0,50,100,200,300,400,500,600,700,800,900,999"


def steps_of(text):
    """argparse type for --steps: comma-separated steps t of the linear schedule, each in 0..999."""
    try:
        steps = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: write steps t as integers separated by commas, such as "
                                         f"{STEPS}") from None
    if any(not 0 <= t < NUM_TRAIN_TIMESTEPS for t in steps):
        raise argparse.ArgumentTypeError(f"{text}: each step t must be in 0..{NUM_TRAIN_TIMESTEPS - 1}")
    return steps


@torch.no_grad()
def error_parts(model, config, images, eps, alpha_bar, batch_size=200):
    """(mean squared error of the implied eps, its colour part) over the images at one level."""
    total = colour = 0.0
    for start in range(0, len(images), batch_size):
        x0 = normalise(images[start:start + batch_size], config)
        error = eps_error(model, x0, eps[start:start + batch_size], alpha_bar.expand(len(x0)), config)
        total += error.square().mean(dim=(1, 2, 3)).sum().item()
        colour += error.mean(dim=(2, 3)).square().mean(dim=1).sum().item()
    return total / len(images), colour / len(images)


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", nargs="+", required=True, help="one or more checkpoints (latest_model.pth)")
    parser.add_argument("--test_dir", default="images/test_images_downsample", help="default: %(default)s")
    parser.add_argument("--num_images", type=positive_int, default=400,
                        help="the first N test images (default: %(default)s)")
    parser.add_argument("--steps", type=steps_of, default=STEPS,
                        help="steps t of the linear schedule (default: %(default)s)")
    parser.add_argument("--seed", type=random_seed, default=0, help="the noise's seed (default: %(default)s)")
    parser.add_argument("--no_ema", action="store_true", help="the raw weights instead of the EMA")
    parser.add_argument("--device", default="cpu", help="default: %(default)s")
    args = parser.parse_args(argv)
    images = load_folder(args.test_dir, "--test_dir")[:args.num_images]
    device = pick_device(args.device)
    models = [load_for_sampling(path, device, use_ema=not args.no_ema) for path in args.checkpoint]
    images = images.to(device)
    eps = torch.randn(images.shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
    table = linear_alpha_bar(str(device))
    print(f"{len(images)} images of {args.test_dir}, noise seed {args.seed}, "
          f"{'raw' if args.no_ema else 'EMA'} weights, fp32; columns: eps error / its colour part")
    for i, path in enumerate(args.checkpoint, 1):
        print(f"  {i}: {path}")
    print("\n| t | alpha_bar | " + " | ".join(f"{i}: error | {i}: colour" for i in range(1, len(models) + 1)) + " |")
    print("|" + "---:|" * (2 + 2 * len(models)))
    for t in args.steps:
        cells = [f"{value:.5f}" for model, config in models
                 for value in error_parts(model, config, images, eps, table[t])]
        print(f"| {t} | {table[t].item():.2e} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    run_main(main)
