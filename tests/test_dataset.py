import numpy as np
import pytest
import torch
from PIL import Image

from config import make_config
from dataset import DatasetError, load_image_folder, normalise, to_uint8
from testkit import make_avatar_folder, one_line_error, run_script, tiny_train_args


def save(path, mode, size=(32, 32), colour=None, fmt=None):
    colour = colour if colour is not None else {"RGB": (10, 20, 30), "RGBA": (10, 20, 30, 0), "L": 77}.get(mode, 5)
    image = Image.new(mode, size, colour)
    if mode == "P":
        image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    image.save(path, format=fmt)
    return path


def test_modes_and_formats_become_rgb(tmp_path):
    save(tmp_path / "1.png", "RGB")
    save(tmp_path / "2.png", "RGBA")                     # fully transparent -> white
    save(tmp_path / "3.png", "L")                        # grey 77
    save(tmp_path / "4.png", "P", colour=1)              # palette index 1 -> (200, 100, 50)
    save(tmp_path / "5.jpg", "RGB", colour=(250, 250, 250))
    save(tmp_path / "6.webp", "RGB", colour=(0, 255, 0), fmt="WEBP")
    save(tmp_path / "10.bmp", "RGB", colour=(1, 2, 3))
    (tmp_path / "notes.txt").write_text("not an image")
    data = load_image_folder(str(tmp_path))
    assert data.dtype == torch.uint8 and data.shape == (7, 3, 32, 32)
    centre = data[:, :, 16, 16].tolist()
    assert centre[0] == [10, 20, 30]
    assert centre[1] == [255, 255, 255]
    assert centre[2] == [77, 77, 77]
    assert centre[3] == [200, 100, 50]
    assert all(abs(c - 250) <= 2 for c in centre[4])
    assert centre[6] == [1, 2, 3]  # natural order: 10.bmp comes after 6.webp


def test_half_transparent_pixels_are_composited_on_white(tmp_path):
    save(tmp_path / "a.png", "RGBA", colour=(0, 0, 0, 128))
    assert abs(load_image_folder(str(tmp_path))[0, 0, 0, 0].item() - 127) <= 1


def test_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match=r"nope: no such folder.*make_default_dataset"):
        load_image_folder(str(tmp_path / "nope"))


def test_folder_without_images(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match="no images"):
        load_image_folder(str(tmp_path))


def test_undecodable_file_stops_or_is_skipped(tmp_path, capsys):
    save(tmp_path / "0.png", "RGB")
    (tmp_path / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DatasetError, match=r"1\.png: cannot decode.*--skip_bad_images"):
        load_image_folder(str(tmp_path))
    data = load_image_folder(str(tmp_path), skip_bad_images=True)
    assert data.shape[0] == 1
    assert "skipped 1 undecodable image" in capsys.readouterr().err


def test_wrong_size_points_to_the_downsampling_script(tmp_path):
    save(tmp_path / "big.png", "RGB", size=(64, 48))
    with pytest.raises(DatasetError, match=r"big\.png: image is 64x48, expected 32x32.*downsample"):
        load_image_folder(str(tmp_path))


@pytest.mark.parametrize("data_range", ["-1,1", "0,1"])
def test_normalise_round_trips(data_range):
    config = make_config("tiny", [f"data_range={data_range}"])
    images = torch.arange(256, dtype=torch.uint8).repeat(3 * 32 * 32 // 256 * 2).reshape(2, 3, 32, 32)
    x = normalise(images, config)
    assert (x.min().item(), x.max().item()) == ((-1.0, 1.0) if data_range == "-1,1" else (0.0, 1.0))
    assert torch.equal(to_uint8(x, config), images)


@pytest.mark.parametrize("case, expected", [
    ("missing", "no such folder"),
    ("empty", "no images"),
    ("corrupt", "cannot decode this image"),
    ("size", "expected 32x32"),
])
@pytest.mark.slow
def test_train_py_reports_bad_data_in_one_line(tmp_path, case, expected):
    good = make_avatar_folder(tmp_path / "good", 16)
    bad = tmp_path / "bad"
    if case != "missing":
        bad.mkdir()
    if case == "corrupt":
        save(bad / "0.png", "RGB")
        (bad / "1.png").write_bytes(b"garbage")
    if case == "size":
        save(bad / "0.png", "RGB", size=(1024, 1024))
    result = run_script("train.py", *tiny_train_args(str(bad), good, str(tmp_path / "run"), "--max_steps", 1))
    line = one_line_error(result)
    assert line.startswith("error: ") and str(bad) in line and expected in line
    assert not (tmp_path / "run" / "latest_model.pth").exists()


@pytest.mark.slow
def test_train_py_skip_bad_images_reports_the_count(tmp_path):
    train = make_avatar_folder(tmp_path / "train", 16)
    (tmp_path / "train" / "999.png").write_bytes(b"garbage")
    result = run_script("train.py", *tiny_train_args(train, train, str(tmp_path / "run"), "--max_steps", 1,
                                                       "--skip_bad_images"))
    assert result.returncode == 0, result.stderr
    assert "skipped 1 undecodable image" in result.stderr
