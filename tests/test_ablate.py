"""Tests for ablate.py and ablations/study.py: the study as data, the plan, the report, and the
whole study end to end on tiny data through the real scripts (train.py, evaluate.py, generate.py)."""
import json
import os
import re
import shutil

import pytest
from PIL import Image

import ablate
from cli import UserError
from config import config_to_dict, make_config
from testkit import PYTHON, REPO, make_avatar_folder, run

SAMPLER_KEYS = ("sampler", "sampling_steps", "sampling_schedule", "eta", "clamp_x0")


def load(scale):
    return ablate.load_study(os.path.join(REPO, ablate.STUDY), scale)


def training_fields(config):
    return {k: v for k, v in config_to_dict(config).items() if k not in SAMPLER_KEYS}


# ---- the study as data ---------------------------------------------------------------------------

@pytest.mark.parametrize("scale", ["gpu", "cpu"])
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
        if v.of:  # a re-evaluation: its trained run's training, another sampler
            parent = study.config(study.variant(v.of))
            assert training_fields(config) == training_fields(parent), v.name
            assert config != parent, v.name


@pytest.mark.parametrize("scale", ["gpu", "cpu"])
def test_every_trained_variant_builds_its_network(scale):
    """A configuration that make_config accepts but unet.py cannot build fails here, not on a GPU
    lease (on the meta device: no memory, no time)."""
    import torch
    from unet import UNet
    study = load(scale)
    sizes = {}
    for v in study.variants:
        if not v.not_runnable and not v.of:
            with torch.device("meta"):
                sizes[v.name] = sum(p.numel() for p in UNet(study.config(v)).parameters())
    assert sizes["baseline"] == (18_641_923 if scale == "gpu" else 426_019)
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
    assert training_fields(study.config(trained[-1])) == training_fields(make_config("default"))
    assert path[-1].of == trained[-1].name and study.config(path[-1]) == make_config("default")


def test_the_study_has_what_the_issue_lists():
    study = load("gpu")
    names = {v.name for v in study.variants}
    assert {"noise_cond_none", "norm_batch", "norm_batch_batch_stats", "attention_16_8", "width_half", "width_double",
            "target_v", "lr_x0.5", "lr_x2", "ema_0.9999", "batch_128", "batch_460", "baseline_ddpm_1000",
            "noise_cond_none_dpm_10", "baseline_clamp_off"} <= names
    assert study.variant("baseline").seeds == (0, 1, 2)
    assert study.variant("peer_diffusers_unet2d").not_runnable
    assert {v.group for v in study.variants} == set(study.groups)
    cpu = load("cpu")
    assert cpu.preset(cpu.variant("baseline")) == "tiny" and len(cpu.variants) < len(study.variants)


def write_study(folder, variants, scale="toy"):
    """A study file with a scale of tiny runs and these variants (Python source, one expression each)."""
    path = os.path.join(folder, "study.py")
    with open(path, "w") as f:
        f.write("from ablations.study import GROUPS, SAMPLER_FIELDS, Scale, Variant\n"
                f"SCALES = {{'{scale}': Scale('{scale}', budget_kimg=0.128, num_samples=16, folder='unused', "
                f"checkpoints='unused', presets=(('default', 'tiny'),), toy=True, budget_note='a test budget')}}\n"
                f"def variants(scale):\n    return [{' '.join(variants.split())}]\n")
    return path


def test_a_typo_in_the_study_fails_when_it_loads(tmp_path):
    path = write_study(tmp_path, 'Variant("baseline", "baseline"), Variant("norm_grup", "one_at_a_time", '
                                 'overrides=("norm=grup",))')
    with pytest.raises(UserError) as error:
        ablate.load_study(path, "toy")
    assert str(error.value) == f"{path}: variant norm_grup: --set norm=grup: choose one of batch, group, none"

    path = write_study(tmp_path, 'Variant("baseline", "baseline"), Variant("ddim_5", "sampling", of="baseline", '
                                 'overrides=("norm=batch",))')
    with pytest.raises(UserError, match="variant ddim_5: a re-evaluation may only set sampler, sampling_steps"):
        ablate.load_study(path, "toy")
    with pytest.raises(UserError, match="--scale gpu: choose one of toy"):
        ablate.load_study(path, "gpu")


# ---- the plan --------------------------------------------------------------------------------------

