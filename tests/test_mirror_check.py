"""tools/mirror_check.py: the same test images scored plain and mirrored, through the real evaluate.py."""
import os

import numpy as np
from PIL import Image

from testkit import PYTHON, make_avatar_folder, run


def test_the_mirror_check_scores_the_same_images_plain_and_mirrored(tmp_path):
    train, test = make_avatar_folder(tmp_path / "train", 40), make_avatar_folder(tmp_path / "test", 24, first_index=100)
    out = tmp_path / "out"
    result = run([PYTHON, "tools/mirror_check.py", "--test_dir", test, "--reference_dir", train, "--num_samples", "16",
                  "--out", str(out), "--cache_dir", str(tmp_path / "cache")], timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    names = sorted(os.listdir(out / "plain"))
    assert len(names) == 16 and names == sorted(os.listdir(out / "mirrored"))
    for name in names:  # the same image, flipped left to right
        plain, mirrored = (np.asarray(Image.open(out / kind / name)) for kind in ("plain", "mirrored"))
        assert (plain == np.asarray(Image.open(os.path.join(test, name)).convert("RGB"))).all()
        assert (mirrored == plain[:, ::-1]).all()
    line = next(line for line in result.stdout.splitlines() if line.startswith("attribute_fd: 16 test images "))
    plain_fd, mirrored_fd = float(line.split()[4].rstrip(",")), float(line.split()[8])
    assert plain_fd != mirrored_fd, line
