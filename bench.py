"""Training and sampling throughput on one GPU, or on the CPU, against the seed and diffusers, in one run.

    python bench.py --out generated/bench            # on a CUDA GPU; prints a table, writes bench.json
    python bench.py --device cpu                     # the CPU's table: docs/bench_cpu.md (cpu_main)

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


def seed_style_step(config, batch_size, device):
    """The seed's way of training a network of `config`: eager fp32, contiguous, its optimiser,
    the loss read back every step."""
    model = UNet(config).to(device)
    optimizer = make_optimizer(model, config, fused=False)
    x0, eps, alpha_bar = batch_for(config, batch_size, device)

    def step():
        loss = training_loss(model, x0, eps, alpha_bar, config)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def seed_as_it_trained(batch_size, iters):
    """(1): the seed's loop: eager fp32, Adam at 1e-5, the loss read back every step."""
    step = seed_style_step(make_config("seed"), batch_size, "cuda")
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
    if len(trains) < 2:
        raise UserError(f"{log_path}: the loop logged {len(trains)} window of steps; run it longer (--loop_minutes)")
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


# ---- the CPU: bash bench.sh --device cpu ----------------------------------------------------------

CPU_WIDTHS = ((16, 32, 32, 32), (32, 64, 64, 64))  # preset tiny's, and one wider
CPU_BATCH = 64


def cpu_timed(fn, warmup=2, iters=10):
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def conv_rate(dtype=torch.bfloat16):
    """The CPU's measured rate of one 3x3 convolution in FLOP/s, forward, batch 64 at 32x32: the
    best of 32, 64 and 128 channels and of both layouts. The rate "% of conv" refers to."""
    best = 0.0
    with torch.no_grad():
        for channels in (32, 64, 128):
            for memory_format in (torch.contiguous_format, torch.channels_last):
                conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(dtype=dtype, memory_format=memory_format)
                x = torch.randn(CPU_BATCH, channels, 32, 32, dtype=dtype).contiguous(memory_format=memory_format)
                seconds = cpu_timed(lambda: conv(x), warmup=2, iters=10)
                best = max(best, 2 * CPU_BATCH * channels * channels * 9 * 32 * 32 / seconds)
    return best


def cpu_row(name, step, iters, conv_peak, flops=None, **extra):
    flops = flops or flops_of(step)
    seconds = cpu_timed(step, warmup=2, iters=iters)
    row = dict(name=name, batch_size=CPU_BATCH, img_per_s=CPU_BATCH / seconds, step_ms=1e3 * seconds,
               gflop_per_image=flops / CPU_BATCH / 1e9, tflops=flops / seconds / 1e12, **extra)
    row["conv_share"] = row["tflops"] * 1e12 / conv_peak
    print(f"  {name}: {row['img_per_s']:,.0f} img/s, {row['tflops']:.3f} TFLOP/s, {row['conv_share']:.0%} of conv",
          flush=True)
    return row


def tiny_at(channels):
    return make_config("tiny", [f"channels={tuple(channels)}", f"batch_size={CPU_BATCH}"])


def cpu_seed_style(channels, iters, conv_peak):
    """The seed's way of training (seed_style_step), at this width."""
    step = seed_style_step(tiny_at(channels), CPU_BATCH, "cpu")
    return cpu_row(f"seed-style loop step, {channels}, fp32 eager", step, iters, conv_peak, width=list(channels),
                   precision="fp32")


def cpu_diffusers(channels, precision, iters, conv_peak):
    """diffusers' UNet2DModel at our width (ResBlocks, no attention, as preset tiny), trained with
    the recipe of diffusers' train_unconditional.py: AdamW 1e-4 (betas 0.95, 0.999, weight decay
    1e-6), gradient clipping at 1, EMA (EMAModel, decay 0.9999, power 3/4), the DDPM scheduler's
    timesteps; bf16 as accelerate's mixed precision does it, with autocast."""
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel
    model = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                        block_out_channels=tuple(channels), norm_num_groups=16,
                        down_block_types=("DownBlock2D",) * 4, up_block_types=("UpBlock2D",) * 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(CPU_BATCH, 3, 32, 32, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (CPU_BATCH,), generator=g)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step():
        noisy = scheduler.add_noise(x0, eps, t)
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = (model(noisy, t).sample.float() - eps).square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(model.parameters())
        return loss.detach()

    return cpu_row(f"diffusers UNet2DModel, {channels}, {precision} eager, its recipe", step, iters, conv_peak,
                   width=list(channels), precision=precision, parameters=sum(p.numel() for p in model.parameters()))


