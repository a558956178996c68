"""Tests for evaluate.py: each metric on cases with a known answer, then the command line.

The images are small synthetic "avatars" (discs and boxes on white), so every test runs on a CPU in
seconds; the FID path runs a randomly initialised Inception network on five images per set, and the
attribute metrics a randomly initialised attribute network. One test reads real avatars with the
committed attribute network, and is skipped where models/attribute_net.pt is missing.
"""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import attribute_net  # noqa: E402
import evaluate  # noqa: E402
import testkit  # noqa: E402
from cli import sha256_of  # noqa: E402


def synthetic_images(n, seed):
    """uint8 n x 3 x 32 x 32: three random filled discs or boxes on white, plus a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32]
    images = np.full((n, 32, 32, 3), 255, dtype=np.float32)
    for i in range(n):
        for _ in range(3):
            colour = rng.uniform(0, 255, 3)
            cy, cx = rng.uniform(4, 28, 2)
            r = rng.uniform(3, 9)
            if rng.random() < 0.5:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            else:
                mask = (abs(yy - cy) <= r) & (abs(xx - cx) <= r * rng.uniform(0.4, 1))
            images[i][mask] = colour
    images += rng.normal(0, 4, images.shape)
    return torch.from_numpy(images.clip(0, 255).round().astype(np.uint8)).permute(0, 3, 1, 2).contiguous()


def blurred(images):
    return evaluate._blur(images.float(), evaluate.GAUSSIAN_5x5).round().clamp(0, 255).to(torch.uint8)


def colour_shifted(images):
    return (images.float() + torch.tensor([40.0, -40.0, 0.0]).view(1, 3, 1, 1)).clamp(0, 255).to(torch.uint8)


def write_folder(folder, images):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(image).save(folder / f"{i}.png")
    return str(folder)


# ---- SWD on Laplacian pyramids -------------------------------------------------------------------

def test_laplacian_pyramid_matches_the_progressive_gan_code():
    """Karras et al.'s sliced_wasserstein.py builds the pyramid with scipy (cv2.pyrDown/pyrUp)."""
    gaussian = np.float32([[1, 4, 6, 4, 1], [4, 16, 24, 16, 4], [6, 24, 36, 24, 6],
                           [4, 16, 24, 16, 4], [1, 4, 6, 4, 1]])[None, None] / 256

    def pyr_down(m):
        return scipy.ndimage.convolve(m, gaussian, mode="mirror")[:, :, ::2, ::2]

    def pyr_up(m):
        up = np.zeros((*m.shape[:2], 2 * m.shape[2], 2 * m.shape[3]), m.dtype)
        up[:, :, ::2, ::2] = m
        return scipy.ndimage.convolve(up, gaussian * 4, mode="mirror")

    images = synthetic_images(4, seed=0)
    reference = [images.numpy().astype(np.float32)]
    for _ in range(2):
        reference.append(pyr_down(reference[-1]))
        reference[-2] -= pyr_up(reference[-1])
    ours = evaluate.laplacian_pyramid(images, 3)
    assert [tuple(level.shape[-2:]) for level in ours] == [(32, 32), (16, 16), (8, 8)]
    for theirs, mine in zip(reference, ours):
        np.testing.assert_allclose(mine.numpy(), theirs, atol=1e-3)
    # band-pass levels plus the low-pass level add back up to the image
    rebuilt = ours[2]
    for level in reversed(ours[:2]):
        rebuilt = level + evaluate.pyramid_up(rebuilt)
    np.testing.assert_allclose(rebuilt.numpy(), images.numpy(), atol=1e-3)


def test_swd_levels_and_sensitivity():
    reference, same = synthetic_images(256, seed=1), synthetic_images(256, seed=2)
    same_result, blur_result, shift_result = evaluate.sliced_wasserstein_distance(
        reference, [same, blurred(same), colour_shifted(same)], seed=0)
    assert list(same_result) == ["32", "16", "avg"]
    assert same_result["avg"] == pytest.approx((same_result["32"] + same_result["16"]) / 2)
    assert 0 < same_result["avg"] < 60
    assert blur_result["32"] > 10 * same_result["32"]        # blur removes the fine band
    assert shift_result["16"] > 3 * same_result["16"]        # a colour shift moves the coarse band
    # the same seed gives the same numbers, whatever other sets are scored alongside
    again, identical = evaluate.sliced_wasserstein_distance(reference, [same, reference], seed=0)
    assert again == same_result
    assert identical == {"32": 0.0, "16": 0.0, "avg": 0.0}  # same patches, same directions


# ---- nearest neighbours, precision and recall ----------------------------------------------------

def test_k_nearest_distances_chunked_equal_brute_force():
    g = torch.Generator().manual_seed(0)
    queries, points = torch.rand(300, 40, generator=g), torch.rand(1000, 40, generator=g)
    points[:7] = queries[:7]  # exact copies are at distance 0, not at rounding noise
    ours = evaluate.k_nearest_distances(queries, points, 4, query_chunk=64, point_chunk=100)
    brute = torch.cdist(queries.double(), points.double()).topk(4, dim=1, largest=False).values
    assert ours.shape == (300, 4)
    assert (ours - brute).abs().max().item() < 1e-5
    assert ours[:7, 0].tolist() == [0.0] * 7


def test_precision_recall_hand_computed():
    real = torch.arange(10.0).view(-1, 1)  # ball radii (3rd neighbour): 3 at 0 and 9, 2 inside
    fake = torch.tensor([[0.5], [4.5], [11.5], [20.0], [30.0]])
    # 0.5 and 4.5 lie in balls; 11.5 is 2.5 from 9, inside its radius 3; 20 and 30 are outside.
    # Fake radii: 0.5 -> 19.5 covers every real point.
    assert evaluate.precision_recall(real, fake, k=3) == pytest.approx((0.6, 1.0))
    # Mode collapse onto 0..3: fake radii 3, 2, 2, 3 cover the real points 0..6.
    assert evaluate.precision_recall(real, real[:4], k=3) == pytest.approx((1.0, 0.7))
    assert evaluate.precision_recall(real, real, k=3) == (1.0, 1.0)


