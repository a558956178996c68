"""Does evaluate.py's attribute metric measure what it claims? Image sets with known faults, scored.

    python tools/attribute_metric_checks.py      # writes docs/attribute_metric_checks.md

Builds image sets from the default data set (images/*_downsample and their labels.csv), scores each
as evaluate.py scores samples (attribute network metrics and SWD, against the train set) and writes
a markdown table beside the checks it supports. The floor is N test images (the first N of a seeded
shuffle of the test set); every other set comes from the remaining test images, so no set shares an
image with the floor or with the train set the network learned from:
- held-out real: N other test images, three times (disjoint). A perfect generator: about the floor,
  within the spread of these three.
- blur (Gaussian, sigma 0.5, 1, 1.5 pixels), pixel noise (Gaussian, std 4, 8, 16 of 255) and a colour
  shift (red + s, green - s, s = 10, 20, 40): the held-out set, distorted. The feature distance
  should rise with each strength.
- one skin colour removed, short hair only: held-out images without the most common skin colour, or
  with a short hair style. That head's total variation should rise clearly; the feature distance
  less, and SWD (which sees patches, not faces) hardly.
- hair colour tied to skin colour: held-out images whose (skin colour, hair colour) pairs follow a
  joint with both marginals of the data, half of whose mass pairs the two monotonically (each skin
  colour with "its" hair colours). The mutual information should rise; both heads' total variation
  should stay at the floor.
"""
import math
import os
import sys

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, REPO)
sys.path.append(os.path.join(REPO, "images"))  # images/ is not a package: avatars.py owns labels.csv

import attribute_net  # noqa: E402
import avatars  # noqa: E402
import evaluate  # noqa: E402
from cli import (ArgumentParser, UserError, atomic_write, output_file, pick_device, positive_int,  # noqa: E402
                 random_seed, run_main, sha256_of)
from dataset import DatasetError, image_files, read_rgb  # noqa: E402

BLUR_SIGMAS = (0.5, 1.0, 1.5)
NOISE_STDS = (4.0, 8.0, 16.0)
COLOUR_SHIFTS = (10, 20, 40)
COUPLED_SHARE = 0.5  # of the tied set's joint on the monotone pairing; the rest independent
TIED = ("skin_color", "hair_color")
HELD_OUT = "held-out real"  # the distortions are applied to this set
FOCUS_TV = ("skin_color", "hair", "hair_color")


def main(argv=None):
    args = parse_args(argv)
    output_file(args.output, "--output")
    device = pick_device(args.device)
    if not os.path.isfile(args.attribute_net):
        raise UserError(f"--attribute_net {args.attribute_net}: no such file; it is committed with the "
                        f"repository (git checkout models/), or train one with python train_attribute_net.py")
    net, heads = evaluate.load_attribute_net(args.attribute_net, device)
    missing = [head for head in (*FOCUS_TV, *TIED) if head not in net.classes]
    if missing:
        raise UserError(f"--attribute_net {args.attribute_net}: has no head {missing[0]}")
    floor, image_sets = build_image_sets(args.test_dir, args.n, args.seed)
    reference = reference_subset(args.reference_dir, args.n, args.seed)
    rows = score_sets(net, heads, floor, image_sets, reference, args.seed, device)
    text = report(rows, args, len(reference), heads)
    print(text)
    with atomic_write(args.output, "w") as f:
        f.write(text)
    print(f"wrote {args.output}")


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--reference_dir", default="images/train_images_downsample", help="the train set")
    parser.add_argument("--test_dir", default="images/test_images_downsample",
                        help="held-out images with their labels.csv: the floor and every other set come from here")
    parser.add_argument("--attribute_net", default=attribute_net.WEIGHTS, help="the attribute network's weights")
    parser.add_argument("--n", type=positive_int, default=1000, help="images per set (the test set needs 4 N)")
    parser.add_argument("--seed", type=random_seed, default=0, help="draws the sets, the noise and SWD's patches")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", default="docs/attribute_metric_checks.md", help="the markdown file to write")
    return parser.parse_args(argv)


# ---- the sets --------------------------------------------------------------------------------------

def read_labels(directory, paths):
    """labels.csv's rows for `paths`, in the same order."""
    rows = avatars.read_labels(os.path.join(directory, avatars.LABELS_FILE))  # only the rows it can trust
    missing = [p for p in paths if os.path.basename(p) not in rows]
    if missing:
        raise DatasetError(f"--test_dir {directory}: {avatars.LABELS_FILE} has no valid row for {len(missing)} of "
                           f"its images, such as {os.path.basename(missing[0])}; write it with python "
                           f"images/avatars.py --labels_only --dest_image_dir {directory}")
    return [rows[os.path.basename(p)] for p in paths]


