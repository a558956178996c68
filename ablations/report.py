"""The report: REPORT.md, its plots and its grid mosaics, written from the current rows of one setup
(ablations/rows.py) and never by hand. Every comparison is ablations/stats.py's: a variant against
the run it is paired with (plan.Study.reference), seed by seed, as a ratio with its 95% interval and
a verdict corrected over the table.
"""
import dataclasses
import glob
import math
import os
import statistics

from ablations import stats
from ablations.curve import (LIMIT_FALLBACK, MACHINE_CORES, current_points, per_doubling, run_minutes, suggest_budget,
                             width_label)
from ablations.rows import REPO, Rows, Setup, read_rows
from ablations.runner import RE_EVALUATION_SHARE, measured_first, sampling_line
from cli import UserError, atomic_write
from config import config_to_dict
from unet import zero_init_kills_branches

STUDY = os.path.join("ablations", "study.py")
PRIMARY = "attribute_fd"  # the attribute network's feature distance; lower is better
METRICS = [  # key, label, the scale of its paired difference, lower is better
    (PRIMARY, "attribute FD", "log", True),
    ("swd_x1e3_avg", "SWD", "log", True),
    ("attribute_tv_mean", "attribute TV", "diff", True),
    ("precision", "precision", "diff", False),
    ("recall", "recall", "diff", False),
    ("background_error", "background error", "diff", True),
]


