"""The workers: each takes the next run of the plan, runs its steps in subprocesses and appends its row.

A run is two processes, so that a crash stays inside its run and train.py's command line stays the
contract: train.py (--preset, --set, --max_kimg = the budget, --seed; it measures its fixed
validation loss on the final weights when the budget stops it, and writes no best-validation copy),
then evaluate.py (the variant's own sampler, the scale's number of samples, the scale's evaluation
seed, the real images' statistics from a cache shared by every row, and the grid from the first 32
of its samples, --grid_size of the scale). A re-evaluation runs evaluate.py only, on its trained run's checkpoint.

Only a failure of train.py or evaluate.py becomes a row with status "failed" and the step's last
error line. A bug of the runner itself stops the study with its traceback, and Ctrl-C or SIGTERM
stops it with no row for the runs under way: a rerun does them. A re-evaluation's evaluate.py keeps
each finished batch of samples in <run_dir>/samples_<variant>/ (--resume_dir), so a rerun continues
a stopped one where it stopped, and its row adds the kept batches' time to its wall and CPU seconds
(a trained run's evaluation starts over, as a rerun trains again).
"""
import concurrent.futures
import contextlib
import dataclasses
import datetime
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid

from tqdm import tqdm

from ablations import plan as planning
from ablations.rows import REPO, Rows, Setup, append_row, config_hash, provenance, read_rows, same_outcome
from cli import UserError, make_folder
from config import Config, config_to_dict
from plot_log import read_log

# What sets a run's cost most: under a deadline, a run is estimated from finished runs that share them,
# so that one wide network's hour does not keep the baseline's 25-minute runs from starting.
COST_FIELDS = ("arch", "channels", "attention")
RE_EVALUATION_SHARE = 1 / 3  # a re-evaluation's time as a share of a trained run's, until one has finished

# Concurrent runs on one GPU. Not measured yet: the "time to quality" issue measures it on a GPU.
RUNS_PER_GPU = 1
# Concurrent runs on a CPU, each with cores / RUNS_PER_CPU threads. Measured with
# `python tools/run_costs.py concurrency --device cpu` on 2 cores of an AMD EPYC (Zen 4), torch 2.14.1,
# 2026-12-02, batch 64, eager, bf16 (the probe's choice): at preset tiny's width two 1-thread runs finished 1.38x the runs
# per CPU-hour of one 2-thread run (254 against 183 img/s in all); at channels (32, 64, 64, 64), 0.96x
# for 5 kimg runs, whose start (decoding the data set, the probe) ran twice at once, while training
# itself ran 1.09x (88 against 81 img/s). Two runs at once, until the study's own scale measures better
# (--runs_per_gpu overrides it; the study's scales pin fp32, not measured at 2 x 1 yet).
RUNS_PER_CPU = 2
SAMPLER_FLAGS = {"sampler": "--sampler", "sampling_steps": "--steps", "eta": "--eta", "clamp_x0": "--clamp",
                 "timestep_spacing": "--timestep_spacing"}
LOG_EVERY = 10  # steps between the logged losses that draw the loss curves (each costs a host sync)


class RunFailed(Exception):
    """train.py or evaluate.py failed; the message is the row's one-line reason."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: the run leaves no row."""


class Skipped(Exception):
    """A re-evaluation whose trained run is not there to evaluate: no row (the trained run's own row
    says why), and a rerun tries again."""


