"""Make the seed's data set: playground-v2.5 images of one prompt, saved as {i}.png.

Image i is drawn from its own random generator, seeded with seed * 2**32 + i. So a file depends
only on (--seed, i), not on the batch size, the number of GPUs or restarts, which makes the run
- resumable: an existing {i}.png is skipped and nothing is renumbered; --num_samples is the total;
- shardable: under `torchrun --nproc_per_node K`, rank r makes exactly the i with i % K == r.
Train and test sets use different --seed values, so they never share a starting noise.

    python images/generate_image.py --num_samples 100 --image_save_dir images/train_images
    torchrun --nproc_per_node 4 images/generate_image.py --num_samples 50000 \
        --image_save_dir images/train_images

Speed (the seed made one image per pipeline call and saved it before starting the next): images
are made --batch_size at a time in one pipeline call, turned into bytes on the GPU, and encoded as
PNGs on background threads while the GPU works on the next batch; --compile and --channels_last are
there for the UNet. The VAE decodes one image at a time, so a large batch does not run out of
memory in the decoder.
Weights: see models/README.md.
"""

import argparse
import datetime
import os
import re
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Run as `python images/generate_image.py`, only images/ is on the path: the shared modules are at the root.
sys.path.insert(1, REPO)
from cli import (ArgumentParser, UserError, make_folder, non_negative_float, non_negative_int,  # noqa: E402
                 parse_bool, pick_device, positive_int, run_main)
from downsample import save_png  # noqa: E402  (images/downsample.py: a temporary name, then rename)

DEFAULT_MODEL = "playgroundai/playground-v2.5-1024px-aesthetic"
DEFAULT_PROMPT = "anime-style avatar, totally white background"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def parse_compile(text):
    """--compile: True/False like parse_bool, or "regional"."""
    return "regional" if str(text).strip().lower() == "regional" else parse_bool(text)


def image_side(text):
    """--height, --width: the VAE shrinks the image 8 times, so a multiple of 8."""
    value = positive_int(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"{text} is not a multiple of 8")
    return value


def seed_number(text):
    """--seed: 0 to 2**31 - 1, so that image i's generator seed, seed * 2**32 + i, fits in 63 bits."""
    value = non_negative_int(text)
    if value >= 2**31:
        raise argparse.ArgumentTypeError(f"{text} must be below 2**31 = {2**31}")
    return value


def parse_args(argv=None):
    parser = ArgumentParser(
        description="Generate images of one prompt with playground-v2.5 (or any diffusers text-to-image "
                    "pipeline) as {i}.png; resumable, batched, shardable with torchrun.")
    # the seed's flags
    parser.add_argument("--num_samples", type=non_negative_int, default=50000,
                        help="total number of images in the folder when done (existing ones are kept)")
    parser.add_argument("--image_save_dir", default="images/train_images")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--model_name", default=DEFAULT_MODEL,
                        help="hub id or local folder; a copy in models/<name> is used when present")
    parser.add_argument("--variant", default="fp16", help='weights variant to load; "none" for the default files')
    parser.add_argument("--num_inference_steps", type=positive_int, default=50)
    parser.add_argument("--guidance_scale", type=non_negative_float, default=3.0)
    parser.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu | mps")
    # new
    parser.add_argument("--batch_size", type=positive_int, default=4,
                        help="images per pipeline call: lower it if the GPU runs out of memory, raise it on "
                             "large GPUs (images/bench_playground.py reports peak memory)")
    parser.add_argument("--height", type=image_side, default=1024)
    parser.add_argument("--width", type=image_side, default=1024)
    parser.add_argument("--seed", type=seed_number, default=0, help="image i uses generator seed seed * 2**32 + i")
    parser.add_argument("--local_files_only", type=parse_bool, nargs="?", const=True, default=False,
                        help="never try the network (True/False)")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="auto: fp16 on CUDA (as playground-v2.5 ships), fp32 elsewhere; with bf16 the "
                             "VAE also decodes in bf16 (an fp16 VAE is upcast to fp32 for decoding)")
    parser.add_argument("--compile", type=parse_compile, nargs="?", const=True, default=False,
                        help="torch.compile the UNet (True/False; the first batch, and a smaller last batch, then "
                             "take a minute or two more), or 'regional': compile only its repeated transformer "
                             "blocks, once for all of them (faster to compile)")
    parser.add_argument("--channels_last", type=parse_bool, nargs="?", const=True, default=False,
                        help="channels_last memory format for the UNet")
    parser.add_argument("--save_threads", type=positive_int, default=4, help="threads that encode and write PNGs")
    return parser.parse_args(argv)


