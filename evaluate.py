"""Sample quality: generated images against the train set, each number beside its floor.

    bash evaluate.sh --checkpoint checkpoints/latest_model.pth      # generate, then evaluate
    bash evaluate.sh --image_dir some/folder --output_json eval.json
    bash evaluate.sh --checkpoint checkpoints/latest_model.pth --grid grid.png   # and the first 8x4 samples

Every metric is computed twice with the same number of images N: for the samples against the
reference (train) set, and for the held-out test set against the same reference set. The second
number is the floor: test images are true data that no model saw, so a perfect generator scores
about the floor, not zero. N is the number of samples, at most the size of the test set.

Two seeds with two jobs. --seed sets only the samples' starting noise. Every random draw on the real
side comes from --subset_seed (default 0): the N test images, the reference subsets (below), SWD's
patch positions and directions, KID's subsets, and the samples' own N when --image_dir holds more.
With --subset_seed fixed, the floor is a constant of (reference set, test set, N, subset_seed,
weights), and every row of a study is scored against the same real draws: they shift every row's
numbers alike, so a spread over --seed is the training's and the sampling's, not the evaluation's.

The real side is the same for every evaluation with that key, so it is computed once and kept in
--cache_dir (default checkpoints/evaluation_cache; --no_cache computes it afresh): the subsets, the
network readings of the real images, the precision/recall radii, every test image's nearest
training image (the memorisation threshold) and the floors. The key hashes the decoded reference
and test images, N, --subset_seed, the Inception and attribute network weights, the device type
(CPUs and GPUs round differently) and REAL_STATISTICS_VERSION. A cached evaluation gives the same
numbers, to the bit, as a fresh one.

--grid PATH also writes the first columns x rows (--grid_size, default 8x4) of the samples as one
PNG. Image i of a --seed has its own random stream (generate.image_generators), so every variant's
grid starts from the same noise, whatever --num_samples.

--resume_dir DIR keeps each finished batch of samples in DIR (generate.KeptBatches), so that a
stopped evaluation continues where it stopped: a rerun reads back the batches of the same checkpoint
file, configuration, sampler, --seed, batch size, precision, device type and thread count, samples
the others, and removes them all once the metrics are computed. The report's samples.resumed says
how many batches were read back and what sampling them took.

- FID (Heusel et al. 2017) and KID (Binkowski et al. 2018, x1e3) on Inception-v3 pool features,
  through torchmetrics and torch-fidelity, with the images resized to 299x299 as TensorFlow's FID
  code does. They need the FID Inception weights in models/pt_inception-2015-12-05-6726825d.pth
  (downloaded when the network allows); without them both are skipped. Lower is better. The cache
  then holds every reference image's features (float32: 400 MB for 50,000 images).
- SWD: sliced Wasserstein distance between random 7x7 patches of Laplacian pyramids (Karras et al.
  2018, Progressive GAN, appendix D), x1e3 as in the paper, per pyramid level (32: the finest
  details; 16: the coarse image) and averaged, against a random N of the reference set. Needs no
  pretrained weights. Lower is better.
- Precision and recall (Kynkaanniemi et al. 2019): the share of samples inside the k=3
  nearest-neighbour manifold of real images (are samples realistic?), and the share of real images
  inside the samples' manifold (do samples cover the data?), with the same N real images as SWD. On
  Inception features when the weights are there, else on raw pixels; the table says which. Higher
  is better.
- Background error: the mean distance from white, 0 to 255, of every image's two top corners
  (BACKGROUND_CORNER x BACKGROUND_CORNER pixels each, every channel): DiceBear's avatars stand on
  pure white, so their floor is 0, where samples of a short run have tinted backgrounds. Made for
  the default data set, like the attribute network. Lower is better.
- Memorised share: samples whose nearest training image (L2 over pixels in [0, 1], among every
  reference image) is closer than the 1st percentile of the test images' nearest-training-image
  distances. Its floor is about 0.01 by construction; far above it means the model copies training
  images.

With the attribute network (attribute_net.py; its weights models/attribute_net.pt are committed;
--no_attribute_net to skip, and skipped when the file is missing), made for the default data set
of DiceBear avatars and meaningless on other data. It reads every image set once: the N samples,
the N test images, and a random ATTRIBUTE_REFERENCE_MAX (10,000) of the reference set, all of it
when smaller. The cap keeps the CPU cost at 2N + 10,000 images; the reference subset is fixed by
--subset_seed, the same for every row of a study, so it shifts every row's numbers alike. Only the
heads the network's training found reliable (info["reliable"]) count.
- Attribute FD: the Frechet distance (as FID) between the network's penultimate features: an
  offline FID that needs no download. Lower is better.
- Attribute TV: per head, the total variation distance 1/2 sum_k |p_k - q_k| between the
  histograms of predicted labels (argmax) of the samples and of the reference: 0.1 means 10% of
  the samples would have to change label to match the reference's proportions. The table shows
  the mean over heads and every head; the JSON also holds the histograms. Lower is better.
- Attribute MI: mutual information in nats, sum_ij p_ij log(p_ij / (p_i p_j)), between the
  predicted labels of two heads (from their joint histogram), for every pair of heads. DiceBear
  draws the options independently, except where the style ties them (earrings exist only for some
  hair styles, the bald style has no hair colour); a finite N also biases the estimate upward, by
  about (K_a - 1)(K_b - 1) / 2N. Both are in the floor. The table shows the mean over pairs and
  the pair that rose most above its own floor, in units of its sampling noise (mi_excess): a
  generator that ties, say, hair colour to skin colour shows there. The JSON holds every pair and
  the max. Lower is better, down to the floor.
- Attribute precision: the share of samples on which every head is at least as confident (its
  largest class probability) as the 5th percentile (ATTRIBUTE_CONFIDENCE_PERCENTILE) of that
  head's confidences on the reference images. The thresholds come from the reference, not the
  test set, so the floor (the test images' share) is measured rather than 0.95 by construction;
  it is lower than 0.95 because a sample must pass every head at once, and because the network,
  trained on the train set, is surer of those images than of new ones. Higher is better.
"""
import argparse
import contextlib
import functools
import hashlib
import itertools
import json
import math
import os
import socket
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import attribute_net
from checkpoint import sampling_checkpoint
from cli import (ArgumentParser, UserError, atomic_write, make_folder, output_file, pick_device, positive_int,
                 random_seed, run_main, sha256_of, source_sha256)
