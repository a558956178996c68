"""The ablation study, as data: every variant (a preset plus `--set` overrides) and the scales it
runs at. ablate.py runs it, validates every variant with config.make_config when it loads this
file, and writes the report; nothing here runs anything.

Groups:
    baseline        the study's reference (preset default), on BASELINE_SEEDS
    tuning          the learning rate and batch swept at the scale's width, on seed 0
    path            from the seed's configuration to the default, one change a row, each row
                    keeping the ones before it
    one_at_a_time   the default with one field changed
    sampling        an already-trained run re-evaluated with other sampler settings (no training)
    peer            another architecture, as a reference
    revised         the default chosen by evidence: the baseline with the one-at-a-time changes that
                    help (Scale.revised), on the baseline's seeds
    evaluation_noise  the baseline's seed-0 run scored again from other starting noise: how much of
                    the spread over seeds is the evaluation's own (no table; the report's header)
A variant with `of` set re-evaluates the run of the variant it names; its overrides may only
change the sampler fields (SAMPLER_FIELDS). A variant with `runs_of` set is that trained variant
under another name (the path's last row, where it reaches the baseline): it shows that one's runs
and does not run itself.

The design is paired (ablations/stats.py): every variant trains on the seeds of the run it is
compared with (VARIANT_SEEDS, a subset of the baseline's BASELINE_SEEDS), so that the two share
their initial weights, data order and noise draws, and every evaluation of a scale starts from the
same noise and scores against the same real images (Scale.evaluation_seed).

A scale (SCALES) picks the budget in images seen, the number of samples per evaluation, the
presets (at the cpu scale `default` means `small`, at the toy scale `tiny`), the fields it pins once
the study's findings revise a preset (Scale.pinned) and the variants that run, in one place.
"""
import math
from dataclasses import dataclass

from cli import UserError
from config import CHOICES, CPU_PRESET, make_config

GROUPS = ("baseline", "tuning", "path", "one_at_a_time", "sampling", "peer", "revised", "evaluation_noise")
SAMPLER_FIELDS = ("sampler", "sampling_steps", "eta", "clamp_x0", "timestep_spacing")  # what a re-evaluation may change
BASELINE_SEEDS = (0, 1, 2, 3, 4)  # 5: the baseline's spread, and the pairs of every variant
VARIANT_SEEDS = (0, 1)            # at least 2, so that every variant has a paired difference to pool
EVALUATION_NOISE_SEEDS = 4        # the baseline's seed 0 scored from this many other starting noises


@dataclass(frozen=True)
class Variant:
    name: str
    group: str
    preset: str = "default"       # a scale may map it (cpu: default -> small, toy: default -> tiny)
    overrides: tuple = ()         # "key=value" strings, as train.py's --set takes them
    of: str = ""                  # re-evaluate this trained variant's run with `overrides` (sampler fields only)
    seeds: tuple = VARIANT_SEEDS  # training seeds; the same as its reference's (the pairs)
    eval_seed: int | None = None  # the starting noise of its samples (None: the scale's evaluation_seed)
    not_runnable: str = ""        # why it cannot run yet; the report lists it with this reason
    runs_of: str = ""             # the trained variant whose runs these are (the same configuration)
    note: str = ""                # what the row shows, for the report


