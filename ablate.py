"""The ablation study: train every variant of ablations/study.py for the same budget in images seen,
score it the same way, one JSON row per run in results.jsonl, then REPORT.md from the rows.

    bash ablate.sh                                    # the whole study on this machine's GPU
    bash ablate.sh --group baseline --seeds 0,1,2     # one chunk; --only NAME,NAME picks variants
    bash ablate.sh --deadline_minutes 12              # start no run that cannot end in 12 minutes
    bash ablate.sh --gpus 0,1,2,3                     # one worker per GPU
    bash ablate.sh --shard 3/8                        # the third eighth of the runs (a SLURM array task)
    bash ablate.sh --scale cpu                        # the toy-scale study: preset tiny, < 30 min on 2 cores
    python ablate.py report [--scale cpu]             # REPORT.md, its plots and grid mosaics, from the rows
    python ablate.py curve --points_kimg 125,250,500,1000   # the budget curve: one baseline run, 4 points

Each run is a chain of subprocesses, so that a crash stays inside its run: train.py (--preset,
--set, --max_kimg = the budget, --seed; it measures its fixed validation loss on the final
weights when the budget stops it), evaluate.py (the variant's own sampler, the study's number
of samples) and generate.py (an 8x4 grid, seed 0 for every variant, so that grids compare). A
`sampling` variant re-evaluates the run of the variant it names, with no training. A failed step
gives a row with status "failed" and the step's last error line. Checkpoints go to
checkpoints/ablations/ (git-ignored); rows, grids, plots and the report to the scale's folder.

A rerun skips every run that has a row (--retry_failed runs the failed ones again). Shards write
results.shard-I-of-K.jsonl beside results.jsonl; every results*.jsonl there is read, so merging
shards is concatenating their rows.
"""
import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import glob
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

from tqdm import tqdm

from cli import (ArgumentParser, UserError, atomic_write, make_folder, non_negative_int, positive_float, positive_int,
                 random_seed, run_main)
from config import ConfigError, config_to_dict, make_config
from plot_log import read_log

REPO = os.path.dirname(os.path.abspath(__file__))
STUDY = os.path.join("ablations", "study.py")
# Concurrent runs on one GPU. Not measured yet: the "time to quality" issue measures it on a GPU.
RUNS_PER_GPU = 1
# Concurrent runs on a CPU, each with cores / RUNS_PER_CPU threads. Measured with
# `python tools/run_costs.py concurrency --device cpu` on 2 cores of an AMD EPYC (Zen 4), torch 2.14.1,
# 2026-12-02, batch 64, eager, bf16 (the probe's choice): at preset tiny's width two 1-thread runs finished 1.38x the runs
# per CPU-hour of one 2-thread run (254 against 183 img/s in all); at channels (32, 64, 64, 64), 0.96x
# for 5 kimg runs, whose start (decoding the data set, the probe) ran twice at once, while training
# itself ran 1.09x (88 against 81 img/s). Two runs at once, until the study's own scale measures better
# (--runs_per_gpu overrides it).
RUNS_PER_CPU = 2
PRIMARY = "attribute_fd"  # the attribute network's feature distance; lower is better
SECONDARY = [("swd_x1e3_avg", "SWD x1e3", ".1f"), ("attribute_tv_mean", "attribute TV", ".3f"),
             ("precision", "precision", ".3f"), ("recall", "recall", ".3f")]
SAMPLER_FLAGS = {"sampler": "--sampler", "sampling_steps": "--steps", "eta": "--eta", "clamp_x0": "--clamp"}
GRID_SEED = 0  # every grid starts from the same noise
LOG_EVERY = 10  # steps between the logged losses that draw the loss curves (each costs a host sync)
CURVE_FLAT = 0.25  # the budget curve's steep phase ends where the next point improves the metric by less


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("run", "report", "curve") else "run"
    args = parse_args(command, argv)
    study = load_study(args.study, args.scale)
    if command == "report":
        path = write_report(study, args.out or study.scale.folder, args.budget_kimg or study.scale.budget_kimg,
                            args.num_samples or study.scale.num_samples)
        print(f"wrote {path}")
        return 0
    runner = Runner(study, args)
    return runner.curve() if command == "curve" else runner.run()


def parse_args(command, argv):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--scale", default="gpu", help="gpu (the study) or cpu (the toy scale); see SCALES in the study")
    p.add_argument("--study", default=STUDY, help="the study's file")
    p.add_argument("--out", help="the folder of results.jsonl, REPORT.md, grids and plots (default: the scale's)")
    p.add_argument("--budget_kimg", type=positive_float, help="thousands of images seen per run (default: the scale's)")
    p.add_argument("--num_samples", type=positive_int, help="samples per evaluation (default: the scale's)")
    if command == "report":
        return p.parse_args(argv)
    p.add_argument("--checkpoints", help="where the runs' folders go (default: the scale's, git-ignored)")
    p.add_argument("--train_dataset_directory", default="images/train_images_downsample")
    p.add_argument("--validate_dataset_directory", default="images/test_images_downsample",
                   help="train.py's validation images and evaluate.py's held-out set (the floor)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu, when --gpus is not given")
    p.add_argument("--precision", default="fp32", choices=["bf16", "fp32"],
                   help="one precision for every run of the study, training and sampling, with contiguous "
                        "activations (default fp32: the same numbers on every CPU, to rounding; bf16 is faster where "
                        "the CPU has it natively, see docs/bench_cpu.md)")
    p.add_argument("--gpus", type=comma_list(non_negative_int), help="GPU indices, e.g. 0,1,2,3: one worker per GPU")
    p.add_argument("--runs_per_gpu", type=positive_int,
                   help=f"concurrent runs per GPU (default {RUNS_PER_GPU}) or on the CPU (default {RUNS_PER_CPU})")
    if command == "curve":
        p.add_argument("--points_kimg", type=comma_list(positive_float),
                       help="where to evaluate, in thousands of images seen (default: 1/4, 1/2, 1 and 2 budgets)")
        p.add_argument("--seed", type=random_seed, default=0)
        p.add_argument("--fresh", action="store_true", help="start the curve's run over")
        return p.parse_args(argv)
    p.add_argument("--only", type=comma_list(str), help="variant names, comma-separated")
    p.add_argument("--group", type=comma_list(str), help="groups, comma-separated: baseline, path, one_at_a_time, ...")
    p.add_argument("--seeds", type=comma_list(random_seed), help="seeds for every chosen variant (default: each variant's own)")
    p.add_argument("--deadline_minutes", type=positive_float,
                   help="start no run that cannot finish within this many minutes, then write the report")
    p.add_argument("--shard", type=shard, default=(1, 1), metavar="I/K", help="run the I-th of K parts (1-based)")
    p.add_argument("--retry_failed", action="store_true", help="run the variants whose row says failed again")
    p.add_argument("--dry_run", action="store_true", help="print the runs it would start, and start none")
    return p.parse_args(argv)


