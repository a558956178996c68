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


def test_the_training_step_never_waits_for_the_gpu():
    from config import make_config
    from diffusion import sample_alpha_bar
    from train import make_optimizer, make_train_step
    from unet import UNet
    config = make_config("default")
    model = UNet(config).cuda().to(memory_format=torch.channels_last)
    ema = UNet(config).cuda().to(memory_format=torch.channels_last).requires_grad_(False)
    step = make_train_step(model, model, ema, make_optimizer(model, config, fused=True), config, torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    x0 = torch.rand(64, 3, 32, 32, device="cuda", generator=g) * 2 - 1
    step(x0, torch.randn_like(x0), sample_alpha_bar(config, 64, "cuda", g), 0)  # warm-up
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation now raises
    try:
        for _ in range(3):
            alpha_bar = sample_alpha_bar(config, 64, "cuda", g)
            step(x0, torch.randn(x0.shape, device="cuda", generator=g), alpha_bar, 10 ** 6)
    finally:
        torch.cuda.set_sync_debug_mode("default")