@dataclass(frozen=True)
class Scale:
    name: str
    budget_kimg: float            # thousands of images seen by every training run
    num_samples: int              # samples per evaluation, the same for every row
    folder: str                   # results.jsonl, REPORT.md, grids/ and plots/
    checkpoints: str              # each run's folder (git-ignored)
    presets: tuple = ()           # (study preset, preset run at this scale) pairs
    variants: tuple = ()          # the names that run at this scale, besides its groups'
    groups: tuple = ()            # the groups that run at this scale; with variants (), () = all
    run_minutes_guess: float = 3  # one run, evaluation included, until a finished row says better
    budget_note: str = ""         # how the budget was chosen
    toy: bool = False             # the report says, at its top, that this is not the real study
    evaluation_seed: int = 0      # every evaluation's starting noise, test subset and reference subset
    precision: str = "fp32"       # one precision for every run of the scale, training and sampling
    run_minutes_limit: float = 0  # the minutes of the whole machine a run should take, for the curve's choice (0: none)
    run_minutes_allowed: float = 0  # the most a run may take, when the curve's choice needed more (0: the limit)
    curve_widths: tuple = ()      # channel tuples the budget curve trains (): the baseline's only
    curve_points_kimg: tuple = () # where the curve evaluates (): 1/4, 1/2, 1 and 2 budgets
    curve_overrides: tuple = ()   # --set strings the curve's runs add to the baseline's (the recipe it was measured at)
    path_fixed: tuple = ()        # fields the path takes from the baseline from its first row
    tuning: tuple = ()            # (learning rate, batch) pairs of the sweep (tuning_variants)
    grid_size: str = "8x4"        # each run's grid of its first samples, COLSxROWS
    readme: bool = False          # its report's "What matters" is also the README's (report.write_readme_section)
    longer_budget: float = 0      # the check at this factor of the budget (report.longer_budget_section), 0: none
    revised: tuple = ()           # the one-at-a-time variants whose changes the revised default takes (the report's
                                  # "The default preset" names those that help after Holm); (): none chosen yet
    pinned: tuple = ()            # --set strings put before the overrides of every variant on preset default: that
                                  # preset's fields as the study ran them, so that revising the preset leaves the
                                  # study's rows current (their config_hash unchanged); (): the preset as it is


# The fields that the cpu scale's findings revised in presets default and small (config.py), as the
# study ran them before: every scale that trains on preset default pins them, so that its rows stay
# current and its one-at-a-time variants still change one field from the baseline the study measured.
REVISED_FIELDS = ("hflip=true", "down=maxpool")

SCALES = {
    "gpu": Scale(
        "gpu", budget_kimg=500, num_samples=1000, folder="ablations", checkpoints="checkpoints/ablations/gpu",
        run_minutes_guess=3, pinned=REVISED_FIELDS,  # its one-at-a-time rows confirm the cpu scale's revision at scale
        budget_note="provisional: 500 kimg is about 1.5 minutes of training at the 3-minute run's 5,230 img/s "
                    "(H100); `bash ablate.sh curve` measures the curve that should choose it"),
    "cpu": Scale(
        "cpu", budget_kimg=75, num_samples=2000, folder="ablations/cpu", checkpoints="checkpoints/ablations/cpu",
        presets=(("default", CPU_PRESET),), precision="bf16", run_minutes_limit=10, run_minutes_allowed=15,
        run_minutes_guess=25,
        curve_widths=((16, 32, 32, 32), (16, 32, 64, 64), (32, 64, 64, 64)),
        curve_points_kimg=(12.5, 25, 50, 75, 100, 150),
        curve_overrides=("learning_rate=0.001",),  # the curve ran before the sweep chose the baseline's 2e-3
        path_fixed=("channels", "batch_size", *SAMPLER_FIELDS),
        tuning=((5e-4, 64), (1e-3, 64), (2e-3, 64), (4e-3, 64), (1e-3, 32), (1e-3, 128)), grid_size="16x8",
        groups=("baseline", "tuning", "path", "evaluation_noise", "one_at_a_time", "sampling", "peer", "revised"),
        readme=True,
        longer_budget=4,
        revised=("hflip_off", "down_conv"),  # what "The default preset" of its report takes (issue 25)
        pinned=REVISED_FIELDS,
        budget_note="chosen by the curve below (2026-12-02, AMD EPYC, 2 cores): of the runs of at most 10 minutes, "
                    "the best was width 16-32-64-64 at 50 kimg (9.2 minutes), 23x its floor, short of the goal of "
                    "10x; so runs may take up to 15 minutes, and the best within them is the same width at 75 kimg "
                    "(12.3 minutes, 19x its floor; the goal is still not met)"),
    "toy": Scale(
        "toy", budget_kimg=4, num_samples=256, folder="ablations/toy", checkpoints="checkpoints/ablations/toy",
        presets=(("default", "tiny"),), run_minutes_guess=3,
        variants=("baseline", "noise_cond_none", "norm_batch", "target_x0", "zero_init_on", "lr_schedule_cosine",
                  "baseline_dpm_10", "baseline_clamp_on",
                  *[f"evaluation_noise_{k}" for k in range(1, EVALUATION_NOISE_SEEDS + 1)]),
        budget_note="chosen by time, not by the curve: the whole toy study, 23 runs two at a time, took 29 "
                    "minutes on 2 cores of an AMD EPYC while the test suite shared them (2026-12-02)",
        toy=True),
}