def cpu_ours(channels, plan, compiled, iters, conv_peak, label):
    """train.py's own step (make_train_step) at this width, in `plan`'s precision and layout, eager
    or compiled whole; its steady speed goes into the ledger that train.py's compile_plan reads."""
    from speed import CompileLedger
    config = tiny_at(channels)
    model = plan.apply(UNet(config))
    ema = make_ema(model, config)
    optimizer = make_optimizer(model, config, fused=False)
    ledger = CompileLedger(model, "cpu", CPU_BATCH, plan)
    flops = flops_of(lambda: make_train_step(model, model, ema, optimizer, config, plan.autocast_dtype)(
        *batch_for(config, CPU_BATCH, "cpu"), STEADY))
    train_model = torch.compile(model) if compiled else model
    step = ledger.timing(make_train_step(train_model, model, ema, optimizer, config, plan.autocast_dtype),
                         "whole" if compiled else "off")
    x0, eps, alpha_bar = batch_for(config, CPU_BATCH, "cpu")
    started = time.perf_counter()
    step(x0, eps, alpha_bar, STEADY)  # compiles
    first = time.perf_counter() - started
    return cpu_row(f"{label}, {channels}, {plan.precision} {plan.layout}, {'compiled' if compiled else 'eager'}",
                   lambda: step(x0, eps, alpha_bar, STEADY), iters, conv_peak, flops=flops, width=list(channels),
                   precision=plan.precision, first_step_s=first)


