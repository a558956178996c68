"""CUDA checks for the GPU machine: bash test.sh -m gpu. Skipped where no CUDA GPU is visible."""
import json
import os

import pytest
import torch

from testkit import make_avatar_folder, run_script

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_default_preset_trains_with_bf16_channels_last_and_compile(tmp_path):
    images = make_avatar_folder(tmp_path / "train", 460)
    run = tmp_path / "run"
    result = run_script("train.py", "--train_dataset_directory", images, "--validate_dataset_directory", images,
                        "--model_checkpoint_dir", run, "--device", "cuda", "--compile", "on", "--no_visdom",
                        "--max_steps", 200, "--log_every", 20, "--num_epochs", 1000, "--validate_every", 50)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "precision bf16" in result.stdout
    with open(run / "log.jsonl") as f:
        losses = [r["train_loss"] for r in map(json.loads, f) if r["kind"] == "train"]
    assert losses[-1] < losses[0] / 5, losses
    result = run_script("generate.py", "--checkpoint", run / "latest_model.pth", "--device", "cuda",
                        "--generated_image_save_dir", tmp_path / "grid")
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.getsize(tmp_path / "grid" / "generated_images_8x4.png") > 10_000
