"""How many playground-v2.5 images per hour: the seed's way against ours, and cheaper settings.

The network is the full-size playground-v2.5 architecture (the same as SDXL: UNet2DConditionModel
with SDXL's configuration, SDXL's AutoencoderKL, the CLIP ViT-L and OpenCLIP ViT-bigG text encoders)
with RANDOM weights in fp16, built from the configurations written out below: nothing is
downloaded, and the timing of a network does not depend on its weight values. With --model_name
the real weights are loaded instead, and 32x32 sample grids are saved beside each setting.

What is timed is the whole loop a user runs: pipeline calls (text encoders, UNet steps, VAE decode
to PIL images) and the PNG writing.
- seed: one image per call, prompt re-encoded each call, PNG saved before the next call, eager
  fp16 (images/generate_image.py of the seed).
- ours: images/generate_image.py's loop: --batch_size images per call, one CPU generator per
  image, PNGs written on background threads, cuDNN autotuning; optionally channels_last and
  torch.compile. In a long run each batch's PNGs are written while the GPU makes the next batch, so
  a timed loop ends when its last batch is handed to the writer; the writer then finishes outside
  the timing, and the longest such wait is recorded as png_drain_s (the writing keeps up while it
  is shorter than one batch's time).
Each setting is timed at two small step counts (after warm-up calls, with CUDA synchronised), and
the per-image time is fitted as fixed + steps * per_step, which extrapolates to 25 and 50 steps
without running them all (only the scheduler's step count changes, not the work per step). The
seed's setting is also run once at its full 50 steps to check the fit.

Each row also says how fast the UNet runs: its FLOPs per evaluation are counted (FlopCounterMode on a
weightless meta-device copy), times two with classifier-free guidance, over the fitted time per
step; on CUDA as a share of the card's measured fp16 matrix-multiply peak. One call of our loop is
also split into text encoders, UNet, VAE decode and the rest (each part synchronised), and with
--profile the UNet's GPU time is broken down by kernel kind (what torch.compile can fuse).

    python images/bench_playground.py                    # CUDA: about 3 to 4 minutes on an H100
    python images/bench_playground.py --tiny --device cpu  # tiny configurations, checks the code
    python images/bench_playground.py --flops              # FLOPs per UNet evaluation and VAE decode; no GPU
Writes <out>/bench_playground.json and .md (the table, also printed).
"""

import datetime
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the root: cli.py, bench.py
import generate_image  # noqa: E402
from cli import (ArgumentParser, atomic_write, make_folder, non_negative_float, parse_bool,  # noqa: E402
                 pick_device, positive_float, positive_int, run_main)
from downsample import downsample_image  # noqa: E402

PROMPT = generate_image.DEFAULT_PROMPT

# playground-v2.5 = SDXL's architecture. UNet: 2.57 B parameters, latents 4 x 128 x 128 at 1024 px.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)  # 6 size/crop numbers x 256 + pooled bigG text (1280)
# SDXL's VAE (84 M); playground-v2.5 rescales its latents with scaling factor 0.5 and a
# per-channel mean and std (the EDM-style latent normalisation).
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu",
    norm_num_groups=32, sample_size=1024, scaling_factor=0.5, force_upcast=True,
    latents_mean=[-1.6574, 1.886, -1.383, 2.5155], latents_std=[8.4927, 5.9022, 6.6792, 7.0])
# CLIP ViT-L/14 text encoder (123 M) and OpenCLIP ViT-bigG/14 text encoder with projection (695 M).
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIG_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                  num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)

# --tiny: the same classes, small enough to run on a CPU in seconds.
TINY_UNET = dict(SDXL_UNET, sample_size=16, block_out_channels=(16, 32), layers_per_block=1,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1),
                 attention_head_dim=(2, 4), norm_num_groups=8, cross_attention_dim=32, addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + 16)
TINY_VAE = dict(SDXL_VAE, block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=32)
TINY_CLIP = dict(CLIP_L, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 projection_dim=16)


