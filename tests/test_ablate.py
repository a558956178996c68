"""Tests for ablate.py and ablations/ (the study as data, the plan, the rows and their provenance, the
report, the curve), and the whole study end to end on tiny data through the real scripts (train.py,
evaluate.py)."""
import dataclasses
import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
from PIL import Image

import ablate
from ablations import curve, plan, report, rows, stats
from ablations import runner as runner_module
from ablations.rows import Setup
from cli import UserError
from config import config_to_dict, make_config
from testkit import PYTHON, REPO, make_avatar_folder, run

SAMPLER_KEYS = ("sampler", "sampling_steps", "sampling_schedule", "eta", "clamp_x0", "timestep_spacing")


SMALL_PARAMETERS = 1_172_995  # preset small, the cpu scale's baseline


def load(scale):
    return plan.load_study(os.path.join(REPO, report.STUDY), scale)


def training_fields(config):
    return {k: v for k, v in config_to_dict(config).items() if k not in SAMPLER_KEYS}


# ---- the study as data ---------------------------------------------------------------------------

@pytest.mark.parametrize("scale", ["gpu", "cpu", "toy"])
def test_every_variant_changes_what_it_claims(scale):
    study = load(scale)
    base = study.config(study.variant("baseline"))
    for v in study.variants:
        if v.not_runnable:
            continue
        config = study.config(v)
        if v.group == "one_at_a_time":  # exactly its own fields differ from the baseline
            changed = {k for k, value in config_to_dict(config).items() if config_to_dict(base)[k] != value}
            assert changed == {o.partition("=")[0] for o in v.overrides}, v.name
        if v.of and v.group != "evaluation_noise":  # a re-evaluation: its trained run's training, another sampler
            parent = study.config(study.variant(v.of))
            assert training_fields(config) == training_fields(parent), v.name
            assert config != parent, v.name
        reference = study.reference(v)
        if reference:  # the pairs: it trains on seeds of the run it is compared with
            assert set(v.seeds) <= set(study.variant(reference).seeds), v.name
            assert len(v.seeds) >= (1 if v.group in ("evaluation_noise", "tuning") else 2), v.name


