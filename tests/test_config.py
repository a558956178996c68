import dataclasses
import os

import pytest

from config import Config, ConfigError, PRESETS, config_from_dict, config_to_dict, make_config


def test_seed_preset_is_the_dataclass_defaults():
    assert make_config("seed") == Config()
    assert Config().noise_cond == "none" and Config().learning_rate == 1e-5 and Config().batch_size == 230


def test_set_parses_each_type():
    c = make_config("tiny", ["norm=batch", "dropout=0.25", "batch_size=8", "hflip=true", "attention=(16, 8)",
                             "channels=(8,16,16,16)", "data_range=0,1"])
    assert (c.norm, c.dropout, c.batch_size, c.hflip, c.attention, c.channels, c.data_range) == \
        ("batch", 0.25, 8, True, (16, 8), (8, 16, 16, 16), "0,1")
    assert make_config("default", ["attention=none"]).attention == ()


@pytest.mark.parametrize("item, message", [
    ("colour=red", "unknown key"),
    ("norm=layer", "choose one of batch, group, none"),
    ("dropout=lots", "expected a float"),
    ("hflip=maybe", "expected a bool"),
    ("channels=(8,-1)", "expected a tuple"),
    ("norm", "is not KEY=VALUE"),
    ("batch_size=0", r"batch_size=0: must be in \[1, inf\)"),
    ("learning_rate=0", r"learning_rate=0: must be in \(0.0, inf\)"),
    ("dropout=1", r"dropout=1: must be in \[0.0, 1.0\)"),
    ("ema_decay=nan", r"ema_decay=nan: must be in \[0.0, 1.0\)"),
    ("sampling_steps=-5", r"sampling_steps=-5: must be in \[1, 1000\]"),
    ("sampling_steps=1001", r"sampling_steps=1001: must be in \[1, 1000\]"),  # the training schedule's 1,000 steps
    ("eta=1.5", r"eta=1.5: must be in \[0.0, 1.0\]"),  # DDIM's step variance would be negative
])
def test_bad_set_is_an_error(item, message):
    with pytest.raises(ConfigError, match=message):
        make_config("tiny", [item])


def test_the_bounds_themselves_where_allowed():
    c = make_config("tiny", ["dropout=0", "ema_decay=0", "batch_size=1", "warmup_steps=0", "eta=0", "grad_clip=0"])
    assert (c.dropout, c.ema_decay, c.batch_size) == (0.0, 0.0, 1)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="seed, default, small, tiny"):
        make_config("huge")


@pytest.mark.parametrize("preset", list(PRESETS))
def test_config_round_trips_through_a_plain_dict(preset):
    config = make_config(preset)
    assert config_from_dict(config_to_dict(config)) == config


# Every switch is read in one module (config.py's promise). A Config is always called `config`
# (or `self.config`), so reads are the attributes of such a name.
OWNERS = {
    "unet.py": ["arch", "channels", "noise_cond", "norm", "norm_groups", "act", "dropout", "down", "up", "attention",
                "tail", "bn_sampling_stats", "zero_init"],
    "dataset.py": ["data_range", "hflip"],
    "diffusion.py": ["noise_sampling", "target", "loss_weighting", "sampler", "sampling_steps", "sampling_schedule",
                     "eta", "clamp_x0", "zero_terminal_snr", "timestep_spacing"],
    "train.py": ["optimizer", "learning_rate", "weight_decay", "batch_size", "ema_decay", "warmup_steps", "grad_clip",
                 "lr_schedule"],
}


def config_reads(path):
    """(field, line) of every `config.<field>`, `self.config.<field>` or getattr(config, "<field>")."""
    import ast
    fields = {f.name for f in dataclasses.fields(Config)}
    is_config = lambda node: (isinstance(node, ast.Name) and "config" in node.id) or \
        (isinstance(node, ast.Attribute) and "config" in node.attr)
    reads = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Attribute) and node.attr in fields and is_config(node.value):
            reads.append((node.attr, node.lineno))
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and len(node.args) >= 2
              and is_config(node.args[0]) and isinstance(node.args[1], ast.Constant)):
            reads.append((node.args[1].value, node.lineno))
    return reads


def project_files():
    from testkit import REPO
    for folder in (REPO, os.path.join(REPO, "images"), os.path.join(REPO, "tools")):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py") and name != "config.py":
                yield os.path.relpath(os.path.join(folder, name), REPO)


def test_the_owners_cover_every_field_once():
    owned = [name for names in OWNERS.values() for name in names]
    assert sorted(owned) == sorted(f.name for f in dataclasses.fields(Config))


def test_every_field_is_read_in_its_owner_module_only():
    from testkit import REPO
    owner = {name: module for module, names in OWNERS.items() for name in names}
    strays, read = [], set()
    for path in project_files():
        for field, line in config_reads(os.path.join(REPO, path)):
            read.add(field)
            if owner[field] != path:
                strays.append(f"{path}:{line} reads config.{field}, which {owner[field]} owns")
    assert strays == []
    assert read == set(owner), f"never read: {set(owner) - read}"  # a switch nobody reads does nothing


def test_the_ownership_check_finds_a_stray_read(tmp_path):
    stray = tmp_path / "stray.py"
    stray.write_text("def f(config, model):\n    return model.config.norm, getattr(config, 'eta'), config.channels\n")
    assert sorted(config_reads(stray)) == [("channels", 2), ("eta", 2), ("norm", 2)]


def test_the_cpu_preset_is_the_defaults_recipe_at_a_cpu_width():
    """preset small (the cpu scale, train.py's choice without CUDA) differs from the default only in
    width, batch and the learning rate and warm-up that go with them: the same recipe."""
    from config import CPU_PRESET, config_to_dict
    small, default = config_to_dict(make_config(CPU_PRESET)), config_to_dict(make_config("default"))
    assert {k for k in small if small[k] != default[k]} == {"channels", "batch_size", "learning_rate", "warmup_steps"}
    assert small["channels"][0] < default["channels"][0] and small["batch_size"] < default["batch_size"]
