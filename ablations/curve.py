"""The budget curve: one baseline run, trained segment by segment to each point (resumed exactly)
and evaluated at each, so that the person who picks a scale's budget sees where the baseline leaves
its steep early phase. Its rows go to curve.jsonl, and the report's section "The budget curve".
"""
import dataclasses
import os
import signal

from ablations.plan import Job
from ablations.rows import append_row, config_hash, read_rows
from ablations.runner import Interrupted, raise_keyboard_interrupt, summary
from cli import UserError

CURVE_FLAT = 0.25  # the steep phase ends where the next point improves the metric by less


def run_curve(runner, points_kimg=None, seed=0, fresh=False):
    """The baseline with lr_schedule=constant (so that the segments are one run), evaluated at each
    point of points_kimg (default 1/4, 1/2, 1 and 2 budgets). A rerun continues where it stopped."""
    v, setup = curve_variant(runner.study), runner.setup
    points = sorted(points_kimg or [setup.budget_kimg * f for f in (0.25, 0.5, 1, 2)])
    path = os.path.join(runner.out, "curve.jsonl")
    run_dir = os.path.join(runner.checkpoints, "curve", f"seed{seed}")
    slot = runner.slots()[0]  # one run at a time, each like one of the study's
    if fresh and os.path.exists(path):
        os.remove(path)
    done = {r["budget_kimg"] for r in current_points(runner.study, setup, read_rows(runner.out, "curve.jsonl"))
            if r["seed"] == seed}
    print(f"budget curve, scale {runner.scale.name}: the baseline with lr_schedule=constant, seed {seed}, evaluated "
          f"at {', '.join(f'{p:g}' for p in points)} kimg with {setup.num_samples} samples; rows in {path}")
    for point in points:
        if point in done:
            print(f"{point:g} kimg: has a row (skipped)")
            continue
        if any(p > point for p in done):
            raise UserError(f"the curve's run is past {point:g} kimg already: pass --fresh to start it over")
        previous_handler = signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
        try:
            row = runner.run_job(Job(dataclasses.replace(v, name=f"curve_{point:g}kimg"), seed), slot,
                                 budget_kimg=point, run_dir=run_dir, fresh=not done)
        except (Interrupted, KeyboardInterrupt):
            runner.interrupt("interrupted: the point under way leaves no row; a rerun continues the curve", wait=True)
            return 130
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
        append_row(path, row)
        print(summary(row))
        if row["status"] != "ok":
            return 1
        done.add(point)
    from ablations.report import write_report
    print(f"wrote {write_report(runner.study, runner.out, setup)}")
    return 0


def curve_variant(study):
    base = study.variant("baseline")
    return dataclasses.replace(base, name="curve", overrides=(*base.overrides, "lr_schedule=constant"))


def current_points(study, setup, rows):
    """The curve's finished rows that the study file and setup still give (its budget is the point's)."""
    want = config_hash(study, curve_variant(study))
    return [r for r in rows if r["status"] == "ok" and r.get("config_hash") == want
            and r.get("setup_hash") == dataclasses.replace(setup, budget_kimg=r["budget_kimg"]).hash]


def suggest_budget(values, points_kimg, metric):
    """The smallest point at which the baseline is past its steep early phase: from it on, every
    point improves the metric on the one before by less than CURVE_FLAT. A suggestion for the person
    who picks the budget."""
    for i in range(len(values) - 1):
        if all(b > (1 - CURVE_FLAT) * a for a, b in zip(values[i:], values[i + 1:])):
            return (f"Suggested budget: **{points_kimg[i]:g} kimg**, the first point from which no later "
                    f"point improves {metric} by {CURVE_FLAT:.0%} or more on the one before it.")
    return (f"No suggestion: the last point still improved {metric} by {CURVE_FLAT:.0%} or more, so the baseline is "
            f"still in its steep early phase there; extend the curve (--points_kimg).")
