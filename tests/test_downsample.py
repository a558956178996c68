"""images/downsample.py: antialiasing, transparency, odd files, subsets, the --skip_exists flag and the
flag checks. Its launchers (images/seed_data.sh) are tested in test_generate_image.py."""

import os
import sys

import numpy as np
import pytest
from PIL import Image

import dataset
from cli import UserError
from testkit import REPO, one_line_error, run_script

sys.path.insert(0, os.path.join(REPO, "images"))
import downsample  # noqa: E402

SCRIPT = "images/downsample.py"


def pixels(path):
    return np.asarray(Image.open(path)).astype(int)


@pytest.fixture
def mixed_folder(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    # RGBA: transparent everywhere except an opaque red left half
    rgba = np.zeros((256, 256, 4), np.uint8)
    rgba[:, :128] = (255, 0, 0, 255)
    Image.fromarray(rgba, "RGBA").save(source / "0.png")
    # grayscale: a horizontal ramp
    Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (256, 1)), "L").save(source / "1.png")
    (source / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not really a png" * 10)  # corrupt
    (source / "notes.txt").write_text("not an image")
    Image.new("RGB", (64, 64), (0, 0, 255)).save(source / "3.jpg")
    return source


@pytest.mark.slow
def test_mixed_folder_gives_expected_outputs_and_report(mixed_folder, tmp_path):
    dest = tmp_path / "dest"
    result = run_script(SCRIPT, "--source_image_dir", mixed_folder, "--dest_image_dir", dest, "--num_workers", 2)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(dest)) == ["0.png", "1.png", "3.png"]
    assert ("downsampled 3 images to 32x32 into " in result.stdout
            and "1 non-image files ignored; 1 undecodable" in result.stdout)
    assert "skipped 1 file(s) that could not be decoded: 2.png" in result.stderr
    for name in ("0.png", "1.png", "3.png"):
        image = Image.open(dest / name)
        assert (image.size, image.mode) == ((32, 32), "RGB")
    rgba = pixels(dest / "0.png")
    assert (rgba[:, :16] == (255, 0, 0)).all()  # opaque red stays red
    assert (rgba[:, 16:] == (255, 255, 255)).all()  # transparent became white, not black
    gray = pixels(dest / "1.png")
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    # each output pixel averages 8 columns of the ramp: column j covers 8j..8j+7, mean 8j+3.5
    assert np.abs(gray[0, :, 0] - (8 * np.arange(32) + 3.5)).max() <= 0.5
    assert (np.abs(pixels(dest / "3.png") - (0, 0, 255)) <= 1).all()  # JPEG written as PNG


def test_fine_stripes_become_uniform_grey(tmp_path):
    source, dest = tmp_path / "source", tmp_path / "dest"
    source.mkdir()
    stripes = np.zeros((1024, 1024), np.uint8)
    stripes[:, ::2] = 255  # one-pixel black and white columns
    Image.fromarray(stripes, "L").save(source / "0.png")
    for filter_name in ("area", "lanczos"):
        downsample.main(["--source_image_dir", str(source), "--dest_image_dir", str(dest / filter_name),
                         "--filter", filter_name, "--num_workers", "1"])
        small = pixels(dest / filter_name / "0.png")
        assert small.shape == (32, 32, 3)
        assert np.abs(small - 127.5).max() <= 2, filter_name  # grey, not stripes
    # what the seed's cv2 default (bilinear, 2x2 taps per output pixel) or nearest sampling would
    # give: the stripes survive or turn into one colour, never the true average
    naive = np.asarray(Image.fromarray(stripes).resize((32, 32), Image.Resampling.NEAREST)).astype(int)
    assert np.abs(naive - 127.5).min() > 100


def test_size_flags_are_height_and_width(tmp_path):
    source, dest = tmp_path / "source", tmp_path / "dest"
    source.mkdir()
    Image.new("RGB", (96, 96), (10, 20, 30)).save(source / "0.png")
    downsample.main(["--source_image_dir", str(source), "--dest_image_dir", str(dest),
                     "--dest_image_height", "16", "--dest_image_width", "24", "--num_workers", "1"])
    assert Image.open(dest / "0.png").size == (24, 16)  # PIL sizes are (width, height)


def make_numbered_images(folder, count):
    folder.mkdir()
    for i in range(count):
        Image.new("RGB", (64, 64), (i * 20, 0, 0)).save(folder / f"{i}.png")


def test_subset_is_deterministic_with_seed(tmp_path):
    source = tmp_path / "source"
    make_numbered_images(source, 10)
    chosen = {}
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        downsample.main(["--source_image_dir", str(source), "--dest_image_dir", str(tmp_path / run),
                         "--num_samples", "4", "--seed", str(seed), "--num_workers", "1"])
        chosen[run] = sorted(os.listdir(tmp_path / run))
    assert len(chosen["a"]) == 4
    assert chosen["a"] == chosen["b"]
    assert chosen["a"] != chosen["c"]
    assert downsample.choose_subset(["0.png", "1.png"], -1, 0) == ["0.png", "1.png"]


