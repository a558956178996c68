"""Tests for images/avatars.py and images/make_default_dataset.sh, on 16 avatars."""

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


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One in-process build of indices 0..NUM-1, shared by the read-only tests."""
    dest = tmp_path_factory.mktemp("avatars") / "out"
    avatars.main(["--dest_image_dir", str(dest), "--num_samples", str(NUM), "--num_workers", "1"])
    return dest


def test_files_are_named_by_index_and_are_32x32_rgb_png(built):
    # Exactly {i}.png for every index, and no temporary files left behind.
    assert sorted(os.listdir(built)) == sorted(f"{i}.png" for i in range(NUM))
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
    assert f"1 to render, {NUM - 1} already in" in capsys.readouterr().out
    after = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    assert after.keys() == {f"{i}.png" for i in range(NUM)}
    assert {name: after[name] for name in before} == before
    assert (dest / "5.png").read_bytes() == (built / "5.png").read_bytes()


def test_first_index_offsets_the_seeds(built, tmp_path):
    avatars.main(["--dest_image_dir", str(tmp_path), "--num_samples", "2", "--first_index", str(NUM - 2),
                  "--num_workers", "1"])
    assert sorted(os.listdir(tmp_path)) == [f"{NUM - 2}.png", f"{NUM - 1}.png"]
    assert (tmp_path / f"{NUM - 1}.png").read_bytes() == (built / f"{NUM - 1}.png").read_bytes()


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
    assert sorted(os.listdir(train)) == ["0.png", "1.png", "2.png"]
    assert sorted(os.listdir(test)) == ["1000000.png", "1000001.png"]
    assert not set(digests(train).values()) & set(digests(test).values())


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