class Runner:
    """One invocation of the study (or of the curve): its plan, its workers, the rows it appends."""

    def __init__(self, study, args):
        self.study, self.args, self.scale = study, args, study.scale
        self.setup = Setup.of(self.scale, args.budget_kimg, args.num_samples, args.precision)
        self.out = make_folder(args.out or self.scale.folder, "--out")
        self.checkpoints = args.checkpoints or self.scale.checkpoints
        index, count = getattr(args, "shard", (1, 1))
        self.results = os.path.join(self.out, "results.jsonl" if count == 1 else f"results.shard-{index}-of-{count}.jsonl")
        for flag in ("train_dataset_directory", "validate_dataset_directory"):
            if not os.path.isdir(getattr(args, flag)):
                raise UserError(f"--{flag} {getattr(args, flag)}: no such folder; build the default data set "
                                f"with bash images/make_default_dataset.sh")
        self.facts = {"torch": package_version("torch"), **provenance(self.out)}
        self.runs_per_gpu = args.runs_per_gpu or RUNS_PER_GPU
        self.threads = None  # each run's CPU threads, once run() has its slots
        self.batches = 1     # the batches of samples of an evaluation, once run() has its slots
        self.lock = threading.Condition()  # guards the plan, the children and the results file
        self.stop = threading.Event()
        self.children = {}  # each step under way: whether it resumes (a re-evaluation's evaluate.py)
        self.stopped = []   # the re-evaluations the deadline stopped
        self.signalled = set()  # the steps stop_resumable has sent SIGTERM
        self.local = threading.local()     # the run under way on this thread: its steps' seconds

    def rows(self):
        return Rows.of(self.study, self.setup, read_rows(self.out))

    # -- the plan

    def plan(self):
        """(the runs to do, in order, for this shard; how many of its runs have a current row)."""
        args = self.args
        jobs = planning.select(self.study, args.only, args.group, args.seeds)
        has_checkpoint = None
        if getattr(args, "retrain_missing", False):  # the curve's arguments have no such flag
            has_checkpoint = lambda key: os.path.isfile(os.path.join(self.run_dir(*key), "latest_model.pth"))
        return planning.to_do(planning.shard(jobs, *args.shard), self.rows(), args.retry_failed, has_checkpoint,
                              getattr(args, "remeasure", False))

    def run_dir(self, name, seed, budget_kimg=None):
        """Where a trained run's checkpoint and logs go."""
        return os.path.join(self.checkpoints, f"{budget_kimg or self.setup.budget_kimg:g}kimg", name, f"seed{seed}")

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
        from speed import cpu_info, native_bf16
        if self.setup.precision == "bf16" and not native_bf16():
            # Measured with preset small on 1 thread of an AMD EPYC (Zen 3), 2026-12-02: emulated
            # bf16 trained at 2 img/s against fp32's 33, and sampled at 3 against 110.
            raise UserError(f"--precision bf16 (the {self.scale.name} scale's): this CPU ({cpu_info()[0]}) has no "
                            f"native bf16 (AMX or AVX512-BF16), and emulated it runs 15 to 40 times slower than fp32, "
                            f"so a run would take hours; run the study on a CPU whose lscpu flags have amx_bf16 or "
                            f"avx512_bf16, or pass --precision fp32 for a table of its own")
        runs = args.runs_per_gpu or RUNS_PER_CPU
        return [(None, device, max(1, (os.cpu_count() or 1) // runs))] * runs

    # -- the study: workers take the runs in order

    def run(self):
        jobs, skipped = self.plan()
        slots = self.slots()
        self.threads = slots[0][2]
        from speed import sampling_batch
        self.batches = math.ceil(self.setup.num_samples / sampling_batch(slots[0][1]))  # an evaluation's
        print(f"ablation study, scale {self.scale.name}: budget {self.setup.budget_kimg:g} kimg, "
              f"{self.setup.num_samples} samples per evaluation, {self.setup.precision}; {len(jobs)} runs to do, "
              f"{skipped} skipped (they have a current row); {len(slots)} at a time on {slots[0][1]}; rows in "
              f"{self.results}")
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
                    if self.deadline and time.time() > self.deadline:
                        self.stop_resumable()
            except KeyboardInterrupt:
                self.interrupt("interrupted: the runs under way leave no row; a rerun does them")
                code = 130
        signal.signal(signal.SIGTERM, previous_handler)
        self.bar.close()
        for w in workers:
            w.result()  # a bug of the runner: its traceback
        if self.unstarted:
            print(f"--deadline_minutes: {len(self.unstarted)} runs not started: "
                  f"{', '.join(f'{j.variant.name}/{j.seed}' for j in self.unstarted)}")
        if self.stopped:
            print(f"--deadline_minutes: {len(self.stopped)} re-evaluations stopped at the deadline, their finished "
                  f"batches of samples kept (a rerun continues them): "
                  f"{', '.join(f'{j.variant.name}/{j.seed}' for j in self.stopped)}")
        from ablations.report import write_report
        print(f"wrote {write_report(self.study, self.out, self.setup)}")
        return code

    def worker(self, slot):
        try:
            while (job := self.next_job()) is not None:
                try:
                    row = self.run_job(job, slot)
                except Interrupted:
                    if self.stop.is_set() or not (job.variant.of and self.deadline and time.time() >= self.deadline):
                        return
                    with self.lock:  # the deadline stopped a re-evaluation: next_job files the rest as not started
                        self.stopped.append(job)
                        self.bar.total -= 1
                    continue
                except Skipped as e:
                    self.bar.write(f"{job.variant.name} seed {job.seed}: not run: {e}")
                    continue
                finally:
                    with self.lock:
                        self.running.discard(job.key)
                        self.lock.notify_all()
                note = None if job.variant.of else rerun_note(self.rows(), row)
                with self.lock:
                    append_row(self.results, row)
                self.bar.update(1)
                self.bar.write(summary(row))
                if note:
                    self.bar.write(note)
        except BaseException:
            self.interrupt("a bug in ablate.py stopped the study (traceback below); the runs under way leave no row")
            raise

    def next_job(self):
        """The first pending run whose trained run (for a re-evaluation) is neither pending nor under
        way; None when none is left. Under --deadline_minutes a trained run that cannot finish in time
        is not started, nor are its re-evaluations. A re-evaluation starts where at least one of its
        batches of samples can end in time, even one that cannot finish: its evaluate.py keeps each
        finished batch (--resume_dir), the deadline stops it with no row, and a rerun continues it."""
        with self.lock:
            while not self.stop.is_set() and self.pending:
                waiting_for = self.running | {j.key for j in self.pending}
                job = next((j for j in self.pending if not (j.variant.of and j.root in waiting_for)), None)
                if job is None:
                    self.lock.wait()
                    continue
                self.pending.remove(job)
                unstarted = {j.key for j in self.unstarted}
                seconds = needed = self.estimate_seconds(job) if self.deadline else 0
                kept = 0
                if job.variant.of and self.deadline:
                    kept = self.kept_batches(job)
                    # A re-evaluation needs the time of one batch (--resume_dir keeps each), and samples
                    # only the batches a stopped run of it has not kept; a trained run needs all of it.
                    needed, seconds = seconds / self.batches, seconds * (1 - kept / self.batches)
                if self.deadline and (job.root in unstarted or time.time() + needed > self.deadline):
                    self.unstarted.append(job)
                    self.bar.total -= 1
                    continue
                if self.deadline and time.time() + seconds > self.deadline:
                    left = f" for the {self.batches - kept} of its {self.batches} batches not kept" if kept else ""
                    self.bar.write(f"{job.variant.name} seed {job.seed}: about {seconds / 60:.0f} minutes{left}, past "
                                   f"the deadline: it samples until then, keeps its finished batches, and a rerun "
                                   f"continues it")
                self.running.add(job.key)
                return job
            return None

    def kept_batches(self, job):
        """The batches of samples that a stopped run of this re-evaluation kept (--resume_dir)."""
        from generate import KeptBatches
        folder = os.path.join(self.run_dir(self.study.variant(job.variant.of).name, job.seed), f"samples_{job.variant.name}")
        return min(KeptBatches.most_kept(folder), self.batches)

    def estimate_seconds(self, job):
        """The longest finished run of its kind (trained, or re-evaluated) at this setup, of the same
        network (COST_FIELDS) where one has finished, else of any network; else the scale's guess.
        A re-evaluation's time grows with its sampler steps. Where finished ones (those with a
        measured CPU time, where there are some) span two step counts: the line through them
        (sampling_line), raised by the most one took over it; the line through those on this
        invocation's threads where they span two, else through all, times the most one on these
        threads took over it. Else the longest times the ratio of the steps (DDPM's 1000 steps: 40
        times a 25-step evaluation), never less. A forecast from a few points, not a bound."""
        as_json = lambda config: json.loads(json.dumps(config_to_dict(config)))
        config, default = as_json(self.study.config(job.variant)), as_json(Config())  # rows older than a field lack it
        network = lambda c: [c.get(f, default[f]) for f in COST_FIELDS]
        finished = [r for r in self.rows().current.values() if r["status"] == "ok" and bool(r["of"]) == bool(job.variant.of)]
        pool = [r for r in finished if network(r.get("config") or {}) == network(config)] or finished
        if not pool:
            return 60 * self.scale.run_minutes_guess * (RE_EVALUATION_SHARE if job.variant.of else 1)
        if not job.variant.of:
            return max(r["wall_seconds"] for r in pool)
        pool, steps = measured_first(pool), config["sampling_steps"]
        here = [(r["sampler"]["steps"], r["wall_seconds"]) for r in pool if r.get("threads") == self.threads]
        every = [(r["sampler"]["steps"], r["wall_seconds"]) for r in pool]
        line_here = sampling_line(here)
        line = line_here or sampling_line(every)
        if line is None:
            return max(t * max(1, steps / s) for s, t in here or every)
        fixed, per_step, above = line
        at = lambda s: fixed + per_step * s
        slower = 1 if line_here else max([t / at(s) for s, t in here], default=1)
        return slower * (at(steps) + above)

    def stop_resumable(self):
        """At the deadline: SIGTERM, once, to the re-evaluations under way, whose finished batches stay."""
        with self.lock:
            resumable = [child for child, resumes in self.children.items() if resumes and child not in self.signalled]
            self.signalled.update(resumable)
        for child in resumable:
            with contextlib.suppress(OSError):
                child.send_signal(signal.SIGTERM)

    def interrupt(self, message, wait=False):
        """Stop: no new step starts, the steps under way get SIGTERM (train.py writes its checkpoint);
        wait: until they have exited (the curve, whose step ran on this thread). SIGTERM, not SIGINT:
        a study started in the background (`nohup ... &`) passes an ignored SIGINT on to its runs."""
        if self.stop.is_set():
            return
        self.stop.set()
        with self.lock:
            self.lock.notify_all()
            children = list(self.children)
        for child in children:
            with contextlib.suppress(OSError):
                child.send_signal(signal.SIGTERM)
        if wait:
            for child in children:
                child.wait()
        print(f"\n{message}", file=sys.stderr)

    # -- one run

    def run_job(self, job, slot, budget_kimg=None, run_dir=None, fresh=True):
        """Train (unless it re-evaluates a run), then evaluate one run: its row. The curve passes its
        own budget and run folder, and resumes (fresh=False)."""
        v, seed, budget_kimg = job.variant, job.seed, budget_kimg or self.setup.budget_kimg
        config = self.study.config(v)
        trained = self.study.variant(v.of) if v.of else v
        run_dir = run_dir or self.run_dir(trained.name, seed, budget_kimg)
        self.local.seconds, self.local.cpu_seconds = {}, {}
        eval_seed = self.setup.evaluation_seed if v.eval_seed is None else v.eval_seed
        row = dict(variant=v.name, group=v.group, scale=self.scale.name, preset=self.study.preset(trained),
                   overrides=[*self.study.overrides(trained), *(v.overrides if v.of else ())],
                   of=v.of or None, seed=seed,
                   eval_seed=eval_seed, budget_kimg=budget_kimg, num_samples=self.setup.num_samples,
                   run_id=uuid.uuid4().hex[:12], parent_run=None, config_hash=config_hash(self.study, v),
                   setup_hash=dataclasses.replace(self.setup, budget_kimg=budget_kimg).hash,
                   batch_size=None, steps=None, images_seen=None,
                   date=datetime.datetime.now().isoformat(timespec="seconds"), **self.facts, device=slot[1],
                   precision=self.setup.precision, gpu=gpu_name(slot), cpu=cpu_name(), status="ok", reason=None,
                   step_seconds=self.local.seconds)
        started = time.time()
        try:
            if v.of:
                row.update(self.trained_run(v, seed, run_dir))
            else:
                row.update(self.train(v, seed, budget_kimg, run_dir, slot, fresh))
            row.update(self.evaluate(v, seed, eval_seed, run_dir, slot))
        except RunFailed as e:
            row.update(status="failed", reason=str(e))
        row["finished"] = time.time()  # rows are ordered by it (ablations/rows.py)
        # A re-evaluation that an earlier invocation began: the batches it kept count with what they took.
        earlier = row.get("resumed") or {"wall_seconds": 0, "cpu_seconds": 0}
        row["wall_seconds"] = round(row["finished"] - started + earlier["wall_seconds"], 1)
        # A GPU that runs several runs at once gives each its share of the time.
        row["gpu_seconds"] = None if slot[1] == "cpu" else round(row["wall_seconds"] / self.runs_per_gpu, 1)
        # On a CPU each run has its own threads: its CPU time is its wall time times them.
        row["threads"] = slot[2]
        row["cpu_seconds"] = round(row["wall_seconds"] * slot[2], 1) if slot[1] == "cpu" and slot[2] else None
        # ...and the CPU time its steps really used (user and system), which other load on the
        # machine does not inflate; None where a step's could not be read.
        used = list(self.local.cpu_seconds.values())
        row["process_cpu_seconds"] = (round(sum(used) + earlier["cpu_seconds"], 1)
                                      if used and None not in used and row["status"] == "ok" else None)
        row["config"] = config_to_dict(config)
        return row

    def trained_run(self, v, seed, run_dir):
        """For a re-evaluation: the training fields of the run it re-evaluates."""
        parent = self.rows().current.get((v.of, seed))
        if parent is None or parent["status"] != "ok":
            raise Skipped(f"its trained run {v.of} seed {seed} "
                          f"{'has no current row' if parent is None else 'failed: ' + str(parent['reason'])}")
        if not os.path.isfile(os.path.join(run_dir, "latest_model.pth")):
            raise Skipped(f"{run_dir}/latest_model.pth is missing (trained on another machine?): copy the "
                          f"folder here, or rerun with --retrain_missing to train it again")
        return {"parent_run": parent["run_id"],
                **{k: parent.get(k) for k in ("batch_size", "steps", "images_seen", "train_seconds", "img_per_s",
                                              "train_loss", "val_loss", "val_loss_ema")}}

    def train(self, v, seed, budget_kimg, run_dir, slot, fresh):
        """train.py until the budget (--max_kimg: it takes ceil(budget / batch) steps, and its lr
        schedule ends there), then the validation loss of its final weights: the row's training fields."""
        os.makedirs(run_dir, exist_ok=True)
        self.step("train.py", [
            "train.py", "--preset", self.study.preset(v),
            *[a for o in self.study.overrides(v) for a in ("--set", o)],
            *(["--fresh"] if fresh else []), "--max_kimg", budget_kimg, "--seed", seed, "--model_checkpoint_dir",
            run_dir, "--no_visdom", "--device", slot[1], "--precision", self.setup.precision, "--layout", "contiguous",
            "--log_every", LOG_EVERY, "--save_every", 10 ** 6, "--no_best_checkpoint",
            "--train_dataset_directory", self.args.train_dataset_directory,
            "--validate_dataset_directory", self.args.validate_dataset_directory], run_dir, slot)
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
                "batch_size": last["images_seen"] // last["step"], "train_seconds": round(last["time"], 1),
                "img_per_s": round(last["images_seen"] / last["time"], 1),
                "train_loss": last["train_loss"], "val_loss": measured["val_loss"],
                "val_loss_ema": measured["val_loss_ema"],
                "curve": {"kimg": [r["images_seen"] / 1000 for r in train], "train_loss": [r["train_loss"] for r in train]}}

    def evaluate(self, v, seed, eval_seed, run_dir, slot):
        """evaluate.py with the variant's sampler, which also draws the grid: the row's metrics and grid."""
        sampler = [a for o in (v.overrides if v.of else ()) for a in sampler_flag(o)]
        report_path = os.path.join(run_dir, f"evaluation_{v.name}.json")
        grid_path = os.path.join(run_dir, f"grid_{v.name}.png")
        self.step("evaluate.py", [
            "evaluate.py", "--checkpoint", os.path.join(run_dir, "latest_model.pth"), "--num_samples",
            self.setup.num_samples, "--output_json", report_path, "--reference_dir", self.args.train_dataset_directory,
            "--test_dir", self.args.validate_dataset_directory, "--no_download", "--seed", eval_seed,
            "--subset_seed", self.setup.evaluation_seed, "--cache_dir", os.path.join(self.checkpoints, "evaluation_cache"),
            "--grid", grid_path, "--grid_size", self.scale.grid_size, "--overwrite",  # the first samples
            "--device", slot[1], "--precision", self.setup.precision, "--layout", "contiguous", *sampler,
            *(["--resume_dir", os.path.join(run_dir, f"samples_{v.name}")] if v.of else [])],
            run_dir, slot, resumes=bool(v.of))
        with open(report_path) as f:
            report = json.load(f)
        grid = os.path.join("grids", f"{v.name}_seed{seed}.png")
        os.makedirs(os.path.join(self.out, "grids"), exist_ok=True)
        shutil.copyfile(grid_path, os.path.join(self.out, grid))
        attributes = report.get("attributes") or {}
        return {"sampler": report["sampler"], "metrics": report["metrics"], "attribute_tv": attributes.get("tv"),
                "mi_top_pair": attributes.get("mi_top_pair"), "grid": grid, "run_dir": run_dir,
                "resumed": report["samples"].get("resumed")}

    def step(self, name, command, run_dir, slot, resumes=False):
        """One step of a run, a Python script of this repository in a subprocess, its output in
        <run_dir>/<name>.log and .err. Raises RunFailed with its last error line, or Interrupted.
        resumes: a step that the deadline may stop, as it continues where it stopped."""
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
                self.children[child] = resumes
            code, cpu = wait_for(child)
            with self.lock:
                self.children.pop(child)
        if self.stop.is_set() or code in (130, -signal.SIGINT, -signal.SIGTERM):
            raise Interrupted
        if code != 0:
            raise RunFailed(f"{name} exit {code}: {last_line(err_path) or last_line(log_path) or 'no output'}")
        self.local.seconds[name] = round(time.time() - started, 1)
        self.local.cpu_seconds[name] = cpu


def wait_for(child):
    """(its exit code, the CPU seconds it used, user and system, or None): os.wait4 reads both."""
    try:
        _, status, usage = os.wait4(child.pid, 0)
    except ChildProcessError:  # reaped already (a stop's send_signal polls it): its code, no time
        return child.wait(), None
    code = child.returncode = os.waitstatus_to_exitcode(status)
    return code, usage.ru_utime + usage.ru_stime


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
    from ablations.report import PRIMARY, fmt
    if row["status"] != "ok":
        return f"{row['variant']} seed {row['seed']}: failed: {row['reason']}"
    metric = row["metrics"][PRIMARY]
    return (f"{row['variant']} seed {row['seed']}: {PRIMARY} {fmt(metric['samples'])} (floor {fmt(metric['floor'])}), "
            f"{row['wall_seconds']:.0f} s")


def measured_first(rows):
    """The rows whose CPU time was measured, where there are some, else all: rows from before the
    runner measured it may have shared the cores with other work (some with the tests)."""
    return [r for r in rows if r.get("process_cpu_seconds")] or rows


def sampling_line(points):
    """(fixed seconds, seconds per sampler step, the most a point lies above the line): the
    least-squares line through re-evaluations' (sampler steps, seconds); None where they have fewer
    than two step counts, or the line does not rise from a time of at least 0 (noise)."""
    if len({s for s, _ in points}) < 2:
        return None
    per_step, fixed = statistics.linear_regression(*zip(*points))
    if per_step <= 0 or fixed < 0:
        return None
    return fixed, per_step, max(t - fixed - per_step * s for s, t in points)


def rerun_note(rows, row):
    """What a trained run's new row means for the current re-evaluations of its earlier row (a rerun:
    --retrain_missing, --remeasure; ablations/rows.py), before it is appended to rows; None where
    there are none."""
    before = rows.current.get((row["variant"], row["seed"]))
    evaluations = [r for r in rows.current.values() if before and r.get("parent_run") == before["run_id"]]
    if not evaluations:
        return None
    head = f"{row['variant']} seed {row['seed']}"
    if same_outcome(before, row):
        return (f"{head}: measured the same as its earlier run {before['run_id']} to the last digit (it is "
                f"deterministic): its {len(evaluations)} re-evaluations stay current")
    if row["status"] != "ok":
        return (f"{head}: failed where its earlier run {before['run_id']} finished: its {len(evaluations)} "
                f"re-evaluations are stale until --retry_failed trains it again")
    return (f"{head}: measured otherwise than its earlier run {before['run_id']}: its {len(evaluations)} "
            f"re-evaluations are stale; the same command again runs them on this run")


def package_version(name):
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


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