@pytest.mark.parametrize("flag, overwritten", [("True", False), ("False", True), ("1", False), ("0", True)])
def test_skip_exists_parses_true_and_false(tmp_path, flag, overwritten):
    source, dest = tmp_path / "source", tmp_path / "dest"
    make_numbered_images(source, 1)
    dest.mkdir()
    Image.new("RGB", (32, 32), (0, 255, 0)).save(dest / "0.png")  # a stale output
    downsample.main(["--source_image_dir", str(source), "--dest_image_dir", str(dest), "--skip_exists", flag,
                     "--num_workers", "1"])
    assert tuple(pixels(dest / "0.png")[0, 0]) == ((0, 0, 0) if overwritten else (0, 255, 0))


def test_bad_boolean_is_a_one_line_error():
    with pytest.raises(UserError) as error:
        downsample.parse_args(["--skip_exists", "maybe"])
    assert str(error.value) == "argument --skip_exists: expected True or False (or 1/0), got 'maybe' (see --help)"


def test_missing_source_folder_is_one_line_error(tmp_path):
    with pytest.raises(UserError) as error:
        downsample.main(["--source_image_dir", str(tmp_path / "nowhere"), "--dest_image_dir", str(tmp_path / "dest")])
    assert str(error.value) == (f"--source_image_dir {tmp_path / 'nowhere'} is not a folder: make the images first "
                                "(bash images/generate_images_for_train.sh or _test.sh)")
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize("flag, message", [
    ("--dest_image_height=0", "0 must be at least 1"),
    ("--dest_image_width=-32", "-32 must be at least 1"),
    ("--num_samples=0", "0 must be -1 (all images) or at least 1"),
    ("--num_samples=-2", "-2 must be -1 (all images) or at least 1"),
    ("--num_samples=all", "all must be -1 (all images) or at least 1"),
    ("--seed=-1", "-1 must be 0 or more"),
    ("--num_workers=0", "0 must be at least 1"),
    ("--num_workers=two", "'two' is not an integer"),
])
def test_bad_numbers_name_the_flag(tmp_path, flag, message):
    dest = tmp_path / "dest"
    with pytest.raises(UserError) as error:
        downsample.main(["--source_image_dir", str(tmp_path), "--dest_image_dir", str(dest), flag])
    assert str(error.value) == f"argument {flag.split('=')[0]}: {message} (see --help)"
    assert not dest.exists()


def test_num_samples_minus_one_still_means_all():
    assert downsample.parse_args(["--num_samples", "-1"]).num_samples == -1
    assert downsample.parse_args(["--num_samples", "7"]).num_samples == 7
    assert downsample.parse_args([]).num_samples == -1


@pytest.mark.slow
def test_bad_number_exits_2_with_one_line(tmp_path):
    result = run_script(SCRIPT, "--source_image_dir", tmp_path, "--num_workers", "0")
    assert result.returncode == 2
    assert one_line_error(result) == "error: argument --num_workers: 0 must be at least 1 (see --help)"


def test_output_folder_below_a_file_is_one_line_error(tmp_path):
    source = tmp_path / "source"
    make_numbered_images(source, 1)
    (tmp_path / "a_file").write_text("")
    dest = tmp_path / "a_file" / "dest"
    with pytest.raises(UserError) as error:
        downsample.main(["--source_image_dir", str(source), "--dest_image_dir", str(dest), "--num_workers", "1"])
    assert str(error.value) == (f"--dest_image_dir {dest}: cannot create this folder (Not a directory); "
                                "pass a folder you can write to")


def palette_image():
    """64x64 palette ("P") image whose palette carries alpha: left half opaque red, top right fully
    transparent (its colour is black), bottom right half-transparent blue."""
    indices = np.zeros((64, 64), np.uint8)
    indices[:, :32] = 1
    indices[32:, 32:] = 2
    image = Image.fromarray(indices, "P")
    palette = [0, 0, 0, 0, 200, 30, 60, 255, 10, 120, 240, 128]  # RGBA entries 0, 1, 2
    image.putpalette(palette + [0] * (1024 - len(palette)), rawmode="RGBA")
    return image


def test_palette_transparency_is_composited_on_white_as_the_data_loader_does(tmp_path):
    # The drift the "one place per idea" issue found: downsample.py had its own copy of on_white,
    # which missed a palette's alpha and turned the transparent corner black. Now there is one copy.
    assert downsample.on_white is dataset.on_white and downsample.natural_key is dataset.natural_key
    image = palette_image()
    small = np.asarray(downsample.downsample_image(image, 32, 32)).astype(int)
    assert small[0, 0].tolist() == [200, 30, 60]
    assert small[0, -1].tolist() == [255, 255, 255]  # transparent: white, not the palette's black
    assert small[-1, -1].tolist() == [132, 187, 247]  # blue at alpha 128/255 over white
    assert np.array_equal(small, np.asarray(dataset.on_white(image).resize((32, 32), Image.Resampling.BOX)))

    # through a file: a PNG keeps the palette's alpha as a tRNS chunk; the output at full size must be
    # exactly what the training data loader reads from the source
    source, dest = tmp_path / "source", tmp_path / "dest"
    source.mkdir()
    image.save(source / "0.png")
    downsample.main(["--source_image_dir", str(source), "--dest_image_dir", str(dest), "--num_workers", "1",
                     "--dest_image_height", "64", "--dest_image_width", "64"])
    written = pixels(dest / "0.png")
    assert np.array_equal(written, np.asarray(dataset.read_rgb(str(source / "0.png"))).astype(int))
    assert written[0, -1].tolist() == [255, 255, 255] and written[-1, -1].tolist() == [132, 187, 247]