from config import config_to_dict
from dataset import load_folder, load_image_folder
from diffusion import sampler_settings
from generate import KeptBatches, add_sampler_arguments, generate_images, load_model, sampling_plan, save_grid

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
# The TensorFlow FID Inception weights as converted by pytorch-fid; torch-fidelity's
# weights-inception-2015-12-05-6726825d.pth has the same layout, and either file works here.
INCEPTION_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{INCEPTION_FILE}"
K_NEAREST = 3  # Kynkaanniemi et al. 2019 use k = 3
MEMORISATION_PERCENTILE = 0.01
FEATURE_BATCH = 200
ATTRIBUTE_REFERENCE_MAX = 10_000  # reference images the attribute network reads (see the docstring)
ATTRIBUTE_CONFIDENCE_PERCENTILE = 0.05
BACKGROUND_CORNER = 3  # the side, in pixels, of each top corner that the background error reads
CACHE_DIR = os.path.join("checkpoints", "evaluation_cache")
# Part of the cache key: bump it whenever real_statistics computes anything differently, so that
# files written before are recomputed rather than read.
REAL_STATISTICS_VERSION = 2
# The code that computes the real side, hashed into the cache's key too: an edit that forgets to
# bump REAL_STATISTICS_VERSION still never reads numbers that the old code computed.
CODE_SHA256 = source_sha256("evaluate.py", "attribute_net.py")


def main(argv=None):
    args = parse_args(argv)
    report = run(args)
    print(format_table(report))
    if args.output_json:
        with atomic_write(args.output_json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.output_json}")


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="generate --num_samples images with this checkpoint, then evaluate them "
                                             "(the default: checkpoints/latest_model.pth, or, before any training, "
                                             "the pretrained model in models/)")
    source.add_argument("--image_dir", help="evaluate the 32x32 images of this folder as they are")
    parser.add_argument("--reference_dir", default="images/train_images_downsample",
                        help="the real images the samples are compared with (default: the train set)")
    parser.add_argument("--test_dir", default="images/test_images_downsample",
                        help="held-out real images; the same metrics on them against --reference_dir are the floor")
    parser.add_argument("--num_samples", type=positive_int, default=10_000,
                        help="images to generate with --checkpoint (at most the size of the test set is used)")
    parser.add_argument("--subset_seed", type=random_seed, default=0,
                        help="every random draw on the real side (the test and reference subsets, SWD's patches "
                             "and directions, KID's subsets) and the samples' subset; --seed sets only the "
                             "samples' noise. Keep it fixed across a study: the floor is then a constant")
    parser.add_argument("--output_json",
                        help="also write every number, the sampler, and the configuration the samples were drawn "
                             "with (the checkpoint's, with the sampler flags applied) here")
    parser.add_argument("--grid", help="also write the first --grid_size samples as one PNG here (with --image_dir: "
                                       "the folder's first images by name); an existing file needs --overwrite")
    parser.add_argument("--grid_size", type=grid_size, default="8x4", metavar="NxM",
                        help="the --grid's columns x rows (default 8x4)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --grid file")
    parser.add_argument("--resume_dir",
                        help="keep each finished batch of samples in this folder, and read back the ones an earlier "
                             "stopped run of the same checkpoint file, sampler, seed, batch size and precision left "
                             "there: hours of sampling (DDPM at 1000 steps on a CPU) survive a stop. The batches are "
                             "removed once the metrics are computed")
    parser.add_argument("--cache_dir", default=CACHE_DIR,
                        help="where the real-data statistics are kept between evaluations (see the docstring)")
    parser.add_argument("--no_cache", action="store_true",
                        help="compute the real-data statistics afresh, and neither read nor write --cache_dir")
    parser.add_argument("--inception_weights", default=os.path.join("models", INCEPTION_FILE),
                        help="FID Inception weights (state dict); FID and KID are skipped when missing")
    parser.add_argument("--no_download", action="store_true",
                        help="do not try to download the Inception weights when the file is missing")
    parser.add_argument("--attribute_net", default=attribute_net.WEIGHTS,
                        help="the attribute network's weights (default: the committed models/attribute_net.pt); "
                             "its metrics are skipped when the file is missing")
    parser.add_argument("--no_attribute_net", action="store_true",
                        help="skip the attribute network's metrics (for data other than the default avatars)")
    parser.add_argument("--skip_bad_images", action="store_true", help="skip undecodable image files instead of stopping")
    add_sampler_arguments(parser)  # --sampler --steps --eta --clamp --seed --batch_size --no_ema --device
    return parser.parse_args(argv)