def plan(tmp_path, *flags):
    args = ablate.parse_args("run", ["--out", str(tmp_path / "out"), "--train_dataset_directory", str(tmp_path),
                                     "--validate_dataset_directory", str(tmp_path), *flags])
    jobs, skipped = ablate.Runner(load("gpu"), args).plan()
    return [job.key for job in jobs]


def test_shards_split_the_runs_and_keep_a_re_evaluation_with_its_run(tmp_path):
    everything = plan(tmp_path)
    shards = [plan(tmp_path, "--shard", f"{i}/3") for i in (1, 2, 3)]
    assert sorted(sum(shards, [])) == sorted(everything) and len(set(everything)) == len(everything)
    assert all(shards) and max(map(len, shards)) - min(map(len, shards)) <= 20
    for shard in shards:
        assert ("noise_cond_none_ddpm_1000", 0) not in shard or ("noise_cond_none", 0) in shard
    # --only a re-evaluation brings its trained run; --seeds applies to both.
    assert plan(tmp_path, "--only", "baseline_ddim_50", "--seeds", "1,2") == [
        ("baseline", 1), ("baseline_ddim_50", 1), ("baseline", 2), ("baseline_ddim_50", 2)]
    assert plan(tmp_path, "--group", "baseline") == [("baseline", 0), ("baseline", 1), ("baseline", 2)]
    with pytest.raises(UserError, match="--only norm_grup: not a variant of scale gpu"):
        plan(tmp_path, "--only", "norm_grup")
    with pytest.raises(UserError, match=r"--shard: '4/3' is not I/K"):
        plan(tmp_path, "--shard", "4/3")


def test_the_report_without_rows_lists_every_variant_as_not_yet_run(tmp_path):
    study = load("gpu")
    text = open(ablate.write_report(study, str(tmp_path), 500, 1000)).read()
    not_run = text[text.index("## Not yet run"):]
    for v in study.variants:
        assert f"`{v.name}`" in not_run, v.name
    assert "    bash ablate.sh curve && bash ablate.sh --only baseline,path_A_seed\n" in not_run
    assert "`peer_diffusers_unet2d`: not runnable yet: no architecture option" in not_run
    assert "**Budget: 500 thousand images seen**" in text and "Not measured yet: `bash ablate.sh curve`" in text


@pytest.mark.parametrize("scale", ["gpu", "cpu"])
def test_the_committed_report_is_what_its_rows_give(tmp_path, scale):
    """ablations/REPORT.md and ablations/cpu/REPORT.md come from `python ablate.py report`."""
    study = load(scale)
    folder = os.path.join(REPO, study.scale.folder)
    for name in os.listdir(folder):
        if name.endswith(".jsonl") or name == "grids":
            (shutil.copytree if name == "grids" else shutil.copy)(os.path.join(folder, name), tmp_path / name)
    written = ablate.write_report(study, str(tmp_path), study.scale.budget_kimg, study.scale.num_samples)
    assert open(written).read() == open(os.path.join(folder, "REPORT.md")).read()


# ---- the study end to end ----------------------------------------------------------------------------

