"""The ablation study's command line: train every variant of ablations/study.py for the same budget
in images seen, score it the same way, one JSON row per run in results.jsonl, then REPORT.md from
the rows.

    bash ablate.sh                                    # the whole study on this machine's GPU
    bash ablate.sh --group baseline                   # one chunk; --only NAME,NAME picks variants
    bash ablate.sh --deadline_minutes 12              # no training starts that cannot end in 12 minutes
    bash ablate.sh --gpus 0,1,2,3                     # one worker per GPU
    bash ablate.sh --shard 3/8                        # the third eighth of the runs (a SLURM array task)
    bash ablate.sh --scale cpu                        # the CPU study: preset small, on 2 CPU cores
    bash ablate.sh --scale toy                        # the toy-scale study (preset tiny), for the tests
    python ablate.py report [--scale cpu]             # REPORT.md, its plots and grid mosaics, from the rows
    python ablate.py curve --points_kimg 125,250,500,1000   # the budget curve: one baseline run, 4 points
    python ablate.py curve --scale cpu --widths 16-32-32-32,32-64-64-64   # one curve per width

Each rule has its file in ablations/: the plan (plan.py: the study file loaded and checked, which
runs to do), the workers (runner.py: train.py then evaluate.py per run), the rows and their
provenance (rows.py: what makes a row current or stale), the statistics (stats.py: paired seeds,
intervals, Holm), the report (report.py) and the budget curve (curve.py). Checkpoints go to
checkpoints/ablations/ (git-ignored); rows, grids, plots and the report to the scale's folder.

A rerun skips every run that has a current row (--retry_failed runs the failed ones again, --remeasure
the finished ones without a measured CPU time). Shards write results.shard-I-of-K.jsonl beside
results.jsonl; every results*.jsonl there is read, so merging shards is concatenating their rows.
"""
import argparse
import sys

from ablations.curve import run_curve
from ablations.plan import load_study
from ablations.report import STUDY, write_report
from ablations.rows import Setup
from ablations.runner import RUNS_PER_CPU, RUNS_PER_GPU, Runner
from cli import ArgumentParser, non_negative_int, positive_float, positive_int, random_seed, run_main


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("run", "report", "curve") else "run"
    args = parse_args(command, argv)
    study = load_study(args.study, args.scale)
    if command == "report":
        setup = Setup.of(study.scale, args.budget_kimg, args.num_samples, args.precision)
        print(f"wrote {write_report(study, args.out or study.scale.folder, setup)}")
        return 0
    runner = Runner(study, args)
    return run_curve(runner, args.points_kimg, args.seed, args.fresh, args.widths) if command == "curve" else runner.run()


def parse_args(command, argv):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--scale", default="gpu", help="gpu, cpu (the study on a GPU or on 2 CPU cores) or toy; see SCALES in the study")
    p.add_argument("--study", default=STUDY, help="the study's file")
    p.add_argument("--out", help="the folder of results.jsonl, REPORT.md, grids and plots (default: the scale's)")
    p.add_argument("--budget_kimg", type=positive_float, help="thousands of images seen per run (default: the scale's)")
    p.add_argument("--num_samples", type=positive_int, help="samples per evaluation (default: the scale's)")
    p.add_argument("--precision", choices=["bf16", "fp32"],
                   help="one precision for every run, training and sampling, with contiguous activations (default: "
                        "the scale's, fp32: the same numbers on every CPU, to rounding; bf16 is faster where the CPU "
                        "has it natively, see docs/bench_cpu.md)")
    if command == "report":
        return p.parse_args(argv)
    p.add_argument("--checkpoints", help="where the runs' folders go (default: the scale's, git-ignored)")
    p.add_argument("--train_dataset_directory", default="images/train_images_downsample")
    p.add_argument("--validate_dataset_directory", default="images/test_images_downsample",
                   help="train.py's validation images and evaluate.py's held-out set (the floor)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu, when --gpus is not given")
    p.add_argument("--gpus", type=comma_list(non_negative_int), help="GPU indices, e.g. 0,1,2,3: one worker per GPU")
    p.add_argument("--runs_per_gpu", type=positive_int,
                   help=f"concurrent runs per GPU (default {RUNS_PER_GPU}) or on the CPU (default {RUNS_PER_CPU})")
    if command == "curve":
        p.add_argument("--points_kimg", type=comma_list(positive_float),
                       help="where to evaluate, in thousands of images seen (default: 1/4, 1/2, 1 and 2 budgets)")
        p.add_argument("--widths", type=comma_list(width),
                       help="channel tuples, comma-separated, e.g. 16-32-64-64,32-64-64-64: one curve each "
                            "(default: the scale's curve_widths, else the baseline's)")
        p.add_argument("--seed", type=random_seed, default=0)
        p.add_argument("--fresh", action="store_true", help="start the curve's run over")
        return p.parse_args(argv)
    p.add_argument("--only", type=comma_list(str), help="variant names, comma-separated")
    p.add_argument("--group", type=comma_list(str), help="groups, comma-separated: baseline, path, one_at_a_time, ...")
    p.add_argument("--seeds", type=comma_list(random_seed),
                   help="seeds for every chosen variant (default: each variant's own, the pairs of the design)")
    p.add_argument("--deadline_minutes", type=positive_float,
                   help="start no trained run that cannot finish within this many minutes, then write the report; "
                        "re-evaluations start until then, and one still sampling then stops, its finished batches "
                        "of samples kept for a rerun to continue")
    p.add_argument("--shard", type=shard, default=(1, 1), metavar="I/K", help="run the I-th of K parts (1-based)")
    p.add_argument("--retry_failed", action="store_true", help="run the variants whose row says failed again")
    p.add_argument("--retrain_missing", action="store_true",
                   help="train a finished run again where a re-evaluation to do needs its checkpoint and this machine "
                        "does not have it (its new row replaces the old one; the old one's re-evaluations stay current "
                        "where it measured the same to the last digit)")
    p.add_argument("--remeasure", action="store_true",
                   help="run again the finished runs whose row has no measured CPU time (rows from before the runner "
                        "measured it), so that the time limit judges them by it; the new row replaces the old one, "
                        "and the old one's re-evaluations stay current where it measured the same to the last digit")
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


def width(text):
    parts = text.split("-")
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a width: channels joined by -, e.g. 16-32-64-64")
    return tuple(map(int, parts))


def shard(text):
    i, sep, k = text.partition("/")
    if not (sep and i.isdigit() and k.isdigit() and 1 <= int(i) <= int(k)):
        raise argparse.ArgumentTypeError(f"{text!r} is not I/K with 1 <= I <= K, e.g. 2/8")
    return int(i), int(k)


if __name__ == "__main__":
    run_main(main)
