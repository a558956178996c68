"""Tests for images/avatars.py and images/make_default_dataset.sh, on 16 avatars."""

import csv
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli import UserError
from testkit import one_line_error, run_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "images" / "avatars.py"
LAUNCHER = REPO / "images" / "make_default_dataset.sh"
NUM = 16


def load_avatars_module():
    # images/ is not a package, so import the script by its path.
    spec = importlib.util.spec_from_file_location("avatars", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


avatars = load_avatars_module()


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def pngs(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith(".png"))


def read_rows(folder):
    with open(folder / "labels.csv", newline="") as f:
        return list(csv.reader(f))


def copy_without_labels(built, dest):
    shutil.copytree(built, dest)
    (dest / "labels.csv").unlink()
    return dest


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One in-process build of indices 0..NUM-1, shared by the read-only tests."""
    dest = tmp_path_factory.mktemp("avatars") / "out"
    avatars.main(["--dest_image_dir", str(dest), "--num_samples", str(NUM), "--num_workers", "1"])
    return dest


def test_files_are_named_by_index_and_are_32x32_rgb_png(built):
    # Exactly {i}.png for every index and the labels, and no temporary files left behind.
    assert sorted(os.listdir(built)) == sorted([f"{i}.png" for i in range(NUM)] + ["labels.csv"])
    for i in range(NUM):
        with Image.open(built / f"{i}.png") as image:
            assert image.format == "PNG"
            assert image.mode == "RGB"
            assert image.size == (32, 32)


@pytest.mark.slow
def test_two_separate_runs_give_identical_bytes(built, tmp_path):
    # A different worker count changes which process renders what; the bytes must not change.
    result = run_script("images/avatars.py", "--dest_image_dir", tmp_path, "--num_samples", NUM, "--num_workers", 2)
    assert result.returncode == 0, result.stderr
    assert digests(tmp_path) == digests(built)


def test_render_avatar_matches_the_cli_files(built):
    for i in (0, 7, NUM - 1):
        image = avatars.render_avatar(i)
        assert image.mode == "RGB" and image.size == (32, 32)
        with Image.open(built / f"{i}.png") as saved:
            assert np.array_equal(np.asarray(image), np.asarray(saved))


def test_background_is_white(built):
    # The figure is composited on white: the four corners of indices 0..15 are pure white
    # (long hair reaches a corner in about 2% of other indices), and most of the border is white.
    border_white = []
    for i in range(NUM):
        pixels = np.asarray(Image.open(built / f"{i}.png"))
        for y, x in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
            assert pixels[y, x].tolist() == [255, 255, 255], (i, y, x)
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        border_white.append((border == 255).all(axis=1).mean())
    assert np.mean(border_white) > 0.95
    # ...and there is a face in the middle, not a blank image.
    center = np.asarray(Image.open(built / "0.png"))[8:24, 8:24]
    assert (center != 255).any(axis=2).mean() > 0.5


def test_different_indices_give_different_images(built):
    images = [np.asarray(Image.open(built / f"{i}.png")).astype(np.float64) for i in range(NUM)]
    for i in range(NUM):
        for j in range(i + 1, NUM):
            assert np.abs(images[i] - images[j]).mean() > 5.0, (i, j)


def test_rerun_only_renders_missing_files(built, tmp_path, capsys):
    dest = tmp_path / "out"
    shutil.copytree(built, dest)
    (dest / "5.png").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}

    avatars.main(["--dest_image_dir", str(dest), "--num_samples", str(NUM), "--num_workers", "1"])
    out = capsys.readouterr().out
    assert f"1 to render, {NUM - 1} already in" in out
    assert f"labels.csv has {NUM} rows (0 labelled without rendering)" in out
    after = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    assert after.keys() == {f"{i}.png" for i in range(NUM)} | {"labels.csv"}
    # The other images, and labels.csv whose content did not change, are not written again.
    assert {name: after[name] for name in before} == before
    assert (dest / "5.png").read_bytes() == (built / "5.png").read_bytes()


def test_first_index_offsets_the_seeds(built, tmp_path):
    avatars.main(["--dest_image_dir", str(tmp_path), "--num_samples", "2", "--first_index", str(NUM - 2),
                  "--num_workers", "1"])
    assert pngs(tmp_path) == [f"{NUM - 2}.png", f"{NUM - 1}.png"]
    assert (tmp_path / f"{NUM - 1}.png").read_bytes() == (built / f"{NUM - 1}.png").read_bytes()
    assert read_rows(tmp_path)[1:] == read_rows(built)[-2:]


# ---- labels.csv ----------------------------------------------------------------------------------

def test_labels_file_has_one_row_per_image_in_natural_order(built):
    rows = read_rows(built)
    assert rows[0] == ["file_name", "skin_color", "hair_color", "hair", "eyes", "eyebrows", "mouth",
                       "glasses", "earrings", "details"]
    assert [row[0] for row in rows[1:]] == [f"{i}.png" for i in range(NUM)]  # 10.png after 9.png
    # Seeds 0, 5 (glasses and earrings) and 14 (a detail), written out to pin the labels down.
    assert rows[1] == ["0.png", "#ecad80", "#85c2c6", "long11", "variant26", "variant08", "variant15",
                       "none", "none", "none"]
    assert rows[6] == ["5.png", "#ecad80", "#ac6511", "long03", "variant16", "variant01", "variant12",
                       "variant04", "variant01", "none"]
    assert rows[15] == ["14.png", "#763900", "#dba3be", "short07", "variant20", "variant01", "variant14",
                        "none", "none", "blush"]
    assert (built / "labels.csv").read_bytes().count(b"\r") == 0


def test_labels_are_the_options_dicebear_resolved(built):
    rows = {row["file_name"]: row for row in csv.DictReader(open(built / "labels.csv", newline=""))}
    for i in (0, 5, 14, 63):  # 63 is bald (short19): no hair colour
        options = avatars.make_avatar(i).to_json()["options"]
        expected = {
            "file_name": f"{i}.png",
            "skin_color": options["skinColor"][0],
            "hair_color": options["hairColor"][0] if "hairColor" in options else "none",
            "hair": options["hairVariant"],
            "eyes": options["eyesVariant"],
            "eyebrows": options["eyebrowsVariant"],
            "mouth": options["mouthVariant"],
            "glasses": options.get("glassesVariant", "none"),
            "earrings": options.get("earringsVariant", "none"),
            "details": options.get("detailsVariant", "none"),
        }
        # Computed without rendering, twice, and (for 0..15) while rendering: all the same.
        assert avatars.avatar_labels(i) == avatars.avatar_labels(i) == expected
        if i < NUM:
            assert rows[f"{i}.png"] == expected
    assert avatars.avatar_labels(63)["hair_color"] == "none"


def test_attribute_values_are_the_styles():
    values = avatars.ATTRIBUTES
    assert {column: len(v) for column, v in values.items()} == {
        "skin_color": 4, "hair_color": 14 + 1, "hair": 45, "eyes": 26, "eyebrows": 15, "mouth": 30,
        "glasses": 5 + 1, "earrings": 6 + 1, "details": 4 + 1}  # + 1: "none"
    assert sum(v.startswith("long") for v in values["hair"]) == 26
    assert sum(v.startswith("short") for v in values["hair"]) == 19
    assert values["skin_color"] == ["#f2d3b1", "#ecad80", "#9e5622", "#763900"]
    assert values["details"] == ["birthmark", "blush", "freckles", "mustache", "none"]
    assert avatars.attribute_values() == values  # a fixed order, the same on every call
    # The first 300 seeds give every listed value and nothing else.
    seen = {column: set() for column in values}
    for i in range(300):
        for column, value in avatars.avatar_labels(i).items():
            if column != "file_name":
                seen[column].add(value)
    assert seen == {column: set(v) for column, v in values.items()}


def test_rerun_that_adds_images_keeps_the_old_rows(built, tmp_path, capsys):
    dest = tmp_path / "out"
    shutil.copytree(built, dest)
    old = (dest / "labels.csv").read_text()
    avatars.main(["--dest_image_dir", str(dest), "--num_samples", str(NUM + 2), "--num_workers", "1"])
    assert f"labels.csv has {NUM + 2} rows (0 labelled without rendering)" in capsys.readouterr().out
    new = (dest / "labels.csv").read_text()
    assert new.startswith(old)
    assert new[len(old):] == "".join(
        ",".join(avatars.avatar_labels(i).values()) + "\n" for i in (NUM, NUM + 1))


def test_rerun_labels_a_folder_made_before_labels(built, tmp_path, capsys):
    # Images but no labels.csv: the rerun renders nothing and labels every image.
    dest = copy_without_labels(built, tmp_path / "out")
    avatars.main(["--dest_image_dir", str(dest), "--num_samples", str(NUM), "--num_workers", "1"])
    out = capsys.readouterr().out
    assert f"0 to render, {NUM} already in" in out
    assert f"labels.csv has {NUM} rows ({NUM} labelled without rendering)" in out
    assert digests(dest) == digests(built)


def test_labels_only_writes_the_file_rendering_writes(built, tmp_path, capsys):
    dest = copy_without_labels(built, tmp_path / "out")
    # Files that are not avatars {i}.png are not labelled.
    for name in ("07.png", "cat.png", "notes.txt"):
        (dest / name).write_bytes(b"")
    # A stale labels.csv is not trusted: --labels_only recomputes every row.
    stale = (built / "labels.csv").read_text().replace("long11", "long12")
    assert stale != (built / "labels.csv").read_text()
    (dest / "labels.csv").write_text(stale)
    avatars.main(["--labels_only", "--dest_image_dir", str(dest), "--num_workers", "1"])
    assert f"avatars: wrote {dest / 'labels.csv'}: {NUM} rows" in capsys.readouterr().out
    assert (dest / "labels.csv").read_bytes() == (built / "labels.csv").read_bytes()


def test_launcher_defaults_give_disjoint_train_and_test_seeds():
    text = LAUNCHER.read_text()
    calls = re.findall(r"^build images/(\w+) \"\$\{NUM_(\w+):-(\d+)\}\" (\d+)", text, flags=re.M)
    assert [(folder, var) for folder, var, _, _ in calls] == [
        ("train_images_downsample", "TRAIN"), ("test_images_downsample", "TEST")]
    (_, _, num_train, train_first), (_, _, num_test, test_first) = calls
    assert (int(num_train), int(num_test)) == (50000, 5000)
    train = range(int(train_first), int(train_first) + int(num_train))
    test = range(int(test_first), int(test_first) + int(num_test))
    assert train.stop <= test.start


@pytest.mark.slow
def test_launcher_builds_both_sets(tmp_path):
    # Run the real launcher in a copy of the repo layout, so the repo's own images/ stay untouched.
    (tmp_path / "images").mkdir()
    shutil.copy(SCRIPT, tmp_path / "images" / "avatars.py")
    shutil.copy(REPO / "cli.py", tmp_path / "cli.py")  # avatars.py's flag checks and atomic write
    shutil.copy(LAUNCHER, tmp_path / "images" / "make_default_dataset.sh")
    # The launcher prefers .venv/bin/python: point it at the environment running these tests.
    os.symlink(sys.prefix, tmp_path / ".venv")
    env = dict(os.environ, NUM_TRAIN="3", NUM_TEST="2")
    result = subprocess.run(["bash", str(tmp_path / "images" / "make_default_dataset.sh"),
                             "--num_workers", "1"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    train = tmp_path / "images" / "train_images_downsample"
    test = tmp_path / "images" / "test_images_downsample"
    assert pngs(train) == ["0.png", "1.png", "2.png"]
    assert pngs(test) == ["1000000.png", "1000001.png"]
    assert not set(digests(train).values()) & set(digests(test).values())
    assert [row[0] for row in read_rows(train)] == ["file_name", "0.png", "1.png", "2.png"]
    assert [row[0] for row in read_rows(test)] == ["file_name", "1000000.png", "1000001.png"]
    assert sorted(os.listdir(train)) == ["0.png", "1.png", "2.png", "labels.csv"]

    # A data set built before labels existed gets them from a rerun, with its images untouched.
    before = digests(test)
    (test / "labels.csv").unlink()
    result = subprocess.run(["bash", str(tmp_path / "images" / "make_default_dataset.sh"), "--num_workers", "1"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert digests(test) == before


@pytest.mark.parametrize("args, message", [
    (["--num_samples", "4"], "--dest_image_dir is required: give the output folder"),
    (["--dest_image_dir", "{dest}"], "--num_samples is required: give the number of images to make"),
    (["--dest_image_dir", "{dest}", "--num_samples", "0"], "argument --num_samples: 0 must be at least 1 (see --help)"),
    (["--dest_image_dir", "{dest}", "--num_samples", "x"], "argument --num_samples: 'x' is not an integer (see --help)"),
    (["--dest_image_dir", "{dest}", "--num_samples", "4", "--first_index", "-1"],
     "argument --first_index: -1 must be 0 or more (see --help)"),
    (["--dest_image_dir", "{dest}", "--num_samples", "4", "--num_workers", "0"],
     "argument --num_workers: 0 must be at least 1 (see --help)"),
    (["--dest_image_dir", "{dest}", "--num_samples", "4", "--bogus"], "unrecognized arguments: --bogus (see --help)"),
    (["--dest_image_dir", "{file}", "--num_samples", "4"],
     "--dest_image_dir {file}: cannot create this folder (File exists); pass a folder you can write to"),
    (["--dest_image_dir", "{file}/out", "--num_samples", "4"],
     "--dest_image_dir {file}/out: cannot create this folder (Not a directory); pass a folder you can write to"),
])
def test_bad_flags_give_one_line_error(tmp_path, args, message):
    (tmp_path / "a_file").write_text("")
    names = dict(dest=tmp_path / "out", file=tmp_path / "a_file")
    with pytest.raises(UserError) as error:
        avatars.main([a.format(**names) for a in args])
    assert str(error.value) == message.format(**names)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--dest_image_dir", "{missing}"], "--dest_image_dir {missing}: no such folder; pass a folder of {{i}}.png avatars"),
    (["--dest_image_dir", "{file}"], "--dest_image_dir {file}: no such folder; pass a folder of {{i}}.png avatars"),
    (["--dest_image_dir", "{other}"],
     "--dest_image_dir {other}: no avatar files ({{i}}.png, such as 0.png) in this folder; "
     "render some first (drop --labels_only, give --num_samples)"),
    (["--dest_image_dir", "{other}", "--num_samples", "4"],
     "--labels_only labels every {{i}}.png in the folder; drop --num_samples"),
    (["--dest_image_dir", "{other}", "--first_index", "0"],
     "--labels_only labels every {{i}}.png in the folder; drop --first_index"),
    (["--dest_image_dir", "{other}", "--style", "lorelei"],
     "--labels_only: labels are defined for the adventurer style only; drop --style lorelei"),
    (["--num_workers", "2"], "--dest_image_dir is required: give the output folder"),
])
def test_labels_only_bad_input_gives_one_line_error(tmp_path, args, message):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "other").mkdir()
    for name in ("07.png", "cat.png", "labels.csv"):
        (tmp_path / "other" / name).write_text("")
    names = dict(missing=tmp_path / "missing", file=tmp_path / "a_file", other=tmp_path / "other")
    with pytest.raises(UserError) as error:
        avatars.main(["--labels_only"] + [a.format(**names) for a in args])
    assert str(error.value) == message.format(**names)
    assert sorted(os.listdir(tmp_path / "other")) == ["07.png", "cat.png", "labels.csv"]
    assert not (tmp_path / "missing").exists()


@pytest.mark.slow
def test_labels_only_with_workers_as_a_script(built, tmp_path):
    dest = copy_without_labels(built, tmp_path / "out")
    result = run_script("images/avatars.py", "--labels_only", "--dest_image_dir", dest, "--num_workers", 2)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"avatars: wrote {dest / 'labels.csv'}: {NUM} rows\n"
    assert (dest / "labels.csv").read_bytes() == (built / "labels.csv").read_bytes()


def test_other_styles_get_no_labels(tmp_path, capsys):
    avatars.main(["--dest_image_dir", str(tmp_path), "--num_samples", "1", "--style", "lorelei", "--num_workers", "1"])
    assert "no labels.csv: labels are defined for the adventurer style only" in capsys.readouterr().out
    assert os.listdir(tmp_path) == ["0.png"]


def test_unknown_style_lists_the_styles(tmp_path):
    with pytest.raises(UserError) as error:
        avatars.main(["--dest_image_dir", str(tmp_path / "out"), "--num_samples", "4", "--style", "nope"])
    assert str(error.value) == f"--style 'nope' is unknown; available: {', '.join(avatars.available_styles())}"
    assert "adventurer, adventurer-neutral," in str(error.value)


@pytest.mark.slow
def test_bad_number_exits_2_with_one_line(tmp_path):
    result = run_script("images/avatars.py", "--dest_image_dir", tmp_path / "out", "--num_samples", "0")
    assert result.returncode == 2
    assert result.stdout == ""
    assert one_line_error(result) == "error: argument --num_samples: 0 must be at least 1 (see --help)"
    assert not (tmp_path / "out").exists()
