"""What a training run costs on this machine, measured by running train.py: compile time, and runs per GPU-hour.

    python tools/run_costs.py compile --out generated/run_costs          # time to the first 50 steps
    python tools/run_costs.py concurrency --out generated/run_costs      # runs per GPU-hour, 1 to 4 at once

compile: train.py with --compile off, whole and regional, each twice: first with an empty compile
cache (a fresh TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR), then again with the cache the first
run filled. Each run trains --steps steps (default 300) from scratch; the table gives the seconds to
the first 50 steps (train.py's log: training time at step 50, so start-up and data loading are not
in it) and the steady img/s of the windows after the first. These are the numbers behind
train.py's --compile auto (compile_plan).

concurrency: K = 1, 2, 3, 4 training processes started together on one GPU, each with its own run
folder and its own copy of the data on the card, each training --kimg thousand images (default:
the ablation study's budget). Runs per GPU-hour = K x 3600 / (seconds until the last one ends).
The ablation runner runs this many at once per GPU (ablate.py's RUNS_PER_GPU). On the CPU
(--device cpu) each of the K processes gets cores / K threads (OMP_NUM_THREADS), as ablate.py gives
them, and the table is runs per CPU-hour (ablate.py's RUNS_PER_CPU).

Both write a markdown table (run_costs_<part>.md) and every number (run_costs_<part>.json) into --out.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, REPO)

from cli import ArgumentParser, UserError, atomic_write, make_folder, non_negative_float, positive_int, run_main  # noqa: E402
from plot_log import read_log  # noqa: E402


def train(run_dir, args, extra, env=None, wait=True):
    """train.py as a subprocess in a fresh run folder; its stdout and stderr go to run_dir/train.out."""
    os.makedirs(run_dir, exist_ok=True)
    command = [sys.executable, os.path.join(REPO, "train.py"), "--model_checkpoint_dir", run_dir, "--fresh",
               "--no_visdom", "--preset", args.preset, "--device", args.device, "--log_every", "50",
               "--validate_every", "100000", "--save_every", "100000",
               "--train_dataset_directory", args.train_dir, "--validate_dataset_directory", args.val_dir,
               "--precision", args.precision,
               *[a for s in args.set for a in ("--set", s)], *map(str, extra)]
    with open(os.path.join(run_dir, "train.out"), "w") as out:
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    if not wait:
        return proc
    if proc.wait() != 0:
        raise UserError(f"train.py failed in {run_dir}: see {run_dir}/train.out")
    return proc


def train_records(run_dir):
    return [r for r in read_log(os.path.join(run_dir, "log.jsonl")) if r["kind"] == "train"]


def measure_compile(args):
    rows = []
    for mode in args.modes.split(","):
        cache = tempfile.mkdtemp(prefix=f"compile_cache_{mode}_")  # empty: a cold start
        env = {"TORCHINDUCTOR_CACHE_DIR": os.path.join(cache, "inductor"), "TRITON_CACHE_DIR": os.path.join(cache, "triton")}
        for warmth in ("cold", "warm"):
            run_dir = os.path.join(args.out, f"compile_{mode}_{warmth}")
            train(run_dir, args, ["--compile", mode, "--max_steps", args.steps], env)
            records = train_records(run_dir)
            first = next(r for r in records if r["step"] >= 50)
            steady = [r["img_per_s"] for r in records[1:]]
            rows.append(dict(mode=mode, cache=warmth if mode != "off" else "-", first_50_steps_s=first["time"],
                             steady_img_per_s=statistics.median(steady) if steady else None, steps=records[-1]["step"]))
            print(rows[-1], flush=True)
            if mode == "off":
                break  # nothing to cache
    table = ["| --compile | cache | time to the first 50 steps | steady img/s (median of 50-step windows) |",
             "|---|---|---|---|"]
    table += [f"| {r['mode']} | {r['cache']} | {r['first_50_steps_s']:.1f} s | "
              f"{r['steady_img_per_s']:,.0f} |" if r["steady_img_per_s"] else
              f"| {r['mode']} | {r['cache']} | {r['first_50_steps_s']:.1f} s | - |" for r in rows]
    return rows, table


def measure_concurrency(args):
    rows = []
    for k in map(int, args.processes.split(",")):
        started = time.time()
        threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // k))} if args.device == "cpu" else {}
        procs = [train(os.path.join(args.out, f"concurrent_{k}_{i}"), args,
                       ["--max_kimg", args.kimg, "--seed", i, "--compile", args.compile], env=threads, wait=False)
                 for i in range(k)]
        failed = [i for i, p in enumerate(procs) if p.wait() != 0]
        seconds = time.time() - started
        if failed:
            raise UserError(f"train.py failed with {k} processes at once: see {args.out}/concurrent_{k}_{failed[0]}/train.out")
        last = [train_records(os.path.join(args.out, f"concurrent_{k}_{i}"))[-1] for i in range(k)]
        img_per_s = [r["images_seen"] / r["time"] for r in last]
        rows.append(dict(processes=k, threads_each=threads.get("OMP_NUM_THREADS"), seconds=seconds,
                         runs_per_hour=k * 3600 / seconds,
                         img_per_s_each=img_per_s, img_per_s_total=sum(img_per_s)))
        print(rows[-1], flush=True)
    base = rows[0]["runs_per_hour"]
    unit = "CPU" if args.device == "cpu" else "GPU"
    table = [f"| processes at once | threads each | seconds until all {args.kimg:g} kimg runs end | runs per {unit}-hour "
             "| vs 1 | img/s per process (training time) | img/s in all |", "|---|---|---|---|---|---|---|"]
    table += [f"| {r['processes']} | {r['threads_each'] or '-'} | {r['seconds']:.0f} | {r['runs_per_hour']:.1f} | "
              f"{r['runs_per_hour'] / base:.2f}x | "
              f"{statistics.mean(r['img_per_s_each']):,.0f} | {r['img_per_s_total']:,.0f} |" for r in rows]
    return rows, table


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("part", choices=["compile", "concurrency"])
    p.add_argument("--out", default="generated/run_costs", help="folder for the tables and the runs")
    p.add_argument("--preset", default="default")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed on to train.py")
    p.add_argument("--device", default="auto")
    p.add_argument("--train_dir", default="images/train_images_downsample")
    p.add_argument("--val_dir", default="images/test_images_downsample")
    p.add_argument("--modes", default="off,whole,regional", help="compile: the --compile modes to time")
    p.add_argument("--steps", type=positive_int, default=300, help="compile: steps per run (at least 50)")
    p.add_argument("--processes", default="1,2,3,4", help="concurrency: how many runs at once, in turn")
    p.add_argument("--kimg", type=non_negative_float, default=300, help="concurrency: thousand images per run")
    p.add_argument("--compile", default="auto", help="concurrency: train.py's --compile")
    p.add_argument("--precision", default="auto", help="train.py's --precision")
    args = p.parse_args(argv)
    if args.steps < 50:
        raise UserError(f"--steps {args.steps}: the table times the first 50 steps; pass 50 or more")
    make_folder(args.out, "--out")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows, table = (measure_compile if args.part == "compile" else measure_concurrency)(args)
    machine = gpu_name() if args.device != "cpu" else None
    machine = machine or f"{cpu_model()}, {os.cpu_count()} cores"
    header = (f"{machine}, torch {torch_version()}, preset {args.preset} {' '.join(args.set)}, --precision "
              f"{args.precision}, {started}")
    with atomic_write(os.path.join(args.out, f"run_costs_{args.part}.md"), "w") as f:
        f.write(f"{header}\n\n" + "\n".join(table) + "\n")
    with atomic_write(os.path.join(args.out, f"run_costs_{args.part}.json"), "w") as f:
        json.dump({"machine": machine, "torch": torch_version(), "preset": args.preset, "set": args.set,
                   "started": started, "rows": rows}, f, indent=1)
    print(header + "\n\n" + "\n".join(table))


def cpu_model():
    from speed import cpu_info
    return cpu_info()[0]


def gpu_name():
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def torch_version():
    import torch
    return torch.__version__


if __name__ == "__main__":
    run_main(main)
