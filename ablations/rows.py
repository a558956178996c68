"""The study's rows: one JSON line per run in results.jsonl, where each row came from, and which rows
still describe the study as it is now.

A row records its provenance: the commit, `dirty` (how many files, tracked or untracked, differed
from it, the study's own output folder left out), torch, the machine, and two hashes:
- config_hash, of everything that makes the variant what it is: its preset resolved to a full
  configuration (every field, the sampler's included, but for a later switch still at the default
  that changes nothing: config.NEUTRAL_AT_DEFAULT), the run it re-evaluates and its starting noise;
- setup_hash, of what every row of one table shares: the budget, the samples per evaluation, the
  evaluation seed and the precision (Setup).
A row is current when both match the study file and the command line. Rows of another setup (say
another --budget_kimg) are another study and are not shown. A row of this setup whose variant was
edited since it ran is stale, and so is a re-evaluation whose trained run has been run again since
with another outcome (its parent_run is not the trained run's current run_id, and the row it names
measured something else: OUTCOME): the report lists stale rows apart and the runner runs them again.
A rerun that reproduced its run to the last digit (--retrain_missing on a machine that lacks the
checkpoint, --remeasure; the runs are deterministic) trained the same network, so the re-evaluations
stay. A row is appended whole, as one write of one line, so an interrupted run leaves no row, and a
line cut short by a crash is skipped (with a warning) without taking the next row with it.
"""
import dataclasses
import glob
import hashlib
import json
import os
import subprocess
import sys

from config import NEUTRAL_AT_DEFAULT, Config, config_to_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every row of one table shares."""
    budget_kimg: float      # thousands of images seen by every training run
    num_samples: int        # samples per evaluation
    evaluation_seed: int    # the evaluation's test and reference subsets, and its default starting noise
    precision: str          # of training and sampling, the same for every row

    @classmethod
    def of(cls, scale, budget_kimg=None, num_samples=None, precision=None):
        return cls(budget_kimg or scale.budget_kimg, num_samples or scale.num_samples, scale.evaluation_seed,
                   precision or scale.precision)

    @property
    def hash(self):
        return digest(dataclasses.asdict(self))


def digest(value):
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


# What a trained run measured: the loss at every logged step, the held-out losses, the metrics.
OUTCOME = ("curve", "train_loss", "val_loss", "val_loss_ema", "metrics", "attribute_tv")


def same_outcome(row, other):
    """Whether two rows of a trained run measured the same, to the last digit: a rerun that
    reproduced it."""
    return (other is not None and row["status"] == other["status"] == "ok"
            and all(row.get(k) == other.get(k) for k in OUTCOME))


def config_hash(study, variant):
    """The hash of the variant as the study file defines it now (see the module docstring)."""
    config = config_to_dict(study.config(variant))
    for name in NEUTRAL_AT_DEFAULT:  # a switch added later changes no hash while it is at its default
        if config[name] == getattr(Config, name):
            del config[name]
    return digest({"preset": study.preset(study.variant(variant.of) if variant.of else variant),
                   "config": config, "of": variant.of or None, "eval_seed": variant.eval_seed})


def provenance(out):
    """{"commit": HEAD, "dirty": files that differ from it}, the study's output folder left out (its
    rows and grids change while it runs)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout
    commit = git("rev-parse", "--short=12", "HEAD").strip() or None
    exclude = os.path.relpath(os.path.abspath(out), REPO)
    changed = git("status", "--porcelain", "--untracked-files=all", "--", ".",
                  *([f":(exclude){exclude}"] if not exclude.startswith("..") else [])).splitlines()
    return {"commit": commit, "dirty": len(changed) if commit else None}


def append_row(path, row):
    """One row as one line: a newline first if the file's last line was cut short by a crash, so
    that this row does not join it; flushed and synced before the run counts as done."""
    line = (json.dumps(row) + "\n").encode()
    with open(path, "ab+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


WARNED = set()  # (path, line) of the cut lines this process has warned about: one warning each


def read_rows(folder, pattern="results*.jsonl"):
    """Every row of every results file in the folder (shards write their own), in the order the
    runs finished; a line that is not JSON (cut short by a crash) is skipped, with one warning."""
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, pattern))):
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        if (path, number) not in WARNED:
                            WARNED.add((path, number))
                            print(f"warning: {path} line {number} is not a whole JSON row (a run cut short while "
                                  f"writing it?); skipped, and its run counts as not done", file=sys.stderr)
    # Shards' files are read one after another, so file order is not the order of the runs.
    return sorted(rows, key=lambda r: r.get("finished", 0))


@dataclasses.dataclass
class Rows:
    """The rows of one setup, sorted out: current[(variant, seed)] is the latest current row, stale
    the rows that a rerun replaces, with why."""
    current: dict
    stale: list   # (row, reason)
    other_setups: int
    runs_of: dict = dataclasses.field(default_factory=dict)  # {variant: (the variant whose runs it shows, its seeds)}

    @classmethod
    def of(cls, study, setup, rows):
        hashes = {v.name: config_hash(study, v) for v in study.variants if not v.not_runnable}
        mine = [r for r in rows if r.get("setup_hash") == setup.hash]
        current, stale = {}, []
        for r in mine:  # a row that finished later (a rerun) replaces an earlier one
            if r["variant"] not in hashes:
                continue  # a variant no longer in this scale
            if r.get("config_hash") != hashes[r["variant"]]:
                stale.append((r, "its variant was edited since it ran"))
            else:
                current[r["variant"], r["seed"]] = r
        by_id = {r["run_id"]: r for r in mine}
        for key, r in list(current.items()):
            parent = current.get((r["of"], r["seed"])) if r["of"] else None
            evaluated = by_id.get(r.get("parent_run"))  # the trained run's row it re-evaluated
            same_network = parent is not None and (parent["run_id"] == r.get("parent_run")
                                                   or same_outcome(parent, evaluated))
            if r["of"] and r["status"] == "ok" and not same_network:
                stale.append((r, f"its trained run {r['of']} seed {r['seed']} was run again since"))
                del current[key]
        superseded = {(r["variant"], r["seed"]) for r in current.values()}
        stale = [(r, why) for r, why in stale if (r["variant"], r["seed"]) not in superseded]
        return cls(current, stale, len(rows) - len(mine),
                   {v.name: (v.runs_of, v.seeds) for v in study.variants if v.runs_of})

    def of_variant(self, name):
        """The current rows a variant shows: its own, or on its seeds those of the variant it shows."""
        shown, seeds = self.runs_of.get(name, (name, None))
        return [r for (n, s), r in sorted(self.current.items()) if n == shown and (seeds is None or s in seeds)]

    def ok(self, name):
        """The variant's finished current rows, by seed."""
        return {r["seed"]: r for r in self.of_variant(name) if r["status"] == "ok"}

    def failed(self, name):
        return [r for r in self.of_variant(name) if r["status"] != "ok"]