def grid_size(text):
    """argparse type for a grid NxM: N columns, M rows."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not NxM (N columns, M rows, each at least 1), such as 8x4")
    return int(parts[0]), int(parts[1])


def run(args):
    if args.num_samples < 2:
        raise UserError(f"--num_samples {args.num_samples}: need at least 2 images")
    if not args.image_dir:
        args.checkpoint = sampling_checkpoint(args.checkpoint)
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        raise UserError(f"--checkpoint {args.checkpoint}: no such file")
    if args.resume_dir and args.image_dir:
        raise UserError(f"--resume_dir {args.resume_dir}: it keeps the batches sampled from --checkpoint; "
                        f"--image_dir's images are read whole, drop one of the two flags")
    if args.output_json:
        output_file(args.output_json, "--output_json")
    if args.grid:
        output_file(args.grid, "--grid")
        if os.path.exists(args.grid) and not args.overwrite:
            raise UserError(f"--grid {args.grid} exists: pass --overwrite to replace it, or another --grid")
    cache_dir = None if args.no_cache else usable_cache_dir(args.cache_dir)
    device = pick_device(args.device)
    keep = None
    notes = []
    inception_path = find_inception_weights(args.inception_weights, download=not args.no_download)
    inception = load_inception(inception_path, device) if inception_path else None
    if inception is None:
        notes.append(f"FID skipped: put {os.path.basename(args.inception_weights)} in "
                     f"{os.path.dirname(args.inception_weights) or '.'}/")
        print(notes[-1])
    attributes = None
    if not args.no_attribute_net:
        attributes = load_attribute_net(args.attribute_net, device)
        if attributes is None:
            notes.append(f"attribute metrics skipped: no attribute network at {args.attribute_net}")
            print(notes[-1])

    reference = load_folder(args.reference_dir, "--reference_dir", args.skip_bad_images)
    test = load_folder(args.test_dir, "--test_dir", args.skip_bad_images)
    report = {"reference": {"dir": args.reference_dir, "images": len(reference)},
              "test": {"dir": args.test_dir, "images": len(test)}}
    if args.checkpoint:
        n = min(args.num_samples, len(test), len(reference))
        if n < args.num_samples:
            notes.append(f"generating {n} samples, not {args.num_samples}: samples and floor use the same N, "
                         f"and {args.test_dir} has {len(test)} images")
            print(notes[-1])
        check_grid_fits(args, n)
        model, config = load_model(args, device)
        plan = sampling_plan(args, config, device, n)
        print(f"sampling in {plan.describe()}")
        if args.resume_dir:
            keep = KeptBatches(args.resume_dir, checkpoint_sha256=sha256_of(args.checkpoint),
                               config=config_to_dict(config), seed=args.seed, ema=not args.no_ema)
        samples = generate_images(model, config, n, seed=args.seed, batch_size=args.batch_size, device=device,
                                  progress=True, compile=args.compile, plan=plan, keep=keep)
        report["samples"] = {"checkpoint": args.checkpoint, "images": n}
        if keep is not None:  # the earlier runs' share of the sampling, and what it took them
            report["samples"]["resumed"] = {k: round(v, 3) for k, v in keep.read.items()}
        report["sampler"] = {**sampler_settings(config), "seed": args.seed, "batch_size": args.batch_size,
                             "ema": not args.no_ema, "precision": plan.precision, "layout": plan.layout}
        report["config"] = config_to_dict(config)
    else:
        samples = load_folder(args.image_dir, "--image_dir", args.skip_bad_images)
        check_grid_fits(args, len(samples))
        report["samples"] = {"dir": args.image_dir, "images": len(samples)}
    if args.grid:
        columns, rows = args.grid_size
        save_grid(samples[:columns * rows], columns, rows, args.grid)
        print(f"wrote {args.grid} ({32 * columns}x{32 * rows} pixels: the first {columns * rows} samples)")
    n = min(len(samples), len(test), len(reference))
    if n <= K_NEAREST + 1:
        raise UserError(f"need more than {K_NEAREST + 1} images in every set, got {n}")
    if n < len(samples):
        notes.append(f"using {n} of the {len(samples)} samples: samples and floor use the same N")
        print(notes[-1])
    # A stream of its own (the real side's seeds are below 2**32): evaluating the train folder itself
    # must not pick the reference subset that SWD and precision/recall compare with.
    samples = samples[subset_index(len(samples), n, torch.Generator().manual_seed(2 ** 32 + args.subset_seed))]

    key = real_statistics_key(reference, test, n, args.subset_seed, inception_path,
                              args.attribute_net if attributes is not None else None, device)
    compute = functools.partial(real_statistics, reference, test, n, args.subset_seed, inception=inception,
                                attributes=attributes, device=device)
    real, cache_file, from_cache = cached_real_statistics(cache_dir, key, compute)
    print("real-data statistics: " + (f"read from the cache {cache_file}" if from_cache else
                                      f"computed, cached in {cache_file}" if cache_file else
                                      "computed (--no_cache)"))
    report["n"] = n
    report["device"] = str(device)
    report["seed"] = args.seed
    report["subset_seed"] = args.subset_seed
    report["real_statistics"] = {"cache_file": cache_file, "from_cache": from_cache, "key": key}
    report.update(evaluate(samples, real, reference, device=device, inception=inception, attributes=attributes))
    if attributes is not None:  # the numbers hold for these weights only
        report["attributes"]["weights"] = {"path": args.attribute_net,
                                           "sha256": sha256_of(args.attribute_net)}
    report["notes"] = notes
    if keep is not None:
        keep.remove()
    return report


def usable_cache_dir(path):
    """--cache_dir made if missing. The default in a folder one cannot write to is no error: the
    evaluation runs without a cache, with one warning. A --cache_dir given by hand must work."""
    try:
        return make_folder(path, "--cache_dir")
    except UserError as e:
        if path != CACHE_DIR:
            raise
        print(f"warning: {e}; evaluating without a cache", file=sys.stderr)
        return None


def check_grid_fits(args, available):
    """Before sampling: the --grid needs that many samples."""
    columns, rows = args.grid_size
    if args.grid and columns * rows > available:
        raise UserError(f"--grid_size {columns}x{rows}: needs {columns * rows} samples, and there are {available}; "
                        f"ask for a smaller grid or more samples")


@contextlib.contextmanager
def full_float32():
    """TF32 (switched on for training) would round Inception's convolutions and the distance
    matmuls to 10-bit mantissas; metrics are computed in full float32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ---- the real side, once; then each set of samples against it -----------------------------------

