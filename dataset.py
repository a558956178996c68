"""Image folder -> uint8 tensor N x 3 x 32 x 32 (RGB), and the data range (config.data_range).

The images stay uint8 (3 KB each, 150 MB for 50,000) and are turned into floats batch by batch,
so a whole data set fits in device memory.

    python dataset.py images/train_images_downsample      # check a folder and print its size
"""
import os
import re
import sys

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from cli import ArgumentParser, UserError, run_main

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
IMAGE_SIZE = 32


class DatasetError(UserError):
    """A problem with the user's data, reported as one line."""


def natural_key(name):
    """Sort key that puts 2.png before 10.png."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def image_files(directory):
    if not os.path.isdir(directory):
        raise DatasetError(f"{directory}: no such folder; build the default data set with "
                           f"bash images/make_default_dataset.sh, or point the flag at a folder of 32x32 images")
    names = sorted((n for n in os.listdir(directory) if n.lower().endswith(IMAGE_EXTENSIONS)), key=natural_key)
    if not names:
        raise DatasetError(f"{directory}: no images (.png, .jpg, .jpeg, .webp or .bmp) in this folder")
    return [os.path.join(directory, n) for n in names]


def on_white(image):
    """Any mode -> RGB; transparency (an alpha channel, or a palette's transparent colour) is
    composited on white, as the avatars and the playground prompt's pictures are drawn on white."""
    if image.mode in ("RGBA", "LA", "P", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def read_rgb(path):
    with Image.open(path) as image:
        image.load()
        return on_white(image)


def load_image_folder(directory, skip_bad_images=False):
    """All images of a folder as a uint8 tensor N x 3 x 32 x 32, in natural file-name order."""
    paths = image_files(directory)
    images, bad = [], []
    for path in paths:
        try:
            image = read_rgb(path)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            if not skip_bad_images:
                raise DatasetError(f"{path}: cannot decode this image ({type(e).__name__}); "
                                   f"delete it or pass --skip_bad_images") from None
            bad.append(path)
            continue
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            raise DatasetError(f"{path}: image is {image.size[0]}x{image.size[1]}, expected 32x32; "
                               f"make 32x32 copies with images/downsample.py (see images/downsample_images_for_train.sh)")
        images.append(np.asarray(image))
    if bad:
        print(f"warning: skipped {len(bad)} undecodable image(s) in {directory}, e.g. {bad[0]}", file=sys.stderr)
    if not images:
        raise DatasetError(f"{directory}: none of its {len(paths)} image files could be decoded")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


# ---- the data range: the one place that reads config.data_range ---------------------------------

def data_bounds(config):
    return (-1.0, 1.0) if config.data_range == "-1,1" else (0.0, 1.0)


def normalise(images_uint8, config):
    low, high = data_bounds(config)
    return images_uint8.float() * ((high - low) / 255) + low


def to_uint8(x, config):
    low, high = data_bounds(config)
    return ((x.float() - low) * (255 / (high - low))).round().clamp(0, 255).to(torch.uint8)


def augment(x, config, u):
    """Horizontal flips (config.hflip): image i is flipped when its uniform draw u[i] < 0.5."""
    if not config.hflip:
        return x
    return torch.where((u < 0.5).view(-1, 1, 1, 1), x.flip(3), x)


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("directory")
    parser.add_argument("--skip_bad_images", action="store_true", help="skip undecodable files instead of stopping")
    args = parser.parse_args(argv)
    data = load_image_folder(args.directory, args.skip_bad_images)
    print(f"{args.directory}: {data.shape[0]} images, {tuple(data.shape[1:])}, uint8")


if __name__ == "__main__":
    run_main(main)
