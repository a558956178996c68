"""Tests for tools/attribute_metric_checks.py: the sets it builds have the faults they claim, and the
command writes its table (with a randomly initialised attribute network on a few real avatars)."""
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "images"))

import attribute_metric_checks as checks  # noqa: E402
import evaluate  # noqa: E402
import testkit  # noqa: E402


def test_monotone_coupling_keeps_both_marginals_and_pairs_quantiles():
    p_a, p_b = np.array([0.25, 0.25, 0.5]), np.array([0.5, 0.3, 0.2])
    joint = checks.monotone_coupling(p_a, p_b)
    np.testing.assert_allclose(joint.sum(axis=1), p_a)
    np.testing.assert_allclose(joint.sum(axis=0), p_b)
    # a's intervals [0, .25], [.25, .5], [.5, 1]; b's [0, .5], [.5, .8], [.8, 1]
    np.testing.assert_allclose(joint, [[0.25, 0, 0], [0.25, 0, 0], [0, 0.3, 0.2]])


def test_round_to_total():
    counts = checks.round_to_total(np.array([[1.4, 2.6], [0.5, 0.5]]), 5)
    assert counts.sum() == 5 and counts.tolist() == [[1, 3], [1, 0]]  # the first of equal remainders wins


def test_tied_set_keeps_the_marginals_and_raises_the_mutual_information():
    rng = np.random.default_rng(0)
    pool = list(range(8000))
    labels = [{"skin": f"s{rng.integers(4)}", "hair": f"h{rng.integers(10)}"} for _ in pool]
    chosen = checks.tied(labels, pool, 1000, "skin", "hair", share=0.5)
    assert len(chosen) == len(set(chosen)) == 1000

    def codes(indices, column):
        return torch.tensor([int(labels[i][column][1:]) for i in indices])

    for column, k in (("skin", 4), ("hair", 10)):
        pool_share = evaluate.label_histogram(codes(pool, column), k)
        chosen_share = evaluate.label_histogram(codes(chosen, column), k)
        assert evaluate.total_variation(pool_share, chosen_share) < 0.01  # only rounding moves the marginals
    independent = evaluate.mutual_information(codes(pool[:1000], "skin"), codes(pool[:1000], "hair"), 4, 10)
    tied = evaluate.mutual_information(codes(chosen, "skin"), codes(chosen, "hair"), 4, 10)
    # the MI of the target joint, for uniform marginals: half independent, half the monotone pairing
    joint = 0.5 * np.full((4, 10), 1 / 40) + 0.5 * checks.monotone_coupling(np.full(4, 0.25), np.full(10, 0.1))
    target = float((joint * np.log(joint / np.outer(joint.sum(1), joint.sum(0)))).sum())
    assert independent < 0.03 and target > 0.25
    assert tied == pytest.approx(target, abs=0.03)
    # a pair that runs short is made up from the same skin colour: that marginal stays exact
    rare = [{**row, "hair": "h9"} if row["hair"] == "h0" and i % 8 else row for i, row in enumerate(labels)]
    chosen = checks.tied(rare, pool, 1000, "skin", "hair", share=1.0)
    assert len(chosen) == len(set(chosen)) == 1000
    assert (evaluate.label_histogram(codes(chosen, "skin"), 4).tolist()
            == (torch.round(evaluate.label_histogram(codes(pool, "skin"), 4) * 1000) / 1000).tolist())
    with pytest.raises(checks.UserError, match="--n 300: too few held-out images with skin s"):
        checks.tied(labels, pool[:200], 300, "skin", "hair", share=1.0)


def test_build_sets_removes_a_skin_colour_and_keeps_short_hair():
    labels = [{"skin_color": "ab"[i % 2] if i % 5 else "c", "hair": ["short01", "long02", "short03"][i % 3],
               "hair_color": "xyz"[i % 3]} for i in range(3000)]
    pool = list(range(100, 3000))
    sets = checks.build_sets(labels, pool, 200)
    assert list(sets) == ["held-out real", "held-out real, 2nd", "held-out real, 3rd", "no skin colour a",
                          "short hair only", "hair colour tied to skin colour"]
    assert sets["held-out real"] == pool[:200] and sets["held-out real, 3rd"] == pool[400:600]
    assert all(labels[i]["skin_color"] != "a" for i in sets["no skin colour a"])
    assert all(labels[i]["hair"].startswith("short") for i in sets["short hair only"])
    assert all(len(indices) == 200 and set(indices) <= set(pool) for indices in sets.values())


def test_distortions_grow_with_their_strength():
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8))
    changes = [[(f(images, s).float() - images.float()).abs().mean().item() for s in strengths]
               for f, strengths in ((checks.blur, checks.BLUR_SIGMAS), (checks.colour_shift, checks.COLOUR_SHIFTS),
                                    (lambda x, s: checks.pixel_noise(x, s, seed=0), checks.NOISE_STDS))]
    for change in changes:
        assert 0 < change[0] < change[1] < change[2], changes
    assert checks.colour_shift(images, 10).dtype == torch.uint8


def test_command_writes_the_table(tmp_path):
    sys.path.insert(0, str(REPO / "tests"))
    from test_evaluate import random_attribute_net
    import avatars
    test_dir = testkit.make_avatar_folder(tmp_path / "test", 100, first_index=1_000_000)
    avatars.write_labels(test_dir, {}, num_workers=1)
    reference_dir = testkit.make_avatar_folder(tmp_path / "train", 48)
    classes = {"skin_color": avatars.ATTRIBUTES["skin_color"], "hair_color": avatars.ATTRIBUTES["hair_color"],
               "hair": avatars.ATTRIBUTES["hair"], "glasses": ["none", "present"]}
    images = evaluate.load_image_folder(reference_dir)
    net_file = random_attribute_net(images, tmp_path / "net.pt", {"reliable": ["skin_color", "hair"]}, classes)
    output = tmp_path / "checks.md"
    code = checks.main(["--test_dir", test_dir, "--reference_dir", reference_dir, "--attribute_net", net_file,
                        "--n", "20", "--device", "cpu", "--output", str(output)])
    assert code is None
    text = output.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    names = [row.split(" | ")[0][2:] for row in rows[1:]]
    assert names[:5] == ["floor: test vs train", "held-out real", "held-out real, 2nd", "held-out real, 3rd",
                         "blur, sigma 0.5"]
    assert len(names) == 4 + 9 + 3 and names[-1] == "hair colour tied to skin colour"
    assert len(rows[0].split(" | ")) == 1 + len(checks.COLUMNS)
    assert "reliable heads: skin_color, hair" in text and "N = 20 images" in text
    assert "over the 3 disjoint held-out sets: attribute FD" in text
    assert "- blur: attribute FD" in text and "- hair colour tied to skin colour: MI(skin colour, hair colour)" in text
    held_out = rows[2].split(" | ")
    assert held_out[-1].rstrip(" |") == f"{float(held_out[-1].rstrip(' |')):.3f}"  # precision: no ratio
    assert math.isfinite(float(held_out[1].split()[0]))
    assert os.path.basename(net_file) in text


def test_a_folder_without_labels_is_a_one_line_error(tmp_path):
    folder = testkit.make_avatar_folder(tmp_path / "test", 2)
    paths = checks.image_files(folder)
    with pytest.raises(checks.DatasetError) as error:
        checks.read_labels(folder, paths)
    assert str(error.value) == (f"--test_dir {folder}: labels.csv has no valid row for 2 of its images, such as 0.png; "
                                f"write it with python images/avatars.py --labels_only --dest_image_dir {folder}")