def image_seed(seed, index):
    """Generator seed of image `index`: unique per (seed, index) for index < 2**32."""
    return seed * 2**32 + index


def shard(num_samples, rank, world_size):
    """The image indices rank `rank` of `world_size` makes: no overlap, no gap."""
    return list(range(rank, num_samples, world_size))


def image_path(directory, index):
    return os.path.join(directory, f"{index}.png")


def missing(directory, indices):
    return [i for i in indices if not os.path.exists(image_path(directory, i))]


def remove_stale_temporaries(directory, rank, world_size):
    """Temporary files left by a killed run (only this rank's, another rank may be writing its own)."""
    for name in os.listdir(directory):
        match = re.fullmatch(r"\.(\d+)\.png\.\d+\.tmp", name)
        if match and int(match[1]) % world_size == rank:
            os.remove(os.path.join(directory, name))


class PngWriter:
    """Encodes and writes PNGs on background threads: a 1024x1024 PNG takes about 0.2 s of CPU,
    which would otherwise leave the GPU idle. Each file is written to a temporary name and then
    renamed, so a killed run never leaves a truncated {i}.png behind."""

    def __init__(self, directory, threads=4, max_pending=64):
        self.directory = directory
        self.pool = ThreadPoolExecutor(max_workers=threads)
        self.pending = deque()
        self.max_pending = max_pending

    def submit(self, image, index):
        while len(self.pending) >= self.max_pending:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(save_png, image, image_path(self.directory, index)))

    def wait(self):
        while self.pending:
            self.pending.popleft().result()

    def close(self):
        self.wait()
        self.pool.shutdown()


def generate(pipe, indices, writer, *, prompt, seed, batch_size, num_inference_steps, guidance_scale,
             height, width, on_batch=None):
    """Make images `indices` (batch_size per pipeline call) and hand them to `writer`;
    on_batch(n) is called after each call with the number of images it made."""
    for start in range(0, len(indices), batch_size):
        batch = indices[start:start + batch_size]
        # CPU generators: the same starting noise on any device, one generator per image, so an
        # image does not depend on which other images share its batch.
        generators = [torch.Generator("cpu").manual_seed(image_seed(seed, i)) for i in batch]
        images = pipe(prompt=prompt, num_images_per_prompt=len(batch), generator=generators,
                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      height=height, width=width, output_type="pt").images
        # [0, 1] to bytes on the device, rounded as diffusers' PIL output rounds (x * 255, half to
        # even): a quarter of the bytes cross to the CPU, and the CPU makes no pass over floats.
        pixels = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for index, array in zip(batch, pixels):
            writer.submit(Image.fromarray(array), index)
        if on_batch is not None:
            on_batch(len(batch))


def resolve_model(model_name):
    """(where to load from, the local folder under models/ that would be used)."""
    local = os.path.join(REPO, "models", os.path.basename(model_name.rstrip("/")))
    if os.path.isdir(model_name):
        return model_name, local
    if os.path.isfile(os.path.join(local, "model_index.json")):
        return local, local
    return model_name, local


def load_pipeline(model_name, *, variant, dtype, device, local_files_only):
    """The diffusers pipeline with the EDM DPM-Solver++ scheduler, as the seed used it.
    Missing weights end the program with one line that says where to put them."""
    import diffusers
    from diffusers import DiffusionPipeline, EDMDPMSolverMultistepScheduler
    from huggingface_hub.errors import HfHubHTTPError

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    try:
        import transformers
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    source, local = resolve_model(model_name)
    # diffusers renamed torch_dtype to dtype; passing the old name still works but warns.
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
        dtype_keyword = "dtype"
    except ImportError:
        dtype_keyword = "torch_dtype"
    local_dir = os.path.relpath(local)
    local_dir = local if local_dir.startswith("..") else local_dir
    from huggingface_hub import constants
    hf_home = constants.HF_HOME  # where the cache is: $HF_HOME, by default ~/.cache/huggingface
    try:
        pipe = DiffusionPipeline.from_pretrained(
            source, variant=variant, local_files_only=local_files_only, **{dtype_keyword: dtype})
    except (OSError, HfHubHTTPError) as error:
        if os.path.isdir(source):
            raise UserError(f"cannot load the pipeline in {source}: {_first_line(error)}; "
                            "point --model_name at a complete diffusers folder") from None
        raise UserError(
            f"weights for {model_name} not found locally and not downloadable: on a machine with "
            f"network run `hf download {model_name} --local-dir {local_dir}` and copy that folder here "
            f"(or set HF_HOME, now {hf_home}, to a Hugging Face cache that holds it); see models/README.md") from None
    except ValueError as error:
        hint = ' (pass --variant none for the default weight files)' if variant else ''
        raise UserError(f"cannot load {source}: {_first_line(error)}{hint}") from None
    if not isinstance(pipe.scheduler, EDMDPMSolverMultistepScheduler):
        pipe.scheduler = EDMDPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    if getattr(pipe, "watermark", None) is not None:
        pipe.watermark = None  # invisible watermark: costs time, nothing to gain for training data
    pipe.set_progress_bar_config(disable=True)
    if hasattr(pipe, "vae") and hasattr(pipe.vae, "enable_slicing"):
        # One image at a time through the decoder: at 1024x1024 in fp32 (fp16 VAEs are upcast) each
        # image needs several GB of activations, so a whole batch at once would not fit in 16 GB.
        pipe.vae.enable_slicing()
    return pipe.to(device)


