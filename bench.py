"""Training and sampling throughput on one GPU, against the seed and diffusers, in one run.

    python bench.py --out generated/bench            # on a CUDA GPU; prints a table, writes bench.json

Rows:
  (1) the seed as it trained: preset seed, fp32 (TF32 convolutions), a plain eager loop that reads
      the loss back every step, Adam, batch 230;
  (2) diffusers' UNet2DModel with its DDPM CIFAR-10 configuration, bf16 autocast + channels_last, batch 256;
  (3) train.py's own training step (make_train_step) with preset seed, batch 230;
  (4) train.py's own training step with preset default, batch 230.
  (5) with --loop_minutes M: train.py's whole loop (data, logging, validation, checkpoints) for M
      minutes on the default data set, against (4).
FLOPs are counted by torch's FlopCounterMode on one eager training step (forward + backward).
Also: samples per second with the default network through generate.py's own path, for DPM-Solver-20
(eager and compiled), DPM-Solver-25 (preset default's), DDIM-100 and DDPM-1000; the card's measured bf16 matrix-multiply peak; and with
--profile, where the GPU time of (4) and of one sampling step goes (torch.profiler). --layouts
forced contiguous also times (4) with other activation layouts (see ours()).
"""
import dataclasses
import json
import os
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from cli import ArgumentParser, UserError, atomic_write, make_folder, non_negative_float, positive_int, run_main
from config import make_config
from diffusion import sample_alpha_bar, training_loss
from generate import generate_images
from plot_log import read_log
from train import make_ema, make_optimizer, make_train_step, set_precision
from unet import UNet


def timed(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def flops_of(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(n=8192, dtype=torch.bfloat16):
    """The card's measured matrix-multiply rate in FLOP/s: the peak that "% of peak" refers to."""
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    seconds = timed(lambda: a @ b, warmup=3, iters=20)
    return 2 * n ** 3 / seconds


def batch_for(config, batch_size, device):
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.rand(batch_size, 3, 32, 32, device=device, generator=g) * 2 - 1
    return x0, torch.randn(x0.shape, device=device, generator=g), sample_alpha_bar(config, batch_size, device, g)


def seed_as_it_trained(batch_size, iters):
    """(1): the seed's loop: eager fp32, Adam, the loss read back every step."""
    config = make_config("seed")
    model = UNet(config).cuda()
    optimizer = make_optimizer(model, config, fused=False)  # the seed's: Adam at 1e-5
    x0, eps, alpha_bar = batch_for(config, batch_size, "cuda")

    def step():
        loss = training_loss(model, x0, eps, alpha_bar, config)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    return measure("(1) seed as it trained: fp32, eager, Adam", step, batch_size, iters)


def diffusers_peer(batch_size, iters):
    """(2): diffusers' UNet2DModel, DDPM CIFAR-10 configuration (google/ddpm-cifar10-32), bf16."""
    from diffusers import UNet2DModel
    model = UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), dropout=0.1,
    ).cuda().to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4, fused=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    x0 = torch.randn(batch_size, 3, 32, 32, device="cuda", generator=g)
    eps = torch.randn_like(x0)
    t = torch.randint(0, 1000, (batch_size,), device="cuda", generator=g)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = (model(x0 + eps, t).sample.float() - eps).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    row = measure("(2) diffusers UNet2DModel (DDPM CIFAR-10), bf16", step, batch_size, iters)
    row["parameters"] = sum(p.numel() for p in model.parameters())
    return row


LAYOUTS = {  # --layouts: how the default network's activations are laid out in the compiled step
    "channels_last": "bf16 + channels_last + compile",  # train.py's
    "forced": "bf16 + channels_last + compile, inductor's channels_last layout forced",
    "contiguous": "bf16 + compile, no channels_last",
}


STEADY = 10 ** 6  # a step long past warm-up, where the EMA has its full decay