def comma_list(kind):
    """argparse type: a comma-separated list, each item checked by `kind`."""
    def parse(text):
        items = [kind(t.strip()) for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{text!r} is an empty list")
        return items
    return parse


def shard(text):
    i, sep, k = text.partition("/")
    if not (sep and i.isdigit() and k.isdigit() and 1 <= int(i) <= int(k)):
        raise argparse.ArgumentTypeError(f"{text!r} is not I/K with 1 <= I <= K, e.g. 2/8")
    return int(i), int(k)


# ---- the study: its variants at one scale, validated --------------------------------------------

@dataclasses.dataclass
class Study:
    path: str
    scale: object              # study.Scale
    variants: list             # study.Variant, the scale's, in the report's order
    groups: tuple

    def variant(self, name):
        return next(v for v in self.variants if v.name == name)

    def preset(self, variant):
        return dict(self.scale.presets).get(variant.preset, variant.preset)

    def config(self, variant):
        """The configuration a variant trains with or, for a re-evaluation, samples with."""
        if variant.of:
            parent = self.variant(variant.of)
            return make_config(self.preset(parent), [*parent.overrides, *variant.overrides])
        return make_config(self.preset(variant), variant.overrides)


def load_study(path, scale_name):
    """The study file's variants at one scale, every one checked with make_config, so that a typo
    in the study fails when it loads rather than in the middle of a GPU lease."""
    if not os.path.isfile(path):
        raise UserError(f"--study {path}: no such file")
    spec = importlib.util.spec_from_file_location("ablation_study", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if scale_name not in module.SCALES:
        raise UserError(f"--scale {scale_name}: choose one of {', '.join(module.SCALES)}")
    scale = module.SCALES[scale_name]
    everything = module.variants(scale)
    by_name = {v.name: v for v in everything}
    if len(by_name) != len(everything):
        raise UserError(f"{path}: two variants share a name")
    unknown = [n for n in scale.variants if n not in by_name]
    if unknown:
        raise UserError(f"{path}: scale {scale_name} names unknown variants: {', '.join(unknown)}")
    chosen = [v for v in everything if not scale.variants or v.name in scale.variants]
    study = Study(path, scale, chosen, module.GROUPS)
    names = {v.name for v in chosen}
    for v in chosen:
        where = f"{path}: variant {v.name}"
        if v.group not in module.GROUPS:
            raise UserError(f"{where}: group {v.group!r} is not one of {', '.join(module.GROUPS)}")
        if v.not_runnable:
            continue
        if v.of and v.of not in names:
            raise UserError(f"{where}: re-evaluates {v.of!r}, which is not a variant of scale {scale_name}")
        if v.of and (by_name[v.of].of or by_name[v.of].not_runnable):
            raise UserError(f"{where}: re-evaluates {v.of!r}, which is not a trained variant")
        if v.of and any(o.partition("=")[0] not in module.SAMPLER_FIELDS for o in v.overrides):
            raise UserError(f"{where}: a re-evaluation may only set {', '.join(module.SAMPLER_FIELDS)}")
        try:
            study.config(v)
        except ConfigError as e:
            raise UserError(f"{where}: {e}") from None
    baselines = [v for v in chosen if v.group == "baseline"]
    if [v.name for v in baselines] != ["baseline"]:
        raise UserError(f"{path}: scale {scale_name} needs exactly one variant, named baseline, in group baseline")
    return study


# ---- running: the plan, the workers, one run ------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Job:
    variant: object
    seed: int

    @property
    def key(self):
        return self.variant.name, self.seed

    @property
    def root(self):
        """The trained run: its own key, or for a re-evaluation the key of the run it re-evaluates."""
        return self.variant.of or self.variant.name, self.seed


class RunFailed(Exception):
    """A step of a run failed; the message is the row's one-line reason."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: the run leaves no row."""


class Runner:
    """One invocation of the study (or of the curve): its plan, its workers, the rows it appends."""

    def __init__(self, study, args):
        self.study, self.args, self.scale = study, args, study.scale
        self.budget_kimg = args.budget_kimg or self.scale.budget_kimg
        self.num_samples = args.num_samples or self.scale.num_samples
        self.out = make_folder(args.out or self.scale.folder, "--out")
        self.checkpoints = args.checkpoints or self.scale.checkpoints
        index, count = getattr(args, "shard", (1, 1))
        self.results = os.path.join(self.out, "results.jsonl" if count == 1 else f"results.shard-{index}-of-{count}.jsonl")
        for flag in ("train_dataset_directory", "validate_dataset_directory"):
            if not os.path.isdir(getattr(args, flag)):
                raise UserError(f"--{flag} {getattr(args, flag)}: no such folder; build the default data set "
                                f"with bash images/make_default_dataset.sh")
        self.facts = {"torch": package_version("torch"), "commit": git_commit()}
        self.runs_per_gpu = args.runs_per_gpu or RUNS_PER_GPU
        self.lock = threading.Condition()  # guards the plan, the children and the results file
        self.stop = threading.Event()
        self.children = set()
        self.local = threading.local()     # the run under way on this thread: its steps' seconds

    def rows(self):
        return [r for r in read_rows(self.out) if r.get("budget_kimg") == self.budget_kimg
                and r.get("num_samples") == self.num_samples]

    def latest_row(self, variant, seed):
        rows = [r for r in self.rows() if r["variant"] == variant and r["seed"] == seed]
        return rows[-1] if rows else None

    # -- the plan

    def plan(self):
        """(the runs to do, in order, for this shard; how many of its runs have a row already)."""
        args, study = self.args, self.study
        for name in args.only or []:
            if name not in {v.name for v in study.variants}:
                raise UserError(f"--only {name}: not a variant of scale {self.scale.name}; see {study.path}")
        for group in args.group or []:
            if group not in study.groups:
                raise UserError(f"--group {group}: choose from {', '.join(study.groups)}")
        jobs = []
        for v in study.variants:
            if v.not_runnable or (args.only and v.name not in args.only) or (args.group and v.group not in args.group):
                continue
            for seed in args.seeds or v.seeds:
                if v.of:  # a re-evaluation needs its trained run
                    jobs.append(Job(study.variant(v.of), seed))
                jobs.append(Job(v, seed))
        jobs = list(dict.fromkeys(jobs))
        # Shards split the runs before any is skipped, so that every shard sees the same split; a
        # re-evaluation goes with the run it re-evaluates.
        roots = list(dict.fromkeys(job.root for job in jobs))
        index, count = args.shard
        jobs = [job for job in jobs if roots.index(job.root) % count == index - 1]
        done = {(r["variant"], r["seed"]) for r in self.rows() if r["status"] == "ok" or not args.retry_failed}
        return [job for job in jobs if job.key not in done], sum(job.key in done for job in jobs)

    def slots(self):
        """(GPU index or None, --device, threads or None) for each run that runs at the same time."""
        args = self.args
        if args.gpus:
            return [(gpu, "cuda", None) for gpu in args.gpus for _ in range(self.runs_per_gpu)]
        device = args.device
        if device == "auto":
            import torch
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device != "cpu":
            return [(None, device, None)] * self.runs_per_gpu
        runs = args.runs_per_gpu or RUNS_PER_CPU
        return [(None, device, max(1, (os.cpu_count() or 1) // runs))] * runs

    # -- the study: workers take the runs in order

    def run(self):
        jobs, skipped = self.plan()
        slots = self.slots()
        print(f"ablation study, scale {self.scale.name}: budget {self.budget_kimg:g} kimg, {self.num_samples} samples "
              f"per evaluation; {len(jobs)} runs to do, {skipped} skipped (they have a row); {len(slots)} at a "
              f"time on {slots[0][1]}; rows in {self.results}")
        if self.args.dry_run:
            for job in jobs:
                print(f"  {job.variant.group}: {job.variant.name} seed {job.seed}")
            return 0
        self.pending, self.running, self.unstarted = list(jobs), set(), []
        self.deadline = time.time() + 60 * self.args.deadline_minutes if self.args.deadline_minutes else None
        self.bar = tqdm(total=len(jobs), unit="run", dynamic_ncols=True)
        previous_handler = signal.signal(signal.SIGTERM, raise_keyboard_interrupt)  # SLURM's scancel, a lease's end
        code = 0
        with concurrent.futures.ThreadPoolExecutor(len(slots)) as pool:
            workers = [pool.submit(self.worker, slot) for slot in slots]
            try:
                while not all(w.done() for w in workers):
                    time.sleep(0.5)
            except KeyboardInterrupt:
                self.interrupt()
                code = 130
        signal.signal(signal.SIGTERM, previous_handler)
        self.bar.close()
        for w in workers:
            w.result()  # a bug in a worker: its traceback
        if self.unstarted:
            print(f"--deadline_minutes: {len(self.unstarted)} runs not started: "
                  f"{', '.join(f'{j.variant.name}/{j.seed}' for j in self.unstarted)}")
        print(f"wrote {write_report(self.study, self.out, self.budget_kimg, self.num_samples)}")
        return code

    def worker(self, slot):
        while (job := self.next_job()) is not None:
            try:
                row = self.run_job(job, slot)
            except Interrupted:
                return
            finally:
                with self.lock:
                    self.running.discard(job.key)
                    self.lock.notify_all()
            with self.lock, open(self.results, "a") as f:
                f.write(json.dumps(row) + "\n")
            self.bar.update(1)
            self.bar.write(summary(row))

    def next_job(self):
        """The first pending run whose trained run (for a re-evaluation) is neither pending nor under
        way; None when none is left. Under --deadline_minutes a run that cannot finish in time is
        not started, nor are its re-evaluations."""
        with self.lock:
            while not self.stop.is_set() and self.pending:
                waiting_for = self.running | {j.key for j in self.pending}
                job = next((j for j in self.pending if not (j.variant.of and j.root in waiting_for)), None)
                if job is None:
                    self.lock.wait()
                    continue
                self.pending.remove(job)
                unstarted = {j.key for j in self.unstarted}
                if self.deadline and (job.root in unstarted or time.time() + self.estimate_seconds(job) > self.deadline):
                    self.unstarted.append(job)
                    self.bar.total -= 1
                    continue
                self.running.add(job.key)
                return job
            return None

    def estimate_seconds(self, job):
        """The longest finished run of its kind (trained, or re-evaluated) at this budget, else the
        scale's guess."""
        seconds = [r["wall_seconds"] for r in self.rows() if r["status"] == "ok" and bool(r["of"]) == bool(job.variant.of)]
        return max(seconds) if seconds else 60 * self.scale.run_minutes_guess / (3 if job.variant.of else 1)

    def interrupt(self):
        self.stop.set()
        with self.lock:
            self.lock.notify_all()
            children = list(self.children)
        for child in children:  # train.py writes its checkpoint on SIGINT
            with contextlib.suppress(OSError):
                child.send_signal(signal.SIGINT)
        print("\ninterrupted: the runs under way leave no row; a rerun does them")

    # -- one run

    def run_job(self, job, slot, budget_kimg=None, run_dir=None, fresh=True):
        """Train (unless it re-evaluates a run), measure, evaluate and draw one run: its row. The
        curve passes its own budget and run folder, and resumes (fresh=False)."""
        v, seed, budget_kimg = job.variant, job.seed, budget_kimg or self.budget_kimg
        config = self.study.config(v)
        trained = self.study.variant(v.of) if v.of else v
        run_dir = run_dir or os.path.join(self.checkpoints, f"{budget_kimg:g}kimg", trained.name, f"seed{seed}")
        self.local.seconds = {}
        row = dict(variant=v.name, group=v.group, scale=self.scale.name, preset=self.study.preset(trained),
                   overrides=[*trained.overrides, *(v.overrides if v.of else ())], of=v.of or None, seed=seed,
                   budget_kimg=budget_kimg, num_samples=self.num_samples, batch_size=None, steps=None,
                   images_seen=None, date=datetime.datetime.now().isoformat(timespec="seconds"), **self.facts,
                   device=slot[1], precision=self.args.precision, gpu=gpu_name(slot), cpu=cpu_name(), status="ok",
                   reason=None,
                   step_seconds=self.local.seconds)
        started = time.time()
        try:
            if v.of:
                row.update(self.trained_run(v, seed, run_dir))
            else:
                row.update(self.train(v, seed, budget_kimg, run_dir, slot, fresh))
            row.update(self.evaluate(v, seed, run_dir, slot))
        except RunFailed as e:
            row.update(status="failed", reason=str(e))
        except (OSError, KeyError, ValueError) as e:  # a step's output that is not what we read
            row.update(status="failed", reason=f"ablate.py: {type(e).__name__}: {e}")
        row["wall_seconds"] = round(time.time() - started, 1)
        # A GPU that runs several runs at once gives each its share of the time.
        row["gpu_seconds"] = None if slot[1] == "cpu" else round(row["wall_seconds"] / self.runs_per_gpu, 1)
        row["config"] = config_to_dict(config)
        return row

    def trained_run(self, v, seed, run_dir):
        """For a re-evaluation: the training fields of the run it re-evaluates."""
        parent = self.latest_row(v.of, seed)
        if parent is None or parent["status"] != "ok":
            raise RunFailed(f"its trained run {v.of} seed {seed} "
                            f"{'has no row' if parent is None else 'failed: ' + str(parent['reason'])}")
        if not os.path.isfile(os.path.join(run_dir, "latest_model.pth")):
            raise RunFailed(f"{run_dir}/latest_model.pth is missing (trained on another machine?): copy the "
                            f"folder here, or delete {v.of}'s row and rerun it")
        return {k: parent.get(k) for k in ("batch_size", "steps", "images_seen", "train_seconds", "img_per_s",
                                           "train_loss", "val_loss", "val_loss_ema")}

    def train(self, v, seed, budget_kimg, run_dir, slot, fresh):
        """train.py until the budget (--max_kimg: it takes ceil(budget / batch) steps, and its lr
        schedule ends there), then the validation loss of its final weights: the row's training fields."""
        os.makedirs(run_dir, exist_ok=True)
        self.step("train.py", [
            "train.py", "--preset", self.study.preset(v), *[a for o in v.overrides for a in ("--set", o)],
            *(["--fresh"] if fresh else []), "--max_kimg", budget_kimg, "--seed", seed, "--model_checkpoint_dir",
            run_dir, "--no_visdom", "--device", slot[1], "--precision", self.args.precision, "--layout", "contiguous",
            "--log_every", LOG_EVERY,
            "--save_every", 10 ** 6,
            "--train_dataset_directory", self.args.train_dataset_directory,
            "--validate_dataset_directory", self.args.validate_dataset_directory], run_dir, slot)
        # The study scores the final weights; train.py's best-validation copy would double each run's disk.
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(run_dir, "best_validation_checkpoint.pth"))
        records = read_log(os.path.join(run_dir, "log.jsonl"))
        train = [r for r in records if r.get("kind") == "train"]
        if not train or train[-1]["images_seen"] < round(budget_kimg * 1000):
            raise RunFailed(f"train.py stopped at {train[-1]['images_seen'] if train else 0} images, "
                            f"before the budget of {budget_kimg * 1000:g}")
        last = train[-1]
        measured = next((r for r in records if r.get("kind") == "validation" and r["step"] == last["step"]), None)
        if measured is None:
            raise RunFailed(f"{run_dir}/log.jsonl has no validation at step {last['step']}, where the budget stopped it")
        return {"steps": last["step"], "images_seen": last["images_seen"],
                "batch_size": last["images_seen"] // last["step"], "train_seconds": round(last["time"], 1), "img_per_s": round(last["images_seen"] / last["time"], 1),
                "train_loss": last["train_loss"], "val_loss": measured["val_loss"],
                "val_loss_ema": measured["val_loss_ema"],
                "curve": {"kimg": [r["images_seen"] / 1000 for r in train], "train_loss": [r["train_loss"] for r in train]}}

    def evaluate(self, v, seed, run_dir, slot):
        """evaluate.py, then generate.py's 8x4 grid, with the variant's sampler: the row's metrics and grid."""
        sampler = [a for o in (v.overrides if v.of else ()) for a in sampler_flag(o)]
        checkpoint = os.path.join(run_dir, "latest_model.pth")
        report_path = os.path.join(run_dir, f"evaluation_{v.name}.json")
        self.step("evaluate.py", [
            "evaluate.py", "--checkpoint", checkpoint, "--num_samples", self.num_samples, "--output_json", report_path,
            "--reference_dir", self.args.train_dataset_directory, "--test_dir", self.args.validate_dataset_directory,
            "--no_download", "--seed", seed, "--device", slot[1], "--precision", self.args.precision, "--layout", "contiguous",
            *sampler],
            run_dir, slot)
        with open(report_path) as f:
            report = json.load(f)
        grid_dir = os.path.join(run_dir, f"grid_{v.name}")
        self.step("generate.py", [
            "generate.py", "--checkpoint", checkpoint, "--n", 8, "--m", 4, "--seed", GRID_SEED,
            "--generated_image_save_dir", grid_dir, "--overwrite", "--device", slot[1], "--precision",
            self.args.precision, "--layout", "contiguous", *sampler], run_dir, slot)
        grid = os.path.join("grids", f"{v.name}_seed{seed}.png")
        os.makedirs(os.path.join(self.out, "grids"), exist_ok=True)
        shutil.copyfile(os.path.join(grid_dir, "generated_images_8x4.png"), os.path.join(self.out, grid))
        attributes = report.get("attributes") or {}
        return {"sampler": report["sampler"], "metrics": report["metrics"], "attribute_tv": attributes.get("tv"),
                "mi_top_pair": attributes.get("mi_top_pair"), "grid": grid, "run_dir": run_dir}

    def step(self, name, command, run_dir, slot):
        """One step of a run, a Python script of this repository in a subprocess, its output in
        <run_dir>/<name>.log and .err. Returns its stdout; raises RunFailed with its last error
        line, or Interrupted."""
        gpu, _, threads = slot
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        log_path, err_path = os.path.join(run_dir, f"{name}.log"), os.path.join(run_dir, f"{name}.err")
        started = time.time()
        with open(log_path, "w") as out, open(err_path, "w") as err:
            with self.lock:
                if self.stop.is_set():
                    raise Interrupted
                child = subprocess.Popen([sys.executable, os.path.join(REPO, command[0]), *map(str, command[1:])],
                                         env=env, stdout=out, stderr=err)
                self.children.add(child)
            code = child.wait()
            with self.lock:
                self.children.discard(child)
        if self.stop.is_set() or code in (130, -signal.SIGINT, -signal.SIGTERM):
            raise Interrupted
        if code != 0:
            raise RunFailed(f"{name} exit {code}: {last_line(err_path) or last_line(log_path) or 'no output'}")
        self.local.seconds[name] = round(time.time() - started, 1)
        with open(log_path) as f:
            return f.read()

    # -- the budget curve

    def curve(self):
        """One baseline run, trained segment by segment to each point (resumed exactly), evaluated
        at each. Its learning rate is constant, so that the segments are one run."""
        base = self.study.variant("baseline")
        v = dataclasses.replace(base, name="curve", overrides=(*base.overrides, "lr_schedule=constant"))
        points = sorted(self.args.points_kimg or [self.budget_kimg * f for f in (0.25, 0.5, 1, 2)])
        seed, path = self.args.seed, os.path.join(self.out, "curve.jsonl")
        run_dir = os.path.join(self.checkpoints, "curve", f"seed{seed}")
        slot = self.slots()[0]  # one run at a time, each like one of the study's
        if self.args.fresh and os.path.exists(path):
            os.remove(path)
        done = {r["budget_kimg"] for r in read_rows(self.out, "curve.jsonl")
                if r["seed"] == seed and r["status"] == "ok" and r["num_samples"] == self.num_samples}
        print(f"budget curve, scale {self.scale.name}: the baseline with lr_schedule=constant, seed {seed}, evaluated "
              f"at {', '.join(f'{p:g}' for p in points)} kimg with {self.num_samples} samples; rows in {path}")
        for point in points:
            if point in done:
                print(f"{point:g} kimg: has a row (skipped)")
                continue
            if any(p > point for p in done):
                raise UserError(f"the curve's run is past {point:g} kimg already: pass --fresh to start it over")
            try:
                row = self.run_job(Job(dataclasses.replace(v, name=f"curve_{point:g}kimg"), seed), slot,
                                   budget_kimg=point, run_dir=run_dir, fresh=not done)
            except Interrupted:
                print("interrupted: a rerun continues the curve")
                return 130
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(summary(row))
            if row["status"] != "ok":
                return 1
            done.add(point)
        print(f"wrote {write_report(self.study, self.out, self.budget_kimg, self.num_samples)}")
        return 0


def raise_keyboard_interrupt(*_):
    raise KeyboardInterrupt


def sampler_flag(override):
    key, _, value = override.partition("=")
    return SAMPLER_FLAGS[key], ("on" if value == "true" else "off") if key == "clamp_x0" else value


def last_line(path):
    """The last non-empty line of a file (a progress bar's carriage returns split lines too)."""
    with open(path, errors="replace") as f:
        lines = [line.strip() for line in f.read().replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def summary(row):
    if row["status"] != "ok":
        return f"{row['variant']} seed {row['seed']}: failed: {row['reason']}"
    metric = row["metrics"][PRIMARY]
    return (f"{row['variant']} seed {row['seed']}: {PRIMARY} {fmt(metric['samples'])} (floor {fmt(metric['floor'])}), "
            f"{row['wall_seconds']:.0f} s")


def read_rows(folder, pattern="results*.jsonl"):
    """Every row of every results file in the folder (shards write their own); a line cut short by
    a crash is skipped with a warning."""
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, pattern))):
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        print(f"warning: {path} line {number} is not a JSON row; skipped", file=sys.stderr)
    return rows


def package_version(name):
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def git_commit():
    """HEAD, with +dirty when tracked files differ from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short=12", "HEAD")
    return (commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")) or None


def gpu_name(slot):
    gpu, device, _ = slot
    if device == "cpu":
        return None
    index = str(gpu) if gpu is not None else os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", index],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    return out or "unknown GPU"


def cpu_name():
    from speed import cpu_info
    return f"CPU ({cpu_info()[0]}, {os.cpu_count()} cores)"


def fmt(value, spec=".3g"):
    return "-" if value is None else f"{value:{spec}}"


# ---- the report -------------------------------------------------------------------------------------

@dataclasses.dataclass
class Stats:
    """One variant's rows at this budget: the finished ones (one per seed) and the failed ones."""
    rows: list
    failed: list

    def values(self, metric, column="samples"):
        return [r["metrics"][metric][column] for r in self.rows if r["metrics"].get(metric, {}).get(column) is not None]

    def spread(self, metric):
        """max - min over seeds: the run-to-run spread (None with one seed)."""
        values = self.values(metric)
        return max(values) - min(values) if len(values) > 1 else None

    def head_tv(self, head, column="samples"):
        return [r["attribute_tv"][head][column] for r in self.rows if head in (r.get("attribute_tv") or {})]

    def field(self, key):
        return [r[key] for r in self.rows if r.get(key) is not None]


def mean(values):
    return sum(values) / len(values) if values else None


def write_report(study, folder, budget_kimg, num_samples):
    """REPORT.md in `folder`, with plots/ (bar charts, loss curves) and grid mosaics, from its rows at this
    budget and number of samples. Returns its path."""
    scale = study.scale
    rows = [r for r in read_rows(folder) if r.get("budget_kimg") == budget_kimg and r.get("num_samples") == num_samples]
    latest = {(r["variant"], r["seed"]): r for r in rows}  # a later row (a retried run) replaces an earlier one
    stats = {v.name: Stats([r for (n, _), r in sorted(latest.items()) if n == v.name and r["status"] == "ok"],
                           [r for (n, _), r in sorted(latest.items()) if n == v.name and r["status"] != "ok"])
             for v in study.variants}
    curve = [r for r in read_rows(folder, "curve.jsonl") if r["status"] == "ok" and r["num_samples"] == num_samples]
    plots = os.path.join(folder, "plots")
    base = stats["baseline"]
    default_study = os.path.realpath(study.path) == os.path.realpath(os.path.join(REPO, STUDY))
    flags = ([] if default_study else ["--study", study.path]) + \
        (["--scale", scale.name] if scale.name != "gpu" else []) + \
        (["--budget_kimg", f"{budget_kimg:g}"] if budget_kimg != scale.budget_kimg else [])

    def command(*words, script="bash ablate.sh"):  # a subcommand (curve, report) first, then the scale's flags
        sub = list(words[:1]) if words and not words[0].startswith("--") else []
        return " ".join([script, *sub, *flags, *words[len(sub):]])

    lines = report_header(study, rows, latest, budget_kimg, num_samples, command)
    lines += curve_section(study, curve, folder, command)
    written = ["curve.png"] if curve else []
    lines += ["## Results", "",
              f"Each table: the mean over seeds of {PRIMARY} (primary, lower is better) and its spread (max - min "
              f"over seeds) beside its floor; the change against the baseline's mean, marked * when it is larger "
              f"than the baseline's run-to-run spread "
              + (f"({fmt(base.spread(PRIMARY), '.4g')})" if base.spread(PRIMARY) is not None
                 else "(not known yet: the baseline needs 2 seeds; no marks)")
              + ". The comment names the attribute heads whose total variation (TV) moved, against the baseline, "
                "by more than the larger of the baseline's spread and its floor for that head. Grids: the "
                f"same noise (seed {GRID_SEED}) for every variant, from its first seed's run.", ""]
    if not latest:
        lines += ["No run has a row yet.", ""]
    for group in study.groups:
        variants = [v for v in study.variants if v.group == group and (stats[v.name].rows or stats[v.name].failed)]
        if not variants:
            continue
        lines += [f"### {group}", "", *results_table(study, variants, stats, base), ""]
        with_baseline = [study.variant("baseline"), *[v for v in variants if v.name != "baseline"]]
        plots_made = [bar_chart(group, with_baseline, stats, base, plots, budget_kimg),
                      loss_curves(group, with_baseline, stats, plots)]
        written += [os.path.basename(i) for i in plots_made if i]
        lines += [f"![{os.path.basename(i)}](plots/{os.path.basename(i)})" for i in plots_made if i] + [""]
        shown = [(v, r) for v in with_baseline for r in stats[v.name].rows[:None if group == "baseline" else 1]]
        lines += grid_mosaic([(f"`{v.name}` seed {r['seed']}: {fmt(r['metrics'][PRIMARY]['samples'], '.4g')}", r)
                              for v, r in shown]) + [""]
    lines += not_yet_run(study, stats, command)
    for stale in set(glob.glob(os.path.join(plots, "*.png"))) - {os.path.join(plots, i) for i in written}:
        os.remove(stale)  # a plot that this report does not show any more
    path = os.path.join(folder, "REPORT.md")
    with atomic_write(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return path


def report_header(study, rows, latest, budget_kimg, num_samples, command):
    scale = study.scale
    done = [r for r in latest.values() if r["status"] == "ok"]
    title = "Ablation study" + (f": toy scale ({scale.name})" if scale.toy else "")
    lines = [f"# {title}", ""]
    if scale.toy:
        presets = ", ".join(f"`{a}` runs as `{b}`" for a, b in scale.presets)
        lines += [f"> **Toy scale.** This is the study's machinery at a size a CPU can run in half an hour "
                  f"({presets}, {budget_kimg:g} thousand images per run, {num_samples} samples per evaluation). "
                  f"Its numbers show how the study works and what its report looks like; they say little about "
                  f"what matters for the real network, which is `ablations/REPORT.md`.", ""]
    devices = sorted({r["gpu"] or r["cpu"] for r in done}) or ["-"]
    gpu_seconds = sum(r["gpu_seconds"] or 0 for r in done)
    wall = sum(r["wall_seconds"] for r in done)
    lines += [
        f"Written by `{command('report', script='python ablate.py')}` from the rows in `results*.jsonl` "
        f"({len(rows)} rows, {len(done)} finished runs); do not edit it by hand.", "",
        f"- **Budget: {budget_kimg:g} thousand images seen** by every training run ({scale.budget_note}). A run "
        f"takes ceil({budget_kimg * 1000:g} / batch) steps, so a larger batch takes fewer. The study answers "
        f"\"what matters in the first {budget_kimg * 1000:,.0f} images\", not \"what matters at convergence\".",
        f"- Each run: `train.py` with the variant's preset and `--set` overrides, then `evaluate.py` with "
        f"{num_samples} samples and the variant's own sampler. Every metric is shown beside its floor: the "
        f"held-out test set against the train set, with the same number of images.",
        f"- Primary metric: `{PRIMARY}`, the Frechet distance between the attribute network's features of "
        f"the samples and of the train set (an offline FID; lower is better).",
        f"- Ran on: {', '.join(devices)}; torch {', '.join(sorted({str(r['torch']) for r in done})) or '-'}; "
        f"commit {', '.join(sorted({str(r['commit']) for r in done})) or '-'}.",
        f"- Time: {wall / 60:.1f} minutes, the runs' times summed (runs that share a machine overlap)"
        + (f"; {gpu_seconds / 3600:.2f} GPU hours" if gpu_seconds else "") + ".",
        f"- Reproduce: `{command()}` (it skips the runs that have a row), then "
        f"`{command('report', script='python ablate.py')}`.", ""]
    return lines


def change_of(study, v):
    if v.name == "baseline":
        return f"preset {study.preset(v)}"
    return v.note or " ".join(v.overrides) or f"preset {study.preset(v)}"


def results_table(study, variants, stats, base):
    base_mean, base_spread = mean(base.values(PRIMARY)), base.spread(PRIMARY)
    header = ["variant", "change", "seeds", PRIMARY, "spread", "floor", "vs baseline",
              *[label for _, label, _ in SECONDARY], "val loss (EMA)", "img/s", "comment"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v in variants:
        s = stats[v.name]
        comment = []
        if v.of:
            comment.append(f"re-evaluates {v.of}")
        comment += [f"seed {r['seed']} failed: {r['reason']}" for r in s.failed]
        value = mean(s.values(PRIMARY))
        delta = "-"
        if value is not None and base_mean is not None and v.name != "baseline":
            marked = base_spread is not None and abs(value - base_mean) > base_spread
            delta = f"{value - base_mean:+.4g}" + (" *" if marked else "")
            comment += head_verdicts(s, base)
        cells = [f"`{v.name}`", change_of(study, v).replace("|", "/"), str(len(s.rows)), fmt(value, ".4g"),
                 fmt(s.spread(PRIMARY), ".3g"), fmt(mean(s.values(PRIMARY, "floor")), ".4g"), delta,
                 *[fmt(mean(s.values(key)), spec) for key, _, spec in SECONDARY],
                 fmt(mean(s.field("val_loss_ema")), ".4f"), fmt(mean(s.field("img_per_s")), ".0f"), "; ".join(comment)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def head_verdicts(s, base):
    """Which attribute heads' TV moved clearly against the baseline: by more than the larger of the
    baseline's spread over seeds and its floor (two real image sets differ by that much)."""
    worse, better = [], []
    for head in sorted({h for r in base.rows for h in (r.get("attribute_tv") or {})}):
        ours, theirs, floor = s.head_tv(head), base.head_tv(head), base.head_tv(head, "floor")
        if not ours or not theirs:
            continue
        change = mean(ours) - mean(theirs)
        threshold = max(max(theirs) - min(theirs), mean(floor))
        if abs(change) > threshold:
            (worse if change > 0 else better).append(f"{head} {change:+.2f}")
    return ([f"TV worse: {', '.join(worse)}"] if worse else []) + ([f"TV better: {', '.join(better)}"] if better else [])


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_write(path) as f:
        fig.savefig(f, format="png", metadata={"Software": None})
    pyplot().close(fig)
    return path


def bar_chart(group, variants, stats, base, plots, budget_kimg):
    """The primary metric per variant: mean, and min to max over seeds; the floor and the baseline."""
    plt = pyplot()
    shown = [v for v in variants if stats[v.name].values(PRIMARY)]
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(9, 1.4 + 0.32 * len(shown)), dpi=100)
    y = list(range(len(shown)))[::-1]
    means = [mean(stats[v.name].values(PRIMARY)) for v in shown]
    lows = [m - min(stats[v.name].values(PRIMARY)) for m, v in zip(means, shown)]
    highs = [max(stats[v.name].values(PRIMARY)) - m for m, v in zip(means, shown)]
    ax.barh(y, means, xerr=[lows, highs], color=["tab:gray" if v.name == "baseline" else "tab:blue" for v in shown],
            capsize=3, height=0.6)
    ax.set_yticks(y, [v.name for v in shown], fontsize=8)
    floor = mean(stats[shown[0].name].values(PRIMARY, "floor"))
    if floor is not None:
        ax.axvline(floor, color="tab:green", linestyle="--", label=f"floor {floor:.3g}")
    if base.values(PRIMARY):
        ax.axvspan(min(base.values(PRIMARY)), max(base.values(PRIMARY)), color="tab:gray", alpha=0.2,
                   label="baseline, min to max")
    if max(means) > 20 * min(means):
        ax.set_xscale("log")
    ax.set_xlabel(f"{PRIMARY} (lower is better), {budget_kimg:g} kimg")
    ax.set_title(f"{group}: mean over seeds, bars from min to max", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, os.path.join(plots, f"bars_{group}.png"))


def loss_curves(group, variants, stats, plots):
    """Train loss against images seen: the baseline's seeds in grey, each other trained variant's
    first seed in colour. Each target (eps, x0, v) and weighting has its own loss scale. None for a
    group that trains nothing of its own (re-evaluations)."""
    if all(v.of for v in variants if v.name != "baseline") and group != "baseline":
        return None
    plt = pyplot()
    curves = [(v.name if v.name != "baseline" else f"baseline seed {r['seed']}", r["curve"])
              for v in variants if not v.of
              for r in (stats[v.name].rows if v.name == "baseline" else stats[v.name].rows[:1]) if r.get("curve")]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    greys = iter(["black", "dimgrey", "darkgrey", "silver"] * 8)
    for name, c in curves:
        baseline = name.startswith("baseline seed")
        ax.plot(c["kimg"], c["train_loss"], linewidth=2 if baseline else 1, color=next(greys) if baseline else None,
                alpha=0.8, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("thousands of images seen")
    ax.set_ylabel("train loss (each variant's own target)")
    ax.set_title(f"{group}: training loss", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(curves) > 8 else 1)
    fig.tight_layout()
    return save_figure(fig, os.path.join(plots, f"losses_{group}.png"))


def grid_mosaic(captioned_rows, columns=4):
    """The runs' committed 8x4 grids side by side, each under its caption: a Markdown table, so
    that the mosaic adds no image of its own to the repository."""
    cells = [f"{caption}<br>![{r['variant']}]({r['grid']})" for caption, r in captioned_rows]
    if not cells:
        return []
    width = min(columns, len(cells))
    cells += [""] * (-len(cells) % width)
    return ["|" + " |" * width, "|" + "---|" * width,
            *["| " + " | ".join(cells[i:i + width]) + " |" for i in range(0, len(cells), width)]]


def curve_section(study, curve, folder, command):
    lines = ["## The budget curve", ""]
    if not curve:
        return lines + [f"Not measured yet: `{command('curve')}` trains the baseline once and "
                        f"evaluates it at 4 points (1/4, 1/2, 1 and 2 budgets by default).", ""]
    points = sorted({r["budget_kimg"]: r for r in curve}.values(), key=lambda r: r["budget_kimg"])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    kimg = [r["budget_kimg"] for r in points]
    ax.plot(kimg, [r["metrics"][PRIMARY]["samples"] for r in points], marker="o", label="baseline")
    ax.plot(kimg, [r["metrics"][PRIMARY]["floor"] for r in points], linestyle="--", color="tab:green", label="floor")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("thousands of images seen")
    ax.set_ylabel(f"{PRIMARY} (lower is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    plot = save_figure(fig, os.path.join(folder, "plots", "curve.png"))
    lines += [f"One baseline run (seed {points[0]['seed']}), evaluated as it reached each point. Its learning rate "
              f"is constant (`lr_schedule=constant`), so that the segments are one run; the study's runs use "
              f"the baseline's own schedule. A point's change is against the point before it.", "",
              "| thousand images | steps | " + PRIMARY + " | floor | change | SWD x1e3 | val loss (EMA) | train s | wall s |",
              "|---|---|---|---|---|---|---|---|---|"]
    previous = None
    for r in points:
        value = r["metrics"][PRIMARY]["samples"]
        change = f"{(value / previous - 1) * 100:+.0f}%" if previous and value is not None else "-"
        lines.append(f"| {r['budget_kimg']:g} | {r['steps']} | {fmt(value, '.4g')} | "
                     f"{fmt(r['metrics'][PRIMARY]['floor'], '.4g')} | {change} | "
                     f"{fmt(r['metrics']['swd_x1e3_avg']['samples'], '.1f')} | {fmt(r.get('val_loss_ema'), '.4f')} | "
                     f"{fmt(r.get('train_seconds'), '.0f')} | {r['wall_seconds']:.0f} |")
        previous = value
    lines += ["", suggest_budget(points)]
    return lines + ["", f"![curve](plots/{os.path.basename(plot)})", "",
                    *grid_mosaic([(f"{r['budget_kimg']:g} kimg: {fmt(r['metrics'][PRIMARY]['samples'], '.4g')}", r)
                                  for r in points]), ""]


def suggest_budget(points):
    """The smallest point at which the baseline is past its steep early phase: from it on, every
    point improves the primary metric on the one before by less than CURVE_FLAT. A suggestion for
    the person who picks the budget."""
    values = [p["metrics"][PRIMARY]["samples"] for p in points]
    for i in range(len(points) - 1):
        if all(b > (1 - CURVE_FLAT) * a for a, b in zip(values[i:], values[i + 1:])):
            return (f"Suggested budget: **{points[i]['budget_kimg']:g} kimg**, the first point from which no later "
                    f"point improves {PRIMARY} by {CURVE_FLAT:.0%} or more on the one before it.")
    return (f"No suggestion: the last point still improved {PRIMARY} by {CURVE_FLAT:.0%} or more, so the baseline is "
            f"still in its steep early phase there; extend the curve (--points_kimg).")


def not_yet_run(study, stats, command):
    """The variants (and seeds) with no finished row, with the command that runs them."""
    lines, missing = ["## Not yet run", ""], {}
    for v in study.variants:
        seeds = sorted(set(v.seeds) - {r["seed"] for r in stats[v.name].rows})
        if seeds or v.not_runnable:
            missing.setdefault(v.group, []).append((v, seeds))
    if not missing:
        return lines + ["Every variant has a finished row.", ""]
    if len(stats["baseline"].rows) < len(study.variant("baseline").seeds):
        first = ",".join(["baseline", *[v.name for v in study.variants if v.group == "path"][:1]])
        lines += ["The first chunk (the budget curve, the baseline with its seeds, and the first row of the "
                  "path), one line:", "", f"    {command('curve')} && {command('--only', first)}", ""]
    for group, entries in missing.items():
        runnable = any(not v.not_runnable for v, _ in entries)
        lines.append(f"- **{group}**" + (f": `{command('--group', group)}`" if runnable else ""))
        for v, seeds in entries:
            if v.not_runnable:
                lines.append(f"  - `{v.name}`: not runnable yet: {v.not_runnable}")
            else:
                lines.append(f"  - `{v.name}` (seeds {', '.join(map(str, seeds))}): {change_of(study, v)}")
    return lines + [""]


if __name__ == "__main__":
    run_main(main)
