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
import re
import sys

from PIL import Image
from tqdm import tqdm

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FILTERS = {"area": Image.Resampling.BOX, "lanczos": Image.Resampling.LANCZOS}
# What Pillow raises for a file that is not a readable image (truncated, corrupt, wrong format).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def parse_bool(text):
    """argparse type for booleans: the seed's type=bool turned every non-empty string, "False"
    included, into True."""
    value = str(text).strip().lower()
    if value in ("true", "1", "yes", "y", "on"):
        return True
    if value in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False (or 1/0), got {text!r}")


def natural_key(name):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def on_white(image):
    """RGB version of `image`, with any transparency composited onto a white background."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def downsample_image(image, width, height, filter_name="area"):
    """`image` (any mode) as a width x height RGB image, antialiased."""
    return on_white(image).resize((width, height), FILTERS[filter_name])


def save_png(image, path):
    """Write to a temporary name, then rename: a killed run never leaves a truncated PNG."""
    directory, name = os.path.split(path)
    temporary = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    image.save(temporary, format="PNG")
    os.replace(temporary, path)


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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Downsample images (e.g. 1024x1024 playground-v2.5 output) to small RGB PNGs, antialiased.")
    parser.add_argument("--source_image_dir", default="images/train_images")
    parser.add_argument("--dest_image_dir", default="images/train_images_downsample")
    parser.add_argument("--dest_image_height", type=int, default=32)
    parser.add_argument("--dest_image_width", type=int, default=32)
    parser.add_argument("--num_samples", type=int, default=-1,
                        help="downsample a random subset of this many images (-1: all)")
    parser.add_argument("--skip_exists", type=parse_bool, nargs="?", const=True, default=True,
                        help="keep output files that already exist (True/False; default True)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --num_samples subset")
    parser.add_argument("--filter", choices=sorted(FILTERS), default="area",
                        help="antialiasing filter: area (box average) or lanczos")
    parser.add_argument("--num_workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes (default: one per CPU core)")
    args = parser.parse_args(argv)
    if args.dest_image_height < 1 or args.dest_image_width < 1:
        parser.error("--dest_image_height and --dest_image_width must be at least 1")
    if args.num_workers < 1:
        parser.error("--num_workers must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isdir(args.source_image_dir):
        raise SystemExit(f"error: --source_image_dir {args.source_image_dir} is not a folder: "
                         "make the images first (bash images/generate_images_for_train.sh or _test.sh)")
    names, ignored = list_images(args.source_image_dir)
    if not names:
        raise SystemExit(f"error: no images ({', '.join(IMAGE_EXTENSIONS)}) in --source_image_dir "
                         f"{args.source_image_dir}")
    names = choose_subset(names, args.num_samples, args.seed)
    outputs = {}
    for name in names:
        outputs.setdefault(os.path.splitext(name)[0] + ".png", []).append(name)
    clashes = [sources for sources in outputs.values() if len(sources) > 1]
    if clashes:
        raise SystemExit(f"error: {' and '.join(clashes[0])} would both be written as "
                         f"{os.path.splitext(clashes[0][0])[0]}.png: rename one of them")

    os.makedirs(args.dest_image_dir, exist_ok=True)
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
    main()
