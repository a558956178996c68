"""The plan: the study file's variants at one scale, checked when it loads, and which runs one
invocation does (selection, shards, the runs that have a current row).

A run is a (variant, seed). A re-evaluation needs the trained run it re-evaluates, so choosing one
brings that run too, and a shard keeps the two together; choosing a variant that shows another's
runs (`runs_of`) chooses those. A run is skipped when it has a current row (ablations/rows.py):
finished, or failed unless --retry_failed. A stale row does not count. --retrain_missing trains a
finished run again where a re-evaluation needs its checkpoint and this machine does not have it;
--remeasure runs again a finished run whose row has no measured CPU time.
"""
import dataclasses
import difflib
import importlib.util
import os

from cli import UserError
from config import ConfigError, make_config
from dataset import IMAGE_SIZE
from diffusion import check_noise_process
from unet import check_network


@dataclasses.dataclass
class Study:
    path: str
    scale: object              # study.Scale
    variants: list             # study.Variant, the scale's, in the report's order
    groups: tuple
    literature: dict = dataclasses.field(default_factory=dict)  # the study file's literature(scale), for "What matters"

    def variant(self, name):
        return next(v for v in self.variants if v.name == name)

    def preset(self, variant):
        return dict(self.scale.presets).get(variant.preset, variant.preset)

    def pinned(self, variant):
        """The scale's pinned fields (study.Scale.pinned) where the variant is on preset default."""
        return self.scale.pinned if variant.preset == "default" else ()

    def overrides(self, variant):
        """The --set strings a trained variant runs with: its pinned fields first, then its own."""
        return (*self.pinned(variant), *variant.overrides)

    def config(self, variant):
        """The configuration a variant trains with or, for a re-evaluation, samples with."""
        if variant.of:
            parent = self.variant(variant.of)
            return make_config(self.preset(parent), [*self.overrides(parent), *variant.overrides])
        return make_config(self.preset(variant), self.overrides(variant))

    def reference(self, variant):
        """The run a variant is compared with, seed by seed: for a re-evaluation the run it
        re-evaluates; on the path the row before it (what this change bought), the baseline for
        its first row; else the baseline. None for the baseline."""
        if variant.of:
            return variant.of
        if variant.group == "path":
            trained = [v.name for v in self.variants if v.group == "path" and not v.of and not v.not_runnable]
            at = trained.index(variant.name)
            return trained[at - 1] if at else "baseline"
        return None if variant.name == "baseline" else "baseline"


