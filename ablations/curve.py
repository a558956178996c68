"""The budget curve: for each width, one baseline run, trained segment by segment to each point
(resumed exactly) and evaluated at each, so that the person who picks a scale's width and budget
sees the quality each costs in CPU time, and where the baseline leaves its steep early phase. Its
rows go to curve.jsonl, and the report's section "The budget curve".

The segments are one run: the learning rate is constant (lr_schedule=constant), so that stopping
at a point changes nothing about the steps before it. The widths run at the same time, one on each
of the runner's slots, as the study's runs do, so that their minutes are the study's minutes.
"""
import concurrent.futures
import dataclasses
import math
import os
import signal

from ablations.plan import Job
from ablations.rows import append_row, config_hash, read_rows
from ablations.runner import Interrupted, raise_keyboard_interrupt, summary
from ablations.study import setting
from cli import UserError

CURVE_FLAT = 0.25     # the steep phase ends where the next point improves the metric by less
MACHINE_CORES = 2     # run minutes are minutes of the study's 2-core machine: CPU seconds / 2 / 60
INTERRUPTED = "interrupted: the points under way leave no row; a rerun continues the curve"
LIMIT_FALLBACK = 1.5  # the curve goes on to 1.5x the scale's run limit (the 15 minutes the issue allows)


def run_curve(runner, points_kimg=None, seed=0, fresh=False, widths=None):
    """Each width's baseline (lr_schedule=constant) evaluated at each point of points_kimg (default:
    the scale's, else 1/4, 1/2, 1 and 2 budgets). A width stops where its next point would cost a
    run more than LIMIT_FALLBACK times the scale's run limit. A rerun continues where it stopped."""
    setup, scale, study = runner.setup, runner.scale, runner.study
    points = sorted(points_kimg or scale.curve_points_kimg or [setup.budget_kimg * f for f in (0.25, 0.5, 1, 2)])
    widths = [tuple(w) for w in widths or scale.curve_widths] or [None]
    path = os.path.join(runner.out, "curve.jsonl")
    if fresh and os.path.exists(path):
        os.remove(path)
    slots = runner.slots()
    print(f"budget curve, scale {scale.name}: the baseline with lr_schedule=constant, seed {seed}, "
          f"{'widths ' + ', '.join(map(str, widths)) if widths != [None] else 'its own width'}, evaluated at "
          f"{', '.join(f'{p:g}' for p in points)} kimg with {setup.num_samples} samples, {len(slots)} at a time; "
          f"rows in {path}")
    previous_handler = signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    code = 0
    with concurrent.futures.ThreadPoolExecutor(len(slots)) as pool:
        free = list(slots)
        futures = {}
        for width in widths:
            futures[pool.submit(lambda w: curve_of(runner, w, points, seed, path, free), width)] = width
        try:
            codes = [f.result() for f in futures]  # a bug: its traceback
            code = max(codes)
        except KeyboardInterrupt:
            runner.interrupt(INTERRUPTED, wait=True)
            code = 130
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
    if code == 130:
        return code
    from ablations.report import write_report
    print(f"wrote {write_report(study, runner.out, setup)}")
    return code


def curve_of(runner, width, points, seed, path, free):
    """One width's points, on a slot of its own (taken from free and given back)."""
    with runner.lock:
        while not free:
            runner.lock.wait()
        slot = free.pop()
    try:
        return curve_points_of(runner, width, points, seed, path, slot)
    except Interrupted:  # a step stopped by a signal: the other widths stop too
        runner.interrupt(INTERRUPTED, wait=True)
        return 130
    finally:
        with runner.lock:
            free.append(slot)
            runner.lock.notify_all()