def read_images(paths):
    return torch.from_numpy(np.stack([np.asarray(read_rgb(p)) for p in paths])).permute(0, 3, 1, 2).contiguous()


def build_image_sets(test_dir, n, seed):
    """(the floor, {set name: images}): N test images, and every other set from the rest."""
    paths = image_files(test_dir)
    labels = read_labels(test_dir, paths)
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed)).tolist()
    if len(order) < 4 * n:
        raise UserError(f"--n {n}: the test set has {len(order)} images, and the checks need 4 N (the floor and "
                        f"three held-out sets); lower --n")
    floor_index, pool = order[:n], order[n:]
    sets = build_sets(labels, pool, n)
    wanted = sorted({i for indices in sets.values() for i in indices} | set(floor_index))
    images = dict(zip(wanted, read_images([paths[i] for i in wanted])))

    def images_of(indices):
        return torch.stack([images[i] for i in indices])

    image_sets = {name: images_of(indices) for name, indices in sets.items() if name.startswith(HELD_OUT)}
    held_out = image_sets[HELD_OUT]
    for sigma in BLUR_SIGMAS:
        image_sets[f"blur, sigma {sigma:g}"] = blur(held_out, sigma)
    for std in NOISE_STDS:
        image_sets[f"pixel noise, std {std:g}"] = pixel_noise(held_out, std, seed)
    for shift in COLOUR_SHIFTS:
        image_sets[f"colour shift {shift}"] = colour_shift(held_out, shift)
    for name, indices in sets.items():
        if not name.startswith(HELD_OUT):
            image_sets[name] = images_of(indices)
    return images_of(floor_index), image_sets


def reference_subset(reference_dir, n, seed):
    """The reference images evaluate.py uses with --subset_seed equal to seed, in its order: the first N for
    SWD, the first ATTRIBUTE_REFERENCE_MAX for the attribute network. Only these are read."""
    paths = image_files(reference_dir)
    if len(paths) < n:
        raise UserError(f"--n {n}: the reference set has {len(paths)} images; lower --n")
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed))
    return read_images([paths[i] for i in order[:max(n, evaluate.ATTRIBUTE_REFERENCE_MAX)].tolist()])


def build_sets(labels, pool, n):
    """{set name: n indices into labels} drawn from `pool` (indices, already shuffled)."""
    skin = most_common([labels[i]["skin_color"] for i in pool])
    sets = {HELD_OUT: pool[:n], f"{HELD_OUT}, 2nd": pool[n:2 * n], f"{HELD_OUT}, 3rd": pool[2 * n:3 * n],
            f"no skin colour {skin}": first(pool, n, lambda i: labels[i]["skin_color"] != skin, "other skin colours"),
            "short hair only": first(pool, n, lambda i: labels[i]["hair"].startswith("short"), "short hair")}
    sets["hair colour tied to skin colour"] = tied(labels, pool, n, *TIED, COUPLED_SHARE)
    return sets


def most_common(values):
    values, counts = np.unique(values, return_counts=True)
    return str(values[counts.argmax()])


def first(pool, n, keep, what):
    chosen = [i for i in pool if keep(i)][:n]
    if len(chosen) < n:
        raise UserError(f"--n {n}: only {len(chosen)} held-out images with {what}; lower --n")
    return chosen


def monotone_coupling(p_a, p_b):
    """The joint of two marginals that pairs equal quantiles (the north-west corner rule): cell
    (i, j) holds the overlap of class i's interval of the cumulative p_a and class j's of p_b.
    Its marginals are exactly p_a and p_b."""
    edges_a, edges_b = np.concatenate([[0], np.cumsum(p_a)]), np.concatenate([[0], np.cumsum(p_b)])
    low = np.maximum(edges_a[:-1, None], edges_b[None, :-1])
    high = np.minimum(edges_a[1:, None], edges_b[None, 1:])
    return np.clip(high - low, 0, None)


def round_to_total(x, total):
    """Integers near x (an array) that add up to total: floors, plus 1 for the largest remainders."""
    counts = np.floor(x).astype(int)
    remainders = (x - counts).ravel()
    counts.ravel()[np.argsort(-remainders, kind="stable")[:total - counts.sum()]] += 1
    return counts