def load_study(path, scale_name):
    """The study file's variants at one scale, every one checked with make_config (and the network's
    and noise process's checks), so that a typo
    in the study fails when it loads rather than in the middle of a GPU lease."""
    if not os.path.isfile(path):
        raise UserError(f"--study {path}: no such file")
    spec = importlib.util.spec_from_file_location("ablation_study", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if scale_name not in module.SCALES:
        raise UserError(f"--scale {scale_name}: choose one of {', '.join(module.SCALES)}")
    scale = module.SCALES[scale_name]
    try:
        everything = module.variants(scale)
    except UserError as e:  # the study's own checks
        raise UserError(f"{path}: {e}") from None
    by_name = {v.name: v for v in everything}
    if len(by_name) != len(everything):
        raise UserError(f"{path}: two variants share a name")
    unknown = [n for n in scale.variants if n not in by_name]
    if unknown:
        raise UserError(f"{path}: scale {scale_name} names unknown variants: {', '.join(unknown)}")
    chosen = [v for v in everything if v.name in scale.variants or v.group in scale.groups
              or not (scale.variants or scale.groups)]
    study = Study(path, scale, chosen, module.GROUPS, getattr(module, "literature", lambda scale: {})(scale))
    names = {v.name for v in chosen}
    baselines = [v for v in chosen if v.group == "baseline"]
    if [v.name for v in baselines] != ["baseline"]:
        raise UserError(f"{path}: scale {scale_name} needs exactly one variant, named baseline, in group baseline")
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
        if v.runs_of and (v.runs_of not in names or by_name[v.runs_of].of or by_name[v.runs_of].runs_of):
            raise UserError(f"{where}: shows the runs of {v.runs_of!r}, which is not a trained variant of scale "
                            f"{scale_name}")
        if v.runs_of and (study.config(v) != study.config(by_name[v.runs_of])
                          or not set(v.seeds) <= set(by_name[v.runs_of].seeds)):
            raise UserError(f"{where}: shows the runs of {v.runs_of!r}, but its configuration or seeds are not "
                            f"that variant's; give it runs of its own (runs_of=\"\")")
        reference = study.reference(v)
        if reference and not set(v.seeds) <= set(by_name[reference].seeds):
            raise UserError(f"{where}: seeds {', '.join(map(str, v.seeds))} are not all seeds of {reference}, "
                            f"which it is compared with seed by seed")
        try:  # the checks train.py makes before it reads the data, made before a lease is spent
            config = study.config(v)
            check_network(config, IMAGE_SIZE)
            check_noise_process(config)
        except ConfigError as e:
            raise UserError(f"{where}: {e}") from None
    return study


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


def select(study, only=None, groups=None, seeds=None):
    """The runs that --only, --group and --seeds choose, in the study's order, each re-evaluation
    after the trained run it needs."""
    names = [v.name for v in study.variants]
    for name in only or []:
        if name not in names:
            near = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
            raise UserError(f"--only {name}: not a variant of scale {study.scale.name}; "
                            + (f"did you mean {', '.join(near)}?" if near else f"see {study.path}"))
        if study.variant(name).not_runnable:
            raise UserError(f"--only {name}: cannot run yet: {study.variant(name).not_runnable}")
    for group in groups or []:
        if group not in study.groups:
            raise UserError(f"--group {group}: choose from {', '.join(study.groups)}")
        members = [v for v in study.variants if v.group == group]
        if members and all(v.not_runnable for v in members):
            raise UserError(f"--group {group}: cannot run yet: {members[0].not_runnable}")
    jobs = []
    for v in study.variants:
        if v.not_runnable or (only and v.name not in only) or (groups and v.group not in groups):
            continue
        for seed in seeds or v.seeds:
            if v.of:
                jobs.append(Job(study.variant(v.of), seed))
            jobs.append(Job(study.variant(v.runs_of) if v.runs_of else v, seed))
    return list(dict.fromkeys(jobs))


def shard(jobs, index, count):
    """The index-th of count parts (1-based). The runs are split before any is skipped, so that
    every shard sees the same split; a re-evaluation goes with the run it re-evaluates."""
    roots = list(dict.fromkeys(job.root for job in jobs))
    return [job for job in jobs if roots.index(job.root) % count == index - 1]


def to_do(jobs, rows, retry_failed=False, has_checkpoint=None, remeasure=False):
    """(the runs without a current row, how many have one): rows is ablations/rows.Rows. With
    has_checkpoint (--retrain_missing: a trained run's key -> whether its checkpoint is on this
    machine), a finished trained run that a re-evaluation to do needs, but whose checkpoint is
    missing, trains again first: its new row replaces the old one, and the old one's re-evaluations
    stay current where it measured the same to the last digit (rows.same_outcome: the runs are
    deterministic), else they become stale. With remeasure, so does a
    finished trained run whose row has no measured CPU time (from before the runner measured it):
    the time limit then judges it by its CPU time, not by a wall time that other load lengthened."""
    unmeasured = lambda r: remeasure and r["status"] == "ok" and not r["of"] and not r.get("process_cpu_seconds")
    done = {key for key, r in rows.current.items() if (r["status"] == "ok" or not retry_failed) and not unmeasured(r)}
    todo = [job for job in jobs if job.key not in done]
    if has_checkpoint:
        trained = {job.root: job for job in jobs if not job.variant.of}  # select() brings each re-evaluation's run
        again = {j.root for j in todo if j.variant.of and j.root in done and j.root in trained and not has_checkpoint(j.root)}
        todo = [job for job in jobs if job.key not in done or job.key in again]
    return todo, sum(job.key in done for job in jobs) - len({job.key for job in todo} & done)