def test_relative_variants_have_the_values_they_claim():
    """Not only which fields change, but by how much: half and double width, half and twice the
    learning rate, half and double batch, from the baseline; and the evaluation-noise rows."""
    study = load("gpu")
    base, config = study.config(study.variant("baseline")), lambda name: study.config(study.variant(name))
    assert config("width_half").channels == tuple(c // 2 for c in base.channels)
    assert config("width_double").channels == tuple(c * 2 for c in base.channels)
    assert math.isclose(config("lr_x0.5").learning_rate, base.learning_rate / 2)
    assert math.isclose(config("lr_x2").learning_rate, 2 * base.learning_rate)
    assert config("batch_128").batch_size == 128 < base.batch_size < config("batch_460").batch_size == 2 * base.batch_size
    assert study.variant("baseline").seeds == (0, 1, 2, 3, 4)
    noise = [v for v in study.variants if v.group == "evaluation_noise"]
    assert [v.eval_seed for v in noise] == [study.scale.evaluation_seed + k for k in (1, 2, 3, 4)]
    assert all(v.of == "baseline" and v.seeds == (0,) for v in noise)


@pytest.mark.parametrize("scale", ["gpu", "cpu", "toy"])
def test_every_trained_variant_builds_its_network(scale):
    """A configuration that make_config accepts but unet.py cannot build fails here, not on a GPU
    lease (on the meta device: no memory, no time)."""
    import torch
    from unet import make_network
    study = load(scale)
    sizes = {}
    for v in study.variants:
        if not v.not_runnable and not v.of:
            with torch.device("meta"):
                sizes[v.name] = sum(p.numel() for p in make_network(study.config(v)).parameters())
    assert sizes["baseline"] == {"gpu": 18_641_923, "cpu": SMALL_PARAMETERS, "toy": 426_019}[scale]
    if scale == "gpu":
        assert sizes["path_A_seed"] == 138_624_003
        assert sizes["width_half"] < sizes["baseline"] < sizes["width_double"]


def test_the_path_goes_from_the_seed_to_the_default_one_change_at_a_time():
    study = load("gpu")
    path = [v for v in study.variants if v.group == "path"]
    trained = [v for v in path if not v.of]
    assert trained[0].name == "path_A_seed" and study.config(trained[0]) == make_config("seed")
    for before, after in zip(trained, trained[1:]):
        assert after.overrides[:len(before.overrides)] == before.overrides  # each row keeps the ones before it
        assert training_fields(study.config(after)) != training_fields(study.config(before)), after.name
    baseline = make_config("default", study.scale.pinned)  # the default as the study runs it
    assert training_fields(study.config(trained[-1])) == training_fields(baseline)
    assert path[-1].of == trained[-1].name and study.config(path[-1]) == baseline


def test_the_cpu_path_goes_from_the_seeds_recipe_at_the_scales_width_to_its_baseline():
    """At the cpu scale the path starts from the seed's recipe (BatchNorm, no noise conditioning,
    uniform alpha-bar, Adam at 1e-5, no EMA) at the scale's width, batch and sampler, then the
    learning rate alone, and ends at the scale's baseline: at least 8 rows, none a re-evaluation."""
    study = load("cpu")
    path = [v for v in study.variants if v.group == "path"]
    base, first = study.config(study.variant("baseline")), study.config(path[0])
    seed = make_config("seed")
    assert len(path) >= 8 and not any(v.of for v in path) and path[0].name == "path_A_seed"
    assert (first.norm, first.noise_cond, first.noise_sampling, first.optimizer, first.learning_rate, first.ema_decay) == \
        (seed.norm, seed.noise_cond, seed.noise_sampling, seed.optimizer, 1e-5, 0.0)
    assert (first.channels, first.batch_size, first.sampler, first.sampling_steps) == \
        (base.channels, base.batch_size, base.sampler, base.sampling_steps)
    second = study.config(path[1])
    assert path[1].name == "path_B_learning_rate" and second.optimizer == "adam"
    assert dataclasses.replace(second, learning_rate=first.learning_rate) == first
    assert second.learning_rate == base.learning_rate
    assert study.config(path[-1]) == base and path[-1].runs_of == "baseline"  # its rows are the baseline's
    assert not any(v.runs_of for v in path[:-1])
    tuning = [study.config(v) for v in study.variants if v.group == "tuning"]
    assert [(c.learning_rate, c.batch_size) for c in tuning] == list(study.scale.tuning)
    assert all(dataclasses.replace(c, learning_rate=base.learning_rate, batch_size=base.batch_size) == base
               for c in tuning)  # only the rate and the batch differ from the baseline
    assert len({lr for lr, _ in study.scale.tuning}) >= 3 and len({n for _, n in study.scale.tuning}) >= 3


def test_the_study_has_what_the_issue_lists():
    study = load("gpu")
    names = {v.name for v in study.variants}
    assert {"noise_cond_none", "norm_batch", "norm_batch_batch_stats", "attention_16_8", "width_half", "width_double",
            "target_v", "lr_x0.5", "lr_x2", "ema_0.9999", "batch_128", "batch_460", "baseline_ddpm_1000",
            "noise_cond_none_dpm_10", "baseline_clamp_off"} <= names
    peers = {v.name: study.config(v) for v in study.variants if v.group == "peer"}
    assert set(peers) == {"peer_diffusers_unet2d", "peer_diffusers_unet2d_groups_of_4",
                          "peer_diffusers_unet2d_example_recipe"}
    assert all(c.arch == "diffusers" and c.attention == (16,) for c in peers.values())
    for scale in (study, load("cpu")):  # DDPM's group size at the head, 4 channels, whatever the scale's width
        config = scale.config(scale.variant("peer_diffusers_unet2d_groups_of_4"))
        assert config.channels[0] // config.norm_groups == 4 and config.norm_groups != math.gcd(32, *config.channels)
    # Every variant can run, but the revised default, until the study chooses its changes (issue 25).
    assert [v.name for v in study.variants if v.not_runnable] == ["revised_default"]
    lin = study.config(study.variant("zero_terminal_snr"))  # all three parts of Lin et al.'s fix at once
    assert (lin.zero_terminal_snr, lin.target) == (True, "v")
    assert study.config(study.variant("baseline_trailing")).timestep_spacing == "trailing"
    assert {v.group for v in study.variants} == set(study.groups) - {"tuning"}  # the gpu scale sweeps nothing yet
    toy = load("toy")
    assert toy.preset(toy.variant("baseline")) == "tiny" and len(toy.variants) < len(study.variants)
    cpu = load("cpu")  # the issue's CPU scale: the default's recipe at a CPU's width, 2,000 samples, 16x8 grids
    assert cpu.preset(cpu.variant("baseline")) == "small" and cpu.scale.num_samples >= 2000
    assert (cpu.scale.precision, cpu.scale.grid_size, cpu.scale.run_minutes_limit) == ("bf16", "16x8", 10)
    assert {v.group for v in cpu.variants} == set(study.groups)
    assert len([v for v in cpu.variants if v.group == "sampling"]) >= 18
    assert len(cpu.scale.curve_widths) >= 2


def write_study(folder, variants, scale="toy"):
    """A study file with a scale of tiny runs and these variants (Python source, one expression each)."""
    path = os.path.join(folder, "study.py")
    with open(path, "w") as f:
        f.write("from ablations.study import GROUPS, SAMPLER_FIELDS, Scale, Variant\n"
                f"SCALES = {{'{scale}': Scale('{scale}', budget_kimg=0.128, num_samples=32, folder='unused', "
                f"checkpoints='unused', presets=(('default', 'tiny'),), toy=True, budget_note='a test budget')}}\n"
                f"def variants(scale):\n    return [{' '.join(variants.split())}]\n")
    return path


def test_a_typo_in_the_study_fails_when_it_loads(tmp_path):
    path = write_study(tmp_path, 'Variant("baseline", "baseline"), Variant("norm_grup", "one_at_a_time", '
                                 'overrides=("norm=grup",))')
    with pytest.raises(UserError) as error:
        plan.load_study(path, "toy")
    assert str(error.value) == f"{path}: variant norm_grup: --set norm=grup: choose one of batch, group, none"

    path = write_study(tmp_path, 'Variant("baseline", "baseline"), Variant("ddim_5", "sampling", of="baseline", '
                                 'overrides=("norm=batch",))')
    with pytest.raises(UserError, match="variant ddim_5: a re-evaluation may only set sampler, sampling_steps"):
        plan.load_study(path, "toy")
    with pytest.raises(UserError, match="--scale gpu: choose one of toy"):
        plan.load_study(path, "gpu")
    # Unpaired seeds: a variant trained on a seed that its reference has no run of.
    path = write_study(tmp_path, 'Variant("baseline", "baseline", seeds=(0, 1)), '
                                 'Variant("norm_batch", "one_at_a_time", overrides=("norm=batch",), seeds=(1, 2))')
    with pytest.raises(UserError, match="variant norm_batch: seeds 1, 2 are not all seeds of baseline"):
        plan.load_study(path, "toy")


def test_a_path_row_that_reaches_the_baseline_shows_the_baselines_runs_on_its_seeds(tmp_path):
    """The path's last row trains what the baseline trains: it runs nothing of its own, the plan
    runs the baseline's seeds for it, and its table row pairs the baseline's runs with the row above."""
    path = write_study(tmp_path, '''Variant("baseline", "baseline", seeds=(0, 1, 2)),
        Variant("path_A", "path", overrides=("norm=batch",), seeds=(0, 1)),
        Variant("path_B", "path", seeds=(0, 1), runs_of="baseline")''')
    study = plan.load_study(path, "toy")
    assert [job.key for job in plan.select(study, only=["path_B"])] == [("baseline", 0), ("baseline", 1)]
    assert [job.key for job in plan.select(study)] == [("baseline", s) for s in (0, 1, 2)] + [("path_A", 0), ("path_A", 1)]
    setup = Setup.of(study.scale)
    written = [fake_row(study, setup, "baseline", s, 100.0 + s) for s in (0, 1, 2)]
    written += [fake_row(study, setup, "path_A", s, 200.0 + s) for s in (0, 1)]
    sorted_out = rows.Rows.of(study, setup, written)
    assert sorted_out.ok("path_B") == {s: written[s] for s in (0, 1)} and len(sorted_out.current) == 5
    assert plan.to_do(plan.select(study), sorted_out) == ([], 5)
    for r in written:
        rows.append_row(tmp_path / "results.jsonl", r)
    text = open(report.write_report(study, str(tmp_path), setup)).read()
    line = next(line for line in text.splitlines() if line.startswith("| `path_B` |"))
    assert "| `path_A` | 2 | 100.5 | x0.50 [" in line, line  # its 2 seeds against the row above, not 3

    # A row that claims another's runs but trains something else fails when the study loads.
    path = write_study(tmp_path, '''Variant("baseline", "baseline", seeds=(0, 1)),
        Variant("path_A", "path", overrides=("norm=batch",), seeds=(0, 1), runs_of="baseline")''')
    with pytest.raises(UserError, match="variant path_A: shows the runs of 'baseline', but its configuration"):
        plan.load_study(path, "toy")


# ---- the plan --------------------------------------------------------------------------------------

def gpu_runner(tmp_path, *flags):
    """The gpu scale's runner, its rows and run folders in tmp_path (flags may give others)."""
    args = ablate.parse_args("run", ["--out", str(tmp_path / "out"), "--checkpoints", str(tmp_path / "runs"),
                                     "--train_dataset_directory", str(tmp_path), "--validate_dataset_directory",
                                     str(tmp_path), *flags])
    return ablate.Runner(load("gpu"), args)


def planned(tmp_path, *flags):
    jobs, skipped = gpu_runner(tmp_path, *flags).plan()
    return [job.key for job in jobs]


def test_shards_split_the_runs_and_keep_a_re_evaluation_with_its_run(tmp_path):
    everything = planned(tmp_path)
    shards = [planned(tmp_path, "--shard", f"{i}/3") for i in (1, 2, 3)]
    assert sorted(sum(shards, [])) == sorted(everything) and len(set(everything)) == len(everything)
    assert all(shards) and max(map(len, shards)) - min(map(len, shards)) <= 20
    for shard in shards:
        assert ("noise_cond_none_ddpm_1000", 0) not in shard or ("noise_cond_none", 0) in shard
    # --only a re-evaluation brings its trained run; --seeds applies to both.
    assert planned(tmp_path, "--only", "baseline_ddim_50", "--seeds", "1,2") == [
        ("baseline", 1), ("baseline_ddim_50", 1), ("baseline", 2), ("baseline_ddim_50", 2)]
    assert planned(tmp_path, "--group", "baseline") == [("baseline", s) for s in range(5)]
    assert planned(tmp_path, "--only", "norm_batch") == [("norm_batch", 0), ("norm_batch", 1)]  # the pairs
    with pytest.raises(UserError, match=r"--shard: '4/3' is not I/K"):
        planned(tmp_path, "--shard", "4/3")


def test_retrain_missing_trains_a_finished_run_again_only_where_a_re_evaluation_needs_its_absent_checkpoint(tmp_path):
    """A re-evaluation whose trained run finished on another machine (no checkpoint here): skipped
    without the flag; with --retrain_missing that run trains again first, once, and only that one."""
    runner = gpu_runner(tmp_path, "--only", "baseline_ddim_50,evaluation_noise_1", "--checkpoints", str(tmp_path / "runs"))
    setup = runner.setup
    for seed in (0, 1):
        rows.append_row(tmp_path / "out" / "results.jsonl", fake_row(runner.study, setup, "baseline", seed, 100.0))
    rows.append_row(tmp_path / "out" / "results.jsonl", fake_row(runner.study, setup, "evaluation_noise_1", 0, 101.0))
    os.makedirs(runner.run_dir("baseline", 1))
    open(os.path.join(runner.run_dir("baseline", 1), "latest_model.pth"), "w").close()  # seed 1's is here
    keys = lambda plan: ([job.key for job in plan[0]], plan[1])
    assert keys(runner.plan()) == ([("baseline_ddim_50", 0), ("baseline_ddim_50", 1)], 3)
    again = gpu_runner(tmp_path, "--only", "baseline_ddim_50,evaluation_noise_1", "--checkpoints", str(tmp_path / "runs"),
                       "--retrain_missing")
    assert keys(again.plan()) == ([("baseline", 0), ("baseline_ddim_50", 0), ("baseline_ddim_50", 1)], 2)


def test_remeasure_runs_again_only_the_finished_trained_runs_without_a_measured_cpu_time(tmp_path):
    """Rows from before the runner measured CPU time are judged against the time limit by their wall
    time, which other load lengthens: --remeasure runs those trained runs again, and no other run
    (the limit does not judge a re-evaluation)."""
    command = ("--only", "baseline,baseline_ddim_50,norm_batch", "--seeds", "0,1")
    runner = gpu_runner(tmp_path, *command)
    results = tmp_path / "out" / "results.jsonl"
    rows.append_row(results, fake_row(runner.study, runner.setup, "baseline", 0, 100.0))  # no process_cpu_seconds
    rows.append_row(results, fake_row(runner.study, runner.setup, "baseline", 1, 100.0, process_cpu_seconds=600.0))
    for seed in (0, 1):
        rows.append_row(results, fake_row(runner.study, runner.setup, "baseline_ddim_50", seed, 100.0))
    rows.append_row(results, fake_row(runner.study, runner.setup, "norm_batch", 0, 100.0, status="failed"))
    keys = lambda r: [job.key for job in r.plan()[0]]
    assert keys(runner) == [("norm_batch", 1)]
    assert keys(gpu_runner(tmp_path, *command, "--remeasure")) == [("baseline", 0), ("norm_batch", 1)]
    assert keys(gpu_runner(tmp_path, *command, "--remeasure", "--retry_failed")) == [
        ("baseline", 0), ("norm_batch", 0), ("norm_batch", 1)]


def test_the_deadline_estimates_a_run_by_its_network_and_a_re_evaluation_by_its_sampler_steps_and_threads(tmp_path):
    """Under --deadline_minutes a re-evaluation with 40 times the sampler steps of a finished one is
    estimated at 40 times its time, so that DDPM's 1000 steps do not start near the deadline on the
    strength of a 25-step evaluation; one with fewer steps at that one's time. Once re-evaluations
    span two step counts, by the line through them (the metrics' fixed share does not grow with the
    steps), on the runs' own threads where it can. A trained run is
    estimated from runs of its own network: a wide network's long run does not hold back the
    baseline's, and stands for a network no run has tried yet."""
    runner = gpu_runner(tmp_path)
    results = tmp_path / "out" / "results.jsonl"
    config = lambda name: json.loads(json.dumps(config_to_dict(runner.study.config(runner.study.variant(name)))))
    rows.append_row(results, fake_row(runner.study, runner.setup, "baseline", 0, 100.0, wall_seconds=700.0,
                                      config=config("baseline")))
    rows.append_row(results, fake_row(runner.study, runner.setup, "evaluation_noise_1", 0, 101.0, wall_seconds=300.0,
                                      sampler={"sampler": "dpm", "steps": 25}))
    estimate = lambda name: runner.estimate_seconds(plan.Job(runner.study.variant(name), 0))
    assert estimate("baseline_ddpm_1000") == 300.0 * 1000 / 25 and estimate("baseline_ddim_50") == 600.0
    assert estimate("baseline_dpm_10") == 300.0 and estimate("norm_batch") == 700.0
    rows.append_row(results, fake_row(runner.study, runner.setup, "width_double", 0, 90.0, wall_seconds=5000.0,
                                      config=config("width_double")))
    assert estimate("norm_batch") == 700.0 and estimate("width_double") == 5000.0
    assert estimate("attention_16_8") == 5000.0  # no run of its network yet: the longest of any

    # Re-evaluations at two step counts: the line through them, on the runs' own threads where
    # those span two step counts. 1 thread: 140 s at 10 steps, 300 s at 25; 2 threads: 130 s at 20,
    # 155 s at 25; 4 threads: 100 s at 25, one step count, so the line through all, scaled.
    points = ((25, 300.0, 1), (10, 140.0, 1), (20, 130.0, 2), (25, 155.0, 2), (25, 100.0, 4))
    for name, (steps, seconds, threads) in zip(("evaluation_noise_1", "baseline_dpm_10", "baseline_dpm_20",
                                                "evaluation_noise_2", "evaluation_noise_3"), points):
        rows.append_row(results, fake_row(runner.study, runner.setup, name, 0, 101.0, wall_seconds=seconds,
                                          threads=threads, sampler={"sampler": "dpm", "steps": steps}))
    runner.threads = 1
    assert estimate("baseline_ddpm_1000") == pytest.approx(140 + 990 * 160 / 15)  # not 40 x 300 s
    assert estimate("baseline_dpm_10") == pytest.approx(140.0)
    runner.threads = 2
    assert estimate("baseline_ddpm_1000") == pytest.approx(30 + 5 * 1000)
    runner.threads = 4
    fixed, per_step, above = runner_module.sampling_line([(s, t) for s, t, _ in points])
    assert estimate("baseline_ddpm_1000") == pytest.approx(100 / (fixed + per_step * 25) * (fixed + per_step * 1000 + above))
    # Once a re-evaluation's CPU time was measured, the rows without one (from before, which may have
    # shared the cores with other work) no longer count.
    rows.append_row(results, fake_row(runner.study, runner.setup, "evaluation_noise_4", 0, 101.0, wall_seconds=90.0,
                                      threads=1, process_cpu_seconds=89.0, sampler={"sampler": "dpm", "steps": 25}))
    assert estimate("baseline_ddpm_1000") == 90.0 * 1000 / 25
    assert runner_module.sampling_line([(10, 140.0), (25, 300.0), (25, 310.0)])[2] == pytest.approx(5.0)  # the most above
    assert runner_module.sampling_line([(25, 300.0), (25, 310.0)]) is None
    assert runner_module.sampling_line([(10, 30.0), (25, 300.0)]) is None  # -150 s at 0 steps: noise


def test_the_deadline_starts_a_re_evaluation_that_cannot_end_and_stops_it_there(tmp_path, capsys):
    """Under --deadline_minutes a trained run that cannot end in time does not start, but a
    re-evaluation does where one batch of its samples can end, as its evaluate.py keeps each finished
    batch (--resume_dir): at the deadline the runner stops it, with no row and a line that says a
    rerun continues it, and lets a trained run's step under way go on."""
    from tqdm import tqdm
    runner = gpu_runner(tmp_path)
    results = tmp_path / "out" / "results.jsonl"
    config = json.loads(json.dumps(config_to_dict(runner.study.config(runner.study.variant("baseline")))))
    rows.append_row(results, fake_row(runner.study, runner.setup, "baseline", 0, 100.0, wall_seconds=700.0, config=config))
    rows.append_row(results, fake_row(runner.study, runner.setup, "evaluation_noise_1", 0, 101.0, wall_seconds=300.0,
                                      sampler={"sampler": "dpm", "steps": 25}))
    job = lambda name: plan.Job(runner.study.variant(name), 0)
    # 10 minutes: neither the trained run (700 s) nor DDPM's 1000 steps (about 12,000 s) can end by
    # then; one of DDPM's 40 batches (300 s) can. With 10 batches (1,200 s each) not one.
    runner.batches, runner.running, runner.unstarted = 40, set(), []
    runner.pending = [job("norm_batch"), job("baseline_ddpm_1000")]
    runner.deadline, runner.bar = time.time() + 600, tqdm(total=2, disable=True)
    assert runner.next_job().key == ("baseline_ddpm_1000", 0) and runner.next_job() is None
    assert [j.key for j in runner.unstarted] == [("norm_batch", 0)]
    runner.batches, runner.pending = 10, [job("baseline_ddpm_1000")]
    assert runner.next_job() is None and runner.unstarted[-1].key == ("baseline_ddpm_1000", 0)
    runner.pending, runner.deadline = [job("baseline_dpm_10")], time.time() - 1
    assert runner.next_job() is None  # past the deadline: no re-evaluation starts either
    assert "baseline_ddpm_1000 seed 0: about 200 minutes, past the deadline: it samples until then" in capsys.readouterr().out
    # A stopped run kept 30 of the 40 batches (under one key; another key's 5 do not count): its
    # rerun samples the other 10, a quarter of the time. With all 40 kept it ends in time.
    samples = pathlib.Path(runner.run_dir("baseline", 0)) / "samples_baseline_ddpm_1000"
    for key, count in (("a", 30), ("b", 5)):
        (samples / key).mkdir(parents=True)
        for start in range(count):
            (samples / key / f"batch_{start * 50:07d}.pt").write_bytes(b"")
    runner.batches, runner.deadline = 40, time.time() + 600
    runner.pending = [job("baseline_ddpm_1000")]
    assert runner.kept_batches(job("baseline_ddpm_1000")) == 30 and runner.next_job().key == ("baseline_ddpm_1000", 0)
    assert ("baseline_ddpm_1000 seed 0: about 50 minutes for the 10 of its 40 batches not kept, past the deadline"
            in capsys.readouterr().out)
    for start in range(30, 40):
        (samples / "a" / f"batch_{start * 50:07d}.pt").write_bytes(b"")
    runner.running, runner.pending = set(), [job("baseline_ddpm_1000")]
    assert runner.next_job().key == ("baseline_ddpm_1000", 0) and "past the deadline" not in capsys.readouterr().out

    script = tmp_path / "step.py"
    script.write_text("import time\nprint('started', flush=True)\ntime.sleep(600)\n")
    raised = {}

    def step(name, resumes):
        try:
            runner.step(name, [str(script)], str(tmp_path), (None, "cpu", 1), resumes=resumes)
        except runner_module.Interrupted:
            raised[name] = True
    threads = {name: threading.Thread(target=step, args=(name, name == "sampling")) for name in ("sampling", "training")}
    for thread in threads.values():
        thread.start()
    wait_until = time.time() + 60
    while not all((tmp_path / f"{name}.log").exists() and "started" in (tmp_path / f"{name}.log").read_text()
                  for name in threads):
        assert time.time() < wait_until
        time.sleep(0.1)
    runner.stop_resumable()
    threads["sampling"].join(timeout=60)
    time.sleep(0.5)
    assert raised == {"sampling": True} and threads["training"].is_alive()
    runner.interrupt("the end of the test")
    threads["training"].join(timeout=60)
    assert raised == {"sampling": True, "training": True}

    # The whole loop: at the deadline run() stops the re-evaluation under way and says so; the worker
    # goes on to file the run after it as not started. No row.
    script.write_text("import time\nprint('started', flush=True)\ntime.sleep(600)\n")
    runner = gpu_runner(tmp_path, "--deadline_minutes", "0.05")  # 3 seconds
    runner.plan = lambda: ([job("baseline_ddpm_1000"), job("baseline_dpm_10")], 0)
    runner.slots = lambda: [(None, "cpu", 1)]
    runner.estimate_seconds = lambda job: 0.1
    runner.run_job = lambda job, slot: runner.step("evaluate.py", [str(script)], str(tmp_path), slot, resumes=True)
    started = time.time()
    assert runner.run() == 0 and time.time() - started < 60
    out = capsys.readouterr().out
    assert ("--deadline_minutes: 1 re-evaluations stopped at the deadline, their finished batches of samples kept "
            "(a rerun continues them): baseline_ddpm_1000/0") in out
    assert "--deadline_minutes: 1 runs not started: baseline_dpm_10/0" in out
    assert len(results_of(tmp_path / "out")) == 2

    # A trained run's step that a signal ended after the deadline is not one that a rerun continues.
    runner, jobs = gpu_runner(tmp_path), [job("norm_batch")]
    runner.bar, runner.running, runner.deadline = tqdm(total=1, disable=True), set(), time.time() - 1
    runner.next_job = lambda: jobs.pop() if jobs else None
    runner.run_job = lambda *args: (_ for _ in ()).throw(runner_module.Interrupted())
    runner.worker((None, "cpu", 1))
    assert runner.stopped == []


def test_a_bf16_study_refuses_a_cpu_that_would_emulate_bf16(tmp_path, monkeypatch):
    """Emulated bf16 runs a CPU study 15 to 40 times slower than fp32: the runner says so before it
    starts, and runs where the CPU has bf16 or the table is fp32."""
    import speed
    monkeypatch.setattr(speed, "native_bf16", lambda: False)
    with pytest.raises(UserError, match=r"^--precision bf16 \(the gpu scale's\): this CPU \(.*\) has no native bf16"):
        gpu_runner(tmp_path, "--device", "cpu", "--precision", "bf16").slots()
    devices = lambda *flags: [device for _, device, _ in gpu_runner(tmp_path, "--device", "cpu", *flags).slots()]
    assert devices("--precision", "fp32") == ["cpu", "cpu"]
    monkeypatch.setattr(speed, "native_bf16", lambda: True)
    assert devices("--precision", "bf16") == ["cpu", "cpu"]


def test_a_mistyped_variant_is_one_line_that_names_the_near_ones(tmp_path):
    with pytest.raises(UserError) as error:
        planned(tmp_path, "--only", "norm_bach")
    assert str(error.value) == "--only norm_bach: not a variant of scale gpu; did you mean norm_batch?"
    with pytest.raises(UserError, match="--only lr_x3: not a variant of scale gpu; did you mean lr_x2, lr_x0.5?"):
        planned(tmp_path, "--only", "lr_x3")
    with pytest.raises(UserError, match="--only zzz: not a variant of scale gpu; see "):
        planned(tmp_path, "--only", "zzz")


# ---- rows: provenance, staleness, a crash mid-write ---------------------------------------------------

def fake_row(study, setup, name, seed, fd, status="ok", **fields):
    """A row as runner.Runner.run_job writes one, with made-up metrics (fd: attribute FD)."""
    v = study.variant(name)
    metric = lambda x, floor: {"samples": x, "floor": floor}
    return {"variant": name, "group": v.group, "of": v.of or None, "seed": seed, "eval_seed": 0,
            "budget_kimg": setup.budget_kimg, "num_samples": setup.num_samples, "run_id": f"{name}-{seed}-{fields.get('tag', '')}",
            "parent_run": f"{v.of}-{seed}-" if v.of else None, "config_hash": rows.config_hash(study, v),
            "setup_hash": setup.hash, "status": status, "reason": None if status == "ok" else "train.py exit 1: boom",
            "date": "2026-12-02T05:00:00", "commit": "abc", "dirty": 0, "torch": "2.14.1", "gpu": None,
            "cpu": "CPU (test, 2 cores)", "device": "cpu", "precision": "fp32", "wall_seconds": 10.0,
            "gpu_seconds": None, "train_seconds": None if v.of else 7.5, "img_per_s": 100.0, "val_loss_ema": 0.2,
            "train_loss": 0.2, "grid": f"grids/{name}_seed{seed}.png",
            "curve": None if v.of else {"kimg": [1, 2, 3], "train_loss": [0.5, 0.3, 0.2 + seed / 100]},
            "metrics": {"attribute_fd": metric(fd, 30.0), "swd_x1e3_avg": metric(fd / 10, 2.0),
                        "attribute_tv_mean": metric(0.1 + fd / 1e4, 0.02), "precision": metric(0.5, 0.7),
                        "recall": metric(0.4, 0.7)} if status == "ok" else None,
            **{k: v for k, v in fields.items() if k != "tag"}}


def test_a_switch_added_later_changes_no_hash_at_its_default():
    """Rows written before arch, zero_terminal_snr, timestep_spacing and norm_groups existed stay
    current (config.NEUTRAL_AT_DEFAULT); a variant that sets one of them is another variant."""
    from config import NEUTRAL_AT_DEFAULT
    study = load("cpu")
    baseline = study.variant("baseline")
    before = config_to_dict(study.config(baseline))  # the configuration as it was hashed before the switches
    for name in NEUTRAL_AT_DEFAULT:
        del before[name]
    assert rows.config_hash(study, baseline) == rows.digest(
        {"preset": study.preset(baseline), "config": before, "of": None, "eval_seed": None})
    for setting in ("arch=diffusers", "zero_terminal_snr=true", "timestep_spacing=trailing", "norm_groups=4"):
        other = dataclasses.replace(baseline, overrides=(setting,))
        assert rows.config_hash(study, other) != rows.config_hash(study, baseline), setting
    # The toy study's committed rows ran before any of these switches: a switch added later without
    # its place in NEUTRAL_AT_DEFAULT would make them stale.
    toy = load("toy")
    toy_rows = rows.Rows.of(toy, Setup.of(toy.scale), rows.read_rows(os.path.join(REPO, "ablations", "toy")))
    assert len(toy_rows.current) == 23 and not toy_rows.stale


def test_revising_the_preset_leaves_the_study_rows_current_where_the_scale_pins_its_old_fields(tmp_path):
    """Issue 25 revised presets default and small by the study's findings (no flips, strided-conv
    down). The cpu scale pins those fields as its rows ran them (Scale.pinned): every committed row
    stays current, the variants keep their names, the revised default is the preset itself, and
    train.py gets the pins before a variant's own --set. Without the pins the revision stales the rows."""
    setup = Setup.of(load("cpu").scale)
    committed_rows = rows.read_rows(os.path.join(REPO, "ablations", "cpu"))  # once: a study chunk may be appending
    committed = lambda study: rows.Rows.of(study, setup, committed_rows)
    study = load("cpu")
    pinned = committed(study)
    assert len(pinned.current) >= 59 and ("baseline", 2) in pinned.current
    assert study.scale.pinned == ("hflip=true", "down=maxpool") == load("gpu").scale.pinned
    assert (make_config("small").hflip, make_config("small").down) == (False, "conv")  # the revision
    assert study.config(study.variant("hflip_off")) == make_config("small", ["down=maxpool"])  # one field at a time
    assert study.config(study.variant("revised_default")) == make_config("small")
    assert study.overrides(study.variant("path_C_optimiser")) == study.variant("path_C_optimiser").overrides  # on seed
    assert report.change_of(study, study.variant("baseline")) == "preset small, with hflip=true, down=maxpool as the study ran it"
    text = open(os.path.join(REPO, report.STUDY)).read()
    assert text.count("pinned=REVISED_FIELDS") == 2
    (tmp_path / "study.py").write_text(text.replace("pinned=REVISED_FIELDS", "pinned=()")
                                       .replace('revised=("hflip_off", "down_conv")', "revised=()"))
    unpinned = plan.load_study(str(tmp_path / "study.py"), "cpu")
    assert not committed(unpinned).current.get(("baseline", 2))  # unpinned: the baseline is another run now
    assert "hflip_on" in [v.name for v in unpinned.variants]  # and the one-at-a-time changes are others
    # What train.py is given, and what the row says it ran.
    args = ablate.parse_args("run", ["--scale", "cpu", "--out", str(tmp_path / "out"), "--checkpoints", str(tmp_path / "runs"),
                                     "--train_dataset_directory", str(tmp_path), "--validate_dataset_directory", str(tmp_path)])
    runner = ablate.Runner(study, args)
    commands = []
    def step(name, command, run_dir, slot):
        commands.append(command)
        raise runner_module.RunFailed("stopped by the test")
    runner.step = step
    row = runner.run_job(plan.Job(study.variant("norm_batch"), 0), (None, "cpu", 1))
    sets = [a for flag, a in zip(commands[0], commands[0][1:]) if flag == "--set"]
    assert sets == row["overrides"] == ["hflip=true", "down=maxpool", "norm=batch"]
    assert row["config_hash"] == pinned.current["norm_batch", 0]["config_hash"]


def test_a_row_cut_short_by_a_crash_costs_no_other_row(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    rows.append_row(results, {"variant": "a", "seed": 0})
    with open(results, "a") as f:
        f.write('{"variant": "b", "se')  # a crash in the middle of a write
    rows.append_row(results, {"variant": "c", "seed": 0})  # the next run's row: not glued to the broken one
    assert [r["variant"] for r in rows.read_rows(tmp_path)] == ["a", "c"]
    assert [r["variant"] for r in rows.read_rows(tmp_path)] == ["a", "c"]  # read again: no second warning
    warnings = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {results} line 2 is not a whole JSON row")


def test_rows_are_ordered_by_when_their_runs_finished_whatever_their_file(tmp_path):
    """A shard's file is read after results.jsonl: a run retried into results.jsonl after it failed in
    a shard must still count as the later row."""
    path = write_study(tmp_path, 'Variant("baseline", "baseline", seeds=(0, 1))')
    study = plan.load_study(path, "toy")
    setup = Setup.of(study.scale)
    rows.append_row(tmp_path / "results.shard-1-of-2.jsonl", fake_row(study, setup, "baseline", 0, None, "failed", finished=1.0))
    rows.append_row(tmp_path / "results.jsonl", fake_row(study, setup, "baseline", 0, 100.0, finished=2.0))
    current = rows.Rows.of(study, setup, rows.read_rows(tmp_path)).current
    assert current["baseline", 0]["status"] == "ok"


def test_a_bug_in_the_runner_stops_it_with_its_traceback_and_writes_no_row(tmp_path, monkeypatch):
    path = write_study(tmp_path, 'Variant("baseline", "baseline", seeds=(0, 1))')
    args = ablate.parse_args("run", ["--study", path, "--scale", "toy", "--out", str(tmp_path / "out"),
                                     "--checkpoints", str(tmp_path / "runs"), "--train_dataset_directory", str(tmp_path),
                                     "--validate_dataset_directory", str(tmp_path), "--device", "cpu"])

    def buggy_train(self, *args):
        raise KeyError("a bug")
    monkeypatch.setattr(ablate.Runner, "train", buggy_train)
    with pytest.raises(KeyError, match="a bug"):
        ablate.Runner(plan.load_study(path, "toy"), args).run()
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_an_edited_variant_and_a_re_evaluation_of_a_rerun_are_stale_unless_the_rerun_reproduced_its_run(tmp_path):
    """A re-evaluation of a trained run that ran again is stale, unless the rerun measured the same to
    the last digit (--retrain_missing on a machine without the checkpoint: a deterministic run)."""
    path = write_study(tmp_path, '''Variant("baseline", "baseline", seeds=(0, 1)),
        Variant("lr_x2", "one_at_a_time", overrides=("learning_rate=4e-4",)),
        Variant("baseline_ddim_5", "sampling", of="baseline", overrides=("sampling_steps=5",))''')
    study = plan.load_study(path, "toy")
    setup = Setup.of(study.scale)
    written = [fake_row(study, setup, "baseline", s, 100.0) for s in (0, 1)]
    written += [fake_row(study, setup, "lr_x2", s, 90.0) for s in (0, 1)]
    written += [fake_row(study, setup, "baseline_ddim_5", s, 95.0) for s in (0, 1)]
    written.append(fake_row(study, Setup.of(study.scale, budget_kimg=1), "baseline", 0, 50.0))  # another setup
    sorted_out = rows.Rows.of(study, setup, written)
    assert sorted(sorted_out.current) == sorted((r["variant"], r["seed"]) for r in written[:6])
    assert sorted_out.stale == [] and sorted_out.other_setups == 1
    jobs = plan.select(study)
    assert plan.to_do(jobs, sorted_out) == ([], 6)

    # The study file changes lr_x2, and baseline seed 1 runs again: lr_x2 and the re-evaluation of
    # seed 1 are stale, and they are what a rerun does.
    path = write_study(tmp_path, open(path).read().split("return [", 1)[1].rsplit("]", 1)[0]
                       .replace("learning_rate=4e-4", "learning_rate=8e-4"))
    study = plan.load_study(path, "toy")
    earlier = rows.Rows.of(study, setup, written)
    written.append(fake_row(study, setup, "baseline", 1, 101.0, tag="rerun"))
    # Baseline seed 0 runs again too, and reproduces itself: its re-evaluation stays current.
    written.append(fake_row(study, setup, "baseline", 0, 100.0, tag="reproduced"))
    sorted_out = rows.Rows.of(study, setup, written)
    assert sorted_out.current["baseline", 0]["run_id"] == "baseline-0-reproduced"
    assert sorted_out.current["baseline_ddim_5", 0]["parent_run"] == "baseline-0-"
    otherwise = dict(written[-1], curve={"kimg": [1, 2, 3], "train_loss": [0.5, 0.3, 0.2000001]})
    assert not rows.same_outcome(written[0], otherwise)  # the same metrics, another loss curve: another run
    # What the runner says of each rerun, from the rows before it.
    note = lambda row: runner_module.rerun_note(earlier, row)
    assert note(written[-1]) == ("baseline seed 0: measured the same as its earlier run baseline-0- to the last digit "
                                 "(it is deterministic): its 1 re-evaluations stay current")
    assert "baseline seed 1: measured otherwise than its earlier run baseline-1-: its 1 re-evaluations are stale" in note(
        written[-2])
    assert "are stale until --retry_failed" in note(fake_row(study, setup, "baseline", 1, 0.0, status="failed"))
    assert note(fake_row(study, setup, "lr_x2", 0, 91.0, tag="again")) is None  # nothing re-evaluates it
    assert sorted(((r["variant"], r["seed"]), why) for r, why in sorted_out.stale) == [
        (("baseline_ddim_5", 1), "its trained run baseline seed 1 was run again since"),
        (("lr_x2", 0), "its variant was edited since it ran"), (("lr_x2", 1), "its variant was edited since it ran")]
    todo, skipped = plan.to_do(plan.select(study), sorted_out)
    assert [job.key for job in todo] == [("lr_x2", 0), ("lr_x2", 1), ("baseline_ddim_5", 1)] and skipped == 3
    for r in written:
        rows.append_row(tmp_path / "results.jsonl", r)
    text = open(report.write_report(study, str(tmp_path), setup)).read()
    assert "## Stale rows" in text and "- `lr_x2` seed 0 (2026-12-02T05:00:00): its variant was edited since it ran" in text


def test_provenance_counts_untracked_files_but_not_the_studys_own(tmp_path, monkeypatch):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)
    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a")
    monkeypatch.setattr(rows, "REPO", str(tmp_path))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.jsonl").write_text("")
    assert rows.provenance(tmp_path / "out")["dirty"] == 0
    (tmp_path / "new.py").write_text("y = 2\n")  # untracked: dirty too
    assert rows.provenance(tmp_path / "out")["dirty"] == 1
    (tmp_path / "a.py").write_text("x = 3\n")
    info = rows.provenance(tmp_path / "out")
    assert info["dirty"] == 2 and len(info["commit"]) == 12


# ---- the report --------------------------------------------------------------------------------------

def pixel_spread(path):
    return float(np.asarray(Image.open(path).convert("L"), dtype=float).std())


def test_the_report_shows_paired_ratios_from_the_rule_and_its_header(tmp_path):
    path = write_study(tmp_path, '''Variant("baseline", "baseline", seeds=(0, 1, 2)),
        Variant("lr_x2", "one_at_a_time", overrides=("learning_rate=4e-4",)),
        Variant("norm_batch", "one_at_a_time", overrides=("norm=batch",)),
        Variant("baseline_ddim_5", "sampling", of="baseline", overrides=("sampling_steps=5",)),
        Variant("evaluation_noise_1", "evaluation_noise", of="baseline", seeds=(0,), eval_seed=1),
        Variant("evaluation_noise_2", "evaluation_noise", of="baseline", seeds=(0,), eval_seed=2)''')
    study = plan.load_study(path, "toy")
    setup = Setup.of(study.scale)
    base = {0: 100.0, 1: 200.0, 2: 150.0}  # seed noise, which pairing cancels
    written = [fake_row(study, setup, "baseline", s, fd) for s, fd in base.items()]
    written += [fake_row(study, setup, "lr_x2", s, base[s] * f) for s, f in ((0, 0.5), (1, 0.52))]  # halves it
    written += [fake_row(study, setup, "norm_batch", s, base[s] * f) for s, f in ((0, 1.02), (1, 0.97))]
    written += [fake_row(study, setup, "baseline_ddim_5", s, base[s] * 1.1) for s in (0, 1)]
    written += [fake_row(study, setup, f"evaluation_noise_{k}", 0, 100.0 * f) for k, f in ((1, 1.05), (2, 0.95))]
    written.append(fake_row(study, setup, "norm_batch", 2, None, status="failed"))
    for r in written:
        rows.append_row(tmp_path / "results.jsonl", r)
    text = open(report.write_report(study, str(tmp_path), setup)).read()

    # The one-at-a-time table is the rule of ablations/stats.py on the paired log differences.
    differences = {name: {s: math.log(written_fd) - math.log(base[s]) for s, written_fd in fds.items()}
                   for name, fds in {"lr_x2": {0: 50.0, 1: 104.0}, "norm_batch": {0: 102.0, 1: 194.0}}.items()}
    expected = stats.compare_table(differences, "log", references={"lr_x2": "baseline", "norm_batch": "baseline"},
                                   kinds={"lr_x2": "training", "norm_batch": "training"})
    line = lambda name: next(row for row in text.splitlines() if row.startswith(f"| `{name}` |"))
    for name, verdict in (("lr_x2", "**helps**"), ("norm_batch", "not significant")):
        ratio, _ = stats.describe(expected[name])
        assert f"| {ratio} | {verdict} |" in line(name), line(name)
    assert ratio.startswith("x1.00 [") or ratio.startswith("x0.99 [")
    assert "seed 2 failed: train.py exit 1: boom" in line("norm_batch")
    # A re-evaluation: x1.10 on both seeds, so no spread and an interval of exactly 1.10 (its own pool).
    assert "| `baseline_ddim_5` | sampling_steps=5 | `baseline` | 2 | " in line("baseline_ddim_5")
    assert "| x1.10 [1.10, 1.10] | **hurts** |" in line("baseline_ddim_5")
    assert "saturated" not in line("lr_x2")  # precision 0.5 and recall 0.4: not at a bound
    assert report.saturated({0: 1.0, 1: 1.0}) == 1.0 and report.saturated({0: 0.0}) == 0.0
    assert report.saturated({0: 1.0, 1: 0.9}) is None and report.saturated({0: 0.5, 1: 0.5}) is None
    # The header: one floor, the evaluation noise, the baseline's spread, the share of training.
    assert "attribute_fd 30, the same for every row." in text
    noise = [100.0, 105.0, 95.0]
    assert f"gives attribute_fd 95 to 105, a spread (standard deviation of the log) of {report.log_sd(noise):.3f}" in text
    assert f"a standard deviation of the log of {report.log_sd(base.values()):.3f}" in text
    finished = [r for r in written if r["status"] == "ok"]
    share = sum(r["train_seconds"] for r in finished if not r["of"]) / sum(r["wall_seconds"] for r in finished)
    assert f"training is {share:.0%} of the runs' wall time" in text and share < 0.9
    for name in ("ratios_one_at_a_time.png", "losses_one_at_a_time.png", "ratios_sampling.png"):
        assert f"(plots/{name})" in text and pixel_spread(tmp_path / "plots" / name) > 5, name


def test_the_header_warns_of_mixed_precisions_and_machines_and_counts_the_cpu_time(tmp_path):
    """A study pins one precision and the minutes are one machine's: the header says when rows
    disagree, gives the total CPU time, and names the runs that took longer than the scale's limit."""
    path = write_study(tmp_path, 'Variant("baseline", "baseline", seeds=(0, 1, 2)), '
                                 'Variant("wide", "one_at_a_time", overrides=("channels=(32,64,64,64)",), seeds=(0,))')
    source = open(path).read().replace("toy=True", "toy=True, run_minutes_limit=1")
    open(path, "w").write(source)
    study = plan.load_study(path, "toy")
    setup = Setup.of(study.scale)
    same = dict(threads=1, cpu_seconds=60.0)
    for r in [fake_row(study, setup, "baseline", 0, 100.0, **same), fake_row(study, setup, "baseline", 1, 110.0, **same),
              fake_row(study, setup, "baseline", 2, 120.0, threads=1, cpu_seconds=400.0, process_cpu_seconds=180.0)]:
        rows.append_row(tmp_path / "results.jsonl", r)
    text = open(report.write_report(study, str(tmp_path), setup)).read()
    assert "- Precision: fp32, for every row (toy scale)." in text and "different machines" not in text
    assert ("- **Total CPU time**: 0.1 CPU-hours (0.0 hours of a 2-core machine) for 3 finished runs and curve points (measured for 1 "
            "of them, the others' wall time times their threads).") in text
    # Measured CPU time, where a row has it: 180 s, not the 400 of its wall time that other load stretched.
    assert "the longest run, `baseline` seed 2, took 1.5; 1 passed the limit: `baseline` seed 2.\n" in text
    # An unmeasured row over the limit: the report says that its wall time counts.
    rows.append_row(tmp_path / "results.jsonl", fake_row(study, setup, "baseline", 0, 100.0, threads=1, cpu_seconds=150.0))
    text = open(report.write_report(study, str(tmp_path), setup)).read()
    assert ("2 passed the limit: `baseline` seed 0, `baseline` seed 2. Of these, 1 has no measured CPU time (rows "
            "from before the runner measured it): their wall time counts") in text
    assert "The limit is the baseline's" not in text  # only the baseline's runs passed it
    # A change that passes the limit: the baseline's own longest run beside it.
    rows.append_row(tmp_path / "results.jsonl", fake_row(study, setup, "wide", 0, 90.0, threads=1, cpu_seconds=300.0,
                                                         process_cpu_seconds=300.0))
    text = open(report.write_report(study, str(tmp_path), setup)).read()
    assert "the longest run, `wide` seed 0, took 2.5; 3 passed the limit" in text
    assert "The limit is the baseline's, which chose the scale: its own runs took at most 1.5;" in text
    assert "sqrt(2) times the baseline's spread over its seeds" in text  # no paired table yet: the upper bound
    rows.append_row(tmp_path / "results.jsonl", fake_row(study, setup, "baseline", 1, 111.0, precision="bf16",
                                                         cpu="CPU (other, 2 cores)", **same))
    text = open(report.write_report(study, str(tmp_path), setup)).read()
    assert "**The rows mix precisions**: a study pins one (fp32 at this scale)" in text
    assert "**The rows come from different machines**" in text


def test_the_report_without_rows_lists_every_variant_as_not_yet_run(tmp_path):
    study = load("gpu")
    text = open(report.write_report(study, str(tmp_path), Setup.of(study.scale))).read()
    not_run = text[text.index("## Not yet run"):]
    for v in study.variants:
        assert f"`{v.name}`" in not_run, v.name
    assert "    bash ablate.sh curve && bash ablate.sh --only baseline,path_A_seed\n" in not_run
    assert "  - `baseline` (seeds 0, 1, 2, 3, 4): preset default" in not_run
    assert "**Budget: 500 thousand images seen**" in text and "Not measured yet: `bash ablate.sh curve`" in text
    assert "- **Evaluation noise**: not measured yet (`bash ablate.sh --group evaluation_noise`)." in text


def test_not_yet_run_says_how_long_the_runs_left_would_take_at_the_finished_rows_cpu_time(tmp_path):
    """A trained run left at the median finished trained run's CPU time, a re-evaluation at the
    median re-evaluation's CPU time per sampler step times its own steps, or once they span two step
    counts by the line through them; over 2 cores."""
    path = write_study(tmp_path, '''Variant("baseline", "baseline", seeds=(0, 1)),
        Variant("lr_x2", "one_at_a_time", overrides=("learning_rate=0.004",), seeds=(0, 1)),
        Variant("baseline_ddim_100", "sampling", of="baseline", overrides=("sampler=ddim", "sampling_steps=100"),
                seeds=(0, 1)),
        Variant("baseline_ddim_10", "sampling", of="baseline", overrides=("sampler=ddim", "sampling_steps=10"),
                seeds=(0, 1))''')
    study = plan.load_study(path, "toy")
    setup = Setup.of(study.scale)
    for r in [fake_row(study, setup, "baseline", 0, 100.0, threads=1, cpu_seconds=3600.0, process_cpu_seconds=1800.0),
              fake_row(study, setup, "baseline", 1, 100.0, threads=1, cpu_seconds=1800.0),
              fake_row(study, setup, "baseline_ddim_10", 0, 100.0, threads=1, cpu_seconds=36.0,
                       sampler={"sampler": "ddim", "steps": 10})]:
        rows.append_row(tmp_path / "results.jsonl", r)
    text = open(report.write_report(study, str(tmp_path), setup)).read()
    # 2 trained runs of 1800 s, 2 re-evaluations of 100 steps at 3.6 s, 1 of 10 steps: 4356 s over 2 cores.
    assert ("Left: 5 runs, about 0.6 hours of a 2-core machine at the finished rows' CPU time (a trained run 30 "
            "CPU-minutes; a re-evaluation 4 CPU-seconds a sampler step") in text
    # At two step counts, the line through them: 36 s at 10 steps and 306 s at 100 are 6 s and 3 s a
    # step; left: 2 trained runs of 1800 s, 306 s and 36 s, 3942 s over 2 cores.
    rows.append_row(tmp_path / "results.jsonl", fake_row(study, setup, "baseline_ddim_100", 0, 100.0, threads=1,
                                                         cpu_seconds=306.0, sampler={"sampler": "ddim", "steps": 100}))
    text = open(report.write_report(study, str(tmp_path), setup)).read()
    assert ("Left: 4 runs, about 0.5 hours of a 2-core machine at the finished rows' CPU time (a trained run 30 "
            "CPU-minutes; a re-evaluation 6 CPU-seconds and 3.0 more a sampler step, the line through the finished "
            "ones).") in text
    # Once re-evaluations with a measured CPU time span two step counts, the others no longer count:
    # 36 s at 10 steps and 216 s at 100 are 16 s and 2 s a step.
    for steps, seconds in ((10, 36.0), (100, 216.0)):
        rows.append_row(tmp_path / "results.jsonl", fake_row(
            study, setup, f"baseline_ddim_{steps}", 1, 100.0, threads=1, cpu_seconds=seconds,
            process_cpu_seconds=seconds, sampler={"sampler": "ddim", "steps": steps}))
    text = open(report.write_report(study, str(tmp_path), setup)).read()
    assert "(a trained run 30 CPU-minutes; a re-evaluation 16 CPU-seconds and 2.0 more a sampler step" in text


@pytest.mark.parametrize("scale", ["gpu", "cpu", "toy"])
def test_the_committed_report_is_what_its_rows_give(tmp_path, scale):
    """ablations/REPORT.md, ablations/cpu/REPORT.md and ablations/toy/REPORT.md come from
    `python ablate.py report`."""
    study = load(scale)
    folder = os.path.join(REPO, study.scale.folder)
    for name in os.listdir(folder):
        if name.endswith(".jsonl") or name == "grids" or name.startswith("budget_"):  # budget_4x: a longer budget's rows
            (shutil.copy if name.endswith(".jsonl") else shutil.copytree)(os.path.join(folder, name), tmp_path / name)
    written = report.write_report(study, str(tmp_path), Setup.of(study.scale))
    assert open(written).read() == open(os.path.join(folder, "REPORT.md")).read()


# ---- the budget curve ------------------------------------------------------------------------------------

class CurveRunner:
    """The part of runner.Runner that the curve drives, recording each segment instead of training.
    A segment's training takes 10 s a thousand images, its start-up and evaluation 60 s, on 1 thread."""

    def __init__(self, study, out, interrupt_at=None, slots=1):
        self.study, self.scale, self.out, self.checkpoints = study, study.scale, str(out), str(out / "runs")
        self.setup, self.calls, self.interrupt_at = Setup.of(study.scale), [], interrupt_at
        self.lock, self.n_slots = threading.Condition(), slots

    def slots(self):
        return [(None, "cpu", 1)] * self.n_slots

    def interrupt(self, message, wait=False):
        self.interrupted = (message, wait)

    def run_job(self, job, slot, budget_kimg, run_dir, fresh):
        if budget_kimg == self.interrupt_at:
            raise curve.Interrupted
        with self.lock:
            self.calls.append((job.variant.name, job.variant.overrides, budget_kimg, run_dir, fresh))
        config = config_to_dict(self.study.config(job.variant))
        narrow = config["channels"][0] < 16  # the narrower width scores 10% worse: the choice is never a tie
        row = fake_row(self.study, self.setup, "baseline", job.seed, 1000 / budget_kimg * (1.1 if narrow else 1))
        previous = max([c[2] for c in self.calls if c[3] == run_dir and c[2] < budget_kimg], default=0)
        return {**row, "variant": job.variant.name, "budget_kimg": budget_kimg, "steps": round(budget_kimg * 1000 / 16),
                "setup_hash": dataclasses.replace(self.setup, budget_kimg=budget_kimg).hash,
                "config_hash": rows.config_hash(self.study, job.variant), "config": config, "threads": 1,
                "train_seconds": 10 * budget_kimg, "cpu_seconds": 10 * (budget_kimg - previous) + 60}


def test_the_curve_trains_one_run_in_segments_and_resumes_where_it_stopped(tmp_path):
    study = plan.load_study(write_study(tmp_path, 'Variant("baseline", "baseline", seeds=(0, 1))'), "toy")
    runner = CurveRunner(study, tmp_path, interrupt_at=0.128)
    assert curve.run_curve(runner) == 130  # 1/4, 1/2, 1 and 2 budgets of 0.128 kimg; stopped at the third
    assert runner.interrupted[1] is True  # it waits for the steps under way
    run_dir = str(tmp_path / "runs/curve/16-32-32-32/seed0")
    assert runner.calls == [("curve_0.032kimg", ("lr_schedule=constant",), 0.032, run_dir, True),
                            ("curve_0.064kimg", ("lr_schedule=constant",), 0.064, run_dir, False)]
    runner = CurveRunner(study, tmp_path)
    assert curve.run_curve(runner) == 0
    assert [(c[2], c[4]) for c in runner.calls] == [(0.128, False), (0.256, False)]  # the same run, resumed
    assert [r["budget_kimg"] for r in rows.read_rows(tmp_path, "curve.jsonl")] == [0.032, 0.064, 0.128, 0.256]
    with pytest.raises(UserError, match="the curve's run of curve is past 0.1 kimg already: pass --fresh"):
        curve.run_curve(CurveRunner(study, tmp_path), points_kimg=[0.1, 0.5])
    text = open(tmp_path / "REPORT.md").read()
    assert "| 0.064 | 4 | 1.562e+04 | 520.8 | -50% |" in text and "No suggestion: the last point still improved" in text
    assert "![curve](plots/curve.png)" in text and pixel_spread(tmp_path / "plots" / "curve.png") > 5


def test_the_curve_runs_each_width_on_its_own_slot_until_a_run_would_pass_the_limit(tmp_path):
    """Two widths at once, each its own run folder and variant; a width stops at the first point
    whose run (its training so far, scaled to the point, plus a start-up and an evaluation) would
    take more than 1.5x the scale's run limit; the report charts quality against run minutes and
    names the best point within the limit."""
    path = write_study(tmp_path, 'Variant("baseline", "baseline", seeds=(0, 1))')
    source = open(path).read().replace("toy=True", "toy=True, run_minutes_limit=1, "
                                       "curve_widths=((16, 32, 32, 32), (8, 16, 16, 16)), curve_points_kimg=(1, 2, 4, 8)")
    open(path, "w").write(source)
    study = plan.load_study(path, "toy")
    runner = CurveRunner(study, tmp_path, slots=2)
    assert curve.run_curve(runner) == 0
    # A run to 4 kimg: 40 s of training and 60 s of the rest on 1 thread, 100 CPU-seconds, 0.83 minutes
    # of the 2-core machine (<= 1.5); to 8 kimg it would be 140 s, 1.17 minutes: still allowed. Beyond:
    # the points end.
    by_width = {}
    for name, _, kimg, run_dir, _ in runner.calls:
        by_width.setdefault(run_dir, []).append(kimg)
    assert by_width == {str(tmp_path / "runs/curve/16-32-32-32/seed0"): [1, 2, 4, 8],
                        str(tmp_path / "runs/curve/8-16-16-16/seed0"): [1, 2, 4, 8]}
    written = rows.read_rows(tmp_path, "curve.jsonl")
    assert [r["run_cpu_seconds"] for r in written if r["variant"].startswith("curve_16")] == [70, 80, 100, 140]
    assert curve.predicted_minutes(written[-1], 16) == pytest.approx((160 + 60) / 120)
    text = open(tmp_path / "REPORT.md").read()
    assert "**Width 16-32-32-32**" in text and "**Width 8-16-16-16**" in text
    # 8 kimg (1.17 minutes) passes the 1-minute limit, so the choice is 4 kimg (0.83 minutes)
    assert "Of the points whose run takes at most 1 minutes, the lowest attribute_fd is width 16-32-32-32 at 4 kimg: " \
           "250, 8.3x its floor, a run of 0.8 minutes, within the goal of 10x." in text
    # with a limit of 0.5 minutes, nothing beyond the 1 kimg points (70 s = 0.58 min > 0.5 ... 0.75 allowed)
    source = open(path).read().replace("run_minutes_limit=1,", "run_minutes_limit=0.5,")
    open(path, "w").write(source)
    runner = CurveRunner(plan.load_study(path, "toy"), tmp_path / "short", slots=2)
    os.makedirs(tmp_path / "short")
    assert curve.run_curve(runner) == 0
    assert sorted(c[2] for c in runner.calls) == [1, 1, 2, 2]  # to 4 kimg: 100 s, 0.83 min > 0.75
    text = open(tmp_path / "short" / "REPORT.md").read()
    assert "**The choice.** No point's run fits 0.5 minutes. Of the points whose run takes at most 0.75 minutes, the " \
           "lowest attribute_fd is width 16-32-32-32 at 2 kimg: 500, 16.7x its floor, a run of 0.7 minutes; the goal " \
           "of 10x is not met there either." in text


def test_the_suggested_budget_is_where_the_curve_flattens():
    assert curve.suggest_budget([1000, 500, 300, 280], [1, 2, 4, 8], "fd").startswith("Suggested budget: **4 kimg**")
    assert curve.suggest_budget([1000, 800, 700], [1, 2, 4], "fd").startswith("Suggested budget: **1 kimg**")
    assert curve.suggest_budget([1000, 500, 200], [1, 2, 4], "fd").startswith("No suggestion")  # per doubling: 1,2,4 are doublings


# ---- the study end to end ----------------------------------------------------------------------------

def results_of(out):
    return [json.loads(line) for line in open(out / "results.jsonl")]


def test_a_step_records_the_cpu_time_it_used_not_its_wall_time():
    """runner.wait_for reads the child's own user and system time: a child that sleeps uses almost
    none, one that computes uses about its wall time; and its exit code."""
    code = "import sys, time\nt = time.process_time()\nwhile time.process_time() - t < {}: pass\ntime.sleep({})\nsys.exit(3)"
    busy = subprocess.Popen([PYTHON, "-c", code.format(0.6, 0)])
    idle = subprocess.Popen([PYTHON, "-c", code.format(0, 0.6)])
    (busy_code, busy_cpu), (idle_code, idle_cpu) = runner_module.wait_for(busy), runner_module.wait_for(idle)
    assert busy_code == idle_code == 3 and busy.returncode == 3
    assert busy_cpu >= 0.6 and idle_cpu < 0.5, (busy_cpu, idle_cpu)
    reaped = subprocess.Popen([PYTHON, "-c", code.format(0, 0)])
    reaped.wait()  # as a stop's poll may, before the worker's wait
    assert runner_module.wait_for(reaped) == (3, None)


def test_a_stop_ends_a_run_that_ignores_sigint(tmp_path):
    """A study started in the background (`nohup ... &`) hands its runs an ignored SIGINT, so the stop
    (a deadline's end, SIGTERM to the study) must reach them by another signal."""
    script = tmp_path / "run.py"
    script.write_text("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                      "print('started', flush=True)\ntime.sleep(600)\n")
    runner, raised = gpu_runner(tmp_path), []

    def step():
        try:
            runner.step("run", [str(script)], str(tmp_path), (None, "cpu", 1))
        except runner_module.Interrupted as e:
            raised.append(e)
    thread = threading.Thread(target=step)
    thread.start()
    log, deadline = tmp_path / "run.log", time.time() + 60
    while not (log.exists() and "started" in log.read_text()):
        assert time.time() < deadline and thread.is_alive()
        time.sleep(0.1)
    runner.interrupt("stopped by the test")
    thread.join(timeout=60)
    assert not thread.is_alive() and len(raised) == 1


@pytest.mark.slow
def test_the_study_end_to_end_on_tiny_data(tmp_path):
    """The baseline and a variant on 2 seeds, a variant that fails (a batch larger than the data), a
    re-evaluation with another sampler and an evaluation-noise row, through the real scripts: stopped
    by SIGTERM after its first row, then finished by a rerun; an edited re-evaluation is run again."""
    train, val = make_avatar_folder(tmp_path / "train", 64), make_avatar_folder(tmp_path / "val", 32, 1_000_000)
    variants = """
        Variant("baseline", "baseline", seeds=(0, 1)),
        Variant("lr_x2", "one_at_a_time", overrides=("learning_rate=4e-3",), seeds=(0,)),
        Variant("batch_512", "one_at_a_time", overrides=("batch_size=512",), seeds=(0,)),
        Variant("baseline_ddim_5", "sampling", of="baseline", overrides=("sampling_steps=5",), seeds=(0,)),
        Variant("evaluation_noise_1", "evaluation_noise", of="baseline", seeds=(0,), eval_seed=1),
        Variant("peer", "peer", not_runnable="not built in this test")"""
    study = write_study(tmp_path, variants)
    out = tmp_path / "out"
    command = [PYTHON, "ablate.py", "--study", study, "--scale", "toy", "--out", out, "--checkpoints", tmp_path / "runs",
               "--train_dataset_directory", train, "--validate_dataset_directory", val, "--device", "cpu"]
    child = subprocess.Popen([str(c) for c in command], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (out / "results.jsonl").exists() or not (out / "results.jsonl").read_text().strip():
        assert child.poll() is None and time.time() < deadline, child.communicate()[0][-3000:]
        time.sleep(0.2)
    child.send_signal(signal.SIGTERM)  # a lease's end, with a run under way on each worker
    output = child.communicate(timeout=120)[0]
    assert child.returncode == 130 and "interrupted: the runs under way leave no row" in output, output[-3000:]
    first = results_of(out)  # every line whole; the runs under way left nothing
    assert 1 <= len(first) < 6

    result = run(command)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{6 - len(first)} runs to do, {len(first)} skipped" in result.stdout
    by_key = {(r["variant"], r["seed"]): r for r in results_of(out)}
    assert len(by_key) == 6 == len(results_of(out))
    failed = by_key["batch_512", 0]
    assert failed["status"] == "failed" and failed["reason"] == (
        f"train.py exit 2: error: --batch_size 512 is larger than the 64 images in {train}: lower --batch_size")
    ok = {key: r for key, r in by_key.items() if r["status"] == "ok"}
    assert len(ok) == 5
    for key, row in ok.items():
        assert (row["budget_kimg"], row["num_samples"], row["steps"], row["images_seen"]) == (0.128, 32, 8, 128), key
        assert row["torch"] and row["commit"] and isinstance(row["dirty"], int) and row["wall_seconds"] > 0
        assert 0 < row["process_cpu_seconds"] < 4 * row["wall_seconds"], key  # its steps' own CPU time
        assert row["setup_hash"] == Setup.of(plan.load_study(study, "toy").scale).hash
        assert Image.open(out / row["grid"]).size == (256, 128) and pixel_spread(out / row["grid"]) > 5
        assert not os.path.exists(os.path.join(row["run_dir"], "best_validation_checkpoint.pth"))
        # A re-evaluation's evaluate.py kept its batches (--resume_dir), then removed them; a trained run's did not.
        assert (row["resumed"] is None) == (row["of"] is None), key
        assert not [name for name in os.listdir(row["run_dir"]) if name.startswith("samples_")], key
    # One evaluation for every row: the floor is a constant; the seed reached the training itself.
    assert len({r["metrics"]["attribute_fd"]["floor"] for r in ok.values()}) == 1
    base0, base1 = ok["baseline", 0], ok["baseline", 1]
    assert base0["curve"]["train_loss"] != base1["curve"]["train_loss"] and base0["eval_seed"] == base1["eval_seed"] == 0
    assert ok["lr_x2", 0]["config"]["learning_rate"] == 4e-3 != base0["config"]["learning_rate"]
    assert ok["lr_x2", 0]["curve"]["train_loss"] != base0["curve"]["train_loss"]
    noise = ok["evaluation_noise_1", 0]
    assert noise["eval_seed"] == 1 and noise["metrics"]["attribute_fd"]["samples"] != base0["metrics"]["attribute_fd"]["samples"]
    sampled = ok["baseline_ddim_5", 0]
    assert sampled["of"] == "baseline" and sampled["sampler"]["steps"] == 5 and base0["sampler"]["steps"] == 20
    assert sampled["parent_run"] == base0["run_id"] and set(sampled["step_seconds"]) == {"evaluate.py"}
    # The validation loss of the last step: train.py's own, since 8 steps of 16 end an epoch of 64.
    log = [json.loads(line) for line in open(tmp_path / "runs" / "0.128kimg" / "baseline" / "seed0" / "log.jsonl")]
    assert base0["val_loss_ema"] == [r for r in log if r["kind"] == "validation"][-1]["val_loss_ema"]

    # The re-evaluation is edited: its row is stale, and the rerun does that run only. Under a deadline
    # that no run fits, --retry_failed starts none.
    write_study(tmp_path, variants.replace("sampling_steps=5", "sampling_steps=4"))
    result = run(command)
    assert result.returncode == 0 and "1 runs to do, 5 skipped" in result.stdout, result.stdout + result.stderr
    assert results_of(out)[-1]["variant"] == "baseline_ddim_5" and results_of(out)[-1]["sampler"]["steps"] == 4
    result = run([*command, "--retry_failed", "--deadline_minutes", "0.01"])
    assert "--deadline_minutes: 1 runs not started: batch_512/0" in result.stdout, result.stdout + result.stderr

    result = run([PYTHON, "ablate.py", "report", "--study", study, "--scale", "toy", "--out", out])
    assert result.returncode == 0, result.stderr
    text = open(out / "REPORT.md").read()
    assert text.startswith("# Ablation study: toy scale (toy)\n\n> **Toy scale.**")
    assert "(6 runs, 5 finished, 0 stale" in text  # the edited re-evaluation's old row is replaced
    differences = {"lr_x2": stats.paired_differences(*[{s: ok[name, s]["metrics"]["attribute_fd"]["samples"]
                                                         for s in (0, 1) if (name, s) in ok} for name in ("lr_x2", "baseline")])}
    expected = stats.compare_table(differences, references={"lr_x2": "baseline"}, kinds={"lr_x2": "training"})["lr_x2"]
    line = next(row for row in text.splitlines() if row.startswith("| `lr_x2` |"))
    ratio, verdict = stats.describe(expected)
    assert f"| `baseline` | 1 | " in line and f"| {ratio} | {'**' + verdict + '**' if expected.significant else verdict} |" in line, line
    assert "seed 0 failed: train.py exit 2: error: --batch_size 512" in text
    assert "`peer`: not runnable yet: not built in this test" in text
    assert "the baseline's seed-0 run scored from 2 starting noises" in text
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert {"plots/ratios_one_at_a_time.png", "plots/losses_baseline.png", "grids/baseline_seed1.png",
            "grids/baseline_ddim_5_seed0.png"} <= set(images)
    for image in images:
        assert pixel_spread(out / image) > 5, image


def test_the_cpu_report_says_whether_the_baseline_meets_its_goals(tmp_path):
    """Attribute FD at most 10x its floor (fake_row's floor: 30) and a 15% change detectable at the
    study's seed count: each met or missed, from the rows."""
    study = load("cpu")
    setup = Setup.of(study.scale)
    for name, fds, expected in (
            ("close", [320.0, 330.0, 325.0, 335.0, 315.0], ("is 10.8x its floor, **short of the goal of 10x**",
                                                            ", within the goal of x1.15")),
            ("spread", [150.0, 300.0, 200.0, 250.0, 100.0], ("its floor, within the goal of 10x",
                                                             ", **short of** the goal of x1.15"))):
        out = tmp_path / name
        out.mkdir()
        for seed, fd in enumerate(fds):
            rows.append_row(out / "results.jsonl", fake_row(study, setup, "baseline", seed, fd))
        text = open(report.write_report(study, str(out), setup)).read()
        line = next(line for line in text.splitlines() if line.startswith("- **The baseline's goals**"))
        assert all(words in line for words in expected), line


def test_the_sampling_section_sets_conditioning_against_sampler_and_one_at_a_time_is_sorted(tmp_path):
    """The 2 x 3 table (noise conditioning on/off x DDPM 1000, DDIM 50, DPM-Solver 25) from the rows,
    its last row the paired off/on ratio by the rule; the one-at-a-time table by effect."""
    study = load("gpu")
    setup = Setup.of(study.scale)
    fds = {"baseline": 100.0, "baseline_ddpm_1000": 90.0, "baseline_ddim_50": 110.0,
           "noise_cond_none": 105.0, "noise_cond_none_ddpm_1000": 95.0, "noise_cond_none_ddim_50": 330.0,
           "norm_batch": 150.0, "width_double": 70.0}
    for name, fd in fds.items():
        for seed in (0, 1):
            rows.append_row(tmp_path / "results.jsonl", fake_row(study, setup, name, seed, fd * (1 + seed / 20)))
    text = open(report.write_report(study, str(tmp_path), setup)).read()
    lines = text.splitlines()
    at = lines.index("| conditioning | DDPM 1000 | DDIM (deterministic) 50 | DPM-Solver++ 2M 25 |")
    assert lines[at + 2].startswith("| on (`baseline`) | 92.22 (2 seeds) | 112.7 (2 seeds) | 102.5 (2 seeds) |")
    assert lines[at + 3].startswith("| off (`noise_cond_none`) | 97.35 (2 seeds) | 338.1 (2 seeds) | 107.6 (2 seeds) |")
    compared = stats.compare_table({"ddim": {s: math.log(330 / 110) for s in (0, 1)},
                                    "ddpm": {s: math.log(95 / 90) for s in (0, 1)},
                                    "dpm": {s: math.log(105 / 100) for s in (0, 1)}})
    assert stats.describe(compared["ddim"])[0] in lines[at + 4]
    one = [line.split(" | ")[0][2:] for line in lines if line.startswith("| `") and line.split(" | ")[0][2:] in
           ("`norm_batch`", "`width_double`")]
    assert one == ["`width_double`", "`norm_batch`"]  # x0.70 before x1.50


def test_what_matters_gives_each_change_its_verdict_the_literature_and_whether_they_agree(tmp_path):
    """The section the README shows: every change with a paired ratio, its verdict after Holm, the
    study's LITERATURE entry, and agrees / disagrees / not seen, by the direction the literature
    expects of that change."""
    study = load("gpu")
    setup = Setup.of(study.scale)
    base = {0: 100.0, 1: 140.0}
    effects = {"ema_off": 2.0, "noise_cond_none": 1.0, "target_x0": 1.0, "optimizer_adam": 0.5, "norm_batch": 1.0,
               "act_gelu": 1.01, "down_conv": 0.99}
    for seed, fd in base.items():
        rows.append_row(tmp_path / "results.jsonl", fake_row(study, setup, "baseline", seed, fd))
        for name, ratio in effects.items():  # a little noise for the pooled variance
            rows.append_row(tmp_path / "results.jsonl",
                            fake_row(study, setup, name, seed, fd * ratio * (1.02 if seed else 0.98)))
    text = open(report.write_report(study, str(tmp_path), setup)).read()
    section = text[text.index("## What matters"):text.index("## The budget curve")]
    line = lambda name: next(row for row in section.splitlines() if row.startswith(f"| `{name}`:"))
    assert "hurts** |" in line("ema_off") and line("ema_off").endswith(
        f"| {study.literature['ema_off'][1]} | agrees |")
    assert "| no detectable effect |" in line("noise_cond_none") and line("noise_cond_none").endswith(
        "| not seen at this scale |")  # the literature expects it to hurt
    assert line("target_x0").endswith("| - |")  # the literature's targets differ by sampler: no expectation
    assert "helps** |" in line("optimizer_adam") and line("optimizer_adam").endswith("| disagrees |")
    assert line("norm_batch").endswith("| no published comparison; DDPM took GroupNorm for simplicity | - |")
    assert line("act_gelu").endswith(f"| {study.literature['act_gelu'][1]} | - |")
    order = [row.split("`")[1] for row in section.splitlines() if row.startswith("| `")]
    assert order[0] == "optimizer_adam" and order[-1] == "ema_off"  # by effect
    assert f"So far: {len(effects)} of {sum(v.group == 'one_at_a_time' for v in study.variants)} one-at-a-time rows" in section


@pytest.mark.parametrize("scale", ["toy", "cpu", "gpu"])
def test_every_one_at_a_time_change_says_what_the_literature_found(scale):
    """The table's literature column never falls back to "nothing published found" for a change of
    the study's own list: each has an entry, if only to say that no ablation was published."""
    study = load(scale)
    missing = [v.name for v in study.variants if v.group == "one_at_a_time" and v.name not in study.literature]
    assert not missing, f"no LITERATURE entry in ablations/study.py for {missing}"


@pytest.mark.parametrize("expected, verdict, words", [
    ("hurts", "hurts", "agrees"), ("helps", "hurts", "disagrees"), ("none", "helps", "disagrees"),
    ("none", "not significant", "consistent (no effect is not shown)"), ("helps", "not significant", "not seen at this scale"),
    ("", "helps", "-"), ("hurts", "no verdict", "-")])
def test_ours_agrees_with_the_literature_only_where_both_found_the_same(expected, verdict, words):
    assert report.agreement(expected, verdict) == words


def test_the_readme_section_is_the_cpu_reports_what_matters(tmp_path):
    """README.md's "What matters" is, between its markers, the committed cpu report's section; the
    report puts it there, and says in one line which file lacks the markers."""
    text = open(os.path.join(REPO, "README.md")).read()
    begin = report.README_BEGIN.format(scale="cpu")
    readme = text[text.index(begin) + len(begin):text.index(report.README_END)].strip()
    cpu = open(os.path.join(REPO, "ablations", "cpu", "REPORT.md")).read()
    section = cpu[cpu.index("## What matters"):].split("\n## ", 1)[0]
    assert readme == section.removeprefix("## What matters").strip()
    assert text.index("## What matters") < text.index("## Three minutes on one GPU")  # near the top
    mine = tmp_path / "README.md"
    mine.write_text(f"# x\n\n## What matters\n\n{begin}\nold\n{report.README_END}\n\n## Next\n")
    report.write_readme_section(load("cpu").scale, ["## What matters", "", "new", "| a |"], readme=str(mine))
    assert mine.read_text() == f"# x\n\n## What matters\n\n{begin}\nnew\n| a |\n{report.README_END}\n\n## Next\n"
    mine.write_text("# x\n")
    with pytest.raises(UserError, match=f"{mine}: the markers"):
        report.write_readme_section(load("cpu").scale, ["## What matters", "", "new"], readme=str(mine))


def test_each_group_says_what_its_table_shows_and_the_tint_section_which_changes_remove_the_tint(tmp_path):
    """A paragraph per group (better, worse, no detectable effect, failed, by the rule), and the
    background error's paired differences per table: which changes lower it, which raise it."""
    study = load("gpu")
    setup = Setup.of(study.scale)
    fds = {"baseline": 100.0, "ema_off": 200.0, "zero_terminal_snr": 100.0, "norm_batch": 100.0, "act_relu": 100.0}
    tints = {"baseline": 50.0, "ema_off": 50.0, "zero_terminal_snr": 5.0, "norm_batch": 90.0, "act_relu": 50.0}
    for name in fds:
        for seed in (0, 1):
            r = fake_row(study, setup, name, seed, fds[name] * (1.02 if seed else 0.98))
            r["metrics"]["background_error"] = {"samples": tints[name] + seed, "floor": 0.0}
            rows.append_row(tmp_path / "results.jsonl", r)
    rows.append_row(tmp_path / "results.jsonl", fake_row(study, setup, "width_half", 0, None, status="failed"))
    text = open(report.write_report(study, str(tmp_path), setup)).read()
    one = text[text.index("### one_at_a_time"):]
    assert one.splitlines()[2] == ("4 variants with a paired ratio of attribute_fd; 1 worse after Holm's correction: "
                                   "`ema_off` (x2.00); 3 with no detectable effect; 1 failed: `width_half`.")
    tint = text[text.index("## The tinted backgrounds"):]
    assert "of the baseline is 50.5 (mean over 2 seeds; real avatars: 0)" in tint
    assert ("- **one_at_a_time** (4 compared): lower with `zero_terminal_snr` (-45.000); higher with `norm_batch` "
            "(+40.000); 2 without a detectable change.") in tint
    matters = text[text.index("## What matters"):text.index("## The budget curve")]
    assert "| `width_half`: channels=(32,64,128,128) | failed | seed 0: train.py exit 1: boom | - |" in matters


def test_the_literature_expects_of_a_sampler_what_the_published_fids_say_against_the_baselines():
    """DDIM Table 1 and DPM-Solver's figures, against the baseline's own sampler: the cpu baseline's
    DPM-Solver 25 (its 20-step figure) beats DDIM at 50 steps; the toy baseline's DDIM 20 loses to
    DPM-Solver at 10; an unpublished step count takes the nearest fewer steps' figure."""
    cpu, toy = load("cpu").literature, load("toy").literature
    assert cpu["baseline_ddim_50"] == ("", "DDIM 50: 4.67, against 2.87 for DPM-Solver 25 (its 20-step figure) "
                                           "(DDIM Table 1 and DPM-Solver's paper: two models)")  # so no expectation
    assert cpu["baseline_dpm_10"][0] == "hurts" and cpu["baseline_dpm_20"][0] == "none" and cpu["ema_off"][0] == "hurts"
    assert toy["baseline_dpm_10"][0] == ""  # against DDIM 20: two papers
    assert toy["baseline_ddpm_100"][0] == "helps"  # 5.78 against DDIM 20's 6.84, both DDIM Table 1
    from importlib import util
    spec = util.spec_from_file_location("the_study", os.path.join(REPO, report.STUDY))
    module = util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.published_fid("ddim", 30) == (6.84, 20) and module.published_fid("dpm", 5) == (None, None)


def test_a_report_in_another_folder_of_the_repository_reproduces_itself_there(tmp_path, monkeypatch):
    """The longer budget's rows live in ablations/cpu/budget_4x: its report's commands name that folder,
    so that rerunning them neither trains into nor rewrites the study's own ablations/cpu."""
    study = load("cpu")
    monkeypatch.setattr(report, "REPO", str(tmp_path))
    folder = tmp_path / "ablations" / "cpu" / "budget_4x"
    folder.mkdir(parents=True)
    setup = Setup.of(study.scale, budget_kimg=ablate.positive_float("300"))
    text = open(report.write_report(study, str(folder), setup)).read()
    reproduce = next(line for line in text.splitlines() if line.startswith("- Reproduce: `bash ablate.sh "))
    assert reproduce.count("--scale cpu --budget_kimg 300 --out ablations/cpu/budget_4x`") == 2  # runs, then report
    own = tmp_path / "ablations" / "cpu"
    assert "--out" not in open(report.write_report(study, str(own), Setup.of(study.scale))).read().split("## ")[0]


def test_the_longer_budget_checks_the_largest_effects_on_seed_0_and_says_whether_the_ranking_holds(tmp_path):
    """The one-at-a-time table's 3 largest effects and the baseline at 4x the cpu scale's budget, their rows
    in budget_4x/: each seed-0 ratio beside its ratios at the study's budget, its interval from the
    table's pooled noise of one paired difference (stats.one_difference), and the ranking at both. A variant
    whose residual branches cannot train (act_relu with zero_init) is not a largest effect, however large."""
    study = load("cpu")
    setup = Setup.of(study.scale)
    longer = Setup.of(study.scale, budget_kimg=ablate.positive_float("300"))  # as the command line reads it
    (tmp_path / "budget_4x").mkdir()
    effects = {"ema_off": 3.0, "width_half": 1.6, "lr_x2": 0.5, "act_relu": 4.0, "norm_batch": 0.97}
    tinted = lambda row, tint: {**row, "metrics": {**row["metrics"], "background_error": {"samples": tint, "floor": 0}}}
    for seed in (0, 1):
        rows.append_row(tmp_path / "results.jsonl", tinted(fake_row(study, setup, "baseline", seed, 100.0 + seed), 20.0))
        for name, ratio in effects.items():
            rows.append_row(tmp_path / "results.jsonl",
                            fake_row(study, setup, name, seed, (100.0 + seed) * ratio * (1.03 if seed else 0.97)))
    at_4x = {"baseline": 50.0, "ema_off": 60.0, "width_half": 100.0, "lr_x2": 40.0}  # width_half now worse than ema_off
    for name, fd in at_4x.items():
        rows.append_row(tmp_path / "budget_4x" / "results.jsonl", tinted(fake_row(study, longer, name, 0, fd), 5.0))
    text = open(report.write_report(study, str(tmp_path), setup)).read()
    section = text[text.index("## A longer budget"):].split("\n## ", 1)[0]
    assert "| x0.50 [" in next(row for row in section.splitlines() if row.startswith("| `lr_x2` |"))
    assert "Left out: `act_relu`, whose residual branches never train" in section and "| `act_relu` |" not in section
    assert ("`bash ablate.sh --scale cpu --budget_kimg 300 --out ablations/cpu/budget_4x --seeds 0 --only "
            "baseline,ema_off,lr_x2,width_half`") in section
    sigma, df = report.pooled_sigma(report.table(study, rows.Rows.of(study, setup, rows.read_rows(str(tmp_path))),
                                                 "one_at_a_time"))
    expected = stats.describe(stats.one_difference("width_half", math.log(100 / 50), sigma, df))
    line = next(row for row in section.splitlines() if row.startswith("| `width_half` |"))
    assert f"| {1.6 * 0.97:.2f} | {expected[0]} | {expected[1]} | - -> 5.0 |" in line, line
    assert "| `baseline` (attribute_fd) | 100.5 | 100 | 50 | - | 20.0 -> 5.0 |" in section
    assert ("On seed 0, best first: `lr_x2`, `width_half`, `ema_off` at 75 thousand images; `lr_x2`, `ema_off`, "
            "`width_half` at 300 thousand: a different order.") in section
    assert ("At 300 thousand images the baseline's seed 0 has a background error of 5.0, against 20.0 at 75 "
            "thousand: lower with the budget alone, on one seed, without an interval.") in text


def test_the_default_preset_section_changes_a_field_only_where_a_change_helps(tmp_path):
    """A field takes a new value only where its change helps after Holm's correction (the best of
    those), and its runs keep within the scale's run-minute limit; else it keeps its value, and says
    whether its changes hurt, showed nothing, or cost more minutes than a run may take."""
    study = load("cpu")
    setup = Setup.of(study.scale)
    effects = {"lr_x2": 0.5, "lr_x0.5": 1.5, "ema_off": 2.0, "act_relu": 1.01, "act_gelu": 0.99}
    for seed in (0, 1):
        rows.append_row(tmp_path / "results.jsonl", fake_row(study, setup, "baseline", seed, 100.0 + seed))
        for name, ratio in effects.items():
            rows.append_row(tmp_path / "results.jsonl",
                            fake_row(study, setup, name, seed, (100.0 + seed) * ratio * (1.02 if seed else 0.98)))
        # Better per image, at 36 minutes of the 2-core machine a run, past the scale's 15.
        rows.append_row(tmp_path / "results.jsonl", fake_row(study, setup, "width_double", seed, (100.0 + seed) * 0.8 * (
            1.02 if seed else 0.98), cpu_seconds=4300.0, process_cpu_seconds=4320.0 - seed))
    text = open(report.write_report(study, str(tmp_path), setup)).read()
    section = text[text.index("## The default preset"):].split("\n## ", 1)[0]
    row = lambda field: next(line for line in section.splitlines() if line.startswith(f"| `{field}` |"))
    assert row("learning_rate").startswith("| `learning_rate` | 0.002 | `lr_x0.5` x1.50 hurts; `lr_x2` x0.50 helps |")
    assert row("learning_rate").endswith("| **a change helps: learning_rate=0.004** (`lr_x2`) |")
    assert row("ema_decay").endswith("| keeps it: its changes hurt |")
    assert row("act").endswith("| keeps it: no detectable effect |")
    assert row("channels").startswith("| `channels` | (16, 32, 64, 64) | `width_double` x0.80 helps |")
    assert row("channels").endswith("| keeps it: channels=(32,64,128,128) helps per image, but its runs took up to 36.0 "
                                    "minutes of the machine, over the scale's limit of 15; the budget curve weighs a "
                                    "wider network by quality per minute |")
    assert "So far 6 of 36 changes have a ratio." in section
    assert ("**The revision is not what the table says now**: `revised` in scale cpu of ablations/study.py takes "
            "`hflip_off`, `down_conv`, the table `lr_x2` (6 of 36 changes measured). `revised_default` runs the first.") in section
    source = open(os.path.join(REPO, report.STUDY)).read()
    chosen = 'revised=("hflip_off", "down_conv"),'
    assert source.count(chosen) == 1
    unrevised = tmp_path / "unrevised" / "study.py"  # before the study file chose: the section says what to do
    unrevised.parent.mkdir()
    unrevised.write_text(source.replace(chosen, "revised=(),"))
    os.symlink(tmp_path / "results.jsonl", unrevised.parent / "results.jsonl")
    text = open(report.write_report(plan.load_study(str(unrevised), "cpu"), str(unrevised.parent), setup)).read()
    assert ("The table chooses `lr_x2` so far (6 of 36 changes measured): when it is complete, set `revised` in "
            f"scale cpu of {os.path.relpath(unrevised, REPO)} to what it chooses, and run `revised_default`.") in text
    for flags in (["--only", "revised_default"], ["--group", "revised"]):  # it cannot run before then, and says why (gpu scale)
        with pytest.raises(UserError, match=f"{flags[0]} revised.*: cannot run yet: set revised in scale gpu"):
            planned(tmp_path, *flags)

    # A study whose revision takes what helps: the revised default runs on the baseline's seeds, paired.
    path = tmp_path / "revised" / "study.py"
    path.parent.mkdir()
    path.write_text(source.replace(chosen, 'revised=("lr_x2",),'))
    study = plan.load_study(str(path), "cpu")
    revised = study.variant("revised_default")
    assert revised.seeds == (0, 1, 2, 3, 4) and revised.overrides == ("learning_rate=0.004",) and not revised.not_runnable
    assert study.config(revised) == study.config(study.variant("lr_x2"))
    results = path.parent / "results.jsonl"
    for seed in (0, 1):
        for name, ratio in effects.items():
            rows.append_row(results, fake_row(study, setup, name, seed, (100.0 + seed) * ratio * (1.02 if seed else 0.98)))
    for seed in range(5):
        rows.append_row(results, fake_row(study, setup, "baseline", seed, 100.0 + seed))
        rows.append_row(results, fake_row(study, setup, "revised_default", seed, (100.0 + seed) * 0.8 * (1.01 if seed % 2 else 0.99)))
    text = open(report.write_report(study, str(path.parent), setup)).read()
    section = text[text.index("## The default preset"):].split("\n## ", 1)[0]
    assert ("`revised_default` is the baseline with `lr_x2`, the changes that help in the table above (5 of 36 "
            "changes measured). Against the baseline, paired on 5 seeds: attribute_fd x0.80 [") in section
    # The seeds 0 and 1 chose the change; seeds 2 to 4 judge it without that bias.
    assert "], **helps**. On the seeds that did not choose the changes (2, 3, 4; the others' pairs flatter it): x0.8" \
        in section
    assert "| `revised_default` | the baseline with lr_x2 (learning_rate=0.004) | `baseline` | 5 |" in text  # its table in the results
    matters = text[text.index("## What matters"):].split("\n## ", 1)[0]
    assert "**The revised default: the baseline with the changes the study chose** (ratios against the " \
           "baseline):" in matters and "| `revised_default`: the baseline with lr_x2 (learning_rate=0.004) | x0.80 [" in matters
    # Two changes that set one field to the same value make one change (Lin et al.'s fix takes the v target).
    path.write_text(source.replace(chosen, 'revised=("zero_terminal_snr", "target_v"),'))
    assert plan.load_study(str(path), "cpu").variant("revised_default").overrides == ("zero_terminal_snr=true", "target=v")
    # Two values of one field, or a name that is no one-at-a-time variant, fail when the study loads.
    for revised, message in ((('"lr_x2", "lr_x0.5"'), r"revised sets learning_rate twice: learning_rate=0.004 \(lr_x2\) "
                                                       r"and learning_rate=0.001 \(lr_x0.5\); keep one"),
                             ('"lr_x3",', "revised names lr_x3, not one-at-a-time variants")):
        path.write_text(source.replace(chosen, f"revised=({revised}),"))
        with pytest.raises(UserError, match=message):
            plan.load_study(str(path), "cpu")
