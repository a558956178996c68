"""images/generate_image.py on a tiny, randomly initialised pipeline of playground-v2.5's classes.

playground-v2.5 is a StableDiffusionXLPipeline (two CLIP text encoders, SDXL UNet and VAE) with the
EDM DPM-Solver++ scheduler. The tests build the same classes with tiny sizes, save them like a hub
folder (fp16 variant file names, as the real model ships) and run the real script on them.
Also: images/bench_playground.py, and the seed's launchers images/seed_data.sh (generate and downsample).
"""

import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cli import UserError
from testkit import one_line_error, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "images", "generate_image.py")
sys.path.insert(0, os.path.join(REPO, "images"))
import bench_playground  # noqa: E402
import generate_image  # noqa: E402
from bench_playground import bytes_to_unicode  # noqa: E402  (the byte alphabet of the bench's tokenizers)

# 32x32 images: the tiny VAE has two levels (factor 2), so the UNet works on 16x16 latents.
TINY_RUN = ["--device", "cpu", "--height", "32", "--width", "32", "--num_inference_steps", "2",
            "--guidance_scale", "3", "--seed", "7"]



def tiny_tokenizers(folder):
    """Two CLIP tokenizers over a 514-token vocabulary: the 256 byte characters, the same with the
    end-of-word mark, and the two special tokens. No merges, so every character is a token."""
    from transformers import CLIPTokenizer

    characters = list(bytes_to_unicode().values())
    vocab = {token: i for i, token in enumerate(characters + [c + "</w>" for c in characters])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    files = (os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))
    # SDXL pads the first prompt with <|endoftext|> and the second (OpenCLIP) with "!".
    return CLIPTokenizer(*files, model_max_length=77), CLIPTokenizer(*files, model_max_length=77, pad_token="!"), vocab


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    import torch
    from diffusers import (AutoencoderKL, EDMDPMSolverMultistepScheduler, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = tmp_path_factory.mktemp("tiny_playground")
    torch.manual_seed(0)
    tokenizer, tokenizer_2, vocab = tiny_tokenizers(str(root / "vocab"))
    text_config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
                                 bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                                 pad_token_id=1, hidden_act="gelu")
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 1), use_linear_projection=True,
        norm_num_groups=8, cross_attention_dim=32,  # the two text encoders' widths, concatenated
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16)  # 6 size/crop numbers + pooled text
    # playground-v2.5's VAE: SDXL's with scaling factor 0.5 and per-channel latent mean and std.
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=32, scaling_factor=0.5,
                        latents_mean=[-1.6574, 1.886, -1.383, 2.5155], latents_std=[8.4927, 5.9022, 6.6792, 7.0])
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(text_config), text_encoder_2=CLIPTextModelWithProjection(text_config),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=EDMDPMSolverMultistepScheduler())
    folder = root / "pipeline"
    pipe.save_pretrained(str(folder), variant="fp16")
    return str(folder)


def run_script(args, env=None, torchrun_procs=0):
    command = [sys.executable, SCRIPT, *args]
    if torchrun_procs:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node", str(torchrun_procs), SCRIPT, *args]
    # one thread: tiny models gain nothing from more, and a busy test machine slows threaded runs a lot
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=240)


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def listing(folder):
    return sorted(os.listdir(folder))


@pytest.fixture(scope="session")
def one_process_run(tiny_pipeline, tmp_path_factory):
    """Five images from one process: first 3 (batch 2), then a resumed run to 5 (batch 3)."""
    out = tmp_path_factory.mktemp("one_process") / "images"
    first = run_script([*TINY_RUN, "--model_name", tiny_pipeline, "--image_save_dir", str(out),
                        "--num_samples", "3", "--batch_size", "2"])
    assert first.returncode == 0, first.stderr
    first_listing = listing(out)
    first_state = {name: (os.stat(out / name).st_mtime_ns, (out / name).read_bytes()) for name in first_listing}
    # a killed earlier run's temporary file, a stray non-image file, and a deleted image
    (out / ".4.png.12345.tmp").write_bytes(b"partial")
    (out / "notes.txt").write_text("not an image")
    deleted = (out / "1.png").read_bytes()
    os.remove(out / "1.png")
    # the resumed run goes in-process (diffusers is imported already: seconds saved)
    with contextlib.redirect_stdout(io.StringIO()) as second_stdout:
        generate_image.main([*TINY_RUN, "--model_name", tiny_pipeline, "--image_save_dir", str(out),
                             "--num_samples", "5", "--batch_size", "3"])
    return out, first, first_listing, first_state, deleted, second_stdout.getvalue()