def parse_args(argv=None):
    parser = ArgumentParser(description="Images per hour of playground-v2.5 generation: seed vs ours.")
    parser.add_argument("--out", default="generated", help="folder for bench_playground.json/.md and grids")
    parser.add_argument("--device", default="cuda", help="cuda | cuda:N | auto | cpu | mps (cpu: with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny configurations (for a CPU check of the code)")
    parser.add_argument("--model_name", default=None,
                        help="load real weights (hub id or folder) instead of random ones; also saves sample grids")
    parser.add_argument("--batch_size", type=positive_int, default=4,
                        help="our batch size at full resolution (images/generate_image.py's default); "
                             "twice it is timed too")
    parser.add_argument("--guidance_scale", type=non_negative_float, default=3.0)
    parser.add_argument("--compile", type=parse_bool, nargs="?", const=True, default=True,
                        help="also time the torch.compile'd UNet (slow to compile: skipped if the budget is short)")
    parser.add_argument("--grids", type=parse_bool, nargs="?", const=True, default=None,
                        help="save 32x32 sample grids per setting (default: with --model_name or --tiny)")
    parser.add_argument("--flops", action="store_true",
                        help="print the FLOPs of one UNet evaluation and one VAE decode at each size, then exit "
                             "(counted on the meta device: no GPU, no weights)")
    parser.add_argument("--profile", action="store_true",
                        help="CUDA: also write where the UNet's GPU time goes, by kernel kind")
    parser.add_argument("--time_budget", type=positive_float, default=225,
                        help="seconds; settings that would start too late are skipped and say so")
    return parser.parse_args(argv)


def bytes_to_unicode():
    """GPT-2/CLIP byte-level alphabet: every byte gets a printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def byte_level_tokenizers(folder):
    """CLIP tokenizers over the 256 byte characters (+ end-of-word forms and the two specials):
    the real 49408-token vocabulary needs a download, and the encoders see 77 tokens either way."""
    from transformers import CLIPTokenizer

    characters = list(bytes_to_unicode().values())
    vocab = {token: i for i, token in enumerate(characters + [c + "</w>" for c in characters])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    files = (os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))
    return (CLIPTokenizer(*files, model_max_length=77), CLIPTokenizer(*files, model_max_length=77, pad_token="!"),
            vocab["<|startoftext|>"], vocab["<|endoftext|>"])


def random_pipeline(tiny, device, dtype, scratch):
    """playground-v2.5's architecture with random weights, built directly on `device`."""
    from diffusers import AutoencoderKL, EDMDPMSolverMultistepScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer, tokenizer_2, bos, eos = byte_level_tokenizers(scratch)
    ids = dict(bos_token_id=bos, eos_token_id=eos, pad_token_id=1)
    with torch.device(device):
        unet = UNet2DConditionModel(**(TINY_UNET if tiny else SDXL_UNET))
        vae = AutoencoderKL(**(TINY_VAE if tiny else SDXL_VAE))
        text_encoder = CLIPTextModel(CLIPTextConfig(**(TINY_CLIP if tiny else CLIP_L), **ids))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**(TINY_CLIP if tiny else CLIP_BIG_G), **ids))
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                     scheduler=EDMDPMSolverMultistepScheduler(), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def unet_inputs(unet_config, vae_config, batch, size, device, dtype):
    """Keyword arguments of one UNet evaluation of `batch` latents for size x size images, as the
    SDXL pipeline passes them: 77 text tokens, the pooled text embedding and 6 size/crop numbers."""
    latent = size // 2 ** (len(vae_config.block_out_channels) - 1)
    pooled = unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim
    make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    return dict(sample=make(batch, unet_config.in_channels, latent, latent), timestep=torch.ones(batch, device=device),
                encoder_hidden_states=make(batch, 77, unet_config.cross_attention_dim),
                added_cond_kwargs=dict(text_embeds=make(batch, pooled), time_ids=make(batch, 6)))


def count_flops(unet_config, vae_config, size):
    """TFLOP of one UNet evaluation (one image, one branch of classifier-free guidance) and of one VAE
    decode, at size x size pixels: FlopCounterMode over weightless copies on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        inputs = unet_inputs(unet.config, vae.config, 1, size, "meta", torch.float32)
        with FlopCounterMode(display=False) as unet_counter:
            unet(**inputs)
        with FlopCounterMode(display=False) as vae_counter:
            vae.decode(inputs["sample"])
    return dict(unet_tflop_per_eval=unet_counter.get_total_flops() / 1e12,
                vae_decode_tflop=vae_counter.get_total_flops() / 1e12)


def unet_tflops(row, flops):
    """TFLOP/s the UNet reaches in a row: FLOPs per image per step over the fitted time per step
    (two evaluations per step with classifier-free guidance, which the pipeline skips at guidance 1)."""
    evaluations = 2 if row["guidance_scale"] > 1 else 1
    return flops[row["size"]]["unet_tflop_per_eval"] * evaluations / row["step_s_per_image"]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_loop(pipe, count, directory, steps, guidance_scale, size):
    """The seed's loop: one image per call, saved before the next call starts."""
    for k in range(count):
        image = pipe(prompt=PROMPT, num_inference_steps=steps, guidance_scale=guidance_scale,
                     height=size, width=size).images[0]
        image.save(os.path.join(directory, f"{k}.png"))