def write_report(study, folder, setup):
    """REPORT.md in `folder`, with plots/ and grid mosaics, from its current rows of this setup.
    Returns its path."""
    scale = study.scale
    all_rows = read_rows(folder)
    rows = Rows.of(study, setup, all_rows)
    curve = current_points(study, setup, read_rows(folder, "curve.jsonl"))
    plots = os.path.join(folder, "plots")
    default_study = os.path.realpath(study.path) == os.path.realpath(os.path.join(REPO, STUDY))
    out = os.path.relpath(os.path.abspath(folder), REPO)  # a folder of the repository other than the scale's own
    flags = ([] if default_study else ["--study", study.path]) + \
        (["--scale", scale.name] if scale.name != "gpu" else []) + \
        (["--budget_kimg", f"{setup.budget_kimg:g}"] if setup.budget_kimg != scale.budget_kimg else []) + \
        (["--out", out] if out != scale.folder and not out.startswith("..") else [])

    def command(*words, script="bash ablate.sh"):  # a subcommand (curve, report) first, then the scale's flags
        sub = list(words[:1]) if words and not words[0].startswith("--") else []
        return " ".join([script, *sub, *flags, *words[len(sub):]])

    tables = {group: table(study, rows, group) for group in study.groups if group != "evaluation_noise"}
    lines = header(study, rows, setup, tables, command, curve)
    matters = what_matters(study, rows, setup, tables, values(rows.ok("baseline"), PRIMARY))
    lines += matters + curve_section(study, curve, folder, command)
    written = ["curve.png"] if curve else []
    lines += ["## Results", "",
              f"Each variant is compared with the run it is paired with (the baseline; for a re-evaluation the run "
              f"it re-evaluates; on the path the row above), seed by seed: the ratio of {PRIMARY} and of SWD, the "
              f"difference of attribute TV, precision, recall and background error, each with its 95% interval. "
              f"The variance of a paired difference is pooled over the table's variants of one kind (training changes, "
              f"re-evaluations), and each verdict is corrected by Holm's method over the table, so that a table "
              f"shows a false effect at most 5% of the time (`ablations/stats.py`). \"not significant\" means that "
              f"the change could not be told from run-to-run noise at this scale and seed count. Secondary metrics "
              f"are marked * where significant; a share that sits at 0 or 1 on every seed of the reference is marked "
              f"saturated. img/s is the training speed of runs that shared the machine (two at a time on a CPU), "
              f"not a benchmark. Grids: the first {grid_count(scale.grid_size)} samples of each evaluation, from the "
              f"same starting noise for every variant.", ""]
    if not rows.current:
        lines += ["No run has a row yet.", ""]
    for group, (variants, compared) in tables.items():
        shown = [v for v in variants if rows.ok(v.name) or rows.failed(v.name)]
        if not shown:
            continue
        lines += [f"### {group}", ""]
        if group == "tuning":
            base = study.variant("baseline")
            b = study.config(base)
            lines += [f"The sweep of the learning rate and batch at the baseline's width, on seed 0. The baseline "
                      f"({preset_of(study, base)}) trains at learning rate {b.learning_rate:g}, batch "
                      f"{b.batch_size}.", ""]
        if group == "one_at_a_time":  # by effect: the largest gain first, the variants without a ratio last
            shown = by_effect(shown, compared)
        lines += [*group_paragraph(study, rows, shown, compared), *table_lines(study, rows, shown, compared), ""]
        if group == "sampling":
            lines += conditioning_table(study, rows)
        for plot in (ratio_chart(group, shown, compared, plots), loss_curves(group, study, rows, shown, plots)):
            if plot:
                written.append(os.path.basename(plot))
                lines += [f"![{os.path.basename(plot)}](plots/{os.path.basename(plot)})", ""]
        lines += grid_mosaic([(f"`{v.name}` seed {s}: {fmt(r['metrics'][PRIMARY]['samples'], '.4g')}", r)
                              for v in shown for s, r in list(rows.ok(v.name).items())[:None if group == "baseline" else 1]])
        lines += [""]
    lines += default_preset_section(study, rows, tables)
    longer = longer_rows(study, setup, folder)
    lines += longer_budget_section(study, rows, setup, tables, longer, command)
    lines += tint_section(study, rows, tables, longer) + stale_section(rows, command) + not_yet_run(study, rows, command)
    for old in set(glob.glob(os.path.join(plots, "*.png"))) - {os.path.join(plots, i) for i in written}:
        os.remove(old)  # a plot that this report does not show any more
    path = os.path.join(folder, "REPORT.md")
    with atomic_write(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    if (scale.readme and default_study and setup == Setup.of(scale)
            and os.path.realpath(folder) == os.path.realpath(os.path.join(REPO, scale.folder))):
        write_readme_section(scale, matters)
    return path


# ---- the numbers ---------------------------------------------------------------------------------

def values(by_seed, key):
    """{seed: the metric on the samples} over a variant's finished rows."""
    return {s: r["metrics"][key]["samples"] for s, r in by_seed.items()
            if (r["metrics"].get(key) or {}).get("samples") is not None}


def table(study, rows, group):
    """(the group's variants, {metric key: {variant: stats.Comparison}})."""
    variants = [v for v in study.variants if v.group == group]
    compared = {}
    for key, _, scale, _ in METRICS:
        differences, references, kinds = {}, {}, {}
        for v in variants:
            reference = study.reference(v)
            if reference is None:
                continue
            mine, theirs = values(rows.ok(v.name), key), values(rows.ok(reference), key)
            if scale == "log" and any(x <= 0 for x in [*mine.values(), *theirs.values()]):
                continue  # a metric of exactly 0 has no log ratio
            differences[v.name] = stats.paired_differences(mine, theirs, scale)
            references[v.name], kinds[v.name] = reference, "re-evaluation" if v.of else "training"
        compared[key] = stats.compare_table(differences, scale, references=references, kinds=kinds)
    return variants, compared


def log_sd(values):
    """The sample standard deviation of the logs: a spread that reads as a ratio, exp(sd)."""
    logs = [math.log(x) for x in values if x > 0]
    if len(logs) < 2:
        return None
    m = sum(logs) / len(logs)
    return math.sqrt(sum((x - m) ** 2 for x in logs) / (len(logs) - 1))


def geometric_mean(values):
    values = [x for x in values if x > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def fmt(value, spec=".3g"):
    return "-" if value is None else f"{value:{spec}}"


# ---- the header ----------------------------------------------------------------------------------

def header(study, rows, setup, tables, command, curve=()):
    scale = study.scale
    done = [r for r in rows.current.values() if r["status"] == "ok"]
    measured = done + list(curve)  # every finished run this report counts, the curve's points included
    title = "Ablation study" + (f": toy scale ({scale.name})" if scale.toy else
                                f" at the {scale.name} scale" if scale.name != "gpu" else "")
    lines = [f"# {title}", ""]
    if scale.toy:
        presets = ", ".join(f"`{a}` runs as `{b}`" for a, b in scale.presets)
        lines += [f"> **Toy scale.** This is the study's machinery at a size a CPU runs in well under an hour "
                  f"({presets}, {setup.budget_kimg:g} thousand images per run, {setup.num_samples} samples per "
                  f"evaluation). Its numbers show how the study works and what its report looks like; they say "
                  f"little about what matters for the real network, which is `ablations/REPORT.md`.", ""]
    base = rows.ok("baseline")
    base_values = values(base, PRIMARY)
    floors = sorted({round(r["metrics"][PRIMARY]["floor"], 6) for r in done if r["metrics"][PRIMARY]["floor"] is not None})
    # The evaluation noise: one trained run (the evaluation_noise rows' own, e.g. the baseline's seed
    # 0) scored by its own row and by theirs, each from other starting noise.
    rescored = [v for v in study.variants if v.group == "evaluation_noise"]
    run = (rescored[0].of, rescored[0].seeds[0]) if rescored else None
    noise_rows = [rows.current[run]] if run in rows.current and rows.current[run]["status"] == "ok" else []
    noise_rows += [r for v in rescored for s, r in rows.ok(v.name).items() if (v.of, s) == run]
    noise = [r["metrics"][PRIMARY]["samples"] for r in noise_rows]
    trained = [r for r in done if not r["of"]]
    wall = sum(r["wall_seconds"] for r in done)
    share = sum(r["train_seconds"] for r in trained) / wall if wall else None
    seeds = variant_seeds(study)
    devices = sorted({r["gpu"] or r["cpu"] for r in measured}) or ["-"]
    precisions = sorted({r["precision"] for r in measured})
    commits = sorted({f"{r['commit']}" + (f" ({r['dirty']} files differed)" if r.get("dirty") else "") for r in done})
    gpu_seconds = sum(r["gpu_seconds"] or 0 for r in done)
    lines += [
        f"Written by `{command('report', script='python ablate.py')}` from the current rows of `results*.jsonl` "
        f"({len(rows.current)} runs, {len(done)} finished, {len(rows.stale)} stale"
        + (f"; {rows.other_setups} rows of other setups not shown" if rows.other_setups else "")
        + "); do not edit it by hand.", "",
        f"- **Budget: {setup.budget_kimg:g} thousand images seen** by every training run ({scale.budget_note}). A run "
        f"takes ceil({setup.budget_kimg * 1000:g} / batch) steps, so a larger batch takes fewer. The study answers "
        f"\"what matters in the first {setup.budget_kimg * 1000:,.0f} images\", not \"what matters at convergence\".",
        f"- **Paired seeds.** The baseline trains on seeds {', '.join(map(str, study.variant('baseline').seeds))}, "
        f"every other variant on {seeds} of them; a run's seed fixes its initial weights, data order and flips, "
        f"and training noise, each from its own stream, so that a variant and the baseline on one seed share "
        f"every stream the change does not touch.",
        f"- **One evaluation for every row**: `evaluate.py` with {setup.num_samples} samples from starting noise "
        f"{setup.evaluation_seed}, against the same test subset and reference subset (evaluation seed "
        f"{setup.evaluation_seed}), in {setup.precision}.",
        f"- Primary metric: `{PRIMARY}`, the Frechet distance between the attribute network's features of "
        f"the samples and of the train set (an offline FID; lower is better).",
        "- **Floor** (the held-out test images against the train set, the same N): "
        + (f"{PRIMARY} {floors[0]:.4g}, the same for every row." if len(floors) == 1 else
           f"{PRIMARY} {', '.join(f'{f:.4g}' for f in floors)}: **the rows do not share one floor**, so their "
           f"evaluations differ; rerun the rows of the odd ones out." if floors else "not measured yet."),
        "- **Evaluation noise**: "
        + (f"the baseline's seed-0 run scored from {len(noise)} starting noises gives {PRIMARY} "
           f"{min(noise):.4g} to {max(noise):.4g}, a spread (standard deviation of the log) of "
           f"{log_sd(noise):.3f}, a ratio of x{math.exp(log_sd(noise)):.3f}." if len(noise) > 1 else
           f"not measured yet (`{command('--group', 'evaluation_noise')}`)."),
        "- **The baseline's spread over seeds**: "
        + (f"{PRIMARY} {geometric_mean(base_values.values()):.4g} (geometric mean over {len(base_values)} seeds, "
           f"{min(base_values.values()):.4g} to {max(base_values.values()):.4g}), a standard deviation of the log of "
           f"{log_sd(base_values.values()):.3f} (x{math.exp(log_sd(base_values.values())):.3f}); the evaluation "
           f"noise is part of it." if len(base_values) > 1 else "not known yet: the baseline needs 2 seeds."),
        "- **Detectable change**: " + detectable_line(study, tables, base_values),
        *goal_lines(study, base, base_values),
        "- **Where the time goes**: "
        + (f"training is {share:.0%} of the runs' wall time ({sum(r['train_seconds'] for r in trained) / 60:.1f} of "
           f"{wall / 60:.1f} minutes summed over runs that may overlap; the rest is start-up, evaluation and "
           f"re-evaluations)" + (f"; {gpu_seconds / 3600:.2f} GPU hours" if gpu_seconds else "") + "."
           if share is not None else "no finished run yet."),
        f"- Ran on: {', '.join(devices)}; torch {', '.join(sorted({str(r['torch']) for r in done})) or '-'}; "
        f"commit {', '.join(commits) or '-'}."
        + (" **The rows come from different machines**: their minutes differ, and so may their rounding."
           if len(devices) > 1 else ""),
        f"- Precision: {', '.join(precisions) or '-'}"
        + (f". **The rows mix precisions**: a study pins one ({scale.precision} at this scale); rerun the others."
           if len(precisions) > 1 else f", for every row ({scale.name} scale)." if precisions else "."),
        *run_time_lines(study, done, curve),
        f"- Reproduce: `{command()}` (it skips the runs that have a current row), then "
        f"`{command('report', script='python ablate.py')}`.", ""]
    return lines


def goal_lines(study, base, base_values):
    """Where the scale sets goals for its baseline (run_minutes_limit: the cpu scale): attribute FD at
    most GOAL_FLOOR_RATIO times its floor, and a change of GOAL_DETECTABLE detectable at the study's
    seed count; each met or missed, and the background error beside them (its floor is 0)."""
    if not study.scale.run_minutes_limit:
        return []
    if len(base_values) < 2:
        return [f"- **The baseline's goals** (attribute FD at most {GOAL_FLOOR_RATIO}x its floor; a change of "
                f"{GOAL_DETECTABLE - 1:.0%} detectable): not known yet: the baseline needs 2 seeds."]
    mean = geometric_mean(base_values.values())
    times = mean / next(iter(base.values()))["metrics"][PRIMARY]["floor"]
    # The goal is the baseline's own: its spread over seeds, as if unpaired, an upper bound on what a
    # paired variant at the study's seed count can detect.
    sigma, df = unpaired_sigma(base_values)
    ratio = stats.detectable_ratio(sigma, variant_seeds(study), df=df) if sigma else None
    background = [r["metrics"]["background_error"]["samples"] for r in base.values()
                  if "background_error" in (r["metrics"] or {})]
    return [f"- **The baseline's goals**: {PRIMARY} {mean:.4g} is {times:.1f}x its floor, "
            + (f"within the goal of {GOAL_FLOOR_RATIO}x" if times <= GOAL_FLOOR_RATIO else
               f"**short of the goal of {GOAL_FLOOR_RATIO}x**")
            + "; the change its spread over seeds lets the study detect "
            + ((f"is x{ratio:.2f}, " + ("within" if ratio <= GOAL_DETECTABLE else "**short of**")
                + f" the goal of x{GOAL_DETECTABLE:.2f}") if ratio else "is not known yet")
            + (f"; background error {sum(background) / len(background):.1f} of 255 (mean over {len(background)} seeds; "
               f"real avatars: 0)" if background else "") + "."]


def cpu_time(row):
    """A run's CPU seconds: as measured (process_cpu_seconds: its steps' user and system time), else
    its wall time times its threads (rows from before the runner measured it, and the curve's)."""
    return row.get("process_cpu_seconds") or row["cpu_seconds"]


def machine_minutes(row):
    """A run's minutes of the study's machine: its CPU time over MACHINE_CORES cores."""
    return cpu_time(row) / MACHINE_CORES / 60


def run_time_lines(study, done, curve):
    """The study's total CPU (or GPU) time, and its longest run against the scale's limit."""
    cpu = [r for r in [*done, *curve] if r.get("cpu_seconds") is not None]
    if not cpu:
        return []
    total = sum(map(cpu_time, cpu))
    measured = sum(1 for r in cpu if r.get("process_cpu_seconds"))
    how = (f"measured for {measured} of them, the others' wall time times their threads" if measured else
           "each run's wall time times its threads")
    lines = [f"- **Total CPU time**: {total / 3600:.1f} CPU-hours ({total / 3600 / MACHINE_CORES:.1f} hours of a "
             f"{MACHINE_CORES}-core machine) for {len(cpu)} finished runs and curve points ({how})."]
    limit = study.scale.run_minutes_allowed or study.scale.run_minutes_limit
    minutes = {f"`{r['variant']}` seed {r['seed']}": run_minutes(r) if r in curve else machine_minutes(r)
               for r in cpu if not r.get("of")}
    if limit and minutes:
        over = [name for name, m in minutes.items() if m > limit]
        unmeasured = {f"`{r['variant']}` seed {r['seed']}" for r in done if not r.get("of") and not r.get("process_cpu_seconds")}
        guessed = [name for name in over if name in unmeasured]
        longest = max(minutes, key=minutes.get)
        lines.append(f"- **Run minutes** (CPU time over {MACHINE_CORES} cores, evaluation included; limit {limit:g}): the "
                     f"longest run, {longest}, took {minutes[longest]:.1f}; "
                     + (f"{len(over)} passed the limit: {', '.join(over)}." if over else "none passed the limit.")
                     + (f" Of these, {len(guessed)} {'has' if len(guessed) == 1 else 'have'} no measured CPU time (rows from before the runner measured "
                        f"it): their wall time counts, which work sharing the cores lengthens." if guessed else "")
                     + baseline_minutes_line(over, minutes))
    return lines


def baseline_minutes_line(over, minutes):
    """The limit chose the scale by the baseline's cost: where changes pass it, the baseline's own
    longest run beside them (a change that adds computation costs more by design)."""
    base = [m for name, m in minutes.items() if name.startswith("`baseline` ")]
    changes = [name for name in over if not name.startswith("`baseline` ")]
    if not base or not changes:
        return ""
    return (f" The limit is the baseline's, which chose the scale: its own runs took at most {max(base):.1f}; "
            f"a change that adds computation (more attention, a wider network) costs more by design, and runs its "
            f"budget all the same.")


def variant_seeds(study):
    """The seeds each trained variant runs on (the design's count), for the detectable change."""
    return max((len(v.seeds) for v in study.variants if v.group in ("one_at_a_time", "path")), default=2)


def unpaired_sigma(base_values):
    """(sqrt(2) times the baseline's log spread over its seeds, its degrees of freedom): the standard
    deviation of a paired difference as if the pairs shared nothing, an upper bound; (None, df)
    without a spread."""
    spread = log_sd(base_values.values())
    return (math.sqrt(2) * spread if spread else None), len(base_values) - 1


def detectable_sigma(tables, base_values):
    """(sigma, df, words): the standard deviation of one paired log difference, from the pooled paired
    differences of the one-at-a-time table, else of the path's, else (an upper bound, words None) from
    the baseline's spread over seeds as if unpaired (unpaired_sigma); sigma None without any."""
    for group, words in (("one_at_a_time", "the one-at-a-time table"), ("path", "the path's table")):
        sigma, df = pooled_sigma(tables.get(group))
        if sigma:
            return sigma, df, words
    sigma, df = unpaired_sigma(base_values) if len(base_values) > 2 else (None, None)
    return sigma, df, None


def holm_variants(study):
    """The most variants one table corrects over (Holm's strictest step divides alpha by it)."""
    return max(sum(1 for v in study.variants if v.group == g and not v.not_runnable) for g in ("one_at_a_time", "path"))


def detectable_line(study, tables, base_values):
    """The smallest change the study's seed count detects with 80% power (detectable_sigma)."""
    sigma, df, words = detectable_sigma(tables, base_values)
    if not sigma:
        return "not known yet: it needs the baseline on 3 seeds, or 2 seeds of one paired variant."
    seeds = variant_seeds(study)
    ratio = stats.detectable_ratio(sigma, seeds, df=df)
    m = holm_variants(study)
    source = (f"the paired differences of {words} have a pooled standard deviation of {sigma:.3f} (log, {df} degrees "
              f"of freedom)" if words else
              f"no paired table yet: sqrt(2) times the baseline's spread over its seeds gives {sigma:.3f} (log, {df} "
              f"degrees of freedom), an upper bound, since pairing removes the part of the spread the seeds share")
    return (f"{source}, so {seeds} seeds detect a change of x{ratio:.2f} (or x{1 / ratio:.2f}) with 80% power by a "
            f"t test at 5%, and x{stats.detectable_ratio(sigma, seeds, stats.ALPHA / max(m, 1), df=df):.2f} at Holm's "
            f"strictest step over {m} variants; smaller changes may be real but unseen.")


def pooled_sigma(entry):
    """(the pooled standard deviation of one paired log difference of the table's training changes,
    its degrees of freedom), or (None, None)."""
    comparison = next((c for c in (entry[1][PRIMARY].values() if entry else ()) if c.pooled and c.se is not None),
                      None)
    return (comparison.se * math.sqrt(comparison.n), comparison.df) if comparison else (None, None)


# ---- what matters --------------------------------------------------------------------------------

WHAT_MATTERS = (  # group, its table's title, what each ratio is against
    ("one_at_a_time", "One change from the baseline, the largest gain first", "the baseline"),
    ("path", "From the seed's recipe to the baseline, one change a row, each keeping the rows above",
     "the row above; the first row against the baseline"),
    ("sampling", "The baseline's runs sampled otherwise (no training)", "the baseline's own sampler"),
    ("revised", "The revised default: the baseline with the changes the study chose", "the baseline"),
)
SAMPLER_LABELS = {"ddpm": "DDPM", "ddim": "DDIM (deterministic)", "dpm": "DPM-Solver++ 2M"}
README_BEGIN = "<!-- What matters: written by `python ablate.py report --scale {scale}` from its rows; do not edit by hand -->"
README_END = "<!-- end of What matters -->"


def what_matters(study, rows, setup, tables, base_values):
    """The answer to "which components matter" at this scale, as far as its rows go: each change with
    a paired ratio, its verdict, what the literature found (the study's LITERATURE) and whether the
    two agree. The README's section of the same name is this text, where the scale says so."""
    lines = ["## What matters", ""]
    base = rows.ok("baseline")
    first = next(iter(base.values()), None)
    if first is None:
        return lines + ["Nothing yet: the baseline has no finished run.", ""]
    b = study.config(study.variant("baseline"))
    minutes = sorted(machine_minutes(r) for r in base.values() if r.get("cpu_seconds"))
    cost = (f", about {minutes[len(minutes) // 2]:.0f} minutes of a {MACHINE_CORES}-core machine a run, evaluation "
            f"included" if minutes else "")
    sigma, df, _ = detectable_sigma(tables, base_values)
    seeds = variant_seeds(study)
    if sigma:
        plain = stats.detectable_ratio(sigma, seeds, df=df)
        strict = stats.detectable_ratio(sigma, seeds, stats.ALPHA / max(holm_variants(study), 1), df=df)
        detectable = (f" With {seeds} seeds a change smaller than about x{plain:.2f} (or x{1 / plain:.2f}) can be real "
                      f"and unseen, and one up to x{strict:.2f} can be missed after the correction: \"no detectable "
                      f"effect\" is not \"no effect\".")
    else:
        detectable = ""
    counts = []
    for group, _, _ in WHAT_MATTERS:
        runnable = [v for v in study.variants if v.group == group and not v.not_runnable
                    and (group != "sampling" or v.of == "baseline")]
        if runnable:
            done = sum(v.name in tables[group][1][PRIMARY] for v in runnable)
            counts.append(f"{done} of {len(runnable)} {group.replace('_', '-')} rows")
    lines += [f"At the {study.scale.name} scale: {preset_of(study, study.variant('baseline'))} "
              f"({parameters(config_to_dict(b)) / 1e6:.2f}M parameters, width {width_label(b.channels)}), "
              f"{setup.budget_kimg:g} thousand images a run ({math.ceil(setup.budget_kimg * 1000 / b.batch_size):,} "
              f"steps of {b.batch_size}), "
              f"{SAMPLER_LABELS[b.sampler]} with {b.sampling_steps} steps, {setup.precision}, {setup.num_samples:,} "
              f"samples an evaluation{cost}, on {first['gpu'] or first['cpu']}. Every change trains on {seeds} of the baseline's "
              f"seeds and is compared with the baseline on the same seeds. So far: {', '.join(counts)}; the report's "
              f"\"Not yet run\" lists the rest.", "",
              f"A ratio is the attribute FD (`{PRIMARY}`, the attribute network's offline FID, lower is better) with the change over "
              f"without it, paired by seed, with its 95% interval: below 1 the change is better. **helps** and "
              f"**hurts** hold after Holm's correction over the table.{detectable} This is what matters in the first "
              f"{setup.budget_kimg * 1000:,.0f} images of this network, where the baseline is still improving "
              f"fast; it cannot tell what matters at convergence, at the default's width or on other data. The "
              f"literature column is mostly CIFAR-10 FID at convergence: compare directions, not sizes.", ""]
    for group, title, against in WHAT_MATTERS:
        variants, compared = tables.get(group, ([], {}))
        shown = [v for v in variants if (v.name in compared.get(PRIMARY, {}) or rows.failed(v.name))
                 and (group != "sampling" or v.of == "baseline")]
        if not shown:
            continue
        if group == "one_at_a_time":
            shown = by_effect(shown, compared)
        lines += [f"**{title}** (ratios against {against}):", "",
                  f"| change | attribute FD ratio [95% interval] | at this scale | background error [95% interval] | "
                  f"literature | ours |", "|---|---|---|---|---|---|"]
        for v in shown:
            expected, found = study.literature.get(v.name, ("", "nothing published found"))
            c = compared[PRIMARY].get(v.name)
            if c is None:
                reason = "; ".join(f"seed {r['seed']}: {r['reason']}" for r in rows.failed(v.name))
                cells = ["failed", reason.replace("|", "/"), "-"]
            else:
                text, verdict = stats.describe(c)
                tint = compared["background_error"].get(v.name)
                cells = [text, {"not significant": "no detectable effect"}.get(verdict, f"**{verdict}**"
                                                                                 if c.significant else verdict),
                         (stats.describe(tint, lower_is_better=True)[0] + (" *" if tint.significant else ""))
                         if tint else "-"]
            agrees = agreement(expected, stats.describe(c)[1] if c else "")
            lines.append(f"| `{v.name}`: {change_of(study, v).replace('|', '/')} | " + " | ".join(cells)
                         + f" | {found} | {agrees} |")
        lines.append("")
    return lines


def agreement(expected, verdict):
    """Ours against what the literature leads one to expect (helps, hurts, none; "" when nothing
    comparable): agrees where both found the same direction; consistent where both found nothing,
    since no test here shows that an effect is absent; not seen where we found nothing."""
    if not expected or verdict not in ("helps", "hurts", "not significant"):
        return "-"
    if verdict == "not significant":
        return "consistent (no effect is not shown)" if expected == "none" else "not seen at this scale"
    return "agrees" if verdict == expected else "disagrees"


def write_readme_section(scale, lines, readme=os.path.join(REPO, "README.md")):
    """Put the report's "What matters" (its lines after the title) between the README's markers."""
    begin = README_BEGIN.format(scale=scale.name)
    with open(readme) as f:
        text = f.read()
    if begin not in text or README_END not in text:
        raise UserError(f"{readme}: the markers of the section `ablate.py report --scale {scale.name}` writes are "
                        f"missing; put back the lines {begin!r} and {README_END!r} under \"## What matters\"")
    head, rest = text.split(begin, 1)
    body = "\n".join(lines[2:]).rstrip()
    text = f"{head}{begin}\n{body}\n{README_END}{rest.split(README_END, 1)[1]}"
    with atomic_write(readme, "w") as f:
        f.write(text)


# ---- the tables ----------------------------------------------------------------------------------

def preset_of(study, v):
    """'preset NAME', with the fields the scale pins where it does (study.Scale.pinned)."""
    pinned = study.pinned(v)
    return f"preset {study.preset(v)}" + (f", with {', '.join(pinned)} as the study ran it" if pinned else "")


def change_of(study, v):
    if v.name == "baseline":
        return preset_of(study, v)
    return v.note or " ".join(v.overrides) or preset_of(study, v)


def by_effect(variants, compared):
    """The largest gain first, the variants without a ratio (failed) last."""
    return sorted(variants, key=lambda v: compared[PRIMARY][v.name].mean if v.name in compared[PRIMARY] else math.inf)


def verdicts(variants, compared, key=PRIMARY, lower_is_better=True):
    """{"helps": [...], "hurts": [...], "not significant": [...], "no verdict": [...]}: "name (ratio)" by verdict."""
    found = {"helps": [], "hurts": [], "not significant": [], "no verdict": []}
    for v in variants:
        if v.name in compared[key]:
            text, verdict = stats.describe(compared[key][v.name], lower_is_better)
            found[verdict].append(f"`{v.name}` ({text.split(' [')[0].split(' (')[0]})")
    return found


def group_paragraph(study, rows, variants, compared):
    """What the group's table shows, in numbers: which changes help, which hurt, how many show no
    detectable effect, which failed."""
    found = verdicts([v for v in variants if study.reference(v)], compared)
    failed = [f"`{v.name}`" for v in variants if rows.failed(v.name) and not rows.ok(v.name)]
    compared_count = sum(len(found[k]) for k in found)
    if not compared_count and not failed:
        return []
    parts = [f"{compared_count} variant{'s' * (compared_count != 1)} with a paired ratio of {PRIMARY}"]
    for verdict, words in (("helps", "better after Holm's correction"), ("hurts", "worse after Holm's correction")):
        if found[verdict]:
            parts.append(f"{len(found[verdict])} {words}: {', '.join(found[verdict])}")
    if found["not significant"]:
        parts.append(f"{len(found['not significant'])} with no detectable effect")
    if found["no verdict"]:
        parts.append(f"{len(found['no verdict'])} on one seed, without an interval")
    if failed:
        parts.append(f"{len(failed)} failed: {', '.join(failed)}")
    return ["; ".join(parts) + ".", ""]


def default_preset_section(study, rows, tables):
    """What the one-at-a-time table says of each field of the baseline's preset: a field whose
    change helps after Holm's correction would take the best such value, unless its runs pass the
    scale's run-minute limit (a wider network: more quality per image, not per minute); every other
    field keeps its value, and the section says why (its changes hurt, or showed no detectable effect)."""
    variants, compared = tables.get("one_at_a_time", ([], {}))
    measured = [v for v in variants if v.name in compared.get(PRIMARY, {})]
    if not measured:
        return []
    base = study.variant("baseline")
    b = study.config(base)
    evidence, by_fields = [], {}
    limit = study.scale.run_minutes_allowed or study.scale.run_minutes_limit
    minutes = lambda v: max((machine_minutes(r) for r in rows.ok(v.name).values()
                             if r.get("cpu_seconds") is not None), default=0)
    for v in measured:
        fields = tuple(o.partition("=")[0] for o in v.overrides)
        by_fields.setdefault(fields, []).append(v)
    lines = ["## The default preset", "",
             f"What the one-at-a-time table says of each field of {preset_of(study, base)}, the baseline (the "
             f"default's recipe at this scale's width): a field whose change **helps** after Holm's correction would "
             f"take the best such value; every other field keeps its value. This is evidence at this scale's budget "
             f"only. So far {len(measured)} of {len(variants)} changes have a ratio.", "",
             "| field(s) | the baseline's value | changes measured (ratio, verdict) | the evidence |", "|---|---|---|---|"]
    for fields, vs in by_fields.items():
        found = {v.name: stats.describe(compared[PRIMARY][v.name]) for v in vs}
        helps = sorted((v for v in vs if found[v.name][1] == "helps"), key=lambda v: compared[PRIMARY][v.name].mean)
        costly = [v for v in helps if limit and minutes(v) > limit]
        helps = [v for v in helps if v not in costly]
        value = ", ".join(str(getattr(b, f)) for f in fields)
        measured_text = "; ".join(f"`{v.name}` {found[v.name][0].split(' [')[0]} {found[v.name][1]}" for v in vs)
        verdicts_here = {found[v.name][1] for v in vs}
        if costly and not helps:
            said = (f"keeps it: {' '.join(costly[0].overrides)} helps per image, but its runs took up to "
                    f"{minutes(costly[0]):.1f} minutes of the machine, over the scale's limit of {limit:g}; the budget "
                    f"curve weighs a wider network by quality per minute")
        elif helps:
            evidence.append(helps[0].name)
            said = f"**a change helps: {' '.join(helps[0].overrides)}** (`{helps[0].name}`)"
        elif "hurts" in verdicts_here:
            said = "keeps it: " + ("its changes hurt" if verdicts_here == {"hurts"} else "no change helped, some hurt")
        elif "not significant" in verdicts_here:
            said = "keeps it: no detectable effect"
        else:
            said = "keeps it: one seed, no verdict yet"
        lines.append(f"| {', '.join(f'`{f}`' for f in fields)} | {value} | {measured_text} | {said} |")
    return lines + [""] + revised_lines(study, rows, tables, evidence, len(measured), len(variants))


def revised_lines(study, rows, tables, evidence, measured, total):
    """Whether the revised default (the scale's `revised`) takes what the evidence says, and how it
    compares with the baseline: on all the baseline's seeds, and on the seeds that did not choose its
    changes (the one-at-a-time variants' seeds chose them, so their pairs flatter it)."""
    revised = next((v for v in study.variants if v.group == "revised"), None)
    if revised is None:
        return []
    chosen, names = study.scale.revised, lambda ns: ", ".join(f"`{n}`" for n in ns) or "no change"
    where = f"scale {study.scale.name} of {os.path.relpath(study.path, REPO)}"
    if set(chosen) != set(evidence):
        if not chosen:
            return [f"The table chooses {names(evidence)} so far ({measured} of {total} changes measured): when it is "
                    f"complete, set `revised` in {where} to what it chooses, and run `{revised.name}`.", ""]
        return [f"**The revision is not what the table says now**: `revised` in {where} takes {names(chosen)}, the "
                f"table {names(evidence)} ({measured} of {total} changes measured). `{revised.name}` runs the first.", ""]
    if not chosen:
        return ["No change helps, so far: the default keeps every value.", ""]
    text = (f"`{revised.name}` is the baseline with {names(chosen)}, the changes that help in the table above "
            f"({measured} of {total} changes measured).")
    compared = tables.get("revised", ([], {}))[1].get(PRIMARY, {})
    if revised.name not in compared:
        return [text + " It has not run on the baseline's seeds yet.", ""]
    ratio, verdict = stats.describe(compared[revised.name])
    text += f" Against the baseline, paired on {compared[revised.name].n} seeds: {PRIMARY} {ratio}, **{verdict}**."
    choosers = {s for v in study.variants if v.name in chosen for s in v.seeds}
    mine, theirs = values(rows.ok(revised.name), PRIMARY), values(rows.ok("baseline"), PRIMARY)
    held_out = stats.paired_differences({s: x for s, x in mine.items() if s not in choosers}, theirs)
    if held_out:
        ratio, verdict = stats.describe(stats.compare_table({revised.name: held_out})[revised.name])
        text += (f" On the seeds that did not choose the changes ({', '.join(map(str, sorted(held_out)))}; the "
                 f"others' pairs flatter it): {ratio}, {verdict}.")
    return [text, ""]


LONGER_BUDGET_EFFECTS = 3  # the one-at-a-time table's largest effects that the longer budget checks


def longer_rows(study, setup, folder):
    """(the longer budget's Setup, its Rows, its folder's name), or None where the scale has no check."""
    factor = study.scale.longer_budget
    if not factor:
        return None
    # A float, as `--budget_kimg` reads it: the setup's hash tells 300 from 300.0.
    longer = dataclasses.replace(setup, budget_kimg=float(factor * setup.budget_kimg))
    sub = f"budget_{factor:g}x"
    return longer, Rows.of(study, longer, read_rows(os.path.join(folder, sub))), sub


def longer_budget_section(study, rows, setup, tables, longer, command):
    """Does the ranking hold when training runs longer? The baseline and the one-at-a-time table's
    largest effects (by |log ratio|), on seed 0 at scale.longer_budget times the budget, their rows
    in <folder>/budget_<factor>x (longer_rows), beside their ratios at the study's budget. A single
    seed's interval takes the one-at-a-time table's pooled noise of one paired difference."""
    variants, compared = tables.get("one_at_a_time", ([], {}))
    if not longer or not compared.get(PRIMARY):
        return []
    factor = study.scale.longer_budget
    long_setup, long_rows, sub = longer
    trapped = [v.name for v in variants if zero_init_kills_branches(study.config(v))]
    effects = [c for c in compared[PRIMARY].values() if c.variant not in trapped]
    largest = [c.variant for c in sorted(effects, key=lambda c: -abs(c.mean))[:LONGER_BUDGET_EFFECTS]]
    names = largest + sorted(n for n, s in long_rows.current if n not in ("baseline", *largest) and s == 0)
    run = command("--budget_kimg", f"{long_setup.budget_kimg:g}", "--out", f"{study.scale.folder}/{sub}", "--seeds",
                  "0", "--only", ",".join(["baseline", *largest]))
    lines = ["## A longer budget", "",
             f"Does the ranking hold when training runs longer? The baseline and the one-at-a-time table's "
             f"{LONGER_BUDGET_EFFECTS} largest effects (by the size of their ratio, now), on seed 0, at {factor:g}x the "
             f"budget ({long_setup.budget_kimg:g} thousand images): `{run}`. One seed has no spread of its own, so its "
             f"interval takes the noise of one paired difference pooled over the one-at-a-time table at "
             f"{setup.budget_kimg:g} thousand images, an assumption; it is not corrected for the other rows."
             + (f" Left out: {', '.join(f'`{n}`' for n in trapped)}, whose residual branches never train (zero_init "
                f"zeroes them before a ReLU): more images cannot change a network that does not learn."
                if trapped else ""), ""]
    sigma, df = pooled_sigma(tables.get("one_at_a_time"))
    fd = lambda r: r["metrics"][PRIMARY]["samples"] if r and r["status"] == "ok" else None
    seed0 = lambda by_rows, name: by_rows.ok(name).get(0)
    ratio = lambda by_rows, name: (fd(seed0(by_rows, name)) / fd(seed0(by_rows, "baseline"))
                                   if fd(seed0(by_rows, name)) and fd(seed0(by_rows, "baseline")) else None)
    lines += [f"| variant | {setup.budget_kimg:g} kimg, seeds paired | {setup.budget_kimg:g} kimg, seed 0 | "
              f"{long_setup.budget_kimg:g} kimg, seed 0 [95% interval] | verdict | background error, seed 0 |",
              "|---|---|---|---|---|---|",
              f"| `baseline` ({PRIMARY}) | {fmt(geometric_mean(values(rows.ok('baseline'), PRIMARY).values()), '.4g')} "
              f"| {fmt(fd(seed0(rows, 'baseline')), '.4g')} | {fmt(fd(seed0(long_rows, 'baseline')), '.4g')} | - | "
              f"{fmt(background(seed0(rows, 'baseline')), '.1f')} -> {fmt(background(seed0(long_rows, 'baseline')), '.1f')} |"]
    for name in names:
        paired, short, long = compared[PRIMARY].get(name), ratio(rows, name), ratio(long_rows, name)
        if long and sigma:
            text, verdict = stats.describe(stats.one_difference(name, math.log(long), sigma, df))
        else:
            text, verdict = (f"x{long:.2f} (no interval yet)", "-") if long else ("not run yet", "-")
        lines.append(f"| `{name}` | {stats.describe(paired)[0] if paired else '-'} | {fmt(short, '.2f')} | {text} | "
                     f"{verdict} | {fmt(background(seed0(rows, name)), '.1f')} -> {fmt(background(seed0(long_rows, name)), '.1f')} |")
    both = [n for n in names if ratio(rows, n) and ratio(long_rows, n)]
    if len(both) > 1:
        before, after = sorted(both, key=lambda n: ratio(rows, n)), sorted(both, key=lambda n: ratio(long_rows, n))
        lines += ["", f"On seed 0, best first: {', '.join(f'`{n}`' for n in before)} at {setup.budget_kimg:g} thousand "
                      f"images; {', '.join(f'`{n}`' for n in after)} at {long_setup.budget_kimg:g} thousand: "
                      + ("the same order." if before == after else "a different order.")
                      + " One seed each: an order inside the intervals is not a finding."]
    return lines + [""]


def background(row):
    """A row's background error, or None."""
    return (((row or {}).get("metrics") or {}).get("background_error") or {}).get("samples")


def tint_section(study, rows, tables, longer=None):
    """Which changes remove the tinted backgrounds of short runs (the background error: the top
    corners' mean distance from white, of 255; real avatars: 0), from every table's paired
    differences of it, Holm-corrected over each table."""
    base = values(rows.ok("baseline"), "background_error")
    if not base:
        return []
    lines = ["## The tinted backgrounds", "",
             f"Real avatars have pure white backgrounds; short runs draw some tinted. The background error (the top "
             f"corners' mean distance from white, of 255) of the baseline is {mean(list(base.values())):.1f} (mean "
             f"over {len(base)} seeds; real avatars: 0). Each table's paired differences of it, with Holm's "
             f"correction over the table:", ""]
    for group, (variants, compared) in tables.items():
        found = verdicts([v for v in variants if study.reference(v)], compared, "background_error")
        measured = sum(len(found[k]) for k in found)
        if not measured:
            continue
        lines.append(f"- **{group}** ({measured} compared): "
                     + "; ".join([f"lower with {', '.join(found['helps'])}" if found["helps"] else "lower with none",
                                  f"higher with {', '.join(found['hurts'])}" if found["hurts"] else "higher with none",
                                  f"{len(found['not significant']) + len(found['no verdict'])} without a detectable "
                                  f"change"]) + ".")
    long, short = background(longer[1].ok("baseline").get(0) if longer else None), background(rows.ok("baseline").get(0))
    if None not in (long, short):
        budget = (f"At {longer[0].budget_kimg:g} thousand images the baseline's seed 0 has a background error of "
                  f"{long:.1f}, against {short:.1f} at {longer[0].budget_kimg / study.scale.longer_budget:g} thousand: "
                  f"{'lower' if long < short else 'not lower'} with the budget alone, on one seed, "
                  f"without an interval.")
    else:
        budget = "Whether a longer budget alone removes the tint is not measured at this scale yet."
    return lines + ["", budget, ""]


def table_lines(study, rows, variants, compared):
    header = ["variant", "change", "against", "seeds", f"{PRIMARY} (geometric mean)", "ratio [95% interval]",
              "verdict", *[label for key, label, _, _ in METRICS[1:]], "val loss (EMA)", "img/s", "comment"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v in variants:
        ok, reference = rows.ok(v.name), study.reference(v)
        comment = [f"seed {r['seed']} failed: {r['reason']}" for r in rows.failed(v.name)]
        cells = [f"`{v.name}`", change_of(study, v).replace("|", "/"), f"`{reference}`" if reference else "-",
                 str(len(ok)), fmt(geometric_mean(values(ok, PRIMARY).values()), ".4g")]
        primary = compared[PRIMARY].get(v.name)
        if primary:
            text, verdict = stats.describe(primary)
            cells += [text, f"**{verdict}**" if primary.significant else verdict]
        else:
            cells += ["-", "reference" if reference is None else "no shared seed"]
        for key, _, scale, lower_is_better in METRICS[1:]:
            c = compared[key].get(v.name)
            bound = saturated(values(rows.ok(reference), key)) if reference and scale == "diff" else None
            if bound is not None:  # no spread to judge by: an interval would mean nothing
                here = mean(list(values(ok, key).values()))
                cells.append(f"saturated ({bound:g} -> {fmt(here, '.2f')})")
            else:
                cells.append(stats.describe(c, lower_is_better)[0] + (" *" if c.significant else "") if c else "-")
        cells += [fmt(mean([r["val_loss_ema"] for r in ok.values() if r.get("val_loss_ema") is not None]), ".4f"),
                  fmt(mean([r["img_per_s"] for r in ok.values() if r.get("img_per_s")]), ".0f"), "; ".join(comment)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def conditioning_table(study, rows):
    """Noise conditioning (on: the baseline; off: noise_cond_none) x sampler, beside Sun et al. 2025,
    who found most formulations degrade gracefully without the noise level but deterministic DDIM
    fails. Each cell is the geometric mean of the primary metric over seeds; the last row is off / on,
    paired by seed, the variance pooled over the three samplers, Holm-corrected over them."""
    from ablations.study import CONDITIONING_SAMPLERS, sampled_by
    if not any(v.name == "noise_cond_none" for v in study.variants):
        return []
    b = study.config(study.variant("baseline"))
    cells = {(of, s): values(rows.ok(sampled_by(of, *s, b)), PRIMARY)
             for of in ("baseline", "noise_cond_none") for s in CONDITIONING_SAMPLERS}
    if not any(cells.values()):
        return []
    compared = stats.compare_table(
        {s: stats.paired_differences(cells["noise_cond_none", s], cells["baseline", s]) for s in CONDITIONING_SAMPLERS})
    lines = ["**Noise conditioning x sampler** (Sun et al. 2025: without the noise level most samplers degrade "
             "gracefully, deterministic DDIM fails). Each cell: " + PRIMARY + ", the geometric mean over seeds; the "
             "last row: off against on, paired by seed, with a variance pooled over the three samplers and Holm's "
             "correction over them.", "",
             "| conditioning | " + " | ".join(f"{SAMPLER_LABELS[s]} {n}" for s, n in CONDITIONING_SAMPLERS) + " |",
             "|---|" + "---|" * len(CONDITIONING_SAMPLERS)]
    for of, words in (("baseline", "on (`baseline`)"), ("noise_cond_none", "off (`noise_cond_none`)")):
        lines.append(f"| {words} | " + " | ".join(
            f"{fmt(geometric_mean(cells[of, s].values()), '.4g')} ({len(cells[of, s])} seeds)"
            for s in CONDITIONING_SAMPLERS) + " |")
    ratios = []
    for s in CONDITIONING_SAMPLERS:
        c = compared.get(s)
        text, verdict = stats.describe(c) if c else ("-", "")
        ratios.append(f"{text} {'**' + verdict + '**' if c and c.significant else verdict}".strip())
    return lines + ["| off / on | " + " | ".join(ratios) + " |", ""]


def mean(values):
    return sum(values) / len(values) if values else None


def saturated(by_seed):
    """0 or 1 when a share (precision, recall) sits at that bound on every seed of the reference, else None."""
    shares = set(by_seed.values())
    return shares.pop() if len(shares) == 1 and shares <= {0.0, 1.0} else None


def stale_section(rows, command):
    if not rows.stale:
        return []
    lines = ["## Stale rows", "", f"Not counted above; `{command()}` runs them again.", ""]
    return lines + [f"- `{r['variant']}` seed {r['seed']} ({r['date']}): {why}" for r, why in rows.stale] + [""]


def not_yet_run(study, rows, command):
    """The variants (and seeds) with no current finished row, with the command that runs them."""
    lines, missing = ["## Not yet run", ""], {}
    for v in study.variants:
        seeds = sorted(set(v.seeds) - set(rows.ok(v.name)))
        if seeds or v.not_runnable:
            missing.setdefault(v.group, []).append((v, seeds))
    if not missing:
        return lines + ["Every variant has a finished row.", ""]
    lines += time_left(study, rows, [(v, seeds) for entries in missing.values() for v, seeds in entries])
    if len(rows.ok("baseline")) < len(study.variant("baseline").seeds):
        first = ",".join(["baseline", *[v.name for v in study.variants if v.group == "path"][:1]])
        tuning = [f"{command('--group', 'tuning')} && "] if any(v.group == "tuning" for v in study.variants) else []
        lines += ["The first chunk (the budget curve, " + ("the tuning sweep, " if tuning else "") + "the baseline with "
                  "its seeds, and the first row of the path), one line:", "",
                  f"    {command('curve')} && {''.join(tuning)}{command('--only', first)}", ""]
    for group, entries in missing.items():
        runnable = any(not v.not_runnable for v, _ in entries)
        lines.append(f"- **{group}**" + (f": `{command('--group', group)}`" if runnable else ""))
        for v, seeds in entries:
            if v.not_runnable:
                lines.append(f"  - `{v.name}`: not runnable yet: {v.not_runnable}")
            else:
                lines.append(f"  - `{v.name}` (seeds {', '.join(map(str, seeds))}): {change_of(study, v)}")
    return lines + [""]


def time_left(study, rows, missing):
    """How long the runs left would take on one machine of MACHINE_CORES cores, from the finished
    rows' CPU time: a trained run at the median trained run's; a re-evaluation by the line through
    the finished re-evaluations' CPU time against their sampler steps (runner.sampling_line; those
    whose CPU time was measured, where there are some), else at the median time per sampler step
    times its steps, else at RE_EVALUATION_SHARE of a trained run, the runner's guess. A forecast of
    CPU time, not the deadline's estimate of wall time (runner.estimate_seconds). Nothing where no
    finished row has a CPU time."""
    done = [r for r in rows.current.values() if r["status"] == "ok" and r.get("cpu_seconds")]
    trained = [cpu_time(r) for r in done if not r["of"]]
    points = [(r["sampler"]["steps"], cpu_time(r)) for r in measured_first([r for r in done if r["of"]])]
    runs = [v for v, seeds in missing if not v.not_runnable and not v.runs_of for _ in seeds]
    if not trained or not runs:
        return []
    one = statistics.median(trained)
    line = sampling_line(points)
    if line:
        fixed, step = line[:2]
    else:
        fixed, step = 0, statistics.median(t / s for s, t in points) if points else None
    seconds = sum((fixed + step * study.config(v).sampling_steps if step else one * RE_EVALUATION_SHARE) if v.of
                  else one for v in runs)
    hours = seconds / 3600 / MACHINE_CORES
    how = (f"{fixed:.0f} CPU-seconds and {step:.1f} more a sampler step, the line through the finished ones" if line
           else f"{step:.0f} CPU-seconds a sampler step" if step
           else f"{RE_EVALUATION_SHARE:.0%} of that, until one has finished")
    return [f"Left: {len(runs)} runs, about {hours:.{1 if hours < 10 else 0}f} hours of a {MACHINE_CORES}-core "
            f"machine at the finished rows' CPU time (a trained run {one / 60:.0f} CPU-minutes; a re-evaluation "
            f"{how}).", ""]


# ---- the plots -----------------------------------------------------------------------------------

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


def ratio_chart(group, variants, compared, plots):
    """Each variant's ratio of the primary metric to its reference, with its 95% interval, on a log
    axis: left of 1 is better. Significant ones (after Holm) in colour."""
    shown = [(v, compared[PRIMARY][v.name]) for v in variants if v.name in compared[PRIMARY]]
    if not shown:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 1.4 + 0.32 * len(shown)), dpi=100)
    y = list(range(len(shown)))[::-1]
    for yi, (v, c) in zip(y, shown):
        colour = ("tab:green" if c.mean < 0 else "tab:red") if c.significant else "tab:gray"
        if c.low is not None:
            ax.plot([math.exp(c.low), math.exp(c.high)], [yi, yi], color=colour, linewidth=2)
        ax.plot([math.exp(c.mean)], [yi], "o", color=colour)
    ax.axvline(1, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.set_yticks(y, [v.name for v, _ in shown], fontsize=8)
    ax.set_xlabel(f"{PRIMARY}: ratio to the paired reference, with its 95% interval (left is better)")
    ax.set_title(f"{group}: coloured where significant after Holm's correction", fontsize=10)
    ax.grid(axis="x", alpha=0.3, which="both")
    fig.tight_layout()
    return save_figure(fig, os.path.join(plots, f"ratios_{group}.png"))


def loss_curves(group, study, rows, variants, plots):
    """Train loss against images seen: the baseline's seeds in grey, each other trained variant's
    first seed in colour. Each target (eps, x0, v) and weighting has its own loss scale. None for a
    group that trains nothing of its own (re-evaluations)."""
    trained = [v for v in variants if not v.of]
    if not trained:
        return None
    with_baseline = ([] if trained[0].name == "baseline" else [study.variant("baseline")]) + trained
    curves = [(v.name if v.name != "baseline" else f"baseline seed {s}", r["curve"])
              for v in with_baseline
              for s, r in list(rows.ok(v.name).items())[:None if v.name == "baseline" else 1] if r.get("curve")]
    if not curves:
        return None
    plt = pyplot()
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


def grid_count(grid_size):
    columns, _, rows = grid_size.partition("x")
    return int(columns) * int(rows)


def grid_mosaic(captioned_rows, columns=4):
    """The runs' committed grids (the scale's grid_size) side by side, each under its caption: a Markdown table, so
    that the mosaic adds no image of its own to the repository."""
    cells = [f"{c[0]}<br>![{c[1]['variant']}]({c[1]['grid']})" if c else "" for c in captioned_rows]
    if not cells:
        return []
    width = min(columns, len(cells))
    cells += [""] * (-len(cells) % width)
    return ["|" + " |" * width, "|" + "---|" * width,
            *["| " + " | ".join(cells[i:i + width]) + " |" for i in range(0, len(cells), width)]]


# ---- the budget curve ----------------------------------------------------------------------------

def curve_section(study, curve, folder, command):
    lines = ["## The budget curve", ""]
    if not curve:
        return lines + [f"Not measured yet: `{command('curve')}` trains the baseline once per width and "
                        f"evaluates it at each point.", ""]
    scale, limit = study.scale, study.scale.run_minutes_limit
    widths = {}  # width label -> {point: row}, the latest row of each point
    for r in curve:
        widths.setdefault(width_label(r["config"]["channels"]), {})[r["budget_kimg"]] = r
    widths = {w: [p[k] for k in sorted(p)] for w, p in widths.items()}
    plt = pyplot()
    timed = all(run_minutes(r) is not None for r in curve)  # rows from before the curve timed its runs: images
    x_of = run_minutes if timed else (lambda r: r["budget_kimg"])
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for w, points in widths.items():
        ax.plot([x_of(r) for r in points], [r["metrics"][PRIMARY]["samples"] for r in points], marker="o",
                label=f"width {w}")
        for r in points:
            ax.annotate(f"{r['budget_kimg']:g}k", (x_of(r), r["metrics"][PRIMARY]["samples"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    floor = curve[0]["metrics"][PRIMARY]["floor"]
    ax.axhline(floor, linestyle="--", color="tab:green", label="floor")
    if limit and timed:
        ax.axvline(limit, color="black", linewidth=1, label=f"run limit ({limit:g} min)")
        ax.axvline(LIMIT_FALLBACK * limit, color="grey", linewidth=1, linestyle=":",
                   label=f"allowed if needed ({LIMIT_FALLBACK * limit:g} min)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"minutes of the {MACHINE_CORES}-core machine for one run (training, start-up, evaluation)"
                  if timed else "thousands of images seen")
    ax.set_ylabel(f"{PRIMARY} (lower is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    plot = save_figure(fig, os.path.join(folder, "plots", "curve.png"))
    first = curve[0]
    lines += [f"For each width, one baseline run (seed {first['seed']}, learning rate "
              f"{first['config']['learning_rate']:g}, batch {first['config']['batch_size']}), evaluated as it reached "
              f"each point. Its learning rate is constant (`lr_schedule=constant`), so that the segments are one run. "
              + (f"It also sets {', '.join(f'`{o}`' for o in study.scale.curve_overrides)}: the recipe the curve was "
                 f"measured at, before the tuning sweep chose the baseline's. " if study.scale.curve_overrides else "")
              + (f"The widths ran at the same time, {first['threads']} thread(s) each, as the study's runs do. A "
                 f"point's run minutes are what one run to that point costs: its training up to the point, one "
                 f"start-up and one evaluation, in CPU time over the machine's {MACHINE_CORES} cores. " if timed else "")
              + "A point's change is against the point before it; per doubling is the same change scaled to one doubling of the images seen, so that unevenly spaced points compare.", ""]
    for w, points in widths.items():
        lines += [f"**Width {w}** ({parameters(points[0]['config']) / 1e6:.2f}M parameters):", "",
                  "| thousand images | steps | " + PRIMARY + " | x floor | change | per doubling | SWD x1e3 | "
                  "val loss (EMA) | img/s | run minutes |", "|---|---|---|---|---|---|---|---|---|---|"]
        previous = None
        for r in points:
            value = r["metrics"][PRIMARY]["samples"]
            change = f"{(value / previous['metrics'][PRIMARY]['samples'] - 1) * 100:+.0f}%" if previous else "-"
            doubling = "-" if not previous else \
                f"{(per_doubling(previous['metrics'][PRIMARY]['samples'], value, previous['budget_kimg'], r['budget_kimg']) - 1) * 100:+.0f}%"
            lines.append(f"| {r['budget_kimg']:g} | {r['steps']} | {fmt(value, '.4g')} | "
                         f"{fmt(value / r['metrics'][PRIMARY]['floor'], '.1f')} | {change} | {doubling} | "
                         f"{fmt(r['metrics']['swd_x1e3_avg']['samples'], '.1f')} | {fmt(r.get('val_loss_ema'), '.4f')} | "
                         f"{fmt(r.get('img_per_s'), '.0f')} | {fmt(run_minutes(r), '.1f')} |")
            previous = r
        lines += ["", suggest_budget([r["metrics"][PRIMARY]["samples"] for r in points],
                                     [r["budget_kimg"] for r in points], PRIMARY), ""]
    lines += [f"![curve](plots/{os.path.basename(plot)})", ""] + ([*choice_lines(study, widths), ""] if timed else [])
    columns = max(len(points) for points in widths.values())
    cells = [cell for points in widths.values()  # one row of the mosaic per width
             for cell in [(f"width {width_label(r['config']['channels'])}, {r['budget_kimg']:g} kimg: "
                           f"{fmt(r['metrics'][PRIMARY]['samples'], '.4g')}", r) for r in points]
             + [None] * (columns - len(points))]
    return lines + [*grid_mosaic(cells, columns=columns), ""]


def parameters(config):
    """The network's parameter count, built on the meta device (no memory, no time)."""
    import torch
    from config import config_from_dict
    from unet import make_network
    with torch.device("meta"):
        return sum(p.numel() for p in make_network(config_from_dict(config)).parameters())


GOAL_FLOOR_RATIO = 10  # the cpu scale's goal for its baseline: attribute FD at most 10x its floor
GOAL_DETECTABLE = 1.15  # ...and a 15% change detectable at the study's seed count


def choice_lines(study, widths):
    """What the curve supports: the point with the lowest primary metric among those whose run fits
    the scale's limit; when that one misses GOAL_FLOOR_RATIO, the best within LIMIT_FALLBACK times
    the limit. Against what the scale runs."""
    limit, scale = study.scale.run_minutes_limit, study.scale
    base = study.config(study.variant("baseline"))
    runs = f"The scale runs width {width_label(base.channels)} at {scale.budget_kimg:g} kimg."
    if not limit:
        return [runs]
    value = lambda r: r["metrics"][PRIMARY]["samples"]
    ratio = lambda r: value(r) / r["metrics"][PRIMARY]["floor"]
    points = [r for rows in widths.values() for r in rows]

    def best(bound):
        fits = [r for r in points if run_minutes(r) <= bound]
        return min(fits, key=value) if fits else None

    def words(r, bound):
        return (f"Of the points whose run takes at most {bound:g} minutes, the lowest {PRIMARY} is width "
                f"{width_label(r['config']['channels'])} at {r['budget_kimg']:g} kimg: {value(r):.4g}, "
                f"{ratio(r):.1f}x its floor, a run of {run_minutes(r):.1f} minutes")
    within, fallback = best(limit), best(LIMIT_FALLBACK * limit)
    if within is None and fallback is None:
        return [f"No point's run fits {LIMIT_FALLBACK * limit:g} minutes. " + runs]
    if within is not None and (ratio(within) <= GOAL_FLOOR_RATIO or fallback is within):
        return [f"**The choice.** {words(within, limit)}" + (f", within the goal of {GOAL_FLOOR_RATIO}x." if
                ratio(within) <= GOAL_FLOOR_RATIO else f"; the goal of {GOAL_FLOOR_RATIO}x is not met.") + " " + runs]
    lines = [f"**The choice.** " + (f"{words(within, limit)}, which misses the goal of {GOAL_FLOOR_RATIO}x its "
                                    f"floor, so runs may take up to {LIMIT_FALLBACK * limit:g} minutes. " if within
                                    else f"No point's run fits {limit:g} minutes. ")
             + words(fallback, LIMIT_FALLBACK * limit)
             + (f", within the goal of {GOAL_FLOOR_RATIO}x." if ratio(fallback) <= GOAL_FLOOR_RATIO else
                f"; the goal of {GOAL_FLOOR_RATIO}x is not met there either.") + " " + runs]
    return lines