@pytest.mark.slow
def test_writes_the_requested_images(one_process_run):
    out, first, first_listing, _, _, _ = one_process_run
    assert first_listing == ["0.png", "1.png", "2.png"]
    assert "all 3 images present" in first.stdout
    for name in first_listing:
        image = Image.open(out / name)
        assert (image.size, image.mode) == ((32, 32), "RGB")
    # different indices start from different noise, so they are different pictures
    assert np.abs(pixels(out / "0.png") - pixels(out / "2.png")).mean() > 5


def test_pixels_are_those_of_diffusers_pil_output(tiny_pipeline, tmp_path):
    """generate() turns the pipeline's [0, 1] tensors into bytes on the device; the PNGs must hold
    exactly the pixels diffusers' own PIL output gives for the same starting noise."""
    import torch

    pipe = generate_image.load_pipeline(tiny_pipeline, variant="fp16", dtype=torch.float32, device="cpu",
                                        local_files_only=True)
    call = dict(prompt=generate_image.DEFAULT_PROMPT, num_inference_steps=2, guidance_scale=3.0, height=32, width=32)
    writer = generate_image.PngWriter(str(tmp_path))
    generate_image.generate(pipe, [0, 1], writer, seed=7, batch_size=2, **call)
    writer.close()
    generators = [torch.Generator("cpu").manual_seed(generate_image.image_seed(7, i)) for i in (0, 1)]
    expected = pipe(num_images_per_prompt=2, generator=generators, **call).images
    for i, image in enumerate(expected):
        want = np.asarray(image).astype(int)
        assert len(np.unique(want)) > 50  # mid-range values: rounding and truncation would differ
        assert np.array_equal(pixels(tmp_path / f"{i}.png"), want)


@pytest.mark.slow
def test_second_run_adds_only_missing_images(one_process_run):
    out, _, _, first_state, deleted, second = one_process_run
    assert listing(out) == ["0.png", "1.png", "2.png", "3.png", "4.png", "notes.txt"]  # temporary file gone
    assert "3 to make on rank 0 of 1 (2 of its 5 already there)" in second
    for name in ("0.png", "2.png"):  # untouched: same bytes, same modification time
        assert (os.stat(out / name).st_mtime_ns, (out / name).read_bytes()) == first_state[name]
    # 1.png is made again under its own number (the seed renumbered from len(listdir)) and, being
    # a function of (seed, index) only, it is the same picture although its batch was different
    assert np.abs(pixels(out / "1.png") - np.asarray(Image.open(io.BytesIO(deleted))).astype(int)).max() <= 1


@pytest.mark.slow
def test_two_ranks_split_the_work_with_no_overlap_and_no_gap(tiny_pipeline, one_process_run, tmp_path):
    reference = one_process_run[0]
    out = tmp_path / "images"
    result = run_script([*TINY_RUN, "--model_name", tiny_pipeline, "--image_save_dir", str(out),
                         "--num_samples", "5", "--batch_size", "2"], torchrun_procs=2)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 to make on rank 0 of 2" in result.stdout  # rank 0: 0, 2, 4; rank 1: 1, 3
    assert "all 5 images present" in result.stdout
    assert listing(out) == ["0.png", "1.png", "2.png", "3.png", "4.png"]
    for i in range(5):
        # same pictures as one process with other batches: sharding changes nothing but who makes
        # them (up to 1 grey level: 1 vs 2 CPU threads sum in a different order)
        difference = np.abs(pixels(out / f"{i}.png") - pixels(reference / f"{i}.png"))
        assert difference.max() <= 1 and (difference > 0).mean() < 0.01, i


