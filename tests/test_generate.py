import re

import numpy as np
import pytest
from PIL import Image

from testkit import make_avatar_folder, one_line_error, run_script, tiny_train_args

pytestmark = pytest.mark.slow  # every test here uses a checkpoint trained by train.py in a subprocess


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    images = make_avatar_folder(root / "train", 16)
    # 30 epochs of one step; one validation, at the end (one every epoch would double the time)
    result = run_script("train.py", *tiny_train_args(images, images, str(root / "run"), "--max_steps", 30,
                                                     "--num_epochs", 100, "--validate_every", 100))
    assert result.returncode == 0, result.stderr
    return root / "run" / "latest_model.pth"


def generate(checkpoint, out_dir, *extra):
    result = run_script("generate.py", "--checkpoint", checkpoint, "--generated_image_save_dir", out_dir,
                        "--device", "cpu", "--steps", 4, *extra)
    assert result.returncode == 0, result.stderr
    return result


def generate_in_process(checkpoint, out_dir, capsys, *extra):
    """generate.py's main in this process, with the flags of generate(): no interpreter to start and
    no torch and diffusers to import, about 4 s less a call. Returns what it printed."""
    import generate
    assert generate.main(["--checkpoint", str(checkpoint), "--generated_image_save_dir", str(out_dir), "--device", "cpu",
                          "--steps", "4", *map(str, extra)]) == 0
    return capsys.readouterr().out


def pixels(path):
    return np.asarray(Image.open(path))


def test_grid_is_n_columns_by_m_rows_without_padding(checkpoint, tmp_path):
    generate(checkpoint, tmp_path, "--n", 5, "--m", 3)
    grid = pixels(tmp_path / "generated_images_5x3.png")
    assert grid.shape == (96, 160, 3)
    assert grid.std() > 5  # not one flat colour
    tiles = grid.reshape(3, 32, 5, 32, 3).transpose(0, 2, 1, 3, 4).reshape(15, -1)
    assert len({t.tobytes() for t in tiles}) == 15  # fifteen different samples, no separator lines