def cpu_loop(channels, minutes, out, extra, label, flops_per_image, conv_peak):
    """train.py's whole loop at this width, batch 64, on the default data set, for `minutes`: its
    img/s over the 50-step windows after the first (loop_windows), and what its plan chose."""
    run_dir = os.path.join(out, f"loop_{'_'.join(map(str, channels))}_{label.split()[0]}")
    command = [sys.executable, "train.py", "--preset", "tiny", "--set", f"channels={tuple(channels)}",
               "--batch_size", str(CPU_BATCH), "--max_minutes", str(minutes), "--model_checkpoint_dir", run_dir,
               "--fresh", "--no_visdom", *extra]
    print(f"  {' '.join(command[1:])}", flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    row = loop_windows(os.path.join(run_dir, "log.jsonl"))
    plan = next(r for r in read_log(os.path.join(run_dir, "log.jsonl")) if r["kind"] == "plan")
    name = f"train.py loop, {channels}, {label}: {plan['precision']} {plan['layout']}, compile {plan['compile']}"
    row.update(name=name, batch_size=CPU_BATCH, width=list(channels), tflops=row["img_per_s"] * flops_per_image / 1e12,
               plan=plan, flags=extra, precision=plan["precision"])
    row["conv_share"] = row["tflops"] * 1e12 / conv_peak
    print(f"  {name}: {row['img_per_s']:,.0f} img/s", flush=True)
    return row


def cpu_sampling(channels, num_images, compile, steps=25):
    """generate.py's own path (generate_images, its default CPU batch and auto plan), eager or with
    its --compile auto: DPM-Solver steps for num_images samples of a random network of this width.
    A compile is timed in (the cache is warm after the first run of the bench)."""
    from generate import sampling_compile
    from speed import CompileLedger, choose_plan, sampling_batch
    config = dataclasses.replace(tiny_at(channels), sampler="dpm", sampling_steps=steps)
    model = UNet(config).sampling_mode()
    plan = choose_plan("auto", config, "cpu", sampling_batch("cpu"), kind="sample")
    compiled, why = sampling_compile(compile, config, num_images, sampling_batch("cpu"), torch.device("cpu"), plan,
                                     CompileLedger(model, "cpu", sampling_batch("cpu"), plan, kind="sample"))
    started = time.perf_counter()
    generate_images(model, config, num_images, progress=False, plan=plan, compile=compile)
    seconds = time.perf_counter() - started
    row = dict(name=f"sampling dpm-{steps}, {channels}, batch {sampling_batch('cpu')}, {plan.precision} {plan.layout}, "
                    f"--compile {compile}: {'compiled' if compiled else 'eager'}", width=list(channels), num_images=num_images,
               compile_why=why, seconds=seconds, samples_per_s=num_images / seconds, evaluations_per_s=num_images * steps / seconds)
    print(f"  {row['name']}: {row['evaluations_per_s']:,.0f} network evaluations/s, {seconds:.0f} s for "
          f"{num_images:,} samples", flush=True)
    return row


def cpu_profile(channels, plan, path, steps=3):
    """Where the CPU time of train.py's eager step in the probe's plan goes: torch.profiler's
    operators by self CPU time, written to path."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    config = tiny_at(channels)
    model = plan.apply(UNet(config))
    step = make_train_step(model, model, make_ema(model, config), make_optimizer(model, config, fused=False), config,
                           plan.autocast_dtype)
    x0, eps, alpha_bar = batch_for(config, CPU_BATCH, "cpu")
    step(x0, eps, alpha_bar, STEADY)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(x0, eps, alpha_bar, STEADY)
    with atomic_write(path, "w") as f:
        f.write(f"train.py's step, preset tiny at {channels}, batch {CPU_BATCH}, {plan.precision} {plan.layout}, eager; "
                f"{steps} steps\n\n")
        f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25) + "\n")
    print(f"  profile written to {path}", flush=True)


def write_cpu_outputs(results, path):
    """docs/bench_cpu.md (and bench_cpu.json beside it): the table so far, after every row."""
    lines = [f"CPU: {results['cpu']} ({results['threads']} threads; flags: {', '.join(results['flags']) or 'none'}); "
             f"torch {results['torch']}; {results['date']}; `bash bench.sh --device cpu`", "",
             f"One bf16 3x3 convolution (forward, batch 64 at 32x32, best of 32/64/128 channels and both layouts): "
             f"{results['conv_tflops']:.2f} TFLOP/s. Every row is batch {CPU_BATCH}.", "",
             "| what | img/s | TFLOP/s | % of conv | vs seed-style | vs diffusers, same precision |",
             "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        same = [d for d in results["rows"] if d["name"].startswith("diffusers") and d["width"] == r["width"]
                and d["precision"] == r["precision"]]
        seed = [d for d in results["rows"] if d["name"].startswith("seed-style") and d["width"] == r["width"]]
        vs = lambda rows: f"{r['img_per_s'] / rows[0]['img_per_s']:.2f}x" if rows else ""
        lines.append(f"| {r['name']} | {r['img_per_s']:,.0f} | {r['tflops']:.3f} | {r['conv_share']:.0%} | "
                     f"{vs(seed)} | {vs(same)} |")
    for r in results["ratios"]:
        lines.append(f"\n{r}")
    lines.append("")
    for s in results["sampling"]:
        lines.append(f"- {s['name']}: {s['evaluations_per_s']:,.0f} network evaluations/s; {s['seconds']:.0f} s for "
                     f"{s['num_images']:,} samples")
    with atomic_write(path.replace(".md", ".json"), "w") as f:
        json.dump(results, f, indent=1)
    with atomic_write(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


def cpu_main(args):
    from speed import choose_plan, cpu_info
    name, flags = cpu_info()
    results = dict(cpu=name, threads=torch.get_num_threads(), flags=sorted(flags & {"amx_bf16", "amx_tile", "avx512_bf16",
                                                                                        "avx512f", "bf16"}),
                   torch=torch.__version__, date=time.strftime("%Y-%m-%d"), rows=[], ratios=[], sampling=[])
    results["conv_tflops"] = conv_rate() / 1e12
    print(f"{name}, {results['threads']} threads, torch {torch.__version__}; bf16 conv "
          f"{results['conv_tflops']:.2f} TFLOP/s", flush=True)
    path = args.out if args.out.endswith(".md") else os.path.join(args.out, "bench_cpu.md")
    make_folder(os.path.dirname(path) or ".", "--out")
    peak = results["conv_tflops"] * 1e12
    from speed import Plan
    for channels in CPU_WIDTHS:
        config = tiny_at(channels)
        plan = choose_plan("auto", config, "cpu", CPU_BATCH)
        rows = [lambda: cpu_seed_style(channels, args.iters, peak)]
        rows += [lambda p=p: cpu_diffusers(channels, p, args.iters, peak) for p in ("fp32", "bf16")]
        rows += [lambda p=p: cpu_ours(channels, Plan(p, False, "bench"), False, args.iters, peak, "our step")
                 for p in ("fp32", "bf16")]
        rows += [lambda: cpu_ours(channels, plan, False, args.iters, peak, "our step, the probe's plan"),
                 lambda: cpu_ours(channels, plan, True, args.iters, peak, "our step as train.py compiles it")]
        for make_row in rows:
            try:
                results["rows"].append(make_row())
            except Exception as e:  # one failing row must not lose the others
                print(f"  row failed: {type(e).__name__}: {e}", flush=True)
            write_cpu_outputs(results, path)
        cpu_profile(channels, plan, path.replace(".md", f"_profile_{'_'.join(map(str, channels))}.txt"))
        flops = next(r["gflop_per_image"] for r in results["rows"] if r["width"] == list(channels)) * 1e9
        if args.loop_minutes:
            for extra, label in ((["--precision", "fp32", "--layout", "contiguous", "--compile", "off"],
                                  "fp32 eager contiguous (the old --precision auto)"),
                                 ([], "defaults (--precision auto --compile auto)")):
                results["rows"].append(cpu_loop(channels, args.loop_minutes, os.path.join(args.out_runs, "bench_cpu_runs"),
                                                extra, label, flops, peak))
                write_cpu_outputs(results, path)
            old, new = results["rows"][-2], results["rows"][-1]
            peer = [r for r in results["rows"] if r["name"].startswith("diffusers") and r["width"] == list(channels)
                    and r["precision"] == new["precision"]]
            results["ratios"].append(
                f"{channels}: train.py's loop with its defaults is {new['img_per_s'] / old['img_per_s']:.2f}x the "
                f"same loop in fp32 eager (target 2.5x), and {new['img_per_s'] / peer[0]['img_per_s']:.2f}x diffusers' "
                f"UNet2DModel in {new['precision']} (target 1.5x).")
        for compile in ("off", "on", "auto"):
            results["sampling"].append(cpu_sampling(channels, args.sample_images, compile))
            write_cpu_outputs(results, path)
        if args.loop_minutes:
            loop = results["rows"][-1]["img_per_s"]
            results["ratios"].append(f"{channels}: sampling runs {results['sampling'][-1]['evaluations_per_s'] / loop:.2f}x "
                                     f"as many network evaluations per second as the loop trains images (target 2.5x).")
        write_cpu_outputs(results, path)
    print(write_cpu_outputs(results, path))


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: the CPU's table instead (cpu_main), written to docs/bench_cpu.md")
    parser.add_argument("--out", default="generated/bench", help="folder (on the CPU: the .md file to write)")
    parser.add_argument("--iters", type=positive_int, default=None, help="timed steps per row (default 30; CPU 10)")
    parser.add_argument("--sample_images", type=positive_int, default=None,
                        help="images per sampling measurement (default 5,000; on the CPU 2,000)")
    parser.add_argument("--sample_batch", type=positive_int, default=1000, help="images sampled at once")
    parser.add_argument("--profile", action="store_true", help="also write torch.profiler summaries of (4) and of sampling")
    parser.add_argument("--layouts", nargs="*", default=[], choices=["forced", "contiguous"],
                        help="also time (4) with other activation layouts (see ours())")
    parser.add_argument("--loop_minutes", type=non_negative_float, default=None,
                        help="also run train.py's loop this long on the default data set, against (4) (0: skip; "
                             "default 0, on the CPU 2)")
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    args.sample_images = args.sample_images or (2000 if cpu else 5000)
    args.iters = args.iters or (10 if cpu else 30)
    args.loop_minutes = (2 if cpu else 0) if args.loop_minutes is None else args.loop_minutes
    if args.device == "cpu":
        args.out = args.out if args.out != "generated/bench" else "docs/bench_cpu.md"
        args.out_runs = "generated"
        return cpu_main(args)
    if not torch.cuda.is_available():
        raise UserError("bench.py measures a CUDA GPU and none is visible")
    set_precision(torch.device("cuda"))  # train.py's: TF32 and cuDNN's autotuner
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

