"""Are mirrored avatars still avatars to the evaluation? N held-out test images, and the same N
flipped left to right, each scored by evaluate.py against the train set as the study scores its
samples (the same N, subset seed and cache of the real side). The gap between the two says how far
the mirroring alone moves images from the data, as the metrics see it: flips are an augmentation of
the study's baseline (`hflip`), so a model trained with them may draw mirrored avatars.

    python tools/mirror_check.py            # writes checkpoints/mirror_check/ (git-ignored)
"""
import json
import os
import random
import subprocess
import sys

from PIL import Image, ImageOps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from cli import ArgumentParser, UserError, run_main  # noqa: E402


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--test_dir", default="images/test_images_downsample")
    parser.add_argument("--reference_dir", default="images/train_images_downsample")
    parser.add_argument("--num_samples", type=int, default=2000, help="the study's N (default: %(default)s)")
    parser.add_argument("--out", default="checkpoints/mirror_check")
    parser.add_argument("--cache_dir", default="checkpoints/ablations/cpu/evaluation_cache",
                        help="the real side's cache (default: the cpu study's, %(default)s)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.test_dir):
        raise UserError(f"--test_dir {args.test_dir}: no such folder; build the default data set with "
                        f"bash images/make_default_dataset.sh")
    names = sorted(n for n in os.listdir(args.test_dir) if n.lower().endswith(".png"))
    chosen = random.Random(0).sample(names, min(args.num_samples, len(names)))
    for kind, change in (("plain", lambda image: image), ("mirrored", ImageOps.mirror)):
        folder = os.path.join(args.out, kind)
        os.makedirs(folder, exist_ok=True)
        for name in chosen:
            with Image.open(os.path.join(args.test_dir, name)) as image:
                change(image.convert("RGB")).save(os.path.join(folder, name))
        subprocess.run([sys.executable, os.path.join(REPO, "evaluate.py"), "--image_dir", folder, "--num_samples",
                        str(len(chosen)), "--reference_dir", args.reference_dir, "--test_dir", args.test_dir,
                        "--subset_seed", "0", "--cache_dir", args.cache_dir, "--no_download",
                        "--output_json", f"{folder}.json", "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    def metrics(kind):
        with open(os.path.join(args.out, f"{kind}.json")) as f:
            return json.load(f)["metrics"]
    plain, mirrored = metrics("plain"), metrics("mirrored")
    for key in ("attribute_fd", "attribute_tv_mean", "swd_x1e3_avg", "background_error"):
        if plain.get(key):
            print(f"{key}: {len(chosen)} test images {plain[key]['samples']:.4g}, the same mirrored "
                  f"{mirrored[key]['samples']:.4g} (floor {plain[key]['floor']:.4g})")
    return 0


if __name__ == "__main__":
    run_main(main)