def test_precision_recall_point_clouds_with_known_overlap():
    g = torch.Generator().manual_seed(0)
    n = 1000

    def gaussian(shift=0.0):
        return torch.randn(n, 2, generator=g) + shift

    real = gaussian()
    precision, recall = evaluate.precision_recall(real, gaussian())
    assert precision > 0.95 and recall > 0.95
    assert evaluate.precision_recall(real, gaussian(20.0)) == (0.0, 0.0)
    half_far = torch.cat([gaussian()[: n // 2], gaussian(20.0)[: n // 2]])  # half of the samples are junk
    precision, recall = evaluate.precision_recall(real, half_far)
    assert 0.45 < precision <= 0.5 and recall > 0.95
    points = torch.randn(4 * n, 2, generator=g)
    half_plane = points[points[:, 0] > 0][:n]  # realistic, but half of the data is never produced
    precision, recall = evaluate.precision_recall(real, half_plane)
    assert precision > 0.95 and 0.4 < recall < 0.62


# ---- Frechet distance and KID --------------------------------------------------------------------

def test_frechet_distance_of_two_gaussians_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    n = 50_000
    # diagonal covariances: d^2 = |mu1 - mu2|^2 + sum (s1 - s2)^2 = (1 + 4) + (1 + 0.25 + 0) = 6.25
    a = torch.randn(n, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    b = (torch.randn(n, 3, generator=g, dtype=torch.float64) * torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64)
         + torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64))
    assert evaluate.frechet_distance(a, b) == pytest.approx(6.25, abs=0.05)
    assert evaluate.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)

    # full covariances: exactly the closed form of the two sets' fitted Gaussians
    mix_a = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.3, -0.5, 0.9]], dtype=torch.float64)
    mix_b = torch.tensor([[0.5, 0.2, 0.0], [0.0, 1.5, 0.0], [0.7, 0.0, 0.4]], dtype=torch.float64)
    a, b = a[:20_000] @ mix_a.T, b[:20_000] @ mix_b.T
    mu_a, mu_b = a.mean(0).numpy(), b.mean(0).numpy()
    sigma_a, sigma_b = np.cov(a.numpy().T), np.cov(b.numpy().T)
    closed = ((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a + sigma_b - 2 * scipy.linalg.sqrtm(sigma_a @ sigma_b).real)
    assert evaluate.frechet_distance(a, b) == pytest.approx(float(closed), rel=1e-9)


def test_kernel_inception_distance_is_zero_for_one_distribution_and_large_otherwise():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, 4, generator=g), torch.randn(1000, 4, generator=g)
    same_mean, same_std = evaluate.kernel_inception_distance(a, b, subsets=20, subset_size=200)
    shifted_mean, _ = evaluate.kernel_inception_distance(a, b + 1.0, subsets=20, subset_size=200)
    assert abs(same_mean) < 3 * same_std + 0.05
    assert shifted_mean > 10 * (abs(same_mean) + same_std)
    assert evaluate.kernel_inception_distance(a, b, subsets=20, subset_size=200) == (same_mean, same_std)


# ---- the attribute network's metrics: total variation, mutual information, confidence ----------

def test_label_histogram_and_total_variation():
    histogram = evaluate.label_histogram(torch.tensor([0, 0, 1, 3]), 4)
    assert histogram.tolist() == [0.5, 0.25, 0.0, 0.25]
    uniform = torch.full((4,), 0.25, dtype=torch.float64)
    # 0.5 |0.5 - 0.25| + 0.5 |0 - 0.25| = 0.25: a quarter of the mass moves from class 0 to class 2
    assert evaluate.total_variation(histogram, uniform) == pytest.approx(0.25)
    assert evaluate.total_variation(uniform, histogram) == pytest.approx(0.25)
    assert evaluate.total_variation(uniform, uniform) == 0.0
    disjoint = torch.tensor([0.0, 0.0, 0.5, 0.5], dtype=torch.float64)
    assert evaluate.total_variation(torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64), disjoint) == 1.0


def test_mutual_information_hand_computed():
    a = torch.arange(1200) % 4
    independent = (torch.arange(1200) // 4) % 3  # every (a, b) pair equally often
    assert evaluate.mutual_information(a, independent, 4, 3) == pytest.approx(0.0, abs=1e-12)
    assert evaluate.mutual_information(a, a, 4, 4) == pytest.approx(math.log(4))  # b determines a: H(A)
    assert evaluate.mutual_information(a, a % 2, 4, 2) == pytest.approx(math.log(2))  # H(B)
    # p(a, b) = [[1/2, 0], [1/4, 1/4]]: p(a) = (1/2, 1/2), p(b) = (3/4, 1/4)
    a, b = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 0, 1])
    closed = (0.5 * math.log(0.5 / (0.5 * 0.75)) + 0.25 * math.log(0.25 / (0.5 * 0.75))
              + 0.25 * math.log(0.25 / (0.5 * 0.25)))
    assert evaluate.mutual_information(a, b, 2, 2) == pytest.approx(closed)
    assert evaluate.mutual_information(a, b, 2, 5) == pytest.approx(closed)  # classes never seen add nothing
    # independent random labels: the plug-in estimate is about (K_a - 1)(K_b - 1) / 2N above 0,
    # which is why the floor is measured at the same N
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 10, (2000,), generator=g), torch.randint(0, 10, (2000,), generator=g)
    assert 0.6 * 81 / 4000 < evaluate.mutual_information(a, b, 10, 10) < 1.5 * 81 / 4000


def one_hot_readings(labels, classes, generator):
    """(random features, one-hot probabilities) as attribute_readings returns them, for given labels."""
    n = len(next(iter(labels.values())))
    return (torch.randn(n, 4, generator=generator, dtype=torch.float64),
            {head: torch.nn.functional.one_hot(labels[head], len(classes[head])).double() for head in classes})


def test_the_most_raised_pair_is_measured_in_units_of_its_noise():
    g = torch.Generator().manual_seed(0)
    classes = {"glasses": ["none", "present"], "earrings": ["none", "present"],
               "hair": [str(i) for i in range(40)], "mouth": [str(i) for i in range(40)]}
    n = 2000

    def labels(tied):
        drawn = {head: torch.randint(0, len(values), (n,), generator=g) for head, values in classes.items()}
        if tied:  # earrings copy glasses; mouth copies hair in half of the images
            drawn["earrings"] = drawn["glasses"]
            drawn["mouth"] = torch.where(torch.arange(n) % 2 == 0, drawn["hair"], drawn["mouth"])
        return drawn

    readings = {name: one_hot_readings(labels(name == "samples"), classes, g)
                for name in ("samples", "test", "reference")}
    result = evaluate.attribute_scores(readings, list(classes), classes)
    mi = result["mi"]
    assert mi["glasses,earrings"]["samples"] == pytest.approx(math.log(2), abs=0.01)
    raised = {pair: v["samples"] - v["floor"] for pair, v in mi.items()}
    # hair x mouth gained more nats, but 39 x 39 degrees of freedom make its estimate far noisier
    assert raised["hair,mouth"] > raised["glasses,earrings"] + 0.4
    assert result["mi_top_pair"] == "glasses,earrings"
    assert result["metrics"]["attribute_mi_top_pair"] == mi["glasses,earrings"]
    assert result["metrics"]["attribute_mi_max"]["samples"] == mi["hair,mouth"]["samples"]
    assert evaluate.mi_excess({"samples": 0.7, "floor": 0.1}, 40, 40) == pytest.approx(0.6 / 39)


def two_class_probabilities(confidences):
    confidences = torch.tensor(confidences, dtype=torch.float64)
    return torch.stack([confidences, 1 - confidences], dim=1)