@full_float32()
def real_statistics(reference, test, n, subset_seed=0, *, inception=None, attributes=None, device="cpu"):
    """Everything the metrics need from the real images alone, for N images and subset_seed.

    reference: every reference image, uint8; test: the test images, uint8, of which a random N is the
    floor's set. attributes: load_attribute_net's (network, reliable heads), or None. Returns a dict
    of CPU tensors, numbers and strings, which torch.save writes and torch.load(weights_only=True) reads:
      n, subset_seed
      test_index                 the N test images of the floor
      reference_index            a random max(N, ATTRIBUTE_REFERENCE_MAX) of the reference: its first N
                                 are SWD's and precision/recall's real set, its first
                                 ATTRIBUTE_REFERENCE_MAX the attribute network's
      inception                  None, or {"reference": every reference image's features, "test": ...}
      precision_recall_features  "inception" or "pixels"
      real_radii                 the real set's k-NN radii in itself: precision's manifold
      test_nearest               each test image's L2 to its nearest reference image (pixels)
      memorisation_threshold_l2  their 1st percentile
      attributes                 None, or {"test": attribute_readings, "reference": attribute_readings}
      floor                      {metric: the test images' value}, set_scores' metrics; the attribute
                                 metrics' floors come from attribute_scores, beside the samples'
    """
    generator = torch.Generator().manual_seed(subset_seed)
    # The reference order is the first draw of subset_seed's generator:
    # tools/attribute_metric_checks.reference_subset draws the same one.
    order = torch.randperm(len(reference), generator=generator)
    test_index = subset_index(len(test), n, generator)
    test = test[test_index]
    real = {"n": n, "subset_seed": subset_seed, "test_index": test_index,
            "reference_index": order[:max(n, ATTRIBUTE_REFERENCE_MAX)].clone(), "inception": None,
            "precision_recall_features": "pixels" if inception is None else "inception", "attributes": None}
    if inception is not None:
        real["inception"] = {name: inception_features(inception, images, device, f"Inception features, {name}")
                             for name, images in (("reference", reference), ("test", test))}
    real["real_radii"] = manifold_radii(precision_recall_real_set(real, reference), K_NEAREST, device)
    real["test_nearest"] = nearest_train_l2(test, reference, device, desc="nearest train image, test")
    real["memorisation_threshold_l2"] = torch.quantile(real["test_nearest"], MEMORISATION_PERCENTILE).item()
    if attributes is not None:
        net, _ = attributes
        attribute_reference = reference[real["reference_index"][:ATTRIBUTE_REFERENCE_MAX]]
        real["attributes"] = {"test": attribute_readings(net, test, device, desc="attribute network, test"),
                              "reference": attribute_readings(net, attribute_reference, device,
                                                              desc="attribute network, reference")}
    test_features = real["inception"]["test"] if inception is not None else None
    real["floor"] = set_scores(test, test_features, real["test_nearest"], real, reference, device)
    return real


@full_float32()
def evaluate(samples, real, reference, *, device="cpu", inception=None, attributes=None):
    """Every metric for samples vs reference, beside the floor (test vs reference) in `real`.

    samples: uint8 N x 3 x H x W, with real's N; real: real_statistics(reference, ...) made with the
    same inception and attributes (load_attribute_net's (network, reliable heads), or None to skip
    those metrics); reference: every reference image (memorisation looks at all of them).
    Returns {"metrics": {name: {"samples": value, "floor": value}}, "precision_recall_features": ...,
    "memorisation_threshold_l2": ..., "attributes": the attribute metrics' details, or None}.
    """
    assert len(samples) == real["n"], "samples and the floor must use the same N"
    assert (inception is None) == (real["inception"] is None), "real_statistics was made with other networks"
    assert (attributes is None) == (real["attributes"] is None), "real_statistics was made with other networks"
    features = (inception_features(inception, samples, device, "Inception features, samples")
                if inception is not None else None)
    nearest = nearest_train_l2(samples, reference, device, desc="nearest train image, samples")
    scores = set_scores(samples, features, nearest, real, reference, device)
    metrics = {key: pair(value, real["floor"][key]) for key, value in scores.items()}
    details = None
    if attributes is None:
        for key in ATTRIBUTE_METRICS:
            metrics[key] = pair(None, None)
    else:
        net, heads = attributes
        readings = {"samples": attribute_readings(net, samples, device, desc="attribute network, samples"),
                    **real["attributes"]}
        attribute_result = attribute_scores(readings, heads, net.classes)
        metrics.update(attribute_result.pop("metrics"))
        details = attribute_result
    return {"metrics": metrics, "precision_recall_features": real["precision_recall_features"],
            "memorisation_threshold_l2": real["memorisation_threshold_l2"], "attributes": details}


def set_scores(images, features, nearest, real, reference, device="cpu"):
    """One set's metrics against the reference: {metric: value}. The one place where a set is
    scored: the samples in evaluate(), the test images (the floor) in real_statistics().

    features: the set's Inception features, or None without Inception; nearest: its images' L2 to
    their nearest reference image (nearest_train_l2)."""
    n, seed = real["n"], real["subset_seed"]
    scores = {}
    if features is None:
        scores.update(fid=None, kid_x1e3=None, kid_x1e3_std=None)
        fake = pixels(images)
    else:
        reference_features = real["inception"]["reference"]
        kid_mean, kid_std = kernel_inception_distance(features, reference_features, seed=seed)
        scores.update(fid=frechet_distance(features, reference_features), kid_x1e3=kid_mean * 1e3,
                      kid_x1e3_std=kid_std * 1e3)
        fake = features
    # Common random numbers (see sliced_wasserstein_distance): scored alone, a set gets the number it
    # would get beside any other set.
    swd, = sliced_wasserstein_distance(reference[real["reference_index"][:n]], [images], seed=seed, device=device)
    scores.update({f"swd_x1e3_{level}": value for level, value in swd.items()})
    scores["precision"], scores["recall"] = precision_recall(precision_recall_real_set(real, reference), fake,
                                                             k=K_NEAREST, device=device, real_radii=real["real_radii"])
    scores["memorised_share"], scores["nearest_train_l2_median"] = memorisation(nearest,
                                                                                real["memorisation_threshold_l2"])
    scores["background_error"] = background_error(images)
    return scores


def background_error(images):
    """The mean of 255 - value over the top-left and top-right corners' pixels and channels of
    uint8 images N x 3 x H x W: 0 on a pure white background."""
    c = BACKGROUND_CORNER
    corners = torch.cat([images[:, :, :c, :c], images[:, :, :c, -c:]], dim=-1)
    return (255 - corners.float()).mean().item()


