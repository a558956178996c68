"""Downsample the 1024x1024 playground-v2.5 images to the 32x32 training images.

Each output pixel is the average of its whole 32x32 source footprint (Pillow's box filter, that is
area averaging; `--filter lanczos` is the alternative). The seed used cv2.resize's default,
bilinear interpolation, which from 1024 to 32 reads only 2x2 of every 32x32 source pixels: fine
detail (hair strands, line art) then aliases into false patterns. Transparent images are
composited on white first, since the prompt asks for a white background.

    python images/downsample.py --source_image_dir images/train_images \
        --dest_image_dir images/train_images_downsample

Output files are RGB PNGs named like their source ({i}.png stays {i}.png). Files that are not
images (by extension) and hidden files are ignored; images that cannot be decoded are skipped and
listed at the end. A `--num_samples` subset is drawn at random, reproducibly with `--seed`.
"""

import argparse
import multiprocessing
import os
import random
import sys

from PIL import Image
from tqdm import tqdm

# Run as `python images/downsample.py`, only images/ is on the path: the shared modules are at the root.
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cli import (ArgumentParser, UserError, atomic_write, make_folder, non_negative_int,  # noqa: E402
                 parse_bool, positive_int, run_main)
from dataset import natural_key, on_white  # noqa: E402

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FILTERS = {"area": Image.Resampling.BOX, "lanczos": Image.Resampling.LANCZOS}
# What Pillow raises for a file that is not a readable image (truncated, corrupt, wrong format).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def downsample_image(image, width, height, filter_name="area"):
    """`image` (any mode) as a width x height RGB image, antialiased."""
    return on_white(image).resize((width, height), FILTERS[filter_name])


def save_png(image, path):
    """Through a temporary name (cli.atomic_write): a killed run never leaves a truncated PNG."""
    with atomic_write(path) as f:
        image.save(f, format="PNG")


def downsample_file(job):
    """Worker: returns (source name, "done" | "exists" | "undecodable")."""
    source_path, dest_path, width, height, filter_name, skip_exists = job
    name = os.path.basename(source_path)
    if skip_exists and os.path.exists(dest_path):
        return name, "exists"
    try:
        with Image.open(source_path) as image:
            image.load()
            small = downsample_image(image, width, height, filter_name)
    except DECODE_ERRORS:
        return name, "undecodable"
    save_png(small, dest_path)
    return name, "done"


def list_images(directory):
    """(image file names in natural order, number of other files ignored)."""
    names = [n for n in os.listdir(directory) if os.path.isfile(os.path.join(directory, n))]
    images = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")]
    return sorted(images, key=natural_key), len(names) - len(images)


def choose_subset(names, num_samples, seed):
    """All names when num_samples <= 0 or covers them all, else a random subset fixed by seed."""
    if num_samples <= 0 or num_samples >= len(names):
        return names
    return sorted(random.Random(seed).sample(names, num_samples), key=natural_key)


def all_or_count(text):
    """--num_samples: -1 for all the images, else a count of at least 1."""
    if text.strip() == "-1":
        return -1
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text} must be -1 (all images) or at least 1") from None


def parse_args(argv=None):
    parser = ArgumentParser(
        description="Downsample images (e.g. 1024x1024 playground-v2.5 output) to small RGB PNGs, antialiased.")
    parser.add_argument("--source_image_dir", default="images/train_images")
    parser.add_argument("--dest_image_dir", default="images/train_images_downsample")
    parser.add_argument("--dest_image_height", type=positive_int, default=32)
    parser.add_argument("--dest_image_width", type=positive_int, default=32)
    parser.add_argument("--num_samples", type=all_or_count, default=-1,
                        help="downsample a random subset of this many images (-1: all)")
    parser.add_argument("--skip_exists", type=parse_bool, nargs="?", const=True, default=True,
                        help="keep output files that already exist (True/False; default True)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the --num_samples subset")
    parser.add_argument("--filter", choices=sorted(FILTERS), default="area",
                        help="antialiasing filter: area (box average) or lanczos")
    parser.add_argument("--num_workers", type=positive_int, default=os.cpu_count() or 1,
                        help="worker processes (default: one per CPU core)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isdir(args.source_image_dir):
        raise UserError(f"--source_image_dir {args.source_image_dir} is not a folder: "
                        "make the images first (bash images/generate_images_for_train.sh or _test.sh)")
    names, ignored = list_images(args.source_image_dir)
    if not names:
        raise UserError(f"--source_image_dir {args.source_image_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}): "
                        "point it at the folder of large images")
    names = choose_subset(names, args.num_samples, args.seed)
    outputs = {}
    for name in names:
        outputs.setdefault(os.path.splitext(name)[0] + ".png", []).append(name)
    clashes = [sources for sources in outputs.values() if len(sources) > 1]
    if clashes:
        raise UserError(f"{' and '.join(clashes[0])} in --source_image_dir would both be written as "
                        f"{os.path.splitext(clashes[0][0])[0]}.png: rename one of them")

    make_folder(args.dest_image_dir, "--dest_image_dir")
    jobs = [(os.path.join(args.source_image_dir, sources[0]), os.path.join(args.dest_image_dir, out_name),
             args.dest_image_width, args.dest_image_height, args.filter, args.skip_exists)
            for out_name, sources in outputs.items()]
    counts = {"done": 0, "exists": 0, "undecodable": 0}
    undecodable = []
    progress = tqdm(total=len(jobs), unit="img", desc="downsampling")
    workers = min(args.num_workers, len(jobs))
    with multiprocessing.Pool(workers) if workers > 1 else _InProcess() as pool:
        for name, status in pool.imap_unordered(downsample_file, jobs, chunksize=16):
            counts[status] += 1
            if status == "undecodable":
                undecodable.append(name)
            progress.update()
    progress.close()

    size = f"{args.dest_image_width}x{args.dest_image_height}"
    print(f"downsampled {counts['done']} images to {size} into {args.dest_image_dir}; "
          f"{counts['exists']} already there (kept); {ignored} non-image files ignored; "
          f"{counts['undecodable']} undecodable")
    if undecodable:
        undecodable.sort(key=natural_key)
        shown = ", ".join(undecodable[:20]) + (", ..." if len(undecodable) > 20 else "")
        print(f"warning: skipped {len(undecodable)} file(s) that could not be decoded: {shown}",
              file=sys.stderr)


class _InProcess:
    """Stands in for multiprocessing.Pool with one worker: no processes to start."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap_unordered(self, function, jobs, chunksize=1):
        return map(function, jobs)


if __name__ == "__main__":
    run_main(main)
