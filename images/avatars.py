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

# Run as `python images/avatars.py`, only images/ is on the path: the shared modules are at the root.
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cli import (ArgumentParser, UserError, atomic_write, make_folder, non_negative_int,  # noqa: E402
                 positive_int, run_main)

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
    # Through a temporary name (cli.atomic_write): a killed run never leaves a half-written PNG
    # under a final name, and the temporary name is not *.png, so no loader sees it.
    with atomic_write(os.path.join(dest_image_dir, f"{index}.png")) as f:
        render_avatar(index, style).save(f, **PNG_OPTIONS)
    return index


def parse_args(argv):
    parser = ArgumentParser(description="Render DiceBear avatars to 32x32 RGB PNGs {i}.png.")
    parser.add_argument("--dest_image_dir", type=str, default=None, help="output folder")
    parser.add_argument("--num_samples", type=positive_int, default=None, help="number of images")
    parser.add_argument("--first_index", type=non_negative_int, default=0, help="index (seed) of the first image")
    parser.add_argument("--style", type=str, default=DEFAULT_STYLE, help="DiceBear style name")
    parser.add_argument("--num_workers", type=positive_int, default=os.cpu_count() or 1,
                        help="worker processes (default: all cores)")
    args = parser.parse_args(argv)

    if args.dest_image_dir is None:
        raise UserError("--dest_image_dir is required: give the output folder")
    if args.num_samples is None:
        raise UserError("--num_samples is required: give the number of images to make")
    styles = available_styles()
    if args.style not in styles:
        raise UserError(f"--style {args.style!r} is unknown; available: {', '.join(styles)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    make_folder(args.dest_image_dir, "--dest_image_dir")

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
    run_main(main)