def curve_points_of(runner, width, points, seed, path, slot):
    study, setup, scale = runner.study, runner.setup, runner.scale
    v = curve_variant(study, width)
    run_dir = os.path.join(runner.checkpoints, "curve", width_label(study.config(v).channels), f"seed{seed}")
    done = {r["budget_kimg"]: r for r in current_points(study, setup, read_rows(runner.out, "curve.jsonl"))
            if r["seed"] == seed and r["config_hash"] == config_hash(study, v)}
    for point in points:
        if point in done:
            print(f"{v.name} {point:g} kimg: has a row (skipped)")
            continue
        if any(p > point for p in done):
            raise UserError(f"the curve's run of {v.name} is past {point:g} kimg already: pass --fresh to start over")
        last = done[max(done)] if done else None
        limit = LIMIT_FALLBACK * scale.run_minutes_limit
        if last and limit and predicted_minutes(last, point) > limit:
            print(f"{v.name}: stops before {point:g} kimg, where a run would take about "
                  f"{predicted_minutes(last, point):.0f} minutes of the machine (more than {limit:g})")
            break
        row = runner.run_job(Job(dataclasses.replace(v, name=f"{v.name}_{point:g}kimg"), seed), slot,
                             budget_kimg=point, run_dir=run_dir, fresh=not done)
        if row["status"] == "ok" and last:
            row["run_cpu_seconds"] = round(row["cpu_seconds"] + row["threads"] * last["train_seconds"], 1)
        elif row["status"] == "ok":
            row["run_cpu_seconds"] = row["cpu_seconds"]
        with runner.lock:
            append_row(path, row)
        print(summary(row))
        if row["status"] != "ok":
            return 1
        done[point] = row
    return 0


def run_minutes(row):
    """What one run to this point costs, start-up and evaluation included, in minutes of the study's
    machine: the point's own segment (start-up, its training, its evaluation) plus the training
    before it, in CPU seconds, over MACHINE_CORES cores."""
    seconds = row.get("run_cpu_seconds")
    return None if seconds is None else seconds / MACHINE_CORES / 60


def predicted_minutes(last, point):
    """A run to `point`, from the last point's: training scales with the images, the rest stays."""
    threads = last["threads"]
    train = last["train_seconds"] * point / last["budget_kimg"]
    rest = last["run_cpu_seconds"] / threads - last["train_seconds"]
    return threads * (train + rest) / MACHINE_CORES / 60


def width_label(channels):
    return "-".join(map(str, channels))


def curve_variant(study, width=None):
    base = study.variant("baseline")
    overrides = (*base.overrides, "lr_schedule=constant", *study.scale.curve_overrides,
                 *([setting("channels", width)] if width else []))
    name = "curve" if width is None else f"curve_{width_label(width)}"
    return dataclasses.replace(base, name=name, overrides=overrides)


def curve_variants(study):
    return [curve_variant(study, tuple(w) if w else None) for w in study.scale.curve_widths or [None]]


def current_points(study, setup, rows):
    """The curve's finished rows that the study file and setup still give (its budget is the point's)."""
    want = {config_hash(study, v) for v in curve_variants(study)}
    return [r for r in rows if r["status"] == "ok" and r.get("config_hash") in want
            and r.get("setup_hash") == dataclasses.replace(setup, budget_kimg=r["budget_kimg"]).hash]


def per_doubling(a, b, kimg_a, kimg_b):
    """The ratio b / a of the metric between two points, scaled to one doubling of the images seen,
    so that unevenly spaced points compare."""
    return (b / a) ** (1 / math.log2(kimg_b / kimg_a))


def suggest_budget(values, points_kimg, metric):
    """The smallest point at which the baseline is past its steep early phase: from it on, every
    point improves the metric on the one before by less than CURVE_FLAT per doubling of the images
    seen. A suggestion for the person who picks the budget."""
    steps = [per_doubling(a, b, ka, kb) for a, b, ka, kb in zip(values, values[1:], points_kimg, points_kimg[1:])]
    for i in range(len(steps)):
        if all(r > 1 - CURVE_FLAT for r in steps[i:]):
            return (f"Suggested budget: **{points_kimg[i]:g} kimg**, the first point from which no later "
                    f"point improves {metric} by {CURVE_FLAT:.0%} or more per doubling of the images seen.")
    return (f"No suggestion: the last point still improved {metric} by {CURVE_FLAT:.0%} or more per doubling of "
            f"the images seen, so the baseline is still in its steep early phase there; extend the curve "
            f"(--points_kimg).")
