"""The README's quick start through the shell launchers, on tiny data, in a copy of the repo."""
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from testkit import REPO, run


@pytest.mark.slow
def test_train_then_generate_through_the_launchers(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(REPO, repo, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "checkpoints", "generated", "*_images_downsample", "*_images", "__pycache__", ".pytest_cache",
        ".whl", ".devdata", "models", "*.cache.npz"))  # the data set caches (dataset.py): 170 MB
    os.symlink(os.path.join(REPO, ".venv"), repo / ".venv")  # install.sh finds it up to date
    os.makedirs(repo / "models")
    for name in ("pretrained_small.pth", "pretrained_small.pth.sha256"):  # committed, as in a fresh clone
        shutil.copy(os.path.join(REPO, "models", name), repo / "models" / name)

    # Before any training, generate.sh samples the pretrained model, and says so.
    result = run(["bash", "generate.sh", "--device", "cpu", "--n", 4, "--m", 2], cwd=repo)
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("no checkpoints/latest_model.pth yet (bash train_UNet.sh trains one): sampling the pretrained model "
            "models/pretrained_small.pth") in result.stdout
    assert len(np.unique(np.asarray(Image.open(repo / "generated" / "generated_images_4x2.png")).reshape(-1, 3),
                         axis=0)) > 100

    result = run(["bash", "train_UNet.sh", "--preset", "tiny", "--device", "cpu", "--no_visdom", "--max_steps", 6],
                 cwd=repo, env={"NUM_TRAIN": "32", "NUM_TEST": "16"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "building the default data set" in result.stdout
    for folder, count in (("train_images_downsample", 32), ("test_images_downsample", 16)):
        names = os.listdir(repo / "images" / folder)
        assert len([n for n in names if n.endswith(".png")]) == count and "labels.csv" in names
        assert len((repo / "images" / folder / "labels.csv").read_text().splitlines()) == count + 1
    assert (repo / "checkpoints" / "latest_model.pth").exists()

    result = run(["bash", "generate.sh", "--device", "cpu", "--steps", 3], cwd=repo)
    assert result.returncode == 0, result.stderr[-2000:]
    grid = np.asarray(Image.open(repo / "generated" / "generated_images_8x4.png"))
    assert grid.shape == (128, 256, 3)
    assert len(np.unique(grid.reshape(-1, 3), axis=0)) > 100

    # A second launch resumes instead of rebuilding the data or starting over.
    result = run(["bash", "train_UNet.sh", "--preset", "tiny", "--device", "cpu", "--no_visdom", "--max_steps", 8],
                 cwd=repo, env={"NUM_TRAIN": "32", "NUM_TEST": "16"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "building the default data set" not in result.stdout and "resuming" in result.stdout