def baseline_config(scale):
    """The scale's baseline: preset default as the scale maps it, with the scale's pinned fields."""
    return make_config(dict(scale.presets).get("default", "default"), scale.pinned)


def setting(key, value):
    """A --set string for a configuration value: tuples as (a,b), booleans as true/false."""
    if isinstance(value, tuple):
        text = "(" + ",".join(map(str, value)) + ("," if len(value) == 1 else "") + ")"
    elif isinstance(value, bool):
        text = str(value).lower()
    else:
        text = str(value)
    return f"{key}={text}"


# ---- path: the seed, then the baseline's fields a few at a time ---------------------------------

PATH = [  # (label, the baseline's fields it adds); letters follow the rows that change something
    ("seed", ()),
    ("learning_rate", ("learning_rate",)),  # Adam at the seed's 1e-5, then at the rate tuned for the width
    ("optimiser", ("optimizer", "weight_decay", "warmup_steps", "grad_clip")),
    ("noise_cond", ("noise_cond",)),
    ("ema", ("ema_decay",)),
    ("groupnorm", ("norm",)),
    ("linear_beta_t", ("noise_sampling",)),
    ("zero_init_lr_schedule", ("zero_init", "lr_schedule")),
    ("flips_attention", ("hflip", "attention")),
    ("channels", ("channels",)),  # now the baseline's training configuration
]


def path_variants(scale, b):
    """The path from the seed's configuration to the scale's baseline b. The fields of
    scale.path_fixed take b's value from the first row (at the cpu scale the width, the batch and
    the sampler: the seed's 138M parameters and 1000 sampling steps do not fit a run's minutes)."""
    seed = make_config("seed")
    differs = lambda fields: tuple(setting(k, getattr(b, k)) for k in fields if getattr(b, k) != getattr(seed, k))
    fixed = differs(scale.path_fixed)
    rows, overrides = [], fixed
    for label, fields in PATH:
        added = differs(f for f in fields if f not in scale.path_fixed)
        if fields and not added:
            continue  # the baseline keeps the seed's value, or the scale fixed it from the start
        overrides += added
        note = ", ".join(added) or ("the seed" + (f" with {', '.join(fixed)}" if fixed else ""))
        # Where the path reaches the baseline's configuration, its row is the baseline's runs.
        reached = make_config("seed", overrides) == b
        rows.append(Variant(f"path_{chr(ord('A') + len(rows))}_{label}", "path", preset="seed", overrides=overrides,
                            note=note + (" (the baseline's runs)" if reached else ""),
                            runs_of="baseline" if reached else ""))
    sampler = differs(f for f in SAMPLER_FIELDS if f not in scale.path_fixed)
    if sampler:
        rows.append(Variant(f"path_{chr(ord('A') + len(rows))}_sampler", "path", preset="seed", overrides=sampler,
                            of=rows[-1].name, note="the baseline's sampler on the run above"))
    return rows


# ---- tuning: the learning rate and batch at the scale's width -----------------------------------

