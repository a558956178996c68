"""Default data set: DiceBear avatars rendered to 32x32 RGB PNGs.

Image i is the DiceBear avatar (style `adventurer` by Lisa Wischofsky, CC BY 4.0) made from the
seed string str(i), so any image can be rebuilt from its index alone and train and test sets are
kept apart by giving them disjoint index ranges (see make_default_dataset.sh).

Pipeline per image: dicebear-core builds the SVG, resvg-py rasterises it at 4x the target size,
the RGBA result is alpha-composited onto white, and a 4x4 box filter (area average) reduces it to
the target size. The file is written as `{i}.png`.

Labels: labels.csv in the same folder has one row per `{i}.png`, the options DiceBear resolved for
that seed (skin and hair colour, hair style, eyes, eyebrows, mouth, and the glasses, earrings and
details variants or "none"), so a classifier can check what a generated image shows. Each run
brings it up to date at the end; --labels_only labels a folder without rendering (for folders made
before labels existed). Labels are defined for the default style only.

Usage:
    python images/avatars.py --dest_image_dir images/train_images_downsample --num_samples 50000
    python images/avatars.py --dest_image_dir images/test_images_downsample --num_samples 5000 \
        --first_index 1000000
    python images/avatars.py --dest_image_dir /tmp/av --num_samples 64 --style lorelei --num_workers 2
    python images/avatars.py --labels_only --dest_image_dir images/train_images_downsample

A rerun skips files that already exist, so an interrupted build resumes where it stopped.
"""

import csv
import functools
import io
import json
import multiprocessing
import os
import re
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

LABELS_FILE = "labels.csv"
# labels.csv's attribute columns, in order: column -> where the style lists its values ("colors" or
# "components") and the name there. Everything else about an adventurer avatar has one value (head,
# ink, lips...) or follows from these (the mouth variant decides whether teeth are drawn).
LABEL_SOURCES = {
    "skin_color": ("colors", "skin"),
    "hair_color": ("colors", "hair"),
    "hair": ("components", "hair"),
    "eyes": ("components", "eyes"),
    "eyebrows": ("components", "eyebrows"),
    "mouth": ("components", "mouth"),
    "glasses": ("components", "glasses"),
    "earrings": ("components", "earrings"),
    "details": ("components", "details"),
}
# Attributes an avatar can lack, labelled "none": glasses and details are drawn with probability 10%,
# earrings only inside the 37 hair styles that have them, and the bald style short19 has no hair colour.
NOT_ALWAYS_DRAWN = ("hair_color", "glasses", "earrings", "details")
NONE = "none"
AVATAR_NAME = re.compile(r"(0|[1-9][0-9]*)\.png")  # {i}.png exactly: 07.png is not the seed "7"


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


def make_avatar(index, style=DEFAULT_STYLE):
    """DiceBear's avatar for seed str(index): its SVG and the options it resolved (0.5 ms)."""
    return Avatar(load_style(style), {"seed": str(index)})


def render_avatar(index, style=DEFAULT_STYLE, size=32):
    """The avatar for seed str(index) as a size x size RGB image on a white background."""
    return rasterize(make_avatar(index, style), size)


def rasterize(avatar, size=32):
    render_size = size * SUPERSAMPLE
    png = resvg_py.svg_to_bytes(svg_string=avatar.to_string(), width=render_size, height=render_size)
    rgba = Image.open(io.BytesIO(png)).convert("RGBA")
    # Composite before downsampling: averaging transparent pixels (stored as black) would leave a
    # dark fringe around the figure.
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    return rgb.reduce(SUPERSAMPLE)


# ---- labels ---------------------------------------------------------------------------------------

def attribute_values():
    """Every value each labels.csv column can take, in the style's order ("none" last where the part
    can be left out): a classifier's classes. Read from the style's JSON."""
    definition = json.loads(files("dicebear_styles").joinpath(f"{DEFAULT_STYLE}.json").read_text("utf-8"))
    values = {}
    for column, (kind, name) in LABEL_SOURCES.items():
        listed = definition[kind][name]
        values[column] = list(listed["values"] if kind == "colors" else listed["variants"])
        if column in NOT_ALWAYS_DRAWN:
            values[column].append(NONE)
    return values