def tied(labels, pool, n, column_a, column_b, share):
    """n indices from the pool whose (column_a, column_b) values follow (1 - share) p_a p_b + share
    times the monotone coupling, p_a and p_b being the pool's marginals: the marginals stay, the
    mutual information grows with share."""
    a = [labels[i][column_a] for i in pool]
    b = [labels[i][column_b] for i in pool]
    values_a, index_a = np.unique(a, return_inverse=True)
    values_b, index_b = np.unique(b, return_inverse=True)
    p_a = np.bincount(index_a, minlength=len(values_a)) / len(pool)
    p_b = np.bincount(index_b, minlength=len(values_b)) / len(pool)
    joint = (1 - share) * np.outer(p_a, p_b) + share * monotone_coupling(p_a, p_b)
    quota = round_to_total(n * joint, n)
    chosen, spare = [], []
    for i, cell in zip(pool, zip(index_a, index_b)):
        if quota[cell] > 0:
            quota[cell] -= 1
            chosen.append(i)
        else:
            spare.append((cell[0], i))
    # A rare pair can run short (2% of the avatars are bald, hair colour "none"): the shortfall is
    # taken from other images with the same column_a value, so that marginal stays exact and the
    # other moves by the shortfall only.
    for row, missing in enumerate(quota.sum(axis=1)):
        extra = [i for a, i in spare if a == row][:missing]
        if len(extra) < missing:
            raise UserError(f"--n {n}: too few held-out images with {column_a} {values_a[row]} for the tied set; "
                            f"lower --n")
        chosen += extra
    return chosen


def blur(images, sigma):
    import torchvision.transforms.functional as TF
    size = 2 * math.ceil(3 * sigma) + 1
    return TF.gaussian_blur(images.float(), [size, size], [sigma, sigma]).round().clamp(0, 255).to(torch.uint8)


def pixel_noise(images, std, seed):
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)) * std
    return (images.float() + noise).round().clamp(0, 255).to(torch.uint8)


def colour_shift(images, shift):
    offset = torch.tensor([shift, -shift, 0.0]).view(1, 3, 1, 1)
    return (images.float() + offset).clamp(0, 255).to(torch.uint8)


# ---- scores and the table --------------------------------------------------------------------------

def score_sets(net, heads, floor, image_sets, reference, seed, device):
    """{row name: scores(...) plus "swd"} for the floor and every set, as evaluate.evaluate scores them."""
    n = len(floor)
    with evaluate.full_float32():
        readings = {"test": evaluate.attribute_readings(net, floor, device, "attribute network, floor"),
                    "reference": evaluate.attribute_readings(net, reference[:evaluate.ATTRIBUTE_REFERENCE_MAX],
                                                             device, "attribute network, reference")}
        # One call: every set's patches at the same positions, on the same directions.
        swd = evaluate.sliced_wasserstein_distance(reference[:n], [floor, *image_sets.values()], seed=seed,
                                                   device=device)
        rows = {"floor: test vs train": {**scores({**readings, "samples": readings["test"]}, heads, net.classes,
                                                  "floor"), "swd": swd[0]["avg"]}}
        for (name, images), set_swd in zip(image_sets.items(), swd[1:]):
            set_readings = evaluate.attribute_readings(net, images, device, f"attribute network, {name}")
            rows[name] = {**scores({**readings, "samples": set_readings}, heads, net.classes, "samples"),
                          "swd": set_swd["avg"]}
    return rows


def scores(readings, heads, classes, column):
    """evaluate.attribute_scores' numbers for one set (column "samples") or for the floor (column
    "floor"), plus the total variation of FOCUS_TV's heads and the mutual information of TIED,
    reliable or not."""
    result = evaluate.attribute_scores(readings, heads, classes)
    focus = evaluate.attribute_scores(readings, list(dict.fromkeys((*FOCUS_TV, *TIED))), classes)
    row = {key: result["metrics"][f"attribute_{key}"][column] for key in ("fd", "tv_mean", "mi_mean", "precision")}
    for head in FOCUS_TV:
        row[f"tv {head}"] = focus["tv"][head][column]
    row["mi tied"] = focus["mi"][",".join(TIED)][column]
    return row


COLUMNS = [  # key, heading, format, show the ratio to the floor
    ("fd", "attribute FD", ".3f", True),
    ("swd", "SWD x1e3", ".2f", True),
    ("tv_mean", "TV, mean of heads", ".3f", True),
    ("tv skin_color", "TV skin_color", ".3f", True),
    ("tv hair", "TV hair", ".3f", True),
    ("tv hair_color", "TV hair_color", ".3f", True),
    ("mi tied", "MI skin & hair colour", ".4f", True),
    ("mi_mean", "MI, mean of pairs", ".4f", True),
    ("precision", "attribute precision", ".3f", False),
]


