"""cli.py: one-line errors, flag checks, the device picker and the atomic write."""
import os

import pytest

import cli
from cli import UserError


def test_run_main_turns_a_user_error_into_one_line_and_status_2(capsys):
    def main(argv):
        raise UserError(f"--flag {argv[0]}: wrong; do this instead")
    with pytest.raises(SystemExit) as exit:
        cli.run_main(main, ["x"])
    assert exit.value.code == 2
    assert capsys.readouterr().err == "error: --flag x: wrong; do this instead\n"


@pytest.mark.parametrize("returned, code", [(None, 0), (0, 0), (130, 130)])
def test_run_main_passes_on_the_exit_status(returned, code):
    with pytest.raises(SystemExit) as exit:
        cli.run_main(lambda argv: returned)
    assert exit.value.code == code


def test_config_and_data_errors_are_user_errors():
    from config import ConfigError
    from dataset import DatasetError
    assert issubclass(ConfigError, UserError) and issubclass(DatasetError, UserError)


def parse(kind, text):
    parser = cli.ArgumentParser()
    parser.add_argument("--value", type=kind)
    return parser.parse_args(["--value", text]).value


@pytest.mark.parametrize("kind, text, expected", [
    (cli.positive_int, "3", 3), (cli.non_negative_int, "0", 0), (cli.positive_float, "1e-4", 1e-4),
    (cli.non_negative_float, "0", 0.0), (cli.port, "8097", 8097), (cli.parse_bool, "off", False),
    (cli.parse_bool, "True", True),
])
def test_flag_types_accept(kind, text, expected):
    assert parse(kind, text) == expected


@pytest.mark.parametrize("kind, text, message", [
    (cli.positive_int, "0", "argument --value: 0 must be at least 1 (see --help)"),
    (cli.positive_int, "1.5", "argument --value: '1.5' is not an integer (see --help)"),
    (cli.non_negative_int, "-1", "argument --value: -1 must be 0 or more (see --help)"),
    (cli.positive_float, "0", "argument --value: 0 must be positive (see --help)"),
    (cli.positive_float, "nan", "argument --value: nan must be positive (see --help)"),
    (cli.non_negative_float, "x", "argument --value: 'x' is not a number (see --help)"),
    (cli.port, "65536", "argument --value: 65536 is not a TCP port (1 to 65535) (see --help)"),
    (cli.positive_float, "inf", "argument --value: inf must be positive (see --help)"),
    (cli.random_seed, str(2 ** 32), f"argument --value: {2 ** 32} must be below 2**32 (see --help)"),
    (cli.random_seed, "-1", "argument --value: -1 must be 0 or more (see --help)"),
    (cli.parse_bool, "maybe", "argument --value: expected True or False (or 1/0), got 'maybe' (see --help)"),
])
def test_flag_types_refuse_in_one_line(kind, text, message):
    with pytest.raises(UserError) as error:
        parse(kind, text)
    assert str(error.value) == message


def test_make_folder_names_the_flag_and_path(tmp_path):
    assert cli.make_folder(str(tmp_path / "a" / "b"), "--out") == str(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("mine")
    with pytest.raises(UserError, match=f"--out {tmp_path / 'file' / 'x'}: cannot create this folder"):
        cli.make_folder(str(tmp_path / "file" / "x"), "--out")
    assert (tmp_path / "file").read_text() == "mine"


def test_output_file_is_checked_before_any_work(tmp_path):
    assert cli.output_file(str(tmp_path / "out.json"), "--output_json") == str(tmp_path / "out.json")
    with pytest.raises(UserError, match=f"--output_json {tmp_path / 'no' / 'out.json'}: its folder does not exist"):
        cli.output_file(str(tmp_path / "no" / "out.json"), "--output_json")
    with pytest.raises(UserError, match=f"--output_json {tmp_path}: is a folder"):
        cli.output_file(str(tmp_path), "--output_json")


def test_pick_device():
    import torch
    assert cli.pick_device("cpu") == torch.device("cpu")
    assert cli.pick_device("auto").type in ("cuda", "mps", "cpu")
    with pytest.raises(UserError, match="--device tpu: choose auto, cuda, cuda:N, cpu or mps"):
        cli.pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda: no CUDA GPU is visible"):
            cli.pick_device("cuda")


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with cli.atomic_write(path, "w") as f:
            f.write("half of the new")
            assert path.read_text() == "old"  # nothing is visible before the block ends
            raise RuntimeError("killed")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["file.txt"]
    with cli.atomic_write(path, "w", fsync=True) as f:
        f.write("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["file.txt"]