def precision_recall_real_set(real, reference):
    """The N real points of precision and recall: the first N of the reference order, as features."""
    index = real["reference_index"][:real["n"]]
    return real["inception"]["reference"][index] if real["inception"] is not None else pixels(reference[index])


def subset_index(size, n, generator):
    """The indices of a random n of `size` items; all of them, in order, when n >= size."""
    if n >= size:
        return torch.arange(size)
    return torch.randperm(size, generator=generator)[:n].clone()


# ---- the cache of the real side ------------------------------------------------------------------

def real_statistics_key(reference, test, n, subset_seed, inception_weights, attribute_weights, device):
    """What real_statistics' result depends on, as a dict of strings and numbers. The images are
    hashed decoded (150 MB of uint8 in well under a second): exact, whatever the files' names,
    formats or dates. Weights are given as file paths, or None where a network is not used."""
    def file_sha256(path):
        return sha256_of(path) if path else None

    return {"version": REAL_STATISTICS_VERSION, "code": CODE_SHA256,
            "reference": images_sha256(reference), "test": images_sha256(test),
            "n": n, "subset_seed": subset_seed, "inception_weights": file_sha256(inception_weights),
            "attribute_net": file_sha256(attribute_weights), "device": torch.device(device).type}


def images_sha256(images):
    digest = hashlib.sha256(str(tuple(images.shape)).encode())
    digest.update(images.contiguous().numpy())
    return digest.hexdigest()


def cached_real_statistics(cache_dir, key, compute):
    """(real statistics, the cache file or None, whether they were read from it).

    compute() makes them when cache_dir is None, when the key's file is missing, or when it cannot
    be read or holds another key (one warning line, then it is rewritten)."""
    if cache_dir is None:
        return compute(), None, False
    key_hash = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    path = os.path.join(cache_dir, f"real_statistics_{key_hash[:20]}.pt")
    if os.path.exists(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved["key"] == key:
                return saved["real"], path, True
            problem = "it holds the statistics of another key"
        except Exception as e:  # truncated, garbage, or not our format: all the same, recompute
            problem = f"cannot read it ({type(e).__name__})"
        print(f"warning: {path}: {problem}; computing the real-data statistics again", file=sys.stderr)
    real = compute()
    with atomic_write(path) as f:
        torch.save({"key": key, "real": real}, f)
    return real, path, False


def pair(samples_value, floor_value):
    return {"samples": samples_value, "floor": floor_value}


# ---- FID and KID: torchmetrics on Inception features computed once per image set --------------

def find_inception_weights(path, download=True):
    """The weights file, downloaded to `path` where the network allows; None if not available."""
    if os.path.isfile(path):
        return path
    if not download:
        return None
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # a blocked network should cost seconds, not minutes
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        print(f"downloading the FID Inception weights to {path}", file=sys.stderr)
        torch.hub.download_url_to_file(INCEPTION_URL, path, progress=True)
        return path
    except (OSError, ValueError):
        print("download failed", file=sys.stderr)
        return None
    finally:
        socket.setdefaulttimeout(previous_timeout)


def load_inception(path, device):
    """torchmetrics' Inception-v3 (torch-fidelity's FID network) returning 2048 pool features."""
    from torchmetrics.image.fid import NoTrainInceptionV3
    try:
        # Checked with weights_only=True first: torch-fidelity then loads the same file with
        # weights_only=False, which is safe once the file is known to hold only tensors.
        torch.load(path, map_location="cpu", weights_only=True)
        # antialias=False: the TensorFlow-1 compatible bilinear resize to 299x299 of the original FID.
        model = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                   feature_extractor_weights_path=path, antialias=False)
    except Exception as e:  # any unreadable or mismatched file is the same user mistake
        raise UserError(f"--inception_weights {path}: not a FID Inception state dict "
                        f"({type(e).__name__}); replace it with {INCEPTION_FILE}") from None
    return model.to(device)


@torch.no_grad()
def inception_features(model, images, device, desc="Inception features"):
    """uint8 N x 3 x 32 x 32 -> float32 N x 2048; the model resizes to 299x299 itself. Kept in the
    network's float32 (the cache holds half the bytes): the Frechet distance and KID compute in
    float64 themselves."""
    out = [model(images[i:i + FEATURE_BATCH].to(device)).float().cpu()
           for i in tqdm(range(0, len(images), FEATURE_BATCH), desc=desc, file=sys.stderr)]
    return torch.cat(out)


class PrecomputedFeatures(torch.nn.Module):
    """Lets torchmetrics take features we computed once, so Inception runs once per image."""

    def __init__(self, num_features):
        super().__init__()
        self.num_features = num_features

    def forward(self, features):
        return features


def frechet_distance(features_a, features_b):
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of the two sets' Gaussian fits (FID)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(features_a.shape[1]))
    metric.update(features_a.double(), real=True)
    metric.update(features_b.double(), real=False)
    # Its eigvals (LAPACK geev, sequential at heart) took 3.4 s for a 256 x 256 matrix with 2 threads
    # on a busy 2-core machine, against 0.03 s with 1.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return float(metric.compute())
    finally:
        torch.set_num_threads(threads)


