"""Image folder -> uint8 tensor N x 3 x 32 x 32 (RGB), and the data range (config.data_range).

The images stay uint8 (3 KB each, 150 MB for 50,000) and are turned into floats batch by batch,
so a whole data set fits in device memory.

Decoding 55,000 PNGs takes seconds to tens of seconds, and every run of a study loads the same
folders, so a folder is decoded once: load_image_folder keeps the decoded tensor beside the folder,
in `<folder>.cache.npz` (images/train_images_downsample.cache.npz; outside the folder, so its file
list is unchanged; ignored by git). The cache holds the images (uint8 N x 3 x 32 x 32), the names of
the undecodable files a --skip_bad_images run skipped, and a fingerprint: the sha256 of every image
file's name, size and modification time. A file added, removed or rewritten changes the
fingerprint, and the folder is decoded again and the cache rewritten. A cache that cannot be read
is decoded again too; one that cannot be written (a read-only parent folder) is skipped with a
warning. Delete the .cache.npz files to force a decode, or pass cache=False.

    python dataset.py images/train_images_downsample      # check a folder and print its size
"""
import hashlib
import os
import re
import sys
import zipfile

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from cli import ArgumentParser, UserError, atomic_write, run_main

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
IMAGE_SIZE = 32
# Part of every fingerprint: change it when read_rgb decodes a file differently, and every cache
# made before is decoded again.
CACHE_FORMAT = "simple_ddpm decoded image folder, version 1"


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


def load_image_folder(directory, skip_bad_images=False, cache=True):
    """All images of a folder as a uint8 tensor N x 3 x 32 x 32, in natural file-name order.

    cache: read the decoded images from `<folder>.cache.npz` when its fingerprint matches the folder
    (see the module's docstring), else decode them and write it. The result, the errors and the
    warning are the same with or without it. cache=False neither reads nor writes it."""
    paths = image_files(directory)
    # Taken before decoding: a file rewritten while we decode makes the next call decode again.
    fingerprint = folder_fingerprint(paths) if cache else None
    cached = read_cache(directory, fingerprint, len(paths)) if cache else None
    # A cache that skipped undecodable files serves skip_bad_images only; without it, decoding
    # stops at the first of them with its own error.
    use_cache = cached is not None and (skip_bad_images or not cached[1])
    images, skipped = cached if use_cache else decode_images(paths, skip_bad_images)
    if skipped:
        print(f"warning: skipped {len(skipped)} undecodable image(s) in {directory}, "
              f"e.g. {os.path.join(directory, skipped[0])}", file=sys.stderr)
    if len(images) == 0:
        raise DatasetError(f"{directory}: none of its {len(paths)} image files could be decoded")
    if cache and not use_cache:
        write_cache(directory, fingerprint, images, skipped)
    return torch.from_numpy(images)


def load_folder(path, flag, skip_bad_images=False):
    """load_image_folder for a command-line flag: its errors name the flag."""
    try:
        return load_image_folder(path, skip_bad_images=skip_bad_images)
    except DatasetError as e:
        raise DatasetError(f"{flag}: {e}") from None


def decode_images(paths, skip_bad_images):
    """The images as a uint8 array N x 3 x 32 x 32, and the names of the undecodable files skipped."""
    images, skipped = [], []
    for path in paths:
        try:
            image = read_rgb(path)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            if not skip_bad_images:
                raise DatasetError(f"{path}: cannot decode this image ({type(e).__name__}); "
                                   f"delete it or pass --skip_bad_images") from None
            skipped.append(os.path.basename(path))
            continue
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            raise DatasetError(f"{path}: image is {image.size[0]}x{image.size[1]}, expected 32x32; "
                               f"make 32x32 copies with images/downsample.py (see images/downsample_images_for_train.sh)")
        images.append(np.asarray(image))
    if not images:
        return np.empty((0, 3, IMAGE_SIZE, IMAGE_SIZE), np.uint8), skipped
    # Channels first, as the tensor is, so that reading the cache needs no copy.
    return np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2)), skipped


# ---- the decoded-image cache: <folder>.cache.npz ------------------------------------------------

def cache_path(directory):
    # abspath: "images/x/" and "images/x" share one cache, and "." gets one beside it, not inside.
    return os.path.abspath(directory) + ".cache.npz"


def folder_fingerprint(paths):
    """sha256 of the image files' names, sizes and modification times, in order."""
    digest = hashlib.sha256(CACHE_FORMAT.encode())
    for path in paths:
        name = os.path.basename(path)
        try:
            stat = os.stat(path)
            entry = f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\0"
        except OSError:  # removed since it was listed: decoding reports it, as it would without a cache
            entry = f"{name}\0gone\0"
        digest.update(entry.encode())
    return digest.hexdigest()


def read_cache(directory, fingerprint, num_files):
    """(images, skipped names) from the folder's cache, or None when it is missing, unreadable,
    malformed or made from other files."""
    try:
        # allow_pickle=False: the file holds plain arrays only, so loading it cannot run code.
        with np.load(cache_path(directory), allow_pickle=False) as saved:
            if saved["fingerprint"].item() != fingerprint:
                return None
            images, skipped = saved["images"], saved["skipped"].tolist()
    # What a truncated, empty or foreign file raises: the cache is only a copy, so decode again.
    except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile):
        return None
    if images.dtype != np.uint8 or images.shape != (num_files - len(skipped), 3, IMAGE_SIZE, IMAGE_SIZE):
        return None
    return images, skipped


def write_cache(directory, fingerprint, images, skipped):
    # Atomic: two runs decoding at once, or a run killed mid-write, leave a whole cache or none.
    path = cache_path(directory)
    try:
        with atomic_write(path, fsync=True) as f:
            np.savez(f, fingerprint=np.array(fingerprint), images=images, skipped=np.array(skipped, dtype=str))
    except OSError as e:
        print(f"warning: cannot write the decoded-image cache {path} ({e.strerror or e}); "
              f"the folder will be decoded again next time", file=sys.stderr)


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