def ours(preset, batch_size, iters, layout="channels_last", profile_to=None):
    """(3), (4): exactly train.py's step: make_train_step with bf16, channels_last, EMA, compile.

    Other layouts are experiments: torch.compile keeps a training graph in NCHW when a convolution
    has at least twice as many input as output channels (a UNet's decoder), whatever the weights'
    layout; "forced" overrides that heuristic, "contiguous" drops channels_last altogether."""
    config = make_config(preset, [f"batch_size={batch_size}"])
    memory_format = torch.contiguous_format if layout == "contiguous" else torch.channels_last
    model = UNet(config).cuda().to(memory_format=memory_format)
    ema = make_ema(model, config)
    optimizer = make_optimizer(model, config, fused=True)
    train_model = torch.compile(model, options={"force_layout_optimization": True} if layout == "forced" else None)
    step_fn = make_train_step(train_model, model, ema, optimizer, config, torch.bfloat16)
    x0, eps, alpha_bar = batch_for(config, batch_size, "cuda")
    x0 = x0.contiguous(memory_format=memory_format)
    flops = flops_of(lambda: make_train_step(model, model, ema, optimizer, config, torch.bfloat16)(x0, eps, alpha_bar, STEADY))
    label = ("3" if preset == "seed" else "4") + {"channels_last": "", "forced": "b", "contiguous": "c"}[layout]
    row = measure(f"({label}) train.py step, preset {preset}, {LAYOUTS[layout]}",
                  lambda: step_fn(x0, eps, alpha_bar, STEADY), batch_size, iters, flops=flops)
    row["parameters"] = sum(p.numel() for p in model.parameters())
    if profile_to:
        profile(lambda: step_fn(x0, eps, alpha_bar, STEADY), profile_to)
    return row


def measure(name, step, batch_size, iters, flops=None):
    torch.cuda.reset_peak_memory_stats()
    if flops is None:
        flops = flops_of(step)
    seconds = timed(step, warmup=5, iters=iters)
    row = dict(name=name, batch_size=batch_size, img_per_s=batch_size / seconds, step_ms=1e3 * seconds,
               gflop_per_image=flops / batch_size / 1e9, tflops=flops / seconds / 1e12,
               peak_memory_gib=torch.cuda.max_memory_allocated() / 2 ** 30)
    print(f"  {name}: {row['img_per_s']:,.0f} img/s, {row['tflops']:.0f} TFLOP/s, "
          f"{row['peak_memory_gib']:.1f} GiB", flush=True)
    return row


def sampling_speed(sampler, steps, num_images, batch_size, compile):
    """generate.py's own path (generate_images), preset default, random weights. A warm-up call (one
    batch, two steps) pays for compiling, which the timed call then reuses."""
    config = dataclasses.replace(make_config("default"), sampler=sampler, sampling_steps=steps)
    model = UNet(config).cuda().sampling_mode()
    if compile == "on":  # compile once, here, so that warm-up and timed call share it
        model = torch.compile(model.to(memory_format=torch.channels_last), dynamic=False)
    run = lambda n, config: generate_images(model, config, n, batch_size=batch_size, device="cuda", progress=False)
    run(batch_size, dataclasses.replace(config, sampling_steps=2))
    seconds = timed(lambda: run(num_images, config), warmup=0, iters=1)
    name = f"sampling {sampler}-{steps}, preset default, batch {batch_size}, {'compiled' if compile == 'on' else 'eager'}"
    print(f"  {name}: {num_images / seconds:,.0f} samples/s", flush=True)
    return dict(name=name, num_images=num_images, seconds=seconds, samples_per_s=num_images / seconds)