def kernel_inception_distance(features_a, features_b, seed=0, subsets=100, subset_size=1000):
    """Unbiased MMD^2 with the cubic polynomial kernel, mean and std over random subsets (KID)."""
    from torchmetrics.image.kid import KernelInceptionDistance
    subset_size = min(subset_size, len(features_a), len(features_b))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "will save all extracted features in buffer": intended
        metric = KernelInceptionDistance(feature=PrecomputedFeatures(features_a.shape[1]), subsets=subsets,
                                         subset_size=subset_size)
    metric.update(features_a.double(), real=True)
    metric.update(features_b.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # KID draws its subsets from the global CPU generator
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


# ---- the attribute network: an offline Frechet distance and per-attribute verdicts --------------

ATTRIBUTE_METRICS = ("attribute_fd", "attribute_tv_mean", "attribute_mi_mean", "attribute_mi_max",
                     "attribute_mi_top_pair", "attribute_precision")


def load_attribute_net(path, device):
    """(network, its reliable heads in the network's order), or None when the file is missing."""
    if not os.path.isfile(path):
        return None
    net, info = attribute_net.load(path, device)
    reliable = info.get("reliable", list(net.classes))
    return net, [name for name in net.classes if name in reliable]


def attribute_readings(net, images, device, desc):
    """attribute_net.read_images with a progress bar: (features N x D, {head: probabilities N x K})."""
    return attribute_net.read_images(net, images, device, desc=desc)


def label_histogram(labels, num_classes):
    """The share of each class among integer labels: float64, sums to 1."""
    return torch.bincount(labels, minlength=num_classes).double() / len(labels)


def total_variation(p, q):
    """1/2 sum_k |p_k - q_k|: the share of one histogram's mass that must move to match the other."""
    return 0.5 * (p - q).abs().sum().item()


def mutual_information(labels_a, labels_b, num_classes_a, num_classes_b):
    """The plug-in estimate of I(A; B) in nats, sum_ij p_ij log(p_ij / (p_i p_j)), from the joint
    histogram of two label vectors. Biased upward by about (K_a - 1)(K_b - 1) / 2N (Miller 1955)."""
    joint = torch.bincount(labels_a * num_classes_b + labels_b, minlength=num_classes_a * num_classes_b)
    joint = joint.double().view(num_classes_a, num_classes_b) / len(labels_a)
    independent = joint.sum(dim=1, keepdim=True) * joint.sum(dim=0, keepdim=True)
    seen = joint > 0
    return (joint[seen] * (joint[seen] / independent[seen]).log()).sum().item()


def mi_excess(values, num_classes_a, num_classes_b):
    """How far a pair's MI rose above its floor, in units of the estimates' noise. For independent
    labels 2N times the plug-in MI is about chi-square with (K_a - 1)(K_b - 1) degrees of freedom,
    so the difference of two such estimates has a standard deviation of sqrt((K_a - 1)(K_b - 1)) / N:
    ranked by the raw difference, the pairs with the most classes would win on noise alone."""
    return (values["samples"] - values["floor"]) / math.sqrt(max((num_classes_a - 1) * (num_classes_b - 1), 1))


def confidence_thresholds(probabilities, percentile=ATTRIBUTE_CONFIDENCE_PERCENTILE):
    """{head: the percentile of its confidences (largest class probability)} over a set of images."""
    return {name: torch.quantile(p.max(dim=1).values, percentile).item() for name, p in probabilities.items()}


def confident_share(probabilities, thresholds):
    """The share of images on which every head in `thresholds` is at least that confident."""
    confident = [probabilities[name].max(dim=1).values >= threshold for name, threshold in thresholds.items()]
    return torch.stack(confident).all(dim=0).double().mean().item()


def attribute_scores(readings, heads, classes):
    """The attribute metrics of readings {"samples", "test", "reference": (features, probabilities)}
    (see the module docstring), on the heads listed; `classes` names each head's classes.

    Returns {"metrics": {key: pair}, "heads", "reference_images", "tv": {head: pair}, "mi": {"a,b":
    pair}, "mi_top_pair", "mi_units", "confidence_thresholds", "histograms": {head: {"classes",
    "samples", "test", "reference"}}}.
    """
    compared = ("samples", "test")  # each against the reference; test vs reference is the floor
    features = {name: f for name, (f, _) in readings.items()}
    labels = {name: {head: p[head].argmax(dim=1) for head in heads} for name, (_, p) in readings.items()}
    histograms = {head: {name: label_histogram(labels[name][head], len(classes[head]))
                         for name in ("samples", "test", "reference")} for head in heads}
    tv = {head: pair(*[total_variation(h[name], h["reference"]) for name in compared])
          for head, h in histograms.items()}
    mi = {f"{a},{b}": pair(*[mutual_information(labels[name][a], labels[name][b], len(classes[a]), len(classes[b]))
                             for name in compared])
          for a, b in itertools.combinations(heads, 2)}
    top_pair = max(mi, key=lambda k: mi_excess(mi[k], *(len(classes[head]) for head in k.split(",")))) if mi else None
    thresholds = confidence_thresholds({head: readings["reference"][1][head] for head in heads})

    def over(values, reduce):
        values = list(values)
        return pair(*[reduce([v[column] for v in values]) for column in ("samples", "floor")]) if values \
            else pair(None, None)

    metrics = {
        "attribute_fd": pair(*[frechet_distance(features[name], features["reference"]) for name in compared]),
        "attribute_tv_mean": over(tv.values(), lambda v: sum(v) / len(v)),
        "attribute_mi_mean": over(mi.values(), lambda v: sum(v) / len(v)),
        "attribute_mi_max": over(mi.values(), max),
        "attribute_mi_top_pair": mi[top_pair] if top_pair else pair(None, None),
        "attribute_precision": (pair(*[confident_share(readings[name][1], thresholds) for name in compared])
                                if heads else pair(None, None)),
    }
    return {"metrics": metrics, "heads": list(heads), "reference_images": len(features["reference"]), "tv": tv,
            "mi": mi, "mi_top_pair": top_pair, "mi_units": "nats", "confidence_thresholds": thresholds,
            "histograms": {head: {"classes": classes[head], **{name: h[name].tolist() for name in h}}
                           for head, h in histograms.items()}}


# ---- SWD on Laplacian-pyramid patches (Karras et al. 2018, appendix D) --------------------------

GAUSSIAN_5x5 = torch.outer(torch.tensor([1., 4., 6., 4., 1.]), torch.tensor([1., 4., 6., 4., 1.])) / 256


def _blur(x, kernel):
    channels = x.shape[1]
    x = F.pad(x, (2, 2, 2, 2), mode="reflect")
    return F.conv2d(x, kernel.to(x).expand(channels, 1, 5, 5), groups=channels)


def pyramid_down(x):  # as cv2.pyrDown
    return _blur(x, GAUSSIAN_5x5)[:, :, ::2, ::2]


def pyramid_up(x):  # as cv2.pyrUp
    n, c, h, w = x.shape
    up = x.new_zeros(n, c, 2 * h, 2 * w)
    up[:, :, ::2, ::2] = x
    return _blur(up, GAUSSIAN_5x5 * 4)


def laplacian_pyramid(images, num_levels):
    """Band-pass levels from fine to coarse; the last level is the low-pass image itself."""
    pyramid = [images.float()]
    for _ in range(1, num_levels):
        pyramid.append(pyramid_down(pyramid[-1]))
        pyramid[-2] = pyramid[-2] - pyramid_up(pyramid[-1])
    return pyramid


def patch_descriptors(level, patches_per_image, patch_size, generator):
    """patches_per_image random patch_size^2 neighbourhoods of each image -> M x C x size x size."""
    n, _, size, _ = level.shape
    windows = level.unfold(2, patch_size, 1).unfold(3, patch_size, 1)  # a view: N x C x Y x X x 7 x 7
    image = torch.arange(n).repeat_interleave(patches_per_image)
    y = torch.randint(0, size - patch_size + 1, (len(image),), generator=generator)
    x = torch.randint(0, size - patch_size + 1, (len(image),), generator=generator)
    return windows[image, :, y, x]


def sliced_wasserstein_distance(reference, image_sets, seed=0, device="cpu", patch_size=7,
                                patches_per_image=128, directions=512, directions_per_batch=128,
                                min_resolution=16):
    """SWD x1e3 of each image set against the reference, per pyramid level and averaged.

    All sets must hold the same number of images (the 1-D Wasserstein distance is then the mean
    gap between sorted projections). As in the paper: levels down to 16x16, 128 7x7 patches per
    image, 4 x 128 random unit directions. One change: Karras et al. normalise each set's patches
    by that set's own per-channel mean and std, which makes SWD blind to a global colour or
    contrast shift; we normalise every set with the reference's statistics, so such a shift counts.
    Returns [{"32": ..., "16": ..., "avg": ...} for each image set].
    """
    size = reference.shape[-1]
    resolutions = [size >> i for i in range(int(math.log2(size)) + 1) if size >> i >= min_resolution]
    if not resolutions:
        raise UserError(f"SWD needs images of at least {min_resolution}x{min_resolution}, got {size}x{size}")
    for images in image_sets:
        assert len(images) == len(reference), "SWD compares sets of the same size"
    pyramids = [laplacian_pyramid(images, len(resolutions)) for images in [reference, *image_sets]]
    results = [{} for _ in image_sets]
    for level, resolution in enumerate(resolutions):
        # Every set takes its patches at the same random positions and is projected on the same
        # random directions (common random numbers): identical sets score exactly 0, and a set's
        # score does not depend on which other sets are scored with it.
        descriptors = [patch_descriptors(p[level], patches_per_image, patch_size,
                                         torch.Generator().manual_seed(seed * 1000 + level))
                       for p in pyramids]
        generator = torch.Generator().manual_seed(seed * 1000 + 500 + level)
        mean = descriptors[0].mean(dim=(0, 2, 3), keepdim=True)
        std = descriptors[0].std(dim=(0, 2, 3), keepdim=True, correction=0).clamp_min(1e-8)
        descriptors = [((d - mean) / std).flatten(1).to(device) for d in descriptors]
        distance = torch.zeros(len(image_sets), dtype=torch.float64)
        for _ in range(0, directions, directions_per_batch):
            direction = torch.randn(descriptors[0].shape[1], directions_per_batch, generator=generator)
            direction = (direction / direction.norm(dim=0, keepdim=True)).to(device)
            projected_reference = sorted_projections(descriptors[0], direction)
            for i, d in enumerate(descriptors[1:]):
                projected = sorted_projections(d, direction)
                distance[i] += (projected - projected_reference).abs().mean().item() * directions_per_batch
        for i in range(len(image_sets)):
            results[i][str(resolution)] = distance[i].item() / directions * 1e3
        del descriptors
    for r in results:
        r["avg"] = sum(r.values()) / len(r)
    return results


def sorted_projections(descriptors, direction):
    """Projections of M descriptors on K directions, each direction's sorted: K x M."""
    projected = direction.T @ descriptors.T
    if projected.device.type == "cpu":  # numpy's vectorised sort is about 10x faster than torch's on a CPU
        return torch.from_numpy(np.sort(projected.numpy(), axis=1))
    return projected.sort(dim=1).values


# ---- nearest neighbours: precision/recall and memorisation -------------------------------------

def pixels(images):
    """uint8 images -> float N x (3*H*W) in [0, 1]: the space of the memorisation distances."""
    return images.flatten(1).float() / 255


@torch.no_grad()
def k_nearest_distances(queries, points, k, device="cpu", query_chunk=1024, point_chunk=8192, desc=None):
    """The k smallest L2 distances from each query to `points`, sorted: N_q x k.

    Chunked so that 10,000 queries against 50,000 points never hold the full distance matrix.
    Candidates are found with ||q||^2 + ||p||^2 - 2 q.p (one matmul), then their distances are
    recomputed directly, so that an exact copy is at distance 0, not at float32 rounding noise.
    """
    centre = points.float().mean(dim=0)  # centring keeps the matmul form accurate
    points = (points.float() - centre).to(device)
    points_sq = points.square().sum(dim=1)
    out = []
    chunks = range(0, len(queries), query_chunk)
    for start in tqdm(chunks, desc=desc, file=sys.stderr) if desc else chunks:
        q = (queries[start:start + query_chunk].float() - centre).to(device)
        q_sq = q.square().sum(dim=1, keepdim=True)
        best_d2 = torch.full((len(q), k), math.inf, device=device)
        best_index = torch.zeros((len(q), k), dtype=torch.long, device=device)
        for p_start in range(0, len(points), point_chunk):
            p = points[p_start:p_start + point_chunk]
            d2 = q_sq + points_sq[p_start:p_start + point_chunk] - 2 * q @ p.T
            index = torch.arange(p_start, p_start + len(p), device=device).expand(len(q), -1)
            best_d2, position = torch.cat([best_d2, d2], dim=1).topk(k, dim=1, largest=False)
            best_index = torch.cat([best_index, index], dim=1).gather(1, position)
        exact = (q[:, None, :] - points[best_index]).norm(dim=2)
        out.append(exact.sort(dim=1).values.cpu())
    return torch.cat(out)


@torch.no_grad()
def inside_any_ball(queries, centres, radii, device="cpu", query_chunk=1024, centre_chunk=8192):
    """For each query: is it within radii[j] of some centres[j]? (boolean N_q)"""
    centre_mean = centres.float().mean(dim=0)
    centres = (centres.float() - centre_mean).to(device)
    centres_sq = centres.square().sum(dim=1)
    radii_sq = radii.to(device).float().square()
    out = []
    for start in range(0, len(queries), query_chunk):
        q = (queries[start:start + query_chunk].float() - centre_mean).to(device)
        q_sq = q.square().sum(dim=1, keepdim=True)
        inside = torch.zeros(len(q), dtype=torch.bool, device=device)
        for c_start in range(0, len(centres), centre_chunk):
            c = slice(c_start, c_start + centre_chunk)
            d2 = (q_sq + centres_sq[c] - 2 * q @ centres[c].T).clamp_min(0)
            inside |= (d2 <= radii_sq[c]).any(dim=1)
        out.append(inside.cpu())
    return torch.cat(out)


def manifold_radii(points, k=K_NEAREST, device="cpu"):
    """Each point's distance to its k-th nearest neighbour in the set: the radii of its manifold."""
    # k + 1 nearest: each point is its own nearest neighbour, at distance 0.
    return k_nearest_distances(points, points, k + 1, device)[:, k].clone()


def precision_recall(real, fake, k=K_NEAREST, device="cpu", real_radii=None):
    """Improved precision and recall (Kynkaanniemi et al. 2019, eq. 1 and 2).

    The manifold of a set is the union of balls around its points, each with the radius of the
    point's k-th nearest neighbour in the set. Precision: share of fake points inside the real
    manifold. Recall: share of real points inside the fake manifold. real_radii: the real set's
    manifold_radii, when computed before (they depend on the real points alone).
    """
    if real_radii is None:
        real_radii = manifold_radii(real, k, device)
    fake_radii = manifold_radii(fake, k, device)
    precision = inside_any_ball(fake, real, real_radii, device).float().mean().item()
    recall = inside_any_ball(real, fake, fake_radii, device).float().mean().item()
    return precision, recall


def nearest_train_l2(images, reference, device="cpu", desc=None):
    """Each image's L2 distance (pixels in [0, 1]) to its nearest reference image: float N."""
    return k_nearest_distances(pixels(images), pixels(reference), 1, device, desc=desc)[:, 0].clone()


def memorisation(nearest, threshold):
    """(memorised share, median nearest distance) of a set's nearest_train_l2 distances: the share
    is of images nearer to a training image than `threshold`, the test images' 1st percentile
    (MEMORISATION_PERCENTILE), so the floor's share is about that percentile by construction."""
    return (nearest < threshold).float().mean().item(), nearest.median().item()


# ---- input and output --------------------------------------------------------------------------

ROWS = [  # key, label, format
    ("fid", "FID", ".2f"),
    ("kid_x1e3", "KID x1e3", ".2f"),
    ("swd_x1e3_32", "SWD x1e3, 32x32 level (fine detail)", ".2f"),
    ("swd_x1e3_16", "SWD x1e3, 16x16 level (coarse image)", ".2f"),
    ("swd_x1e3_avg", "SWD x1e3, average", ".2f"),
    ("precision", "precision (k=3, {space})", ".3f"),
    ("recall", "recall (k=3, {space})", ".3f"),
    ("memorised_share", "memorised share", ".4f"),
    ("nearest_train_l2_median", "nearest train image, median L2", ".3f"),
    ("background_error", "background error (top corners, distance from white, of 255)", ".2f"),
    ("attribute_fd", "attribute FD (attribute network features)", ".3f"),
    ("attribute_tv_mean", "attribute TV, mean over heads", ".3f"),  # then one row per head
    ("attribute_mi_mean", "attribute MI (nats), mean over pairs", ".4f"),
    ("attribute_mi_top_pair", "attribute MI (nats), most raised pair: {top_pair}", ".4f"),
    ("attribute_precision", "attribute precision (every head confident)", ".3f"),
]
TV_HEAD_ROW = "  attribute TV, {head}"


def number(value, fmt):
    text = f"{value:{fmt}}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.00" from rounding


def format_table(report):
    metrics = report["metrics"]
    space = report["precision_recall_features"]
    n = report["n"]
    source = report["samples"].get("checkpoint") or report["samples"]["dir"]
    title = (f"{source}: {n} samples; floor: {n} images of {report['test']['dir']}; "
             f"reference: {report['reference']['dir']} ({report['reference']['images']} images)")
    attributes = report.get("attributes") or {}
    context = {"space": space, "top_pair": (attributes.get("mi_top_pair") or "-").replace(",", " & ")}
    rows = [(key, label.format(**context), fmt, metrics.get(key)) for key, label, fmt in ROWS]
    tv_at = next(i for i, row in enumerate(rows) if row[0] == "attribute_tv_mean") + 1
    rows[tv_at:tv_at] = [(None, TV_HEAD_ROW.format(head=head), ".3f", values)
                         for head, values in attributes.get("tv", {}).items()]
    lines = [("metric", f"samples (N={n})", f"floor: test vs train (N={n})")]
    for key, label, fmt, values in rows:
        if values is None:
            continue
        cells = []
        for column in ("samples", "floor"):
            value = values[column]
            if value is None:
                cells.append("skipped")
            elif key == "kid_x1e3":
                cells.append(f"{number(value, fmt)} +- {number(metrics['kid_x1e3_std'][column], fmt)}")
            else:
                cells.append(number(value, fmt))
        lines.append((label, *cells))
    widths = [max(len(line[i]) for line in lines) for i in range(3)]
    text = [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}" for a, b, c in lines]
    text.insert(1, "-" * len(text[0]))
    return "\n".join([title, *text])


if __name__ == "__main__":
    run_main(main)