def our_loop(pipe, count, writer, steps, guidance_scale, size, batch_size):
    """images/generate_image.py's loop; the caller drains `writer` (a generate_image.PngWriter)."""
    generate_image.generate(pipe, list(range(count)), writer, prompt=PROMPT, seed=0, batch_size=batch_size,
                            num_inference_steps=steps, guidance_scale=guidance_scale, height=size, width=size)


def time_loop(loop, device, **kwargs):
    synchronize(device)
    start = time.perf_counter()
    loop(**kwargs)
    synchronize(device)
    return time.perf_counter() - start


def measure(pipe, setting, device, scratch, step_points, warmups):
    """Seconds per image as fixed + steps * per_step, from loops at two step counts."""
    s_lo, s_hi = step_points
    batch = setting["batch_size"]
    count = batch * max(1, math.ceil(2 / batch))  # at least 2 images, whole batches
    directory = tempfile.mkdtemp(dir=scratch)
    writer = None if setting["seed_loop"] else generate_image.PngWriter(directory)
    if writer is None:
        loop = dict(loop=seed_loop, pipe=pipe, directory=directory, guidance_scale=setting["guidance_scale"],
                    size=setting["size"])
    else:
        loop = dict(loop=our_loop, pipe=pipe, writer=writer, guidance_scale=setting["guidance_scale"],
                    size=setting["size"], batch_size=batch)
    drains = []

    def seconds_per_image(count, steps):
        seconds = time_loop(device=device, count=count, steps=steps, **loop) / count
        if writer is not None:  # the last batch's PNGs, written after the timing (see the module's docstring)
            started = time.perf_counter()
            writer.wait()
            drains.append(time.perf_counter() - started)
        return seconds
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(warmups):  # cuDNN autotuning, torch.compile, allocator growth
        seconds_per_image(batch, s_lo)
    warmup_s = time.perf_counter() - started
    t_lo = seconds_per_image(count, s_lo)
    t_hi = seconds_per_image(count, s_hi)
    if writer is not None:
        writer.close()
    shutil.rmtree(directory, ignore_errors=True)
    per_step = (t_hi - t_lo) / (s_hi - s_lo)
    result = dict(fixed_s_per_image=t_lo - s_lo * per_step, step_s_per_image=per_step,
                  timed_images_per_point=count, step_points=[s_lo, s_hi], warmup_s=round(warmup_s, 1))
    if drains:
        result["png_drain_s"] = max(drains[-2:])
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def time_components(pipe, device, scratch, batch_size, size, steps, guidance_scale):
    """Seconds per image in each part of one call of our loop at `steps` steps: text encoders, UNet
    (all steps), VAE decode, and the rest (scheduler, latents to PIL images). Each part is timed
    between CUDA synchronisations, so the parts add up to the call."""
    parts = dict(text_encoders=0.0, unet=0.0, vae_decode=0.0)
    wrapped = [(pipe, "encode_prompt", "text_encoders"), (pipe.unet, "forward", "unet"),
               (pipe.vae, "decode", "vae_decode")]

    def timed_part(function, part):
        def call(*args, **kwargs):
            synchronize(device)
            start = time.perf_counter()
            result = function(*args, **kwargs)
            synchronize(device)
            parts[part] += time.perf_counter() - start
            return result
        return call
    for owner, attribute, part in wrapped:  # an instance attribute shadows the method
        setattr(owner, attribute, timed_part(getattr(owner, attribute), part))
    writer = generate_image.PngWriter(tempfile.mkdtemp(dir=scratch))
    try:
        total = time_loop(our_loop, device, pipe=pipe, count=batch_size, writer=writer, steps=steps,
                          guidance_scale=guidance_scale, size=size, batch_size=batch_size)
    finally:
        for owner, attribute, _ in wrapped:
            delattr(owner, attribute)
        writer.close()
    parts["other"] = total - sum(parts.values())
    return dict({part: seconds / batch_size for part, seconds in parts.items()}, steps=steps, batch_size=batch_size)