def loop_speed(minutes, out, bare_img_per_s):
    """(5): train.py's whole loop, preset default, for `minutes` on the default data set, against
    the bare step (4). The first 50-step window (compiling) is left out; the others are split by
    whether they held a validation or a checkpoint (loop_windows)."""
    run_dir = os.path.join(out, "loop_run")
    command = [sys.executable, "train.py", "--max_minutes", str(minutes), "--model_checkpoint_dir", run_dir, "--fresh",
               "--no_visdom", "--compile", "whole", "--batch_size", "230"]
    print(f"  (5) {' '.join(command[1:])}", flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    row = loop_windows(os.path.join(run_dir, "log.jsonl"))
    row.update(name=f"(5) train.py loop, preset default, {minutes:g} minutes", batch_size=230,
               vs_bare_step=row["img_per_s"] / bare_img_per_s if bare_img_per_s else None)
    print(f"  {row['name']}: {row['img_per_s']:,.0f} img/s, {row['vs_bare_step'] or float('nan'):.0%} of (4)", flush=True)
    return row


def loop_windows(log_path):
    """A train.py log's img/s over its 50-step windows after the first, and per window kind: quiet,
    or holding a validation or a checkpoint (the records between two train records)."""
    records = read_log(log_path)
    windows, events = [], []
    for r in records:
        if r["kind"] == "train":
            windows.append(dict(step=r["step"], img_per_s=r["img_per_s"], events=events))
            events = []
        elif r["kind"] in ("validation", "checkpoint"):
            events = events + [r["kind"]]
    trains = [r for r in records if r["kind"] == "train"]
    images = trains[-1]["images_seen"] - trains[0]["images_seen"]
    seconds = trains[-1]["time"] - trains[0]["time"]
    by_kind = {}
    for w in windows[1:]:
        kind = "+".join(sorted(set(w["events"]))) or "quiet"
        by_kind.setdefault(kind, []).append(w["img_per_s"])
    return dict(img_per_s=images / seconds, windows=len(windows) - 1,
                window_img_per_s={kind: dict(count=len(v), mean=sum(v) / len(v), min=min(v)) for kind, v in by_kind.items()})


def profile(fn, path, steps=5):
    """Where the GPU time of fn goes: the top kernels, and a summary by kind, written to path."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in kernels) or 1.0
    kinds = {}
    for e in kernels:
        kind = kernel_kind(e.key)
        kinds[kind] = kinds.get(kind, 0.0) + e.self_device_time_total
    with atomic_write(path, "w") as f:
        f.write(f"GPU time per call: {total / steps / 1e3:.2f} ms\n\nby kind:\n")
        for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1]):
            f.write(f"  {kind:<40} {100 * us / total:5.1f}%  {us / steps / 1e3:7.2f} ms\n")
        f.write("\ntop kernels:\n")
        for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:40]:
            f.write(f"  {100 * e.self_device_time_total / total:5.1f}%  x{e.count // steps:<4} {e.key[:150]}\n")
    print(f"  profile written to {path}", flush=True)


def kernel_kind(name):
    """A CUDA kernel's kind, from its name. Triton kernels come first: torch.compile names them after
    every op they fuse, so a bias add fused after a convolution has "convolution" in its name."""
    name = name.lower()
    if name.startswith("triton"):
        return "fused by torch.compile (norms, activations, dropout)"
    if "flash" in name or "fmha" in name or "attention" in name or "sdpa" in name:
        return "attention"
    if any(k in name for k in ("gemm", "conv", "cutlass", "xmma", "wgrad", "dgrad", "sm90_", "nvjet", "cudnn")):
        return "convolution / matrix multiply (cuDNN, cuBLAS)"
    if any(k in name for k in ("adam", "foreach", "multi_tensor")):
        return "optimizer and EMA"
    if "copy" in name:
        return "copies (layout changes)"
    return "other"


def write_outputs(results, out):
    """The table and JSON so far: written after every measurement, so a time-out loses nothing."""
    rows = {r["name"][:3]: r for r in results["rows"]}
    peak = results["bf16_matmul_peak_tflops"]
    lines = [f"Card: {results['card']}; torch {results['torch']}; {results['date']}; bf16 matmul peak {peak:.0f} TFLOP/s", "",
             "| what | batch | img/s | GFLOP/img | TFLOP/s | % of bf16 peak | peak memory GiB | vs (1) | vs (2) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        vs1 = r["img_per_s"] / rows["(1)"]["img_per_s"] if "(1)" in rows else float("nan")
        vs2 = r["img_per_s"] / rows["(2)"]["img_per_s"] if "(2)" in rows else float("nan")
        lines.append(f"| {r['name']} | {r['batch_size']} | {r['img_per_s']:,.0f} | {r['gflop_per_image']:.1f} | "
                     f"{r['tflops']:.0f} | {100 * r['tflops'] / peak:.0f}% | {r['peak_memory_gib']:.1f} | "
                     f"{vs1:.2f}x | {vs2:.2f}x |")
    if "loop" in results:
        loop = results["loop"]
        lines += ["", f"{loop['name']}: {loop['img_per_s']:,.0f} img/s over {loop['windows']} windows of 50 steps "
                      f"after the first, {loop['vs_bare_step'] or float('nan'):.0%} of (4)"]
        lines += [f"- windows with {kind}: {w['count']}, mean {w['mean']:,.0f} img/s, lowest {w['min']:,.0f}"
                  for kind, w in loop["window_img_per_s"].items()]
    lines.append("")
    for s in results["sampling"]:
        lines.append(f"- {s['name']}: {s['samples_per_s']:,.0f} samples/s "
                     f"(50,000 samples in {50000 / s['samples_per_s']:.0f} s)")
    table = "\n".join(lines)
    with atomic_write(os.path.join(out, "bench.json"), "w") as f:
        json.dump(results, f, indent=1)
    with atomic_write(os.path.join(out, "bench.md"), "w") as f:
        f.write(table + "\n")
    return table


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="generated/bench")
    parser.add_argument("--iters", type=positive_int, default=30, help="timed steps per row")
    parser.add_argument("--sample_images", type=positive_int, default=5000, help="images per sampling measurement")
    parser.add_argument("--sample_batch", type=positive_int, default=1000, help="images sampled at once")
    parser.add_argument("--profile", action="store_true", help="also write torch.profiler summaries of (4) and of sampling")
    parser.add_argument("--layouts", nargs="*", default=[], choices=["forced", "contiguous"],
                        help="also time (4) with other activation layouts (see ours())")
    parser.add_argument("--loop_minutes", type=non_negative_float, default=0,
                        help="also run train.py's loop this long on the default data set, against (4) (0: skip)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise UserError("bench.py measures a CUDA GPU and none is visible")
    set_precision("bf16", torch.device("cuda"))  # train.py's: TF32 and cuDNN's autotuner
    make_folder(args.out, "--out")
    card = torch.cuda.get_device_name()
    print(f"{card}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}", flush=True)

    results = dict(card=card, torch=torch.__version__, date=time.strftime("%Y-%m-%d"), rows=[], sampling=[])
    results["bf16_matmul_peak_tflops"] = matmul_peak() / 1e12
    print(f"  bf16 matmul peak: {results['bf16_matmul_peak_tflops']:.0f} TFLOP/s", flush=True)
    profile_to = lambda layout: args.profile and os.path.join(args.out, f"profile_train_default_{layout}.txt")
    rows = [lambda: seed_as_it_trained(230, args.iters), lambda: diffusers_peer(256, args.iters),
            lambda: ours("seed", 230, args.iters), lambda: ours("default", 230, args.iters, profile_to=profile_to("channels_last"))]
    rows += [lambda layout=layout: ours("default", 230, args.iters, layout, profile_to(layout)) for layout in args.layouts]
    for make_row in rows:
        try:
            results["rows"].append(make_row())
        except Exception as e:  # one failing row must not lose the others
            print(f"  row failed: {type(e).__name__}: {e}", flush=True)
        torch.cuda.empty_cache()
        write_outputs(results, args.out)
    if args.loop_minutes:
        bare = next((r["img_per_s"] for r in results["rows"] if r["name"].startswith("(4)")), None)
        results["loop"] = loop_speed(args.loop_minutes, args.out, bare)
        write_outputs(results, args.out)
    b, n = args.sample_batch, args.sample_images
    for sampler, steps, num_images, compile in (("dpm", 20, n, "off"), ("dpm", 20, n, "on"), ("dpm", 25, n, "on"),
                                                ("ddim", 100, n // 5, "on"), ("ddpm", 1000, b, "on")):
        try:
            results["sampling"].append(sampling_speed(sampler, steps, num_images, b, compile))
        except Exception as e:
            print(f"  sampling failed: {type(e).__name__}: {e}", flush=True)
        write_outputs(results, args.out)
    if args.profile:
        config = make_config("default")
        model = torch.compile(UNet(config).cuda().to(memory_format=torch.channels_last).sampling_mode(), dynamic=False)
        x, alpha_bar = torch.randn(b, 3, 32, 32, device="cuda"), torch.full((b,), 0.5, device="cuda")

        def forward():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                model(x, alpha_bar)
        profile(forward, os.path.join(args.out, "profile_sampling_forward.txt"))

    print(write_outputs(results, args.out))


if __name__ == "__main__":
    run_main(main)

