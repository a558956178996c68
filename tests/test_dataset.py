import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
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


# ---- the decoded-image cache ---------------------------------------------------------------------

@pytest.fixture
def decoded(monkeypatch):
    """The names of the files dataset.read_rgb decodes, as they are decoded."""
    names, read_rgb = [], dataset.read_rgb

    def counting_read_rgb(path):
        names.append(os.path.basename(path))
        return read_rgb(path)
    monkeypatch.setattr(dataset, "read_rgb", counting_read_rgb)
    return names


def test_the_cache_is_written_beside_the_folder_and_then_read_instead_of_decoding(tmp_path, monkeypatch):
    folder = make_avatar_folder(tmp_path / "images", 6)
    fresh = load_image_folder(folder, cache=False)
    first = load_image_folder(folder)
    assert sorted(os.listdir(tmp_path)) == ["images", "images.cache.npz"]
    assert sorted(os.listdir(folder)) == [f"{i}.png" for i in range(6)]  # the folder's file list is unchanged

    def no_decoding(path):
        raise AssertionError(f"decoded {path} although the cache is up to date")
    monkeypatch.setattr(dataset, "read_rgb", no_decoding)
    second = load_image_folder(folder)
    also = load_image_folder(folder + "/")  # the same folder, the same cache
    for data in (first, second, also):
        assert data.dtype == torch.uint8 and data.shape == (6, 3, 32, 32) and data.is_contiguous()
        assert torch.equal(data, fresh)
    assert not torch.equal(fresh[0], fresh[1])  # distinct avatars: a shuffled cache would not be equal


def change_add(folder):
    make_avatar_folder(folder, 1, first_index=6)


def change_remove(folder):
    os.remove(os.path.join(folder, "3.png"))


def change_rename(folder):
    # The same files in the same order under another name: the file list changed all the same.
    os.rename(os.path.join(folder, "5.png"), os.path.join(folder, "50.png"))


def change_size_only(folder):
    # Another image under the same name and with the same modification time: only its size tells.
    path = os.path.join(folder, "2.png")
    before = os.stat(path)
    Image.new("RGB", (32, 32), (1, 2, 3)).save(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_size != before.st_size and os.stat(path).st_mtime_ns == before.st_mtime_ns


def change_time_only(folder):
    path = os.path.join(folder, "2.png")
    before = os.stat(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))


@pytest.mark.parametrize("change, count", [(change_add, 7), (change_remove, 5), (change_rename, 6),
                                           (change_size_only, 6), (change_time_only, 6)])
def test_adding_removing_or_rewriting_an_image_decodes_the_folder_again(tmp_path, decoded, change, count):
    folder = make_avatar_folder(tmp_path / "images", 6)
    load_image_folder(folder)
    change(folder)
    decoded.clear()
    data = load_image_folder(folder)
    assert len(decoded) == count  # all of them, not the cached copy
    assert torch.equal(data, load_image_folder(folder, cache=False))
    decoded.clear()
    assert torch.equal(load_image_folder(folder), data) and decoded == []  # the cache was rewritten


def test_a_wrong_size_image_added_after_caching_still_stops(tmp_path):
    folder = make_avatar_folder(tmp_path / "images", 3)
    load_image_folder(folder)
    save(tmp_path / "images" / "3.png", "RGB", size=(64, 48))
    with pytest.raises(DatasetError, match=r"3\.png: image is 64x48, expected 32x32"):
        load_image_folder(folder)


def truncated(data, fingerprint):
    return data[:len(data) // 2]


def empty(data, fingerprint):
    return b""


def foreign_pickle(data, fingerprint):
    return b"\x80\x04 not for us"


def one_image_short(data, fingerprint):
    # A well-formed cache with the right fingerprint whose array has the wrong shape.
    buffer = io.BytesIO()
    np.savez(buffer, fingerprint=np.array(fingerprint), images=np.zeros((2, 3, 32, 32), np.uint8),
             skipped=np.array([], dtype=str))
    return buffer.getvalue()


@pytest.mark.parametrize("damage", [truncated, empty, foreign_pickle, one_image_short])
def test_a_damaged_cache_is_ignored_and_rewritten(tmp_path, decoded, damage):
    folder = make_avatar_folder(tmp_path / "images", 3)
    fresh = load_image_folder(folder)
    cache = tmp_path / "images.cache.npz"
    with np.load(cache) as saved:
        fingerprint = saved["fingerprint"].item()
    cache.write_bytes(damage(cache.read_bytes(), fingerprint))
    decoded.clear()
    assert torch.equal(load_image_folder(folder), fresh) and len(decoded) == 3
    decoded.clear()
    assert torch.equal(load_image_folder(folder), fresh) and decoded == []


def test_a_cache_from_a_skip_run_does_not_hide_a_bad_image(tmp_path, capsys, decoded):
    folder = tmp_path / "images"
    folder.mkdir()
    save(folder / "0.png", "RGB")
    (folder / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    save(folder / "2.png", "RGB", colour=(1, 2, 3))
    with pytest.raises(DatasetError) as without_cache:
        load_image_folder(str(folder), cache=False)
    assert not (tmp_path / "images.cache.npz").exists()  # a failed load writes no cache

    skipped = load_image_folder(str(folder), skip_bad_images=True)
    warning = capsys.readouterr().err
    assert warning == f"warning: skipped 1 undecodable image(s) in {folder}, e.g. {folder / '1.png'}\n"
    decoded.clear()
    assert torch.equal(load_image_folder(str(folder), skip_bad_images=True), skipped) and decoded == []
    assert capsys.readouterr().err == warning  # the same warning from the cache

    with pytest.raises(DatasetError) as with_cache:
        load_image_folder(str(folder))
    assert str(with_cache.value) == str(without_cache.value)
    assert str(with_cache.value).startswith(f"{folder / '1.png'}: cannot decode this image (UnidentifiedImageError)")


def test_cache_false_neither_reads_nor_writes_the_cache(tmp_path, decoded):
    folder = make_avatar_folder(tmp_path / "images", 3)
    load_image_folder(folder, cache=False)
    assert os.listdir(tmp_path) == ["images"]
    load_image_folder(folder)
    decoded.clear()
    load_image_folder(folder, cache=False)
    assert decoded == ["0.png", "1.png", "2.png"]


def test_a_cache_that_cannot_be_written_is_skipped_with_one_warning(tmp_path, capsys):
    # A folder where the cache should go: the write fails as in a read-only parent folder.
    folder = make_avatar_folder(tmp_path / "images", 3)
    (tmp_path / "images.cache.npz").mkdir()
    assert torch.equal(load_image_folder(folder), load_image_folder(folder, cache=False))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: cannot write the decoded-image cache {tmp_path}")
    assert sorted(os.listdir(tmp_path)) == ["images", "images.cache.npz"]  # no temporary file left behind


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
