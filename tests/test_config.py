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
])
def test_bad_set_is_an_error(item, message):
    with pytest.raises(ConfigError, match=message):
        make_config("tiny", [item])


def test_unknown_preset():
    with pytest.raises(ConfigError, match="seed, default, tiny"):
        make_config("huge")


@pytest.mark.parametrize("preset", list(PRESETS))
def test_config_round_trips_through_a_plain_dict(preset):
    config = make_config(preset)
    assert config_from_dict(config_to_dict(config)) == config