ATTRIBUTES = attribute_values()
LABEL_COLUMNS = ["file_name", *ATTRIBUTES]


def labels_of(avatar, index):
    """labels.csv's row for an avatar made from seed str(index) with the default style."""
    options = avatar.to_json()["options"]
    row = {"file_name": f"{index}.png"}
    for column, (kind, name) in LABEL_SOURCES.items():
        # DiceBear names a resolved colour {name}Color (a list: a gradient has several) and a
        # component's choice {name}Variant; an option it never needed is absent.
        value = options.get(f"{name}Color" if kind == "colors" else f"{name}Variant")
        row[column] = NONE if value is None else value[0] if kind == "colors" else value
    return row


def avatar_labels(index):
    """labels.csv's row for image {index}.png, without rendering it."""
    return labels_of(make_avatar(index), index)


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def avatar_index(name):
    """The seed of an avatar file name {i}.png, or None for any other name."""
    match = AVATAR_NAME.fullmatch(name)
    return int(match[1]) if match else None


def read_labels(path):
    """{file name: row} from an existing labels.csv; empty when it is missing or has other columns.
    Rows with a value the style cannot produce are dropped, so they are computed again."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != LABEL_COLUMNS:
                return {}
            return {row["file_name"]: row for row in reader
                    if avatar_index(row["file_name"]) is not None
                    and all(row[column] in values for column, values in ATTRIBUTES.items())}
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}


def write_labels(dest_image_dir, known, num_workers, reuse=True):
    """Write labels.csv for every {i}.png in the folder: rows from `known` ({index: row}, made while
    rendering) or (reuse) from the labels.csv already there, the rest computed without rendering.
    Rows are in index order, which is dataset.natural_key's order for these names. Returns
    (rows written, rows computed)."""
    path = os.path.join(dest_image_dir, LABELS_FILE)
    indices = sorted(i for i in map(avatar_index, os.listdir(dest_image_dir)) if i is not None)
    previous = read_labels(path) if reuse else {}
    rows = {i: known.get(i) or previous.get(f"{i}.png") for i in indices}
    todo = [i for i in indices if rows[i] is None]
    for i, row in zip(todo, run_workers(avatar_labels, todo, num_workers, "labels")):
        rows[i] = row

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=LABEL_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows[i] for i in indices)
    content = text.getvalue().encode("utf-8")
    if not (os.path.isfile(path) and read_bytes(path) == content):  # a no-op rerun leaves it be
        with atomic_write(path) as f:
            f.write(content)
    return len(indices), len(todo)


# ---- the command ---------------------------------------------------------------------------------

def write_avatar(index, dest_image_dir, style):
    """Render {index}.png; returns (index, its labels.csv row, or None for a style without labels)."""
    avatar = make_avatar(index, style)  # one avatar gives both the image and its labels
    # Through a temporary name (cli.atomic_write): a killed run never leaves a half-written PNG
    # under a final name, and the temporary name is not *.png, so no loader sees it.
    with atomic_write(os.path.join(dest_image_dir, f"{index}.png")) as f:
        rasterize(avatar).save(f, **PNG_OPTIONS)
    return index, labels_of(avatar, index) if style == DEFAULT_STYLE else None


def run_workers(work, items, num_workers, desc):
    """work(item) for every item, in order, with a progress bar; in worker processes when asked."""
    results = []
    if not items:
        return results
    progress = tqdm(total=len(items), unit="img", desc=desc)
    if num_workers == 1:
        for item in items:
            results.append(work(item))
            progress.update(1)
    else:
        with multiprocessing.Pool(num_workers) as pool:
            # Chunks amortise the inter-process overhead of tasks of 0.5 to 5 ms.
            chunksize = max(1, min(64, len(items) // (4 * num_workers)))
            for result in pool.imap(work, items, chunksize=chunksize):
                results.append(result)
                progress.update(1)
    progress.close()
    return results


def parse_args(argv):
    parser = ArgumentParser(description="Render DiceBear avatars to 32x32 RGB PNGs {i}.png.")
    parser.add_argument("--dest_image_dir", type=str, default=None, help="output folder")
    parser.add_argument("--num_samples", type=positive_int, default=None, help="number of images")
    parser.add_argument("--first_index", type=non_negative_int, default=None,
                        help="index (seed) of the first image (default 0)")
    parser.add_argument("--style", type=str, default=DEFAULT_STYLE, help="DiceBear style name")
    parser.add_argument("--num_workers", type=positive_int, default=os.cpu_count() or 1,
                        help="worker processes (default: all cores)")
    parser.add_argument("--labels_only", action="store_true",
                        help=f"render nothing: write {LABELS_FILE} for every {{i}}.png in --dest_image_dir")
    args = parser.parse_args(argv)

    if args.dest_image_dir is None:
        raise UserError("--dest_image_dir is required: give the output folder")
    if args.labels_only:
        for flag in ("num_samples", "first_index"):
            if getattr(args, flag) is not None:
                raise UserError(f"--labels_only labels every {{i}}.png in the folder; drop --{flag}")
        if args.style != DEFAULT_STYLE:
            raise UserError(f"--labels_only: labels are defined for the {DEFAULT_STYLE} style only; "
                            f"drop --style {args.style}")
        return args
    if args.num_samples is None:
        raise UserError("--num_samples is required: give the number of images to make")
    if args.first_index is None:
        args.first_index = 0
    styles = available_styles()
    if args.style not in styles:
        raise UserError(f"--style {args.style!r} is unknown; available: {', '.join(styles)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.labels_only:
        return label_folder(args.dest_image_dir, args.num_workers)
    make_folder(args.dest_image_dir, "--dest_image_dir")

    indices = range(args.first_index, args.first_index + args.num_samples)
    todo = [i for i in indices if not os.path.exists(os.path.join(args.dest_image_dir, f"{i}.png"))]
    print(f"avatars: {len(todo)} to render, {args.num_samples - len(todo)} already in "
          f"{args.dest_image_dir} (style {args.style}, {args.num_workers} workers)")

    # Load the style in the parent: forked workers inherit it instead of parsing it again.
    load_style(args.style)
    work = functools.partial(write_avatar, dest_image_dir=args.dest_image_dir, style=args.style)
    rendered = dict(run_workers(work, todo, args.num_workers, "avatars"))
    if args.style != DEFAULT_STYLE:
        print(f"avatars: no {LABELS_FILE}: labels are defined for the {DEFAULT_STYLE} style only")
        return
    # Last, so that the file also covers images an interrupted run left without labels.
    rows, computed = write_labels(args.dest_image_dir, rendered, args.num_workers)
    print(f"avatars: {LABELS_FILE} has {rows} rows ({computed} labelled without rendering)")


def label_folder(dest_image_dir, num_workers):
    """--labels_only: labels.csv for a folder of {i}.png avatars, computed without rendering."""
    if not os.path.isdir(dest_image_dir):
        raise UserError(f"--dest_image_dir {dest_image_dir}: no such folder; pass a folder of {{i}}.png avatars")
    make_folder(dest_image_dir, "--dest_image_dir")  # only checks that it is writable
    names = os.listdir(dest_image_dir)
    if not any(avatar_index(name) is not None for name in names):
        raise UserError(f"--dest_image_dir {dest_image_dir}: no avatar files ({{i}}.png, such as 0.png) "
                        f"in this folder; render some first (drop --labels_only, give --num_samples)")
    load_style(DEFAULT_STYLE)
    # The labels already there are not trusted: this command is also the way to redo them.
    rows, _ = write_labels(dest_image_dir, {}, num_workers, reuse=False)
    print(f"avatars: wrote {os.path.join(dest_image_dir, LABELS_FILE)}: {rows} rows")


if __name__ == "__main__":
    run_main(main)