def grid(pipe, setting, count, scratch):
    """count images of `setting` (indices 0.., seed 0), each downsampled to 32x32, in one row-major grid."""
    directory = tempfile.mkdtemp(dir=scratch)
    writer = generate_image.PngWriter(directory)
    our_loop(pipe, count, writer, setting["steps_for_grid"], setting["guidance_scale"], setting["size"],
             min(setting["batch_size"], count))
    writer.close()
    tiles = [downsample_image(Image.open(os.path.join(directory, f"{i}.png")), 32, 32) for i in range(count)]
    columns = 8
    rows = math.ceil(count / columns)
    sheet = Image.new("RGB", (32 * columns, 32 * rows), (255, 255, 255))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (32 * (i % columns), 32 * (i // columns)))
    shutil.rmtree(directory, ignore_errors=True)
    return sheet


def main(argv=None):
    args = parse_args(argv)
    wall_start = time.perf_counter()
    full, half = (32, 16) if args.tiny else (1024, 512)
    if args.flops:
        for size in (full, half):
            counted = count_flops(TINY_UNET if args.tiny else SDXL_UNET, TINY_VAE if args.tiny else SDXL_VAE, size)
            print(f"{size}x{size}: UNet {counted['unet_tflop_per_eval']:.4g} TFLOP per evaluation "
                  f"({2 * counted['unet_tflop_per_eval']:.4g} per image per step with classifier-free guidance), "
                  f"VAE decode {counted['vae_decode_tflop']:.4g} TFLOP per image")
        return
    make_folder(args.out, "--out")
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # random weights may give NaN pixels
    device = pick_device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny ops gain nothing from threads; on a busy machine they distort timings
    make_grids = args.grids if args.grids is not None else bool(args.model_name or args.tiny)
    scratch = tempfile.mkdtemp(prefix="bench_playground_")

    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    built = time.perf_counter()
    if args.model_name:
        pipe = generate_image.load_pipeline(args.model_name, variant="fp16", dtype=dtype, device=device,
                                            local_files_only=False)
        pipe.vae.disable_slicing()  # the seed's pipeline as it loads; ours turns slicing on below
    else:
        pipe = random_pipeline(args.tiny, device, dtype, scratch)
    build_s = time.perf_counter() - built
    # full size: unet 2,567,463,684, vae 83,653,863, text_encoder 123,060,480, text_encoder_2 694,659,840
    parameters = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
                  for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    flops = {size: count_flops(pipe.unet.config, pipe.vae.config, size) for size in (full, half)}
    peak = None
    if device.type == "cuda":
        from bench import matmul_peak  # bench.py, at the repository's root
        peak = matmul_peak(dtype=dtype) / 1e12
    print(f"pipeline ready in {build_s:.0f} s ({'random' if not args.model_name else args.model_name} weights, "
          f"{str(dtype).replace('torch.', '')}, {device})", flush=True)

    eager_unet = pipe.unet
    b = args.batch_size
    g = args.guidance_scale
    plain = dict(seed_loop=False, compile=False, guidance_scale=g, size=full, batch_size=b)
    # In order of importance: a later setting is the first to go when the time budget runs short.
    settings = [
        dict(plain, name="seed", what="seed: batch 1, eager, PNG saved in the loop", batch_size=1, seed_loop=True),
        dict(plain, name="ours", what=f"ours: batch {b}, eager"),
        dict(plain, name="ours_compiled", what=f"ours: batch {b}, channels_last, torch.compile(UNet)", compile=True),
        dict(plain, name="ours_bf16", what=f"ours: batch {b}, bf16 (the VAE decodes in bf16, not upcast to fp32), eager",
             dtype=torch.bfloat16),
        dict(plain, name="ours_half_size", what=f"ours at {half}x{half}: batch {2 * b}, eager", size=half,
             batch_size=2 * b),
        dict(plain, name="ours_no_cfg", what=f"ours, guidance 1 (no classifier-free guidance): batch {b}, eager",
             guidance_scale=1.0),
        dict(plain, name="ours_batch_2x", what=f"ours: batch {2 * b}, eager", batch_size=2 * b),
        # Last: it compiles the UNet's blocks in place, so every setting after it would be compiled too.
        dict(plain, name="ours_regional", what=f"ours: batch {b}, channels_last, regional torch.compile "
             "(the UNet's transformer blocks)", compile="regional"),
    ]
    if not args.compile:
        settings = [s for s in settings if not s["compile"]]
    if device.type != "cuda":  # bf16 is a GPU setting
        settings = [s for s in settings if "dtype" not in s]
    step_points = (2, 6) if args.tiny else (3, 11)
    rows = []
    for setting in settings:
        elapsed = time.perf_counter() - wall_start
        needed = {True: 150, "regional": 90}.get(setting["compile"], 25)
        if not args.tiny and elapsed + needed > args.time_budget:
            print(f"skipped {setting['name']}: {elapsed:.0f} s used of the {args.time_budget:.0f} s budget", flush=True)
            rows.append(dict(setting, skipped=f"time budget ({elapsed:.0f} s used, ~{needed} s needed)"))
            continue
        if setting["seed_loop"]:
            pipe.vae.disable_slicing()
        else:
            pipe.vae.enable_slicing()
            if device.type == "cuda":
                torch.backends.cudnn.benchmark = True  # the seed ran without it, so it is set after
        if setting["compile"]:
            generate_image.speed_up(pipe, channels_last=True, compile_unet=setting["compile"])
        if "dtype" in setting:
            pipe.to(dtype=setting["dtype"])
        try:
            result = measure(pipe, setting, device, scratch, step_points, warmups=2 if setting["compile"] else 1)
        except Exception as error:  # one failed setting (say, out of memory) must not lose the others
            message = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"
            print(f"{setting['name']} failed: {message}", flush=True)
            rows.append(dict(setting, error=message))
            result = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if setting["compile"]:  # back to the eager UNet as it was, for the settings after this one
            pipe.unet = eager_unet
            pipe.unfuse_qkv_projections()
            eager_unet.to(memory_format=torch.contiguous_format)
        if "dtype" in setting:
            pipe.to(dtype=dtype)
        if result is None:
            continue
        rows.append(dict(setting, **result))
        drain = f", PNG writing after the loop {result['png_drain_s']:.2f} s" if "png_drain_s" in result else ""
        print(f"{setting['name']}: {result['fixed_s_per_image']:.3f} s + steps x {result['step_s_per_image']:.4f} s "
              f"per image (warm-up {result['warmup_s']} s{drain})", flush=True)
        if setting["seed_loop"]:  # check the straight-line fit once, at the full 50 steps
            directory = tempfile.mkdtemp(dir=scratch)
            measured = time_loop(seed_loop, device, pipe=pipe, count=1, directory=directory, steps=50,
                                 guidance_scale=g, size=full)
            rows[-1]["measured_50_steps_s_per_image"] = measured
            print(f"seed at 50 steps: measured {measured:.2f} s, fit "
                  f"{result['fixed_s_per_image'] + 50 * result['step_s_per_image']:.2f} s", flush=True)
        if setting["name"] == "ours":  # where one call's time goes, and with --profile the UNet's kernels
            parts = time_components(pipe, device, scratch, b, full, step_points[1], g)
            rows[-1]["components_s_per_image"] = parts
            print(f"one call, {parts['steps']} steps, per image: " + ", ".join(
                f"{part} {parts[part]:.3f} s" for part in ("text_encoders", "unet", "vae_decode", "other")), flush=True)
            if args.profile and device.type == "cuda":
                from bench import profile
                inputs = unet_inputs(pipe.unet.config, pipe.vae.config, 2 * b, full, device, dtype)
                with torch.no_grad():
                    profile(lambda: pipe.unet(**inputs), os.path.join(args.out, "bench_playground_profile_unet.txt"),
                            steps=3)
        write_report(args, rows, {}, device, dtype, parameters, build_s, wall_start, flops, peak)

    grids = {}
    report = write_report(args, rows, grids, device, dtype, parameters, build_s, wall_start, flops, peak)
    if make_grids:
        for size, steps, guidance in ((full, 50, g), (full, 25, g), (half, 50, g), (half, 25, g), (full, 50, 1.0)):
            if not args.tiny and time.perf_counter() - wall_start > args.time_budget + 120:
                break
            name = f"bench_playground_grid_{size}px_{steps}steps" + ("_nocfg" if guidance == 1.0 else "") + ".png"
            setting = dict(size=size, steps_for_grid=steps, guidance_scale=guidance,
                           batch_size=b if size == full else 2 * b)
            try:
                grid(pipe, setting, 8 if args.tiny else 16, scratch).save(os.path.join(args.out, name))
            except Exception as error:
                print(f"grid {name} failed: {type(error).__name__}: {error}", flush=True)
                continue
            grids[f"{size}px, {steps} steps, guidance {guidance}"] = name
        report = write_report(args, rows, grids, device, dtype, parameters, build_s, wall_start, flops, peak)
    print("\n" + report["heading"] + report["table"])
    print(f"\nwritten: {os.path.join(args.out, 'bench_playground.json')}, bench_playground.md"
          + (f", {len(grids)} grids" if grids else "") + f"; total {report['total_s']:.0f} s")
    shutil.rmtree(scratch, ignore_errors=True)


def write_report(args, rows, grids, device, dtype, parameters, build_s, wall_start, flops, peak):
    """bench_playground.json and .md in --out, rewritten after every setting: a crash keeps what was measured."""
    import diffusers

    report = dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__, diffusers=diffusers.__version__, cuda=torch.version.cuda,
        weights=args.model_name or "random", architecture="tiny" if args.tiny else "playground-v2.5 (SDXL) full size",
        parameters=parameters, dtype=str(dtype).replace("torch.", ""), prompt=PROMPT, build_s=round(build_s, 1),
        total_s=round(time.perf_counter() - wall_start, 1),
        method=("per-image time = fixed + steps * per_step, fitted from two timed loops at step_points "
                "(whole pipeline calls incl. text encoders, VAE decode, PIL, PNG writing), extrapolated to "
                "25 and 50 steps; images per hour = 3600 / seconds per image"),
        flops_tflop={str(size): counted for size, counted in flops.items()}, matmul_peak_tflops=peak,
        settings=rows, table=build_table(rows, flops, peak), grids=grids)
    report["heading"] = (f"playground-v2.5 generation, {report['device']}, {report['dtype']}, {report['weights']} "
                         f"weights, torch {report['torch']}, diffusers {report['diffusers']}, {report['date']}"
                         + (f", {report['dtype']} matmul peak {peak:.0f} TFLOP/s" if peak else "") + "\n\n"
                         + "".join(f"UNet at {size} px: {c['unet_tflop_per_eval']:.3g} TFLOP per evaluation (two per "
                                   f"image and step with guidance); VAE decode {c['vae_decode_tflop']:.3g} TFLOP per "
                                   "image\n" for size, c in flops.items()) + "\n")
    ours = next((r for r in rows if "components_s_per_image" in r), None)
    if ours:
        parts = ours["components_s_per_image"]
        report["heading"] += (f"One call of ours ({parts['batch_size']} images, {parts['steps']} steps), seconds per "
                              "image: " + ", ".join(f"{part.replace('_', ' ')} {parts[part]:.3f}" for part in
                                                    ("text_encoders", "unet", "vae_decode", "other")) + "\n\n")
    with atomic_write(os.path.join(args.out, "bench_playground.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with atomic_write(os.path.join(args.out, "bench_playground.md"), "w") as f:
        f.write(report["heading"] + report["table"] + "\n")
    return report


def build_table(rows, flops, peak=None):
    """Markdown table: every measured setting at 50 and 25 steps, with the speed-up over the
    seed's setting at the same steps and size, and the UNet's TFLOP/s (and share of the peak)."""
    seed = next((r for r in rows if r["name"] == "seed" and "fixed_s_per_image" in r), None)
    lines = ["| setting | size | steps | s/image | images/hour | vs seed (same steps, size) | UNet TFLOP/s "
             "| peak GPU memory |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "fixed_s_per_image" not in row or row["step_s_per_image"] <= 0:
            reason = row.get("skipped") or row.get("error") or "timing noise (time per step <= 0): rerun"
            lines.append(f"| {row['what']} | {row['size']} | - | - | - | {reason} | - | - |")
            continue
        for steps in (50, 25):
            seconds = row["fixed_s_per_image"] + steps * row["step_s_per_image"]
            vs = "-"
            if seed and row["size"] == seed["size"]:
                vs = f"{(seed['fixed_s_per_image'] + steps * seed['step_s_per_image']) / seconds:.2f}x"
            memory = f"{row['peak_memory_gib']} GiB" if "peak_memory_gib" in row else "-"
            rate = unet_tflops(row, flops)
            rate = f"{rate:.0f} ({100 * rate / peak:.0f}%)" if peak else f"{rate:.3g}"
            lines.append(f"| {row['what']} | {row['size']} | {steps} | {seconds:.3f} | {3600 / seconds:,.0f} | "
                         f"{vs} | {rate} | {memory} |")
    return "\n".join(lines)


if __name__ == "__main__":
    run_main(main)