def test_shards_cover_every_index_exactly_once():
    for world_size in (1, 2, 3, 8):
        shards = [generate_image.shard(50, rank, world_size) for rank in range(world_size)]
        flat = sorted(i for s in shards for i in s)
        assert flat == list(range(50)), world_size
        assert all(i % world_size == rank for rank, s in enumerate(shards) for i in s)


def test_image_seeds_do_not_collide_between_train_and_test_seeds():
    train = {generate_image.image_seed(0, i) for i in range(50000)}
    test = {generate_image.image_seed(1, i) for i in range(5000)}
    assert len(train) == 50000 and len(test) == 5000 and not train & test


@pytest.mark.parametrize("text, value", [("True", True), ("False", False), ("1", True), ("0", False),
                                         ("false", False)])
def test_boolean_flags_parse_true_and_false(text, value):
    args = generate_image.parse_args(["--local_files_only", text, "--compile", text])
    assert args.local_files_only is value and args.compile is value


def test_compile_can_be_regional():
    assert generate_image.parse_args(["--compile", "regional"]).compile == "regional"
    assert generate_image.parse_args(["--compile"]).compile is True


def test_regional_compile_compiles_each_transformer_block_in_place():
    """Regional compilation on a tiny SDXL UNet (diffusers' compile_repeated_blocks): the UNet
    object stays, its transformer blocks are compiled, and nothing runs until it is called."""
    import bench_playground
    from diffusers import UNet2DConditionModel

    class Pipe:
        unet = UNet2DConditionModel(**bench_playground.TINY_UNET)

    import torch
    pipe = Pipe()
    unet = pipe.unet
    with torch._inductor.config.patch(conv_1x1_as_mm=False):  # speed_up sets it: leave other tests as they were
        generate_image.speed_up(pipe, compile_unet="regional")
    assert pipe.unet is unet
    blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert blocks and all(m._compiled_call_impl is not None for m in blocks)


def test_bad_boolean_is_a_one_line_error():
    with pytest.raises(UserError) as error:
        generate_image.parse_args(["--local_files_only", "maybe"])
    assert str(error.value) == "argument --local_files_only: expected True or False (or 1/0), got 'maybe' (see --help)"


@pytest.mark.parametrize("script, flag, value, message", [
    (generate_image, "--num_samples", "-1", "-1 must be 0 or more"),
    (generate_image, "--num_inference_steps", "0", "0 must be at least 1"),
    (generate_image, "--guidance_scale", "-1", "-1 must be 0 or more"),
    (generate_image, "--guidance_scale", "nan", "nan must be 0 or more"),
    (generate_image, "--batch_size", "0", "0 must be at least 1"),
    (generate_image, "--batch_size", "2.5", "'2.5' is not an integer"),
    (generate_image, "--height", "0", "0 must be at least 1"),
    (generate_image, "--height", "1020", "1020 is not a multiple of 8"),
    (generate_image, "--width", "33", "33 is not a multiple of 8"),
    (generate_image, "--seed", "-1", "-1 must be 0 or more"),
    (generate_image, "--seed", str(2**31), f"{2**31} must be below 2**31 = {2**31}"),
    (generate_image, "--save_threads", "0", "0 must be at least 1"),
    (bench_playground, "--batch_size", "0", "0 must be at least 1"),
    (bench_playground, "--guidance_scale", "-0.5", "-0.5 must be 0 or more"),
    (bench_playground, "--time_budget", "0", "0 must be positive"),
], ids=lambda value: getattr(value, "__name__", None))
def test_bad_numbers_name_the_flag(script, flag, value, message):
    """generate_image.py and bench_playground.py: a bad number is one line naming the flag."""
    with pytest.raises(UserError) as error:
        script.parse_args([flag, value])
    assert str(error.value) == f"argument {flag}: {message} (see --help)"


def test_edge_numbers_are_accepted():
    args = generate_image.parse_args(["--num_samples", "0", "--height", "8", "--width", "1024", "--seed",
                                      str(2**31 - 1), "--guidance_scale", "0"])
    assert (args.num_samples, args.height, args.width, args.seed, args.guidance_scale) == (0, 8, 1024, 2**31 - 1, 0.0)