def tuning_variants(scale):
    """The sweep that chose the baseline's learning rate and batch (scale.tuning), on seed 0. The
    values are absolute, so that each row keeps its meaning when the baseline takes one of them."""
    return [Variant(f"tune_lr_{lr:g}_batch_{n}", "tuning", seeds=(0,),
                    overrides=(setting("learning_rate", lr), setting("batch_size", n)))
            for lr, n in scale.tuning]


# ---- one at a time: the scale's baseline with one field changed ----------------------------------

def one_at_a_time_variants(b):
    """b: the baseline's Config at this scale; relative changes (width, learning rate, batch) and
    flips (zero_init, hflip) are taken from it."""
    def power_of_two(n):
        return 2 ** round(math.log2(n))
    changes = [
        ("noise_cond_none", ["noise_cond=none"]),
        ("norm_batch", ["norm=batch"]),
        ("norm_batch_batch_stats", ["norm=batch", "bn_sampling_stats=batch"]),
        ("norm_none", ["norm=none"]),
        *[(f"act_{a}", [f"act={a}"]) for a in CHOICES["act"] if a != b.act],
        # ReLU without the zero_init that kills its residual branches (unet.zero_init_kills_branches):
        # added after act_relu ran, to say what ReLU itself does; compare it with zero_init_off too.
        *([("act_relu_zero_init_off", ["act=relu", "zero_init=false"])] if b.zero_init and b.act != "relu" else []),
        ("dropout_0" if b.dropout else "dropout_0.1", [setting("dropout", 0.0 if b.dropout else 0.1)]),
        ("down_conv", ["down=conv"]),
        ("up_transposed", ["up=transposed"]),
        ("attention_none", ["attention=()"]),
        ("attention_16_8", ["attention=(16,8)"]),
        ("width_half", [setting("channels", tuple(c // 2 for c in b.channels))]),
        ("width_double", [setting("channels", tuple(c * 2 for c in b.channels))]),
        ("tail_tanh", ["tail=tanh"]),
        (f"zero_init_{'off' if b.zero_init else 'on'}", [setting("zero_init", not b.zero_init)]),
        ("data_range_0_1", ["data_range=0,1"]),
        (f"hflip_{'off' if b.hflip else 'on'}", [setting("hflip", not b.hflip)]),
        *[(f"noise_sampling_{n}", [f"noise_sampling={n}"]) for n in CHOICES["noise_sampling"] if n != b.noise_sampling],
        *[(f"target_{t}", [f"target={t}"]) for t in CHOICES["target"] if t != b.target],
        ("loss_weighting_min_snr_5", ["loss_weighting=min_snr_5"]),
        # Lin et al. 2024's fix of a schedule that never reaches pure noise: the rescaled schedule and the v
        # target it needs. Their third part, sampling from t = 999, our DDIM (linspace) and DPM-Solver (steps
        # uniform in log-SNR) already do; trailing steps are a re-evaluation of their own (sampling group).
        ("zero_terminal_snr", ["zero_terminal_snr=true", "target=v"]),
        *[(f"optimizer_{o}", [f"optimizer={o}"]) for o in CHOICES["optimizer"] if o != b.optimizer],
        ("lr_x0.5", [setting("learning_rate", b.learning_rate / 2)]),
        ("lr_x2", [setting("learning_rate", b.learning_rate * 2)]),
        ("ema_off", ["ema_decay=0"]),
        ("ema_0.9999", ["ema_decay=0.9999"]),
        ("warmup_0", ["warmup_steps=0"]),
        ("grad_clip_0", ["grad_clip=0"]),
        *[(f"lr_schedule_{s}", [f"lr_schedule={s}"]) for s in CHOICES["lr_schedule"] if s != b.lr_schedule],
        # The same images seen, so the number of steps changes with the batch.
        *[(f"batch_{n}", [f"batch_size={n}"]) for n in (power_of_two(b.batch_size / 2), 2 * b.batch_size)],
    ]
    return [Variant(name, "one_at_a_time", overrides=tuple(sets)) for name, sets in changes]


# ---- sampling: two trained runs, each with other samplers ----------------------------------------

SAMPLERS = [("ddpm", 1000), ("ddpm", 100), ("ddim", 20), ("ddim", 50), ("ddim", 100),
            ("dpm", 10), ("dpm", 20), ("dpm", 25)]


CONDITIONING_SAMPLERS = [("ddpm", 1000), ("ddim", 50), ("dpm", 25)]  # the 2 x 3 table's columns (Sun et al. 2025)


def sampled_by(of, sampler, steps, b):
    """The variant whose rows are the trained variant `of` sampled by (sampler, steps): its own rows
    where that is the baseline's sampler, else its re-evaluation of the sampling group."""
    return of if (sampler, steps) == (b.sampler, b.sampling_steps) else f"{of}_{sampler}_{steps}"


def sampling_variants(b):
    rows = []
    for of in ("baseline", "noise_cond_none"):
        for sampler, steps in SAMPLERS:
            if sampled_by(of, sampler, steps, b) != of:  # the trained run's own sampler is its own row
                rows.append(Variant(sampled_by(of, sampler, steps, b), "sampling", of=of,
                                    overrides=(f"sampler={sampler}", f"sampling_steps={steps}")))
        rows.append(Variant(f"{of}_clamp_{'off' if b.clamp_x0 else 'on'}", "sampling", of=of,
                            overrides=(setting("clamp_x0", not b.clamp_x0),)))
        rows.append(Variant(f"{of}_trailing", "sampling", of=of, overrides=("timestep_spacing=trailing",),
                            note="equal strides in t from t = 999 (Lin et al. 2024's trailing steps), in place "
                                 "of DPM-Solver's steps uniform in log-SNR"))
    return rows


# ---- peer: diffusers' UNet2DModel (DDPM's CIFAR-10 layout) at the baseline's widths -----------------

def peer_variants(b):
    """diffusers' own network, trained by our loop: with our recipe; with our recipe and DDPM's group
    size at the head instead of its group count; and with the recipe of diffusers' example
    train_unconditional.py as far as our fields reach (AdamW 1e-4, weight decay 1e-6, 500 warm-up
    steps, cosine decay). Its EMA warms up (decay 1 - (1 + step)^-3/4, at most 0.9999) and its Adam has
    beta1 0.95, which our fields cannot say; the fixed ema_decay is the value its EMA reaches near the
    end of a cpu-scale run (0.995 at step 1,172; at the gpu scale's 2,174 steps it would be 0.997, so
    there the row is a little further from the example's).

    DDPM normalises 128 channels in 32 groups, 4 channels a group at the head. UNet2DModel takes one
    group count for every layer; gcd(32, widths) keeps DDPM's 32 where the widths allow, and at the
    cpu scale's head of 16 channels leaves groups of 1, an instance norm just before its output, which
    erases each channel's mean (README, "Why the peer draws tinted colours"). groups_of_4 keeps DDPM's
    group size at the head instead; the deeper layers then have larger groups than DDPM's (at the
    cpu scale 4, 8, 16, 16 channels a group, DDPM's 4, 8, 8, 8)."""
    layout = ("arch=diffusers", "attention=(16,)")
    return [
        Variant("peer_diffusers_unet2d", "peer", overrides=layout,
                note="diffusers' UNet2DModel, DDPM's CIFAR-10 layout, with our recipe"),
        Variant("peer_diffusers_unet2d_groups_of_4", "peer", overrides=(*layout, f"norm_groups={b.channels[0] // 4}"),
                note="the same network with DDPM's 4 channels a GroupNorm group at the head, as its 128 channels in "
                     "32 groups, instead of gcd(32, widths) groups (1 channel each at a head of 16)"),
        Variant("peer_diffusers_unet2d_example_recipe", "peer",
                overrides=(*layout, "learning_rate=0.0001", "weight_decay=1e-06", "warmup_steps=500",
                           "lr_schedule=cosine", "ema_decay=0.995"),
                note="the same network with diffusers' example recipe (train_unconditional.py), as far as our "
                     "fields reach"),
    ]


# ---- revised: the default chosen by evidence ------------------------------------------------------

def revised_variants(scale, one_at_a_time):
    """The baseline with the changes of the one-at-a-time variants that scale.revised names, on the
    baseline's seeds, so that it is compared with the baseline seed by seed: is the revision better?
    Two chosen variants may set one field only to the same value (zero_terminal_snr and target_v)."""
    by_name = {v.name: v for v in one_at_a_time}
    unknown = [n for n in scale.revised if n not in by_name]
    if unknown:
        raise UserError(f"scale {scale.name}: revised names {', '.join(unknown)}, not one-at-a-time variants")
    chosen = {}  # field -> (its setting, the variant that chose it)
    for name in scale.revised:
        for o in by_name[name].overrides:
            field = o.partition("=")[0]
            if chosen.setdefault(field, (o, name))[0] != o:
                raise UserError(f"scale {scale.name}: revised sets {field} twice: {chosen[field][0]} "
                                f"({chosen[field][1]}) and {o} ({name}); keep one")
    overrides = tuple(o for o, _ in chosen.values())
    return [Variant("revised_default", "revised", overrides=overrides, seeds=BASELINE_SEEDS,
                    note="the baseline with " + ", ".join(f"{n} ({' '.join(by_name[n].overrides)})" for n in scale.revised),
                    not_runnable="" if overrides else f"set revised in scale {scale.name} of the study file to the "
                                                       f"changes that help (the report's \"The default preset\" names them)")]


# ---- what published ablations found, for the report's "What matters" ----------------------------

# variant: (what the literature leads one to expect of the variant's own change, from its reference:
# "helps", "hurts", "none", or "" where nothing published is the same change; what was found, in our
# words). Sources: ../shared/LITERATURE.md. Mostly CIFAR-10 FID at convergence: compare directions.
TARGETS_ALIKE = ("", "Salimans & Ho 2022: eps, x0 and v, each with a sensible weighting, within 0.2 FID at "
                     "convergence with a stochastic sampler, but 2.51 to 3.27 with DDIM, deterministic as ours is")
EMA_FOUND = "DDPM's checkpoint: 3.21 with EMA 0.9999, 12.14 with the raw weights (a secondary source)"
LR_FOUND = ("no published sweep at a fixed budget; EDM's retuning (3.01 -> 2.51) raised Adam's rate from DDPM's 2e-4 "
            "to 1e-3, at batch 512")
LR_SCHEDULE_FOUND = ("no published ablation; DDPM keeps the rate constant after its warm-up, diffusers' "
                     "train_unconditional.py decays it on a cosine")
DROPOUT_FOUND = ("mixed: ADM (ImageNet-64) 2.07 with dropout, 2.61 without; EDM2 finds it harmful for its "
                 "smallest networks")
ZERO_INIT_FOUND = "DDPM and ADM zero their output layers, with no published ablation"
HFLIP_FOUND = "no published ablation; DDPM trains on CIFAR-10 with random horizontal flips (its run_cifar.py)"
BATCH_FOUND = "no published ablation at a fixed number of images; DDPM trains at batch 128, EDM at 512"
LITERATURE = {
    "noise_cond_none": ("hurts", "Sun et al. 2025: most models degrade gracefully without the noise level, "
                                 "deterministic samplers such as DDIM badly"),
    "norm_batch": ("", "no published comparison; DDPM took GroupNorm for simplicity"),
    "norm_none": ("", "EDM2 gained without normalisation (3.02 -> 2.71), in a magnitude-preserving network, "
                      "which ours is not"),
    "act_relu": ("", "no published comparison; here ReLU meets our zero_init, which zeroes each residual branch just "
                     "before its activation: ReLU's gradient at 0 is 0, so the branches never train "
                     "(unet.zero_init_kills_branches; act_relu_zero_init_off is ReLU without it)"),
    "act_relu_zero_init_off": ("", "no published comparison; against zero_init_off it is ReLU's own change"),
    "act_gelu": ("", "no published comparison; DDPM and ADM use SiLU (swish)"),
    "norm_batch_batch_stats": ("", "no published comparison; with the batch's statistics at sampling time, each "
                                   "sample depends on the others in its batch"),
    "hflip_off": ("", HFLIP_FOUND),
    "hflip_on": ("", HFLIP_FOUND),
    "down_conv": ("", "no published ablation; DDPM and ADM downsample by a strided 3x3 conv"),
    "up_transposed": ("", "no published ablation; DDPM and ADM upsample by nearest neighbours, then a 3x3 conv"),
    "dropout_0": ("", DROPOUT_FOUND),
    "dropout_0.1": ("", DROPOUT_FOUND),
    "attention_16_8": ("", "ADM (ImageNet-128): attention at 32, 16 and 8 over 16 alone, about -0.7 FID; here 16 "
                           "joins 8"),
    "attention_none": ("", "no 32x32 result without attention"),
    "noise_sampling_cosine": ("", "iDDPM: cosine beat linear at 64x64 (27.0 vs 31.3), as the schedule of "
                                  "training and sampling; here only the training draws change"),
    "noise_sampling_edm_lognormal": ("", "EDM Table 2: log-normal noise levels with EDM's loss weighting, "
                                         "2.29 -> 2.05 together; here without the weighting"),
    "noise_sampling_uniform_alpha_bar": ("", "no published comparison"),
    "target_x0": TARGETS_ALIKE,
    "target_v": TARGETS_ALIKE,
    "loss_weighting_min_snr_5": ("helps", "Hang et al. 2023 (ImageNet-256, latent): mostly faster early training "
                                          "(7.32 vs 8.55 FID at 200k steps, 4.14 vs 4.21 at 1M)"),
    "zero_terminal_snr": ("", "Lin et al. 2024: fixes a wrong overall brightness or colour (see the background "
                              "error), no FID on our kind of data"),
    "optimizer_adam": ("none", "with weight decay 0, as here, AdamW is Adam: a null change, the study "
                               "checking itself"),
    "lr_x0.5": ("", LR_FOUND),
    "lr_x2": ("", LR_FOUND),
    "warmup_0": ("", "no published ablation; DDPM warms up over its first 5,000 of 800k steps (its run_cifar.py)"),
    "grad_clip_0": ("", "no published ablation; DDPM clips the gradient's norm at 1 (its run_cifar.py)"),
    "lr_schedule_cosine": ("", LR_SCHEDULE_FOUND),
    "lr_schedule_linear": ("", LR_SCHEDULE_FOUND),
    "ema_off": ("hurts", EMA_FOUND),
    "ema_0.9999": ("", "EDM2: the best EMA length grows with training; DDPM's 0.9999 was for 800k steps"),
    "zero_init_off": ("", ZERO_INIT_FOUND),
    "zero_init_on": ("", ZERO_INIT_FOUND),
    "width_half": ("", "no published ablation at a fixed budget; DDPM's CIFAR-10 network has 35.7M parameters"),
    "width_double": ("", "no published ablation at a fixed budget; DDPM's CIFAR-10 network has 35.7M parameters"),
    "tail_tanh": ("", "no published comparison; DDPM and ADM predict eps with an unbounded output, and a tanh "
                      "cannot reach the third of eps's values that lie outside (-1, 1)"),
    "data_range_0_1": ("", "no published numbers"),
    "baseline_clamp_off": ("", "no published numbers"),
    "baseline_trailing": ("", "Lin et al. 2024: trailing steps matter where a sampler would not start at the last "
                              "step; ours start there"),
    "path_B_learning_rate": ("helps", "EDM: retuning the hyperparameters alone, 3.01 -> 2.51"),
    "path_D_noise_cond": ("helps", "Sun et al. 2025: deterministic samplers such as DDIM need the noise "
                                   "level"),
    "path_E_ema": ("helps", EMA_FOUND),
    "path_F_groupnorm": ("", "no published comparison"),
    "path_G_linear_beta_t": ("", "no published comparison with uniform alpha-bar"),
}


# CIFAR-10 FID of one trained model by sampler and steps: DDIM Table 1 on DDPM's checkpoint (our
# DDPM sampler has the posterior variance, diffusers' fixed_small: that table's eta = 1 row), and
# DPM-Solver's own paper (another model).
SAMPLER_FID = {
    ("ddim", 10): 13.36, ("ddim", 20): 6.84, ("ddim", 50): 4.67, ("ddim", 100): 4.16, ("ddim", 1000): 4.04,
    ("ddpm", 10): 41.07, ("ddpm", 20): 18.36, ("ddpm", 50): 8.01, ("ddpm", 100): 5.78, ("ddpm", 1000): 4.73,
    ("dpm", 10): 4.70, ("dpm", 20): 2.87,
}
SAMPLER_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "dpm": "DPM-Solver"}


def published_fid(sampler, steps):
    """(FID, the steps it was published at): at `steps`, else at the nearest fewer steps; (None, None)."""
    known = [n for s, n in SAMPLER_FID if s == sampler and n <= steps]
    return (SAMPLER_FID[sampler, max(known)], max(known)) if known else (None, None)


def literature(scale):
    """LITERATURE, and for each re-sampling of the baseline what the published FIDs expect of it
    against the baseline's own sampler: hurts or helps beyond 15%, else none; no expectation where
    the two figures come from two papers' models."""
    b = baseline_config(scale)
    entries = dict(LITERATURE)
    entries.update({v.name: ("", BATCH_FOUND) for v in one_at_a_time_variants(b) if v.name.startswith("batch_")})
    mine, mine_at = published_fid(b.sampler, b.sampling_steps)
    for sampler, steps in SAMPLERS:
        name, (fid, at) = sampled_by("baseline", sampler, steps, b), published_fid(sampler, steps)
        if name == "baseline" or fid is None or mine is None:
            continue
        ratio = fid / mine
        words = lambda s, n, at: f"{SAMPLER_NAMES[s]} {n}" + (f" (its {at}-step figure)" if at != n else "")
        papers = (sampler, b.sampler).count("dpm")  # DPM-Solver's figures are its own paper's, on another model
        source = {0: "DDIM Table 1", 1: "DDIM Table 1 and DPM-Solver's paper: two models",
                  2: "DPM-Solver's paper, its own solver rather than our ++ 2M"}[papers]
        entries[name] = ("" if papers == 1 else "hurts" if ratio > 1.15 else "helps" if ratio < 1 / 1.15 else "none",
                         f"{words(sampler, steps, at)}: {fid:.2f}, against {mine:.2f} for "
                         f"{words(b.sampler, b.sampling_steps, mine_at)} ({source})")
    return entries


def variants(scale):
    """Every variant of the study, in the report's order, with the relative changes taken from
    the scale's baseline (ablate.py keeps the scale's subset)."""
    b = baseline_config(scale)
    one_at_a_time = one_at_a_time_variants(b)
    return [
        Variant("baseline", "baseline", seeds=BASELINE_SEEDS),
        *path_variants(scale, b),
        *tuning_variants(scale),
        *one_at_a_time,
        *sampling_variants(b),
        *peer_variants(b),
        *revised_variants(scale, one_at_a_time),
        *[Variant(f"evaluation_noise_{k}", "evaluation_noise", of="baseline", seeds=(0,),
                  eval_seed=scale.evaluation_seed + k, note=f"baseline seed 0, starting noise {scale.evaluation_seed + k}")
          for k in range(1, EVALUATION_NOISE_SEEDS + 1)],
    ]