def test_confidence_thresholds_and_confident_share():
    # 101 confidences 0.5, 0.505, ..., 1.0: the 5th percentile is the 6th smallest, 0.525
    reference = {"glasses": two_class_probabilities([0.5 + 0.005 * i for i in range(101)]),
                 "mouth": two_class_probabilities([0.5 + 0.005 * i for i in range(101)]).flip(1)}
    thresholds = evaluate.confidence_thresholds(reference)
    assert thresholds == pytest.approx({"glasses": 0.525, "mouth": 0.525})
    samples = {"glasses": two_class_probabilities([0.52, 0.525, 0.9, 0.99]),
               "mouth": two_class_probabilities([0.99, 0.99, 0.6, 0.51]).flip(1)}  # the largest probability counts
    # pass glasses: F T T T; pass mouth: T T T F; both: only the 2nd and 3rd
    assert evaluate.confident_share(samples, thresholds) == 0.5
    assert evaluate.confident_share(samples, {"glasses": thresholds["glasses"]}) == 0.75
    assert evaluate.confident_share(reference, thresholds) == pytest.approx(96 / 101)


CLASSES = {"skin_color": ["a", "b", "c", "d"], "hair_color": ["a", "b", "c", "d", "e", "f"],
           "hair": ["short01", "short02", "long01"], "glasses": ["none", "present"]}
RELIABLE = ["skin_color", "hair_color", "glasses"]


def random_attribute_net(images, path, info, classes=CLASSES):
    """A randomly initialised AttributeNet whose BatchNorm statistics are those of `images`, so that
    its predicted labels vary from image to image; saved at `path` as the committed one is."""
    torch.manual_seed(0)
    net = attribute_net.AttributeNet(classes, width=8)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # running statistics = this batch's
    with torch.no_grad():
        net.train()(attribute_net.to_input(images))
    attribute_net.save(str(path), net, info)
    return str(path)


@pytest.fixture(scope="module")
def attribute_net_file(tmp_path_factory, image_sets):
    return random_attribute_net(image_sets["reference"][:256], tmp_path_factory.mktemp("attribute_net") / "net.pt",
                                {"reliable": RELIABLE})


def test_load_attribute_net_keeps_the_reliable_heads(attribute_net_file, tmp_path, image_sets):
    net, heads = evaluate.load_attribute_net(attribute_net_file, "cpu")
    assert heads == RELIABLE and list(net.classes) == list(CLASSES)
    assert evaluate.load_attribute_net(tmp_path / "missing.pt", "cpu") is None
    shuffled = random_attribute_net(image_sets["reference"][:64], tmp_path / "net.pt",
                                    {"reliable": ["glasses", "skin_color"]})
    assert evaluate.load_attribute_net(shuffled, "cpu")[1] == ["skin_color", "glasses"]  # in the network's order
    every = random_attribute_net(image_sets["reference"][:64], tmp_path / "net.pt", {})
    assert evaluate.load_attribute_net(every, "cpu")[1] == list(CLASSES)


def test_attribute_scores_of_the_floor_itself_and_of_a_colour_shift(attribute_net_file, image_sets):
    net, heads = evaluate.load_attribute_net(attribute_net_file, "cpu")
    readings = {name: evaluate.attribute_readings(net, image_sets[name], "cpu", name)
                for name in ("test", "reference")}
    result = evaluate.attribute_scores({"samples": readings["test"], **readings}, heads, net.classes)
    m = result["metrics"]
    assert set(m) == set(evaluate.ATTRIBUTE_METRICS)
    for key in evaluate.ATTRIBUTE_METRICS:  # the samples are the test set: the same numbers as the floor
        assert m[key]["samples"] == m[key]["floor"], key
    assert result["heads"] == RELIABLE and list(result["tv"]) == RELIABLE
    assert list(result["mi"]) == ["skin_color,hair_color", "skin_color,glasses", "hair_color,glasses"]
    assert result["mi_units"] == "nats" and result["reference_images"] == 1024
    histogram = result["histograms"]["hair_color"]
    assert list(histogram) == ["classes", "samples", "test", "reference"]
    assert histogram["classes"] == CLASSES["hair_color"] and sum(histogram["reference"]) == pytest.approx(1.0)
    assert sum(share > 0 for share in histogram["test"]) > 1  # the random network's labels vary
    assert result["tv"]["hair_color"]["floor"] == pytest.approx(evaluate.total_variation(
        torch.tensor(histogram["test"]), torch.tensor(histogram["reference"])))
    assert m["attribute_tv_mean"]["floor"] == pytest.approx(sum(v["floor"] for v in result["tv"].values()) / 3)
    assert m["attribute_mi_max"]["floor"] == max(v["floor"] for v in result["mi"].values())
    assert m["attribute_fd"]["floor"] > 0
    thresholds = result["confidence_thresholds"]
    assert list(thresholds) == RELIABLE and all(0 < t < 1 for t in thresholds.values())
    assert 0.5 < m["attribute_precision"]["floor"] < 1.0

    shifted = evaluate.attribute_readings(net, colour_shifted(image_sets["fresh"]), "cpu", "samples")
    shifted = evaluate.attribute_scores({"samples": shifted, **readings}, heads, net.classes)["metrics"]
    assert shifted["attribute_fd"]["samples"] > 3 * shifted["attribute_fd"]["floor"]
    assert shifted["attribute_fd"]["floor"] == m["attribute_fd"]["floor"]  # the floor does not depend on the samples


@pytest.mark.skipif(not Path(attribute_net.WEIGHTS).is_file(), reason="models/attribute_net.pt is not there yet")
def test_committed_attribute_network_scores_held_out_avatars_at_the_floor(tmp_path):
    folders = {name: testkit.make_avatar_folder(tmp_path / name, n, first_index) for name, n, first_index in
               (("reference", 256, 0), ("test", 64, 1_000_000), ("held_out", 64, 2_000_000))}
    images = {name: evaluate.load_image_folder(folder) for name, folder in folders.items()}
    attributes = evaluate.load_attribute_net(attribute_net.WEIGHTS, "cpu")
    assert len(attributes[1]) >= 3  # most heads are reliable
    m = scored(images["held_out"], images["test"], images["reference"], attributes=attributes)["metrics"]
    assert 0.6 < m["attribute_fd"]["samples"] / m["attribute_fd"]["floor"] < 1.6
    assert 0.6 < m["attribute_tv_mean"]["samples"] / m["attribute_tv_mean"]["floor"] < 1.6
    assert 0.6 < m["attribute_mi_mean"]["samples"] / m["attribute_mi_mean"]["floor"] < 1.6
    assert abs(m["attribute_precision"]["samples"] - m["attribute_precision"]["floor"]) < 0.15
    shifted = scored(colour_shifted(images["held_out"]), images["test"], images["reference"],
                     attributes=attributes)["metrics"]
    # At N = 64 the floor is mostly the estimate's bias (256 features); the shift adds about as much again.
    assert shifted["attribute_fd"]["samples"] > 1.5 * shifted["attribute_fd"]["floor"]


# ---- all metrics together: the floor, distortions, memorisation ----------------------------------