def test_seed_makes_a_run_reproducible(checkpoint, tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        generate(checkpoint, tmp_path / name, "--seed", seed, "--n", 2, "--m", 2)
    a, b, c = (pixels(tmp_path / n / "generated_images_2x2.png") for n in "abc")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm"])
def test_each_sampler_writes_a_grid(checkpoint, tmp_path, capsys, sampler):
    out = generate_in_process(checkpoint, tmp_path, capsys, "--sampler", sampler, "--n", 2, "--m", 1, "--clamp", "on")
    assert f"{sampler}-4" in out
    assert pixels(tmp_path / "generated_images_2x1.png").shape == (32, 64, 3)


def test_ema_weights_by_default(checkpoint, tmp_path, capsys):
    generate_in_process(checkpoint, tmp_path / "ema", capsys, "--n", 2, "--m", 1)
    generate_in_process(checkpoint, tmp_path / "raw", capsys, "--n", 2, "--m", 1, "--no_ema")
    assert not np.array_equal(pixels(tmp_path / "ema" / "generated_images_2x1.png"),
                              pixels(tmp_path / "raw" / "generated_images_2x1.png"))


def test_an_existing_grid_is_kept_without_overwrite(checkpoint, tmp_path, capsys):
    generate_in_process(checkpoint, tmp_path, capsys, "--n", 1, "--m", 1)
    before = (tmp_path / "generated_images_1x1.png").read_bytes()
    line = one_line_error(run_script("generate.py", "--checkpoint", checkpoint, "--generated_image_save_dir", tmp_path,
                                     "--n", 1, "--m", 1, "--device", "cpu"))
    assert "exists" in line and "--overwrite" in line
    assert (tmp_path / "generated_images_1x1.png").read_bytes() == before
    generate_in_process(checkpoint, tmp_path, capsys, "--n", 1, "--m", 1, "--overwrite", "--seed", 5)
    assert (tmp_path / "generated_images_1x1.png").read_bytes() != before


def test_missing_checkpoint_is_one_line(tmp_path):
    line = one_line_error(run_script("generate.py", "--checkpoint", tmp_path / "none.pth", "--device", "cpu",
                                     "--generated_image_save_dir", tmp_path))
    assert "none.pth: no such checkpoint" in line


def test_more_images_with_the_same_seed_extend_the_fewer(checkpoint):
    """6 images in batches of 4 are the first 6 of 8 in batches of 4: the last, short batch is
    sampled whole and cut (one shape for a compiled network), and draws the same noise."""
    import torch
    from checkpoint import load_for_sampling
    from generate import generate_images
    model, config = load_for_sampling(str(checkpoint), "cpu", sampling_steps=3)
    six = generate_images(model, config, 6, batch_size=4, progress=False)
    eight = generate_images(model, config, 8, batch_size=4, progress=False)
    assert six.shape == (6, 3, 32, 32)
    assert torch.equal(six, eight[:6])
    assert not torch.equal(six[4], six[0])


def test_batch_size_below_one_is_a_one_line_error(checkpoint, tmp_path):
    result = run_script("generate.py", "--checkpoint", checkpoint, "--generated_image_save_dir", tmp_path,
                        "--device", "cpu", "--batch_size", 0)
    assert result.returncode == 2
    assert one_line_error(result) == "error: argument --batch_size: 0 must be at least 1 (see --help)"


@pytest.mark.parametrize("flag, value, message", [("--n", 0, "0 must be at least 1"), ("--m", "two", "'two' is not an integer"),
                                                   ("--steps", 0, r"must be in \[1, 1000\]"),
                                                   ("--steps", 5000, r"must be in \[1, 1000\]"),
                                                   ("--eta", 2, r"must be in \[0.0, 1.0\]"),
                                                   ("--seed", -1, "-1 must be 0 or more"),
                                                   ("--clamp", "maybe", "expected True or False")])
def test_bad_numbers_are_one_line_errors(checkpoint, tmp_path, capfd, flag, value, message):
    """In-process, through run_main as `python generate.py` runs it (the tests around this one show
    the same path in a subprocess): seven more interpreters would add about 20 s."""
    import generate
    from cli import run_main
    with pytest.raises(SystemExit) as stop:
        run_main(generate.main, ["--checkpoint", str(checkpoint), "--generated_image_save_dir", str(tmp_path),
                                 "--device", "cpu", flag, str(value)])
    assert stop.value.code == 2
    out, err = capfd.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and re.match(f"error: argument {flag}: {message}", err), err
    assert list(tmp_path.iterdir()) == []


def test_a_grid_too_large_for_memory_is_refused_before_sampling(checkpoint, tmp_path):
    result = run_script("generate.py", "--checkpoint", checkpoint, "--generated_image_save_dir", tmp_path,
                        "--device", "cpu", "--n", 100_000, "--m", 100_000)
    assert result.returncode == 2
    assert re.match(r"error: --n 100000 --m 100000: 10,000,000,000 images need about \d+ GiB", one_line_error(result))
    assert list(tmp_path.iterdir()) == []


def test_an_output_folder_below_a_file_is_a_one_line_error(checkpoint, tmp_path):
    (tmp_path / "a_file").write_text("mine")
    result = run_script("generate.py", "--checkpoint", checkpoint, "--generated_image_save_dir",
                        tmp_path / "a_file" / "grids", "--device", "cpu", "--steps", 2)
    assert result.returncode == 2
    assert one_line_error(result).startswith(
        f"error: --generated_image_save_dir {tmp_path / 'a_file' / 'grids'}: cannot create this folder")


def test_diffusers_unet2dmodel_trains_and_samples_like_any_checkpoint(tmp_path, capsys):
    """arch=diffusers through train.py, then generate.py: the checkpoint holds UNet2DModel's weights
    and load_for_sampling builds it again."""
    import torch
    from checkpoint import load_for_sampling
    from unet import DiffusersUNet
    images = make_avatar_folder(tmp_path / "train", 16)
    result = run_script("train.py", *tiny_train_args(images, images, str(tmp_path / "run"), "--max_steps", 20,
                                                     "--num_epochs", 100, "--validate_every", 100,
                                                     "--set", "arch=diffusers", "--set", "attention=(16,)"))
    assert result.returncode == 0, result.stderr
    model, config = load_for_sampling(tmp_path / "run" / "latest_model.pth", "cpu")
    assert isinstance(model, DiffusersUNet) and config.arch == "diffusers" and not model.training
    saved = torch.load(tmp_path / "run" / "latest_model.pth", weights_only=True)
    assert any(key.startswith("unet.down_blocks.1.attentions") for key in saved["ema"])
    generate_in_process(tmp_path / "run" / "latest_model.pth", tmp_path / "out", capsys, "--n", 4, "--m", 2)
    assert Image.open(next((tmp_path / "out").glob("*.png"))).size == (4 * 32, 2 * 32)