def test_output_folder_below_a_file_is_one_line_error(tmp_path):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "images"
    with pytest.raises(UserError) as error:
        generate_image.main(["--image_save_dir", str(out), "--num_samples", "1", "--device", "cpu"])
    assert str(error.value) == (f"--image_save_dir {out}: cannot create this folder (Not a directory); "
                                "pass a folder you can write to")


@pytest.mark.slow
def test_missing_weights_say_where_to_get_them(tmp_path):
    hub_id = "example-org/not-a-real-model-xyz"
    hf_home = tmp_path / "hf"
    result = run_script(["--model_name", hub_id, "--image_save_dir", str(tmp_path / "out"), "--num_samples", "1",
                         "--device", "cpu"], env={"HF_HOME": str(hf_home)})
    assert result.returncode == 2
    assert one_line_error(result) == (
        f"error: weights for {hub_id} not found locally and not downloadable: on a machine with network run "
        f"`hf download {hub_id} --local-dir models/not-a-real-model-xyz` and copy that folder here (or set "
        f"HF_HOME, now {hf_home}, to a Hugging Face cache that holds it); see models/README.md")
    assert listing(tmp_path / "out") == []


@pytest.mark.slow
def test_bad_number_exits_2_with_one_line(tmp_path):
    result = run_script(["--image_save_dir", str(tmp_path / "out"), "--batch_size", "0"])
    assert result.returncode == 2
    assert one_line_error(result) == "error: argument --batch_size: 0 must be at least 1 (see --help)"
    assert not (tmp_path / "out").exists()


def test_unloadable_local_folder_names_it(tmp_path):
    folder = tmp_path / "empty_model"
    folder.mkdir()
    with pytest.raises(UserError) as error:
        generate_image.main(["--model_name", str(folder), "--image_save_dir", str(tmp_path / "out"),
                             "--num_samples", "1", "--device", "cpu"])
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"cannot load the pipeline in {folder}: ")
    assert message.endswith("; point --model_name at a complete diffusers folder")


def test_bench_builds_playground_v2_5_full_size_architecture():
    """images/bench_playground.py times random weights in playground-v2.5's (= SDXL's) shapes: the
    parameter counts are those of the released model's components (built on the meta device: no memory)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    import bench_playground

    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel(**bench_playground.SDXL_UNET),
                 "vae": AutoencoderKL(**bench_playground.SDXL_VAE),
                 "text_encoder": CLIPTextModel(CLIPTextConfig(**bench_playground.CLIP_L)),
                 "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**bench_playground.CLIP_BIG_G))}
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                      "text_encoder_2": 694_659_840}


def test_bench_counts_the_flops_of_playground_v2_5():
    """The UNet and VAE FLOPs the README's analysis of the speed goal rests on, counted on the meta
    device: one UNet evaluation at 1024x1024 (128x128 latents, 77 text tokens) and one VAE decode."""
    import bench_playground

    counted = bench_playground.count_flops(bench_playground.SDXL_UNET, bench_playground.SDXL_VAE, 1024)
    assert counted["unet_tflop_per_eval"] == pytest.approx(6.761, rel=0.005)
    assert counted["vae_decode_tflop"] == pytest.approx(10.47, rel=0.005)


def test_bench_unet_rate_counts_two_evaluations_per_step_with_guidance():
    import bench_playground

    flops = {32: dict(unet_tflop_per_eval=3.0, vae_decode_tflop=1.0)}
    row = dict(size=32, step_s_per_image=0.5)
    assert bench_playground.unet_tflops(dict(row, guidance_scale=3.0), flops) == pytest.approx(12.0)
    assert bench_playground.unet_tflops(dict(row, guidance_scale=1.0), flops) == pytest.approx(6.0)


def test_tiny_bench_times_every_setting_and_splits_one_call(tmp_path):
    """bench_playground.py end to end on the tiny configurations (CPU, no compile rows, no grids):
    every setting gets a fitted time, a table line per step count, and one call of ours is split into
    its parts. Timing values are not checked, only that they were measured."""
    import bench_playground

    with contextlib.redirect_stdout(io.StringIO()):
        bench_playground.main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--compile", "False",
                               "--grids", "False"])
    report = json.loads((tmp_path / "bench_playground.json").read_text())
    rows = {row["name"]: row for row in report["settings"]}
    assert set(rows) == {"seed", "ours", "ours_half_size", "ours_no_cfg", "ours_batch_2x"}
    assert all("fixed_s_per_image" in row for row in rows.values())
    assert "measured_50_steps_s_per_image" in rows["seed"]
    assert all(row["png_drain_s"] >= 0 for name, row in rows.items() if name != "seed")
    parts = rows["ours"]["components_s_per_image"]
    assert all(parts[part] > 0 for part in ("text_encoders", "unet", "vae_decode"))
    assert parts["other"] >= 0 and (parts["steps"], parts["batch_size"]) == (6, 4)
    assert set(report["flops_tflop"]) == {"32", "16"}
    table = (tmp_path / "bench_playground.md").read_text()
    assert "UNet TFLOP/s" in table and "One call of ours" in table
    assert all(f"| {row['what']} |" in table for row in rows.values())


def test_bench_output_folder_below_a_file_is_one_line_error(tmp_path):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "bench"
    with pytest.raises(UserError) as error:
        bench_playground.main(["--tiny", "--device", "cpu", "--out", str(out)])
    assert str(error.value) == (f"--out {out}: cannot create this folder (Not a directory); "
                                "pass a folder you can write to")


@pytest.fixture
def fake_python(tmp_path):
    """A stand-in for the launchers' python (PY=...): prints the arguments it was given, one a line."""
    path = tmp_path / "python"
    path.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    path.chmod(0o755)
    return str(path)