@pytest.fixture(scope="module")
def image_sets():
    """A reference (train) set of 1024, and test, fresh and training-copy sets of 256."""
    reference = synthetic_images(1024, seed=1)
    return {"reference": reference, "test": synthetic_images(256, seed=2), "fresh": synthetic_images(256, seed=3),
            "copies": reference[:256].clone()}


def scored(samples, test, reference, **networks):
    """evaluate.evaluate of the samples against real_statistics (subset_seed 0) of test and reference."""
    real = evaluate.real_statistics(reference, test, len(samples), **networks)
    return evaluate.evaluate(samples, real, reference, **networks)


def scores(image_sets, samples):
    return scored(samples, image_sets["test"], image_sets["reference"])


def test_fresh_samples_score_about_the_floor(image_sets, attribute_net_file):
    attributes = evaluate.load_attribute_net(attribute_net_file, "cpu")
    result = scored(image_sets["fresh"], image_sets["test"], image_sets["reference"], attributes=attributes)
    m = result["metrics"]
    assert result["precision_recall_features"] == "pixels"
    assert m["fid"] == {"samples": None, "floor": None}  # no Inception network given
    assert 0.5 < m["swd_x1e3_avg"]["samples"] / m["swd_x1e3_avg"]["floor"] < 1.5
    assert abs(m["precision"]["samples"] - m["precision"]["floor"]) < 0.1
    assert abs(m["recall"]["samples"] - m["recall"]["floor"]) < 0.1
    assert m["memorised_share"]["samples"] <= 0.05
    assert m["memorised_share"]["floor"] == pytest.approx(0.01, abs=0.005)  # the 1st percentile, by construction
    assert m["nearest_train_l2_median"]["samples"] == pytest.approx(m["nearest_train_l2_median"]["floor"], rel=0.1)
    # the white of the synthetic images, noisy, and shapes that reach a corner now and then
    assert m["background_error"]["floor"] < 10 and abs(m["background_error"]["samples"] - m["background_error"]["floor"]) < 2.5
    # the attribute network read all 1024 reference images (fewer than ATTRIBUTE_REFERENCE_MAX)
    assert result["attributes"]["reference_images"] == 1024 and result["attributes"]["heads"] == RELIABLE
    assert 0.7 < m["attribute_fd"]["samples"] / m["attribute_fd"]["floor"] < 1.4
    assert m["attribute_tv_mean"]["samples"] < 1.5 * m["attribute_tv_mean"]["floor"] + 0.02
    assert abs(m["attribute_precision"]["samples"] - m["attribute_precision"]["floor"]) < 0.1


@pytest.mark.parametrize("distortion", ["blur", "colour_shift"])
def test_distorted_samples_score_clearly_worse_than_the_floor(image_sets, distortion):
    samples = {"blur": blurred, "colour_shift": colour_shifted}[distortion](image_sets["fresh"])
    m = scores(image_sets, samples)["metrics"]
    assert m["attribute_fd"] == {"samples": None, "floor": None}  # no attribute network given
    assert m["swd_x1e3_avg"]["samples"] > 3 * m["swd_x1e3_avg"]["floor"]
    level = "32" if distortion == "blur" else "16"
    assert m[f"swd_x1e3_{level}"]["samples"] > 4 * m[f"swd_x1e3_{level}"]["floor"]
    assert m["recall"]["samples"] < m["recall"]["floor"] - 0.2
    if distortion == "colour_shift":  # the white background turned mauve: green down by 40 of 255
        assert m["background_error"]["samples"] > m["background_error"]["floor"] + 8


def test_the_background_error_reads_the_top_corners_distance_from_white():
    images = torch.full((2, 3, 32, 32), 255, dtype=torch.uint8)
    images[:, :, 8:, :] = 0  # a dark figure below the corners does not count
    assert evaluate.background_error(images) == 0
    images[0, 2, :3, :3] = 155  # one corner's blue channel 100 below white, in one image of two
    assert evaluate.background_error(images) == pytest.approx(100 * 9 / (2 * 3 * 2 * 9))


def test_copies_of_training_images_are_memorised(image_sets):
    reference = image_sets["reference"]
    real = evaluate.real_statistics(reference, image_sets["test"], 256)
    m = evaluate.evaluate(image_sets["copies"], real, reference)["metrics"]
    assert m["memorised_share"]["samples"] == 1.0
    assert m["nearest_train_l2_median"]["samples"] == 0.0
    half = torch.cat([image_sets["copies"][:128], image_sets["fresh"][:128]])
    share, _ = evaluate.memorisation(evaluate.nearest_train_l2(half, reference), real["memorisation_threshold_l2"])
    assert 0.5 <= share <= 0.52


def test_the_floors_own_test_images_score_exactly_the_floor(image_sets, attribute_net_file):
    """One function scores both sides: given the floor's N test images as samples, every metric is its floor."""
    attributes = evaluate.load_attribute_net(attribute_net_file, "cpu")
    reference = image_sets["reference"]
    real = evaluate.real_statistics(reference, image_sets["test"], 64, subset_seed=3, attributes=attributes)
    assert len(set(real["test_index"].tolist())) == 64
    result = evaluate.evaluate(image_sets["test"][real["test_index"]], real, reference, attributes=attributes)
    assert set(result["metrics"]) >= {"swd_x1e3_avg", "precision", "memorised_share", *evaluate.ATTRIBUTE_METRICS}
    for key, values in result["metrics"].items():
        assert values["samples"] == values["floor"], key
    assert result["metrics"]["swd_x1e3_avg"]["floor"] > 0 and result["metrics"]["attribute_fd"]["floor"] > 0


# ---- the command line ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folders(tmp_path_factory, image_sets):
    root = tmp_path_factory.mktemp("evaluate_data")
    return {name: write_folder(root / name, image_sets[name][:count]) for name, count in
            (("reference", 64), ("test", 32), ("fresh", 48), ("copies", 16))}


