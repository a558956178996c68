"""Default data set: DiceBear avatars rendered to 32x32 RGB PNGs.

Image i is the DiceBear avatar (style `adventurer` by Lisa Wischofsky, CC BY 4.0) made from the
seed string str(i), so any image can be rebuilt from its index alone and train and test sets are
kept apart by giving them disjoint index ranges (see make_default_dataset.sh).

Pipeline per image: dicebear-core builds the SVG, resvg-py rasterises it at 4x the target size,
the RGBA result is alpha-composited onto white, and a 4x4 box filter (area average) reduces it to
the target size. The file is written as `{i}.png`.

Usage:
    python images/avatars.py --dest_image_dir images/train_images_downsample --num_samples 50000
    python images/avatars.py --dest_image_dir images/test_images_downsample --num_samples 5000 \
        --first_index 1000000
    python images/avatars.py --dest_image_dir /tmp/av --num_samples 64 --style lorelei --num_workers 2

A rerun skips files that already exist, so an interrupted build resumes where it stopped.
"""

import argparse
import functools
import io
import multiprocessing
import os
import sys
from importlib.resources import files

import resvg_py
from dicebear import Avatar, Style
from PIL import Image
from tqdm import tqdm

DEFAULT_STYLE = "adventurer"
# Rasterise at 4x and box-filter down: each output pixel averages 16 samples, on top of resvg's
# own edge antialiasing. At 32x32 output this is a 128 px render, about 5 ms per image.
SUPERSAMPLE = 4
# Fixed save options so the same index always gives the same bytes (Pillow writes no time stamp).
PNG_OPTIONS = {"format": "PNG", "optimize": False, "compress_level": 6}


def available_styles():
    return sorted(
        entry.name[: -len(".json")]
        for entry in files("dicebear_styles").iterdir()
        if entry.name.endswith(".json")
    )


@functools.lru_cache(maxsize=None)
def load_style(name):
    # Parsing and schema-validating a style takes about 0.5 s, so do it once per process.
    raw = files("dicebear_styles").joinpath(f"{name}.json").read_text("utf-8")
    return Style.from_json(raw)


def render_avatar(index, style=DEFAULT_STYLE, size=32):
    """The avatar for seed str(index) as a size x size RGB image on a white background."""
    svg = Avatar(load_style(style), {"seed": str(index)}).to_string()
    render_size = size * SUPERSAMPLE
    png = resvg_py.svg_to_bytes(svg_string=svg, width=render_size, height=render_size)
    rgba = Image.open(io.BytesIO(png)).convert("RGBA")
    # Composite before downsampling: averaging transparent pixels (stored as black) would leave a
    # dark fringe around the figure.
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    return rgb.reduce(SUPERSAMPLE)


def write_avatar(index, dest_image_dir, style):
    final_path = os.path.join(dest_image_dir, f"{index}.png")
    # Write under a temporary name in the same folder, then rename: the rename is atomic, so a
    # killed run never leaves a half-written PNG under a final name. The name does not end in
    # .png, so a loader globbing *.png never sees it.
    tmp_path = os.path.join(dest_image_dir, f".{index}.png.{os.getpid()}.tmp")
    render_avatar(index, style).save(tmp_path, **PNG_OPTIONS)
    os.replace(tmp_path, final_path)
    return index


class OneLineErrorParser(argparse.ArgumentParser):
    # argparse prints the usage block and then the error; we want one line and no traceback.
    def error(self, message):
        raise SystemExit(f"error: {message} (see --help)")


def parse_args(argv):
    parser = OneLineErrorParser(description="Render DiceBear avatars to 32x32 RGB PNGs {i}.png.")
    parser.add_argument("--dest_image_dir", type=str, default=None, help="output folder")
    parser.add_argument("--num_samples", type=int, default=None, help="number of images")
    parser.add_argument("--first_index", type=int, default=0, help="index (seed) of the first image")
    parser.add_argument("--style", type=str, default=DEFAULT_STYLE, help="DiceBear style name")
    parser.add_argument("--num_workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes (default: all cores)")
    args = parser.parse_args(argv)

    if args.dest_image_dir is None:
        raise SystemExit("error: --dest_image_dir is required: give the output folder")
    if args.num_samples is None:
        raise SystemExit("error: --num_samples is required: give the number of images to make")
    if args.num_samples <= 0:
        raise SystemExit(f"error: --num_samples must be positive, got {args.num_samples}")
    if args.first_index < 0:
        raise SystemExit(f"error: --first_index must be 0 or more, got {args.first_index}")
    if args.num_workers <= 0:
        raise SystemExit(f"error: --num_workers must be positive, got {args.num_workers}")
    styles = available_styles()
    if args.style not in styles:
        raise SystemExit(f"error: --style {args.style!r} is unknown; available: {', '.join(styles)}")
    if os.path.exists(args.dest_image_dir) and not os.path.isdir(args.dest_image_dir):
        raise SystemExit(f"error: --dest_image_dir {args.dest_image_dir!r} is a file: give a folder")
    return args


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.dest_image_dir, exist_ok=True)

    indices = range(args.first_index, args.first_index + args.num_samples)
    todo = [i for i in indices if not os.path.exists(os.path.join(args.dest_image_dir, f"{i}.png"))]
    print(f"avatars: {len(todo)} to render, {args.num_samples - len(todo)} already in "
          f"{args.dest_image_dir} (style {args.style}, {args.num_workers} workers)")
    if not todo:
        return

    # Load the style in the parent: forked workers inherit it instead of parsing it again.
    load_style(args.style)
    work = functools.partial(write_avatar, dest_image_dir=args.dest_image_dir, style=args.style)
    progress = tqdm(total=len(todo), unit="img", desc="avatars")
    if args.num_workers == 1:
        for i in todo:
            work(i)
            progress.update(1)
    else:
        with multiprocessing.Pool(args.num_workers) as pool:
            # Chunks amortise the inter-process overhead of ~5 ms tasks.
            chunksize = max(1, min(64, len(todo) // (4 * args.num_workers)))
            for _ in pool.imap_unordered(work, todo, chunksize=chunksize):
                progress.update(1)
    progress.close()


if __name__ == "__main__":
    main(sys.argv[1:])