SEED_FLAGS = {  # what images/seed_data.sh passes for each set; any flag given to a launcher is appended
    "generate": lambda split, num_samples, seed: [
        "images/generate_image.py", "--num_samples", num_samples, "--image_save_dir", f"images/{split}_images",
        "--prompt", "anime-style avatar, totally white background",
        "--model_name", "playgroundai/playground-v2.5-1024px-aesthetic", "--variant", "fp16",
        "--num_inference_steps", "50", "--guidance_scale", "3", "--device", "cuda", "--seed", seed],
    "downsample": lambda split, num_samples, seed: [
        "images/downsample.py", "--source_image_dir", f"images/{split}_images",
        "--dest_image_dir", f"images/{split}_images_downsample", "--dest_image_height", "32",
        "--dest_image_width", "32", "--num_samples", "-1", "--skip_exists", "True"],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["generate_images", "downsample_images"])
@pytest.mark.parametrize("split, num_samples, seed", [("train", "50000", "0"), ("test", "5000", "1")])
@pytest.mark.parametrize("nproc", ["1", "2"])
def test_launchers_pass_the_seed_flags(fake_python, launcher, split, num_samples, seed, nproc):
    """The four launchers are thin wrappers over images/seed_data.sh; PY points them at a python that
    prints its arguments. NPROC=2 runs generate_image.py under torchrun, one rank per GPU."""
    result = run(["bash", os.path.join(REPO, "images", f"{launcher}_for_{split}.sh"), "--batch_size", "2"],
                 env={"PY": fake_python, "NPROC": nproc})
    assert result.returncode == 0, result.stderr
    step = launcher.split("_")[0]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    expected = (torchrun if step == "generate" and nproc == "2" else []) + SEED_FLAGS[step](split, num_samples, seed)
    assert result.stdout.splitlines() == [*expected, "--batch_size", "2"]


@pytest.mark.slow
def test_launcher_refuses_an_unknown_set():
    result = run(["bash", os.path.join(REPO, "images", "seed_data.sh"), "downsample", "valid"])
    assert result.returncode == 2
    assert one_line_error(result) == ("error: the set is train or test, not 'valid'; usage: bash images/seed_data.sh "
                                      "generate|downsample train|test [flags for the script]")