def run_main(capsys, *argv):
    """evaluate.py's entry point, cli.run_main(evaluate.main), in this process: (exit code, stdout, stderr)."""
    import cli
    with pytest.raises(SystemExit) as exit:
        cli.run_main(evaluate.main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return exit.value.code, out, err


def test_image_dir_without_inception_writes_table_and_json(folders, attribute_net_file, tmp_path, capsys,
                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)  # no models/ here: the default weights path is missing
    out_json = tmp_path / "eval.json"
    code, out, err = run_main(capsys, "--image_dir", folders["fresh"], "--reference_dir", folders["reference"],
                              "--test_dir", folders["test"], "--output_json", out_json, "--no_download",
                              "--attribute_net", attribute_net_file, "--device", "cpu")
    assert code == 0, err
    assert "FID skipped: put pt_inception-2015-12-05-6726825d.pth in models/\n" in out
    assert "using 32 of the 48 samples: samples and floor use the same N" in out
    report = json.loads(out_json.read_text())
    assert report["n"] == 32 and report["seed"] == 0 and report["subset_seed"] == 0
    assert report["samples"] == {"dir": folders["fresh"], "images": 48}
    cache_file = report["real_statistics"]["cache_file"]  # the default --cache_dir, relative to the working folder
    assert Path(cache_file).parent == Path("checkpoints", "evaluation_cache") and (tmp_path / cache_file).is_file()
    assert f"real-data statistics: computed, cached in {cache_file}\n" in out
    assert report["reference"]["images"] == 64 and report["test"]["images"] == 32
    assert report["precision_recall_features"] == "pixels"
    assert report["metrics"]["fid"] == {"samples": None, "floor": None}
    assert "attribute metrics skipped" not in out
    attributes = report["attributes"]
    assert attributes["heads"] == RELIABLE and attributes["reference_images"] == 64
    assert attributes["weights"] == {"path": attribute_net_file, "sha256": sha256_of(attribute_net_file)}
    assert list(attributes["mi"]) == ["skin_color,hair_color", "skin_color,glasses", "hair_color,glasses"]
    top_pair = attributes["mi_top_pair"].replace(",", " & ")
    rows = [(label.format(space="pixels", top_pair=top_pair), fmt, report["metrics"][key])
            for key, label, fmt in evaluate.ROWS]
    rows += [(evaluate.TV_HEAD_ROW.format(head=head), ".3f", attributes["tv"][head]) for head in RELIABLE]
    table = out[out.index("metric"):]
    lines = table.splitlines()
    for label, fmt, values in rows:
        row = next(line for line in lines if line.startswith(label + " "))
        if values["samples"] is None:
            assert row.split()[-2:] == ["skipped", "skipped"], row
        else:
            assert row.split()[-2:] == [f"{values['samples']:{fmt}}", f"{values['floor']:{fmt}}"], row
    mean_row = next(i for i, line in enumerate(lines) if line.startswith("attribute TV, mean over heads "))
    for line, head in zip(lines[mean_row + 1:mean_row + 4], RELIABLE, strict=True):  # the head rows follow it
        assert line.startswith(f"  attribute TV, {head} "), line
    assert "samples (N=32)" in table and "floor: test vs train (N=32)" in table


@pytest.mark.parametrize("how", ["missing_file", "no_attribute_net"])
def test_attribute_metrics_are_skipped(how, folders, attribute_net_file, tmp_path, capsys):
    missing = tmp_path / "models" / "attribute_net.pt"
    flag = ["--attribute_net", missing] if how == "missing_file" else ["--attribute_net", attribute_net_file,
                                                                        "--no_attribute_net"]
    out_json = tmp_path / "eval.json"
    code, out, err = run_main(capsys, "--image_dir", folders["fresh"], "--reference_dir", folders["reference"],
                              "--test_dir", folders["test"], "--output_json", out_json, "--no_download",
                              "--inception_weights", tmp_path / "none.pth", *flag, "--device", "cpu",
                              "--cache_dir", tmp_path / "cache")
    assert code == 0, err
    note = f"attribute metrics skipped: no attribute network at {missing}"
    assert (note + "\n" in out) == (how == "missing_file")
    report = json.loads(out_json.read_text())
    assert report["attributes"] is None
    for key in evaluate.ATTRIBUTE_METRICS:
        assert report["metrics"][key] == {"samples": None, "floor": None}
    row = next(line for line in out.splitlines() if line.startswith("attribute FD"))
    assert row.split()[-2:] == ["skipped", "skipped"]
    assert "attribute TV, skin_color" not in out


def test_fid_path_runs_with_a_random_inception_state_dict(folders, tmp_path, capsys):
    import torchvision
    torch.manual_seed(0)
    network = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    weights = tmp_path / "random_inception.pth"
    torch.save(network.state_dict(), weights)  # the layout of pt_inception-2015-12-05-6726825d.pth
    small = {name: write_folder(tmp_path / name, evaluate.load_image_folder(folders[name])[:5])
             for name in ("reference", "test", "fresh")}
    out_json = tmp_path / "eval.json"
    code, out, err = run_main(capsys, "--image_dir", small["fresh"], "--reference_dir", small["reference"],
                              "--test_dir", small["test"], "--inception_weights", weights, "--output_json", out_json,
                              "--no_attribute_net", "--device", "cpu", "--cache_dir", tmp_path / "cache")
    assert code == 0, err
    assert "FID skipped" not in out
    report = json.loads(out_json.read_text())
    assert report["precision_recall_features"] == "inception"
    for key in ("fid", "kid_x1e3", "kid_x1e3_std"):
        for column in ("samples", "floor"):
            assert math.isfinite(report["metrics"][key][column]), (key, column)
    assert report["metrics"]["fid"]["samples"] >= -1e-6
    assert "Inception features, reference" in err  # the progress bar of the feature pass


# ---- the two seeds, the cache of the real side, the grid -----------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A randomly initialised tiny network in a checkpoint as train.py writes one: its samples are noise,
    which is enough to tell one --seed's samples from another's, in a second."""
    import checkpoint
    from config import make_config
    from unet import UNet
    config = make_config("tiny", ["channels=(8,8,8,8)"])
    torch.manual_seed(0)
    model = UNet(config)
    state = checkpoint.TrainingState(model, model, torch.optim.SGD(model.parameters(), lr=0.1), torch.Generator())
    path = tmp_path_factory.mktemp("checkpoint") / "latest_model.pth"
    checkpoint.write(path, state.to_checkpoint(config, "tiny"))
    return path


SAMPLING = ["--steps", 2, "--precision", "fp32", "--layout", "contiguous", "--compile", "off", "--device", "cpu"]


def evaluated(capsys, tmp_path, folders, *argv):
    """evaluate.py on the tiny folders (a --test_dir in argv replaces folders["test"]): (report, stdout, stderr)."""
    out_json = tmp_path / "eval.json"
    code, out, err = run_main(capsys, "--reference_dir", folders["reference"], "--test_dir", folders["test"],
                              "--no_download", "--inception_weights", tmp_path / "none.pth",
                              "--output_json", out_json, *argv)
    assert code == 0, err
    return json.loads(out_json.read_text()), out, err


def test_the_floor_moves_with_subset_seed_not_with_seed(tiny_checkpoint, folders, attribute_net_file, tmp_path,
                                                        capsys):
    def columns(seed, subset_seed):
        report, _, _ = evaluated(capsys, tmp_path, folders, "--checkpoint", tiny_checkpoint, "--num_samples", 16,
                                 "--attribute_net", attribute_net_file, "--seed", seed, "--subset_seed", subset_seed,
                                 "--no_cache", *SAMPLING)  # no cache: each floor is computed, not read
        assert (report["seed"], report["subset_seed"], report["n"]) == (seed, subset_seed, 16)
        m, attributes = report["metrics"], report["attributes"]
        # The most raised MI pair is the samples' choice, and its floor that pair's: every pair's floor counts instead.
        floor = {key: v["floor"] for key, v in m.items() if key != "attribute_mi_top_pair"}
        floor.update({f"MI {pair}": v["floor"] for pair, v in attributes["mi"].items()})
        floor.update({f"TV {head}": v["floor"] for head, v in attributes["tv"].items()})
        return floor, {key: v["samples"] for key, v in m.items()}

    floor, samples = columns(seed=0, subset_seed=0)
    other_seed_floor, other_seed_samples = columns(seed=1, subset_seed=0)
    other_subset_floor, _ = columns(seed=0, subset_seed=1)
    assert other_seed_floor == floor  # every metric's floor, to the bit
    assert {key for key, value in floor.items() if value is None} == {"fid", "kid_x1e3", "kid_x1e3_std"}
    moved = ("swd_x1e3_32", "swd_x1e3_16", "nearest_train_l2_median", "attribute_fd", "attribute_tv_mean")
    for key in moved:
        assert other_seed_samples[key] != samples[key], key  # --seed does reach the samples
        assert other_subset_floor[key] != floor[key], key  # another 16 of the 32 test images, another reference subset


def test_cached_real_statistics_give_the_same_numbers_and_follow_the_data(folders, attribute_net_file, tmp_path,
                                                                          capsys, monkeypatch):
    computed = []  # the N of every real_statistics call
    real_statistics = evaluate.real_statistics

    def counted(*args, **kwargs):
        computed.append(args[2])
        return real_statistics(*args, **kwargs)

    monkeypatch.setattr(evaluate, "real_statistics", counted)
    test_dir = tmp_path / "test"
    shutil.copytree(folders["test"], test_dir)
    cache = tmp_path / "cache"

    def run_on(image_dir, *flags):
        return evaluated(capsys, tmp_path, folders, "--image_dir", image_dir, "--test_dir", test_dir,
                         "--attribute_net", attribute_net_file, "--device", "cpu", *flags)

    fresh, out, _ = run_on(folders["fresh"], "--no_cache")
    assert "real-data statistics: computed (--no_cache)\n" in out and not cache.exists()
    assert fresh["real_statistics"] == {"cache_file": None, "from_cache": False, "key": fresh["real_statistics"]["key"]}
    first, out, _ = run_on(folders["fresh"], "--cache_dir", cache)
    cache_file = first["real_statistics"]["cache_file"]
    assert [str(p) for p in cache.iterdir()] == [cache_file]
    assert f"real-data statistics: computed, cached in {cache_file}\n" in out
    second, out, _ = run_on(folders["fresh"], "--cache_dir", cache)
    assert f"real-data statistics: read from the cache {cache_file}\n" in out
    assert second["real_statistics"]["from_cache"]
    assert computed == [32, 32]  # the third run computed nothing on the real side
    for report in (first, second):  # exactly the numbers of a fresh evaluation
        assert report["metrics"] == fresh["metrics"]
        assert report["attributes"] == fresh["attributes"]

    run_on(folders["copies"], "--cache_dir", cache)  # 16 samples: N = 16
    flip = Image.Transpose.FLIP_LEFT_RIGHT
    Image.open(test_dir / "0.png").transpose(flip).save(test_dir / "0.png")
    changed, out, _ = run_on(folders["fresh"], "--cache_dir", cache)  # one test image changed in place
    assert computed == [32, 32, 16, 32] and len(list(cache.iterdir())) == 3
    assert "real-data statistics: computed, cached in" in out
    assert changed["metrics"]["swd_x1e3_avg"]["floor"] != fresh["metrics"]["swd_x1e3_avg"]["floor"]
    Image.open(test_dir / "0.png").transpose(flip).save(test_dir / "0.png")  # the same pixels, a newer file
    again, out, _ = run_on(folders["fresh"], "--cache_dir", cache)
    assert computed == [32, 32, 16, 32] and again["real_statistics"]["cache_file"] == cache_file
    assert again["metrics"] == fresh["metrics"]


@pytest.mark.parametrize("damage", ["garbage", "another_key"])
def test_a_damaged_cache_file_is_computed_again_with_a_warning(damage, folders, tmp_path, capsys):
    flags = ["--image_dir", folders["fresh"], "--no_attribute_net", "--device", "cpu",
             "--cache_dir", tmp_path / "cache"]
    first, _, _ = evaluated(capsys, tmp_path, folders, *flags)
    cache_file = first["real_statistics"]["cache_file"]
    if damage == "garbage":
        Path(cache_file).write_bytes(b"not a cache file")
        problem = "cannot read it (UnpicklingError)"
    else:  # a file under this key's name that holds another key's statistics is never used
        saved = torch.load(cache_file, weights_only=True)
        saved["key"]["n"] = 31
        torch.save(saved, cache_file)
        problem = "it holds the statistics of another key"
    report, out, err = evaluated(capsys, tmp_path, folders, *flags)
    warnings = [line for line in err.splitlines() if line.startswith("warning")]
    assert warnings == [f"warning: {cache_file}: {problem}; computing the real-data statistics again"]
    assert f"real-data statistics: computed, cached in {cache_file}\n" in out
    assert report["metrics"] == first["metrics"]
    assert torch.load(cache_file, weights_only=True)["key"] == first["real_statistics"]["key"]  # rewritten
    _, out, err = evaluated(capsys, tmp_path, folders, *flags)
    assert "real-data statistics: read from the cache" in out and "warning" not in err


def test_grid_shows_the_first_samples_and_keeps_an_existing_file(tiny_checkpoint, folders, tmp_path, capsys,
                                                                 monkeypatch):
    generated = []
    generate_images = evaluate.generate_images

    def recorded(*args, **kwargs):
        generated.append(generate_images(*args, **kwargs))
        return generated[-1]

    monkeypatch.setattr(evaluate, "generate_images", recorded)
    grid = tmp_path / "grid.png"
    flags = ["--checkpoint", tiny_checkpoint, "--no_attribute_net", "--cache_dir", tmp_path / "cache", *SAMPLING]
    _, out, _ = evaluated(capsys, tmp_path, folders, *flags, "--num_samples", 16, "--grid", grid, "--grid_size", "4x2")
    assert f"wrote {grid} (128x64 pixels: the first 8 samples)\n" in out
    pixels = np.asarray(Image.open(grid))
    assert pixels.shape == (64, 128, 3)
    samples = generated[0].permute(0, 2, 3, 1).numpy()
    assert len(samples) == 16 and samples[:8].std() > 5  # not one flat colour
    for i in range(8):  # 4 columns, 2 rows, row by row, no padding
        row, column = divmod(i, 4)
        assert (pixels[32 * row:32 * row + 32, 32 * column:32 * column + 32] == samples[i]).all(), i

    code, _, err = run_main(capsys, *flags, "--reference_dir", folders["reference"], "--test_dir", folders["test"],
                            "--no_download", "--num_samples", 16, "--grid", grid, "--grid_size", "4x2")
    assert code == 2
    assert err.strip() == f"error: --grid {grid} exists: pass --overwrite to replace it, or another --grid"
    assert len(generated) == 1 and (np.asarray(Image.open(grid)) == pixels).all()  # refused before sampling

    # Fewer samples, the same --seed: the same first 8 (image i has its own random stream), so every
    # variant's grid starts from the same noise; another --seed draws other images.
    evaluated(capsys, tmp_path, folders, *flags, "--num_samples", 8, "--grid", grid, "--grid_size", "4x2",
              "--overwrite")
    assert (np.asarray(Image.open(grid)) == pixels).all()
    evaluated(capsys, tmp_path, folders, *flags, "--num_samples", 8, "--grid", grid, "--grid_size", "4x2",
              "--overwrite", "--seed", 1)
    assert (np.asarray(Image.open(grid)) != pixels).any()


def test_a_stopped_evaluation_continues_from_its_kept_batches(tiny_checkpoint, folders, attribute_net_file, tmp_path,
                                                              capsys, monkeypatch):
    """--resume_dir: an evaluation stopped after its sampling (here in its metrics, as a session's end
    may stop DDPM's hours) leaves each batch; the rerun reads them back instead of sampling, scores
    exactly the numbers of a run never stopped, reports what it read, and removes them."""
    kept = tmp_path / "kept"
    flags = ["--checkpoint", tiny_checkpoint, "--num_samples", 16, "--batch_size", 8, "--attribute_net",
             attribute_net_file, "--cache_dir", tmp_path / "cache", *SAMPLING]
    plain, _, _ = evaluated(capsys, tmp_path, folders, *flags)
    assert "resumed" not in plain["samples"]

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(evaluate, "evaluate", stopped)
        with pytest.raises(KeyboardInterrupt):
            evaluate.main([str(a) for a in [*flags, "--reference_dir", folders["reference"], "--test_dir",
                                            folders["test"], "--no_download", "--resume_dir", kept]])
    [folder] = kept.iterdir()
    assert sorted(os.listdir(folder)) == ["batch_0000000.pt", "batch_0000008.pt", "key.json"]
    assert json.loads((folder / "key.json").read_text())["checkpoint_sha256"] == sha256_of(tiny_checkpoint)

    resumed, out, _ = evaluated(capsys, tmp_path, folders, *flags, "--resume_dir", kept)
    assert resumed["metrics"] == plain["metrics"] and resumed["attributes"] == plain["attributes"]
    assert resumed["samples"]["resumed"]["batches"] == 2 and resumed["samples"]["resumed"]["wall_seconds"] > 0
    assert f"read 2 batches back from {folder}" in out
    assert not kept.exists()  # used, then removed


def test_kept_batches_are_read_back_for_their_key_only(tiny_checkpoint, tmp_path, capsys):
    """generate.KeptBatches: a kept batch's own pixels come back (a zeroed one stays zero), a file that
    cannot be read is sampled again with a warning, and another key (another seed, another thread
    count) reads none."""
    from checkpoint import load_for_sampling
    from generate import KeptBatches, generate_images
    from speed import choose_plan
    model, config = load_for_sampling(str(tiny_checkpoint), "cpu", sampling_steps=2)
    plan = choose_plan("fp32", config, torch.device("cpu"), 4, kind="sample", layout="contiguous")
    sampled = lambda keep: generate_images(model, config, 8, batch_size=4, progress=False, plan=plan, keep=keep)
    first = KeptBatches(tmp_path, seed=0)
    images = sampled(first)
    assert first.read["batches"] == 0 and len(os.listdir(first.dir)) == 3
    saved = torch.load(first.path(4), weights_only=True)
    saved["images"].zero_()
    torch.save(saved, first.path(4))
    (Path(first.dir) / "batch_0000000.pt").write_bytes(b"not a batch")
    again = KeptBatches(tmp_path, seed=0)
    resumed = sampled(again)
    assert again.dir == first.dir and again.read["batches"] == 1
    assert torch.equal(resumed[:4], images[:4]) and not resumed[4:].any() and images[4:].any()
    assert "batch_0000000.pt: cannot read it (UnpicklingError); sampling that batch again" in capsys.readouterr().err
    other = KeptBatches(tmp_path, seed=1)
    assert torch.equal(sampled(other), images) and other.read["batches"] == 0 and other.dir != first.dir
    other.remove()
    assert not os.path.exists(other.dir) and os.path.exists(first.dir)
    threads = torch.get_num_threads()  # the thread count, whose rounding differs, is part of the key
    try:
        torch.set_num_threads(threads + 1)
        more = KeptBatches(tmp_path, seed=0)
        sampled(more)
        assert more.read["batches"] == 0 and more.dir != first.dir
    finally:
        torch.set_num_threads(threads)


def test_without_a_source_the_pretrained_model_is_evaluated_once_checked(folders, tmp_path, capsys, monkeypatch):
    """No --checkpoint and no --image_dir before any training: the committed pretrained model, said in
    one line; a pretrained file whose sha256 does not match is a one-line error that names it."""
    import checkpoint
    sets = ["--reference_dir", folders["reference"], "--test_dir", folders["test"], "--no_download",
            "--inception_weights", tmp_path / "none.pth", "--device", "cpu", "--cache_dir", tmp_path / "cache",
            "--num_samples", "8", "--steps", "2", "--no_attribute_net"]
    monkeypatch.chdir(tmp_path)  # no checkpoints/latest_model.pth here
    code, out, err = run_main(capsys, *sets)
    assert code == 0, err
    assert ("no checkpoints/latest_model.pth yet (bash train_UNet.sh trains one): sampling the pretrained model "
            f"{os.path.relpath(checkpoint.PRETRAINED)}") in out
    damaged = tmp_path / "pretrained.pth"
    data = bytearray(open(checkpoint.PRETRAINED, "rb").read())
    data[len(data) // 2] ^= 1  # one bit of the weights
    damaged.write_bytes(bytes(data))
    shutil.copy(checkpoint.PRETRAINED + ".sha256", str(damaged) + ".sha256")
    monkeypatch.setattr(checkpoint, "PRETRAINED", str(damaged))
    code, _, err = run_main(capsys, *sets)
    assert code == 2 and err.strip().splitlines() == [
        "error: pretrained.pth: its sha256 does not match pretrained.pth.sha256; the file is damaged or was replaced: "
        "restore it with git checkout pretrained.pth, or pass another --checkpoint"]


@pytest.mark.parametrize("case", ["reference_missing", "wrong_size", "checkpoint_missing",
                                  "num_samples", "output_json", "garbage_weights", "foreign_state_dict", "too_few",
                                  "batch_size", "steps", "eta", "damaged_attribute_net", "grid_size", "grid_too_large",
                                  "cache_dir"])
def test_bad_input_is_one_line_and_nonzero(case, folders, tmp_path, capsys):
    sets = ["--reference_dir", folders["reference"], "--test_dir", folders["test"], "--no_download",
            "--inception_weights", tmp_path / "none.pth", "--device", "cpu", "--cache_dir", tmp_path / "cache"]
    if case == "reference_missing":
        argv, expected = (["--image_dir", folders["fresh"], *sets, "--reference_dir", tmp_path / "nowhere"],
                          f"error: --reference_dir: {tmp_path / 'nowhere'}: no such folder")
    elif case == "wrong_size":
        folder = tmp_path / "big"
        folder.mkdir()
        Image.new("RGB", (16, 16)).save(folder / "a.png")
        argv, expected = (["--image_dir", folder, *sets],
                          f"error: --image_dir: {folder / 'a.png'}: image is 16x16, expected 32x32")
    elif case == "checkpoint_missing":
        argv, expected = (["--checkpoint", tmp_path / "no.pth", *sets],
                          f"error: --checkpoint {tmp_path / 'no.pth'}: no such file")
    elif case == "num_samples":
        argv, expected = (["--checkpoint", tmp_path / "no.pth", "--num_samples", "1", *sets],
                          "error: --num_samples 1: need at least 2 images")
    elif case in ("batch_size", "steps", "eta"):
        value, message = {"batch_size": ("0", "0 must be at least 1"), "steps": ("-2", "must be in [1, 1000]"),
                          "eta": ("-0.5", "must be in [0.0, 1.0]")}[case]
        argv, expected = (["--checkpoint", tmp_path / "no.pth", *sets, f"--{case}", value],
                          f"error: argument --{case}: {message} (see --help)")
    elif case == "output_json":
        out_json = tmp_path / "no_folder" / "eval.json"
        argv, expected = (["--image_dir", folders["fresh"], *sets, "--output_json", out_json],
                          f"error: --output_json {out_json}: its folder does not exist")
    elif case in ("garbage_weights", "foreign_state_dict"):
        weights = tmp_path / "weights.pth"
        if case == "garbage_weights":
            weights.write_bytes(b"not a state dict")
        else:
            torch.save({"conv.weight": torch.zeros(3)}, weights)
        argv, expected = (["--image_dir", folders["fresh"], *sets, "--inception_weights", weights],
                          f"error: --inception_weights {weights}: not a FID Inception state dict")
    elif case == "damaged_attribute_net":
        weights = tmp_path / "attribute_net.pt"
        weights.write_bytes(b"not a network")
        (tmp_path / "attribute_net.pt.sha256").write_text("0" * 64 + "  attribute_net.pt\n")
        argv, expected = (["--image_dir", folders["fresh"], *sets, "--attribute_net", weights],
                          f"error: {weights}: its sha256 does not match {weights}.sha256")
    elif case == "grid_size":
        argv, expected = (["--image_dir", folders["fresh"], *sets, "--grid", tmp_path / "g.png", "--grid_size", "8by4"],
                          "error: argument --grid_size: '8by4' is not NxM (N columns, M rows, each at least 1)")
    elif case == "grid_too_large":
        argv, expected = (["--image_dir", folders["fresh"], *sets, "--grid", tmp_path / "g.png", "--grid_size", "8x8"],
                          "error: --grid_size 8x8: needs 64 samples, and there are 48")
    elif case == "cache_dir":
        (tmp_path / "a_file").write_text("")
        argv, expected = (["--image_dir", folders["fresh"], *sets, "--cache_dir", tmp_path / "a_file"],
                          f"error: --cache_dir {tmp_path / 'a_file'}: cannot create this folder")
    elif case == "too_few":
        few = write_folder(tmp_path / "few", synthetic_images(4, seed=9))
        argv, expected = ["--image_dir", few, *sets], "error: need more than 4 images in every set, got 4"
    code, _, err = run_main(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), err


@pytest.mark.slow
def test_launcher_exits_nonzero_without_traceback(tmp_path):
    # Both folders given, so that evaluate.sh builds no default data set (a fresh clone has none).
    result = subprocess.run(["bash", str(REPO / "evaluate.sh"), "--image_dir", tmp_path, "--reference_dir",
                             tmp_path / "nowhere", "--test_dir", tmp_path / "nowhere", "--no_download", "--inception_weights", tmp_path / "none.pth",
                             "--cache_dir", tmp_path / "cache"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: --reference_dir: {tmp_path / 'nowhere'}: no such folder; build the default data set with "
        f"bash images/make_default_dataset.sh, or point the flag at a folder of 32x32 images"]


@pytest.mark.slow
def test_checkpoint_end_to_end(folders, tmp_path):
    """train.py --preset tiny for 2 steps, then evaluate.sh generates 16 images with 2 steps."""
    run_dir = tmp_path / "run"
    train = subprocess.run([sys.executable, str(REPO / "train.py"), "--preset", "tiny",
                            "--train_dataset_directory", folders["reference"],
                            "--validate_dataset_directory", folders["test"], "--model_checkpoint_dir", run_dir,
                            "--max_steps", "2", "--device", "cpu", "--no_visdom"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-2000:]
    out_json = tmp_path / "eval.json"
    weights = tmp_path / "models" / "pt_inception-2015-12-05-6726825d.pth"
    result = subprocess.run(["bash", str(REPO / "evaluate.sh"), "--checkpoint", run_dir / "latest_model.pth",
                             "--num_samples", "16", "--steps", "2", "--reference_dir", folders["reference"],
                             "--test_dir", folders["test"], "--inception_weights", weights, "--no_download",
                             "--device", "cpu", "--output_json", out_json, "--cache_dir", tmp_path / "cache"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"FID skipped: put pt_inception-2015-12-05-6726825d.pth in {weights.parent}/" in result.stdout
    assert "sampling: 100%" in result.stderr  # the generation progress bar
    report = json.loads(out_json.read_text())
    assert report["n"] == 16
    assert report["samples"] == {"checkpoint": str(run_dir / "latest_model.pth"), "images": 16}
    assert report["sampler"]["steps"] == 2 and report["sampler"]["seed"] == 0
    saved = torch.load(run_dir / "latest_model.pth", weights_only=True)["config"]
    # the checkpoint's configuration with the sampler flags applied, as JSON
    assert report["config"] == json.loads(json.dumps({**saved, "sampling_steps": 2}))
    m = report["metrics"]
    # two training steps make noise: far worse than the floor on every metric
    assert m["swd_x1e3_avg"]["samples"] > 5 * m["swd_x1e3_avg"]["floor"]
    assert m["precision"]["samples"] < m["precision"]["floor"] - 0.5
    assert m["memorised_share"]["samples"] == 0.0


def test_the_default_cache_folder_that_cannot_be_made_means_no_cache(tmp_path, monkeypatch, capsys):
    """In a folder one cannot write to, plain evaluate.py still runs (one warning); a --cache_dir given
    by hand that cannot be made is the user's one-line error."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setattr(evaluate, "CACHE_DIR", str(blocker / "evaluation_cache"))
    assert evaluate.usable_cache_dir(evaluate.CACHE_DIR) is None
    assert capsys.readouterr().err.startswith(f"warning: --cache_dir {blocker / 'evaluation_cache'}: cannot create")
    with pytest.raises(evaluate.UserError, match="--cache_dir .*: cannot create this folder"):
        evaluate.usable_cache_dir(str(blocker / "mine"))
    assert evaluate.usable_cache_dir(str(tmp_path / "made")) == str(tmp_path / "made")