def _first_line(error):
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def speed_up(pipe, *, channels_last=False, compile_unet=False):
    """Optional GPU speed-ups of the UNet, which does nearly all of the work. Compiling also fuses
    each attention's q, k, v projections into one matmul and lets inductor run 1x1 convolutions as
    matmuls (the settings of diffusers' SDXL speed-up guide); neither changes the maths.
    compile_unet="regional" compiles only the UNet's repeated transformer blocks (diffusers'
    compile_repeated_blocks), in place: one compilation serves them all."""
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    if compile_unet:
        if hasattr(pipe, "fuse_qkv_projections"):
            pipe.fuse_qkv_projections()
        torch._inductor.config.conv_1x1_as_mm = True
        if compile_unet == "regional":
            pipe.unet.compile_repeated_blocks()
        else:
            pipe.unet = torch.compile(pipe.unet)
    return pipe


def main(argv=None):
    args = parse_args(argv)
    # torchrun sets these; a plain launch is rank 0 of 1.
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(args.device, local_rank)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (
        torch.float16 if device.type == "cuda" else torch.float32)
    variant = None if args.variant.lower() in ("", "none") else args.variant
    distributed = world_size > 1
    if distributed:
        # Only a final barrier is needed (no tensors move), so gloo on any device; the timeout
        # covers ranks that finish days apart when a resumed run left them uneven work.
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))

    make_folder(args.image_save_dir, "--image_save_dir")
    remove_stale_temporaries(args.image_save_dir, rank, world_size)
    mine = shard(args.num_samples, rank, world_size)
    todo = missing(args.image_save_dir, mine)
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    log(f"{args.image_save_dir}: {args.num_samples} images wanted, {len(todo)} to make on rank {rank} "
        f"of {world_size} ({len(mine) - len(todo)} of its {len(mine)} already there)")

    if todo:
        pipe = load_pipeline(args.model_name, variant=variant, dtype=dtype, device=device,
                             local_files_only=args.local_files_only)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
        speed_up(pipe, channels_last=args.channels_last, compile_unet=args.compile)
        log(f"{args.model_name} on {device} in {str(dtype).replace('torch.', '')}, "
            f"{args.num_inference_steps} steps, guidance {args.guidance_scale}, {args.width}x{args.height}, "
            f"batch {args.batch_size}")
        writer = PngWriter(args.image_save_dir, threads=args.save_threads)
        progress = tqdm(total=len(todo), unit="img", disable=rank != 0, dynamic_ncols=True,
                        desc=f"rank 0 of {world_size}" if distributed else "generating")
        started = time.perf_counter()

        def on_batch(n):
            # images per hour of all ranks together: they share the work evenly
            progress.set_postfix_str(
                f"{(progress.n + n) * world_size / (time.perf_counter() - started) * 3600:,.0f} img/h",
                refresh=False)
            progress.update(n)
        try:
            generate(pipe, todo, writer, prompt=args.prompt, seed=args.seed, batch_size=args.batch_size,
                     num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                     height=args.height, width=args.width, on_batch=on_batch)
        except torch.cuda.OutOfMemoryError:
            writer.close()
            raise UserError(f"out of GPU memory at --batch_size {args.batch_size} "
                            f"({args.width}x{args.height}): lower --batch_size; finished images are kept, "
                            "rerun to continue") from None
        writer.close()
        progress.close()

    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        gaps = missing(args.image_save_dir, range(args.num_samples))
        if gaps:
            raise UserError(f"{len(gaps)} of {args.num_samples} images missing in --image_save_dir "
                            f"{args.image_save_dir} (first: {gaps[0]}.png): rerun to make them")
        print(f"{args.image_save_dir}: all {args.num_samples} images present")


if __name__ == "__main__":
    run_main(main)