def cell(value, floor, fmt, ratio):
    text = evaluate.number(value, fmt)
    return f"{text} ({value / floor:.1f}x)" if ratio and floor > 0 else text


def checks(rows):
    """One line per claim of the issue, with the numbers that decide it."""
    floor = rows["floor: test vs train"]

    def ratio(name, key):
        return rows[name][key] / floor[key]

    lines = []
    held_out = [name for name in rows if name.startswith(HELD_OUT)]

    def spread(key, fmt=".2f", ratio_to_floor=True):
        values = [ratio(name, key) if ratio_to_floor else rows[name][key] for name in held_out]
        return f"{min(values):{fmt}} to {max(values):{fmt}}" + ("x" if ratio_to_floor else "")

    lines.append(f"- held-out real images score about the floor; over the {len(held_out)} disjoint held-out sets: "
                 f"attribute FD {spread('fd')}, TV {spread('tv_mean')}, MI {spread('mi_mean')}, "
                 f"SWD {spread('swd')} the floor; precision {spread('precision', '.3f', False)} against "
                 f"{floor['precision']:.3f}. This is how far each metric moves between real sets of the same N.")
    held = HELD_OUT
    for kind in ("blur", "pixel noise", "colour shift"):
        names = [name for name in rows if name.startswith(kind)]
        values = [rows[held]["fd"], *(rows[name]["fd"] for name in names)]
        rising = all(b > a for a, b in zip(values, values[1:]))
        lines.append(f"- {kind}: attribute FD {' < '.join(f'{v:.3f}' for v in values)} (held-out, then the three "
                     f"strengths): {'rises monotonically' if rising else 'NOT monotonic'}.")
    for name, head in [(name, "skin_color") for name in rows if name.startswith("no skin colour")] + \
                      [("short hair only", "hair")]:
        lines.append(f"- {name}: TV {head} {ratio(name, f'tv {head}'):.1f}x the floor, attribute FD "
                     f"{ratio(name, 'fd'):.1f}x, SWD {ratio(name, 'swd'):.2f}x.")
    mildest = [f"{BLUR_SIGMAS[0]:g}", f"{NOISE_STDS[0]:g}", f"{COLOUR_SHIFTS[0]}"]
    lines.append(f"- attribute precision: {floor['precision']:.3f} for the floor; the mildest distortions: "
                 f"{rows[f'blur, sigma {mildest[0]}']['precision']:.3f} (blur, sigma {mildest[0]}), "
                 f"{rows[f'pixel noise, std {mildest[1]}']['precision']:.3f} (pixel noise, std {mildest[1]}), "
                 f"{rows[f'colour shift {mildest[2]}']['precision']:.3f} (colour shift {mildest[2]}).")
    name = "hair colour tied to skin colour"
    lines.append(f"- {name}: MI(skin colour, hair colour) {ratio(name, 'mi tied'):.1f}x the floor; the marginals: "
                 f"TV skin_color {ratio(name, 'tv skin_color'):.2f}x, "
                 f"TV hair_color {ratio(name, 'tv hair_color'):.2f}x the floor.")
    return lines


def report(rows, args, reference_images, heads):
    floor = rows["floor: test vs train"]
    header = ["set", *(heading for _, heading, _, _ in COLUMNS)]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in rows.items():
        cells = [cell(row[key], floor[key], fmt, ratio and name != "floor: test vs train")
                 for key, _, fmt, ratio in COLUMNS]
        table.append("| " + " | ".join([name, *cells]) + " |")
    sha = sha256_of(args.attribute_net)[:12]
    return "\n".join([
        "# Does the attribute metric measure what it claims?",
        "",
        f"Made by `python tools/attribute_metric_checks.py --n {args.n} --seed {args.seed}` (attribute network "
        f"{os.path.basename(args.attribute_net)}, sha256 {sha}...; reliable heads: {', '.join(heads)}). "
        f"Every set has N = {args.n} images and is scored against {args.reference_dir}: the attribute network reads "
        f"{min(reference_images, evaluate.ATTRIBUTE_REFERENCE_MAX)} of its images, SWD {args.n}. The floor is {args.n} "
        f"images of {args.test_dir}; every other set comes from its other images (see the script's docstring). "
        "In brackets: the ratio to the floor. TV, mean of heads, MI, mean of pairs, and precision use the reliable "
        "heads, as evaluate.py does; the named heads' columns are shown whether reliable or not. MI is in nats.",
        "",
        *table,
        "",
        *checks(rows),
        "",
    ])


if __name__ == "__main__":
    run_main(main)