@pytest.mark.slow
def test_the_study_end_to_end_on_tiny_data(tmp_path):
    """Two tiny variants, the baseline (2 seeds) and its re-evaluation with another sampler, and
    a variant that fails (a batch larger than the data), through the real scripts; then a rerun
    that skips them all, and the report."""
    train, val = make_avatar_folder(tmp_path / "train", 64), make_avatar_folder(tmp_path / "val", 32, 1_000_000)
    study = write_study(tmp_path, """
        Variant("baseline", "baseline", seeds=(0, 1)),
        Variant("batch_512", "one_at_a_time", overrides=("batch_size=512",)),
        Variant("baseline_ddim_5", "sampling", of="baseline", overrides=("sampling_steps=5",)),
        Variant("peer", "peer", not_runnable="not built in this test")""")
    out = tmp_path / "out"
    command = [PYTHON, "ablate.py", "--study", study, "--scale", "toy", "--out", out, "--checkpoints", tmp_path / "runs",
               "--train_dataset_directory", train, "--validate_dataset_directory", val, "--device", "cpu"]
    result = run(command)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "4 runs to do, 0 skipped" in result.stdout

    rows = {(r["variant"], r["seed"]): r for r in map(json.loads, open(out / "results.jsonl"))}
    assert sorted(rows) == [("baseline", 0), ("baseline", 1), ("baseline_ddim_5", 0), ("batch_512", 0)]
    failed = rows["batch_512", 0]
    assert failed["status"] == "failed" and failed["reason"] == (
        f"train.py exit 2: error: --batch_size 512 is larger than the 64 images in {train}: lower --batch_size")
    for key in [("baseline", 0), ("baseline", 1), ("baseline_ddim_5", 0)]:
        row = rows[key]
        assert row["status"] == "ok" and row["reason"] is None, row
        assert (row["budget_kimg"], row["num_samples"], row["steps"], row["images_seen"]) == (0.128, 16, 8, 128)
        assert row["torch"] and row["commit"] and row["wall_seconds"] > 0 and row["gpu_seconds"] is None
        metric = row["metrics"]["attribute_fd"]
        assert metric["samples"] > 0 and metric["floor"] > 0
        assert set(row["attribute_tv"]) >= {"skin_color", "hair"} and row["val_loss_ema"] > 0
        assert Image.open(out / row["grid"]).size == (256, 128)
    trained = rows["baseline", 0]
    assert trained["curve"]["kimg"][-1] == 0.128 and trained["config"]["batch_size"] == 16
    assert failed["config"]["batch_size"] == 512 and failed["overrides"] == ["batch_size=512"]
    assert trained["metrics"] != rows["baseline", 1]["metrics"]  # the seed reached the runs
    # The validation loss of the last step: train.py's own, since 8 steps of 16 end an epoch of 64.
    log = [json.loads(line) for line in open(tmp_path / "runs" / "0.128kimg" / "baseline" / "seed0" / "log.jsonl")]
    assert trained["val_loss_ema"] == [r for r in log if r["kind"] == "validation"][-1]["val_loss_ema"]
    sampled = rows["baseline_ddim_5", 0]
    assert sampled["of"] == "baseline" and sampled["sampler"]["steps"] == 5 and trained["sampler"]["steps"] == 20
    assert sampled["train_loss"] == trained["train_loss"] and set(sampled["step_seconds"]) == {"evaluate.py", "generate.py"}

    # A rerun skips every run with a row; --retry_failed under a deadline that no run fits starts none.
    result = run(command)
    assert result.returncode == 0 and "0 runs to do, 4 skipped" in result.stdout, result.stdout + result.stderr
    result = run([*command, "--retry_failed", "--deadline_minutes", "0.01"])
    assert "--deadline_minutes: 1 runs not started: batch_512/0" in result.stdout, result.stdout + result.stderr
    assert len(open(out / "results.jsonl").readlines()) == 4

    # The report: a table per group, the mark, the per-head verdicts, the failure, the images.
    result = run([PYTHON, "ablate.py", "report", "--study", study, "--scale", "toy", "--out", out])
    assert result.returncode == 0, result.stderr
    report = open(out / "REPORT.md").read()
    assert report.startswith("# Ablation study: toy scale (toy)\n\n> **Toy scale.**")
    base = [rows["baseline", s]["metrics"]["attribute_fd"]["samples"] for s in (0, 1)]
    spread, mean = max(base) - min(base), sum(base) / 2
    assert f"| `baseline` | preset tiny | 2 | {mean:.4g} | {spread:.3g} |" in report
    change = sampled["metrics"]["attribute_fd"]["samples"] - mean
    line = next(line for line in report.splitlines() if line.startswith("| `baseline_ddim_5` |"))
    assert line.startswith("| `baseline_ddim_5` | sampling_steps=5 | 1 |") and "re-evaluates baseline" in line
    assert f"| {change:+.4g}{' *' if abs(change) > spread else ''} |" in line
    for head, tv in sampled["attribute_tv"].items():
        theirs = [rows["baseline", s]["attribute_tv"][head] for s in (0, 1)]
        moved = tv["samples"] - sum(t["samples"] for t in theirs) / 2
        clear = abs(moved) > max(abs(theirs[0]["samples"] - theirs[1]["samples"]), sum(t["floor"] for t in theirs) / 2)
        assert (f"{head} {moved:+.2f}" in line) == clear, (head, line)
    assert "seed 0 failed: train.py exit 2: error: --batch_size 512" in report
    assert "`peer`: not runnable yet: not built in this test" in report
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert {"plots/bars_baseline.png", "plots/losses_baseline.png", "plots/bars_sampling.png",  # charts, and
            "grids/baseline_seed0.png", "grids/baseline_ddim_5_seed0.png"} <= set(images)  # the mosaics of grids
    for image in images:
        assert Image.open(out / image).size[0] > 200, image
