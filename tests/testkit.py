"""Small helpers shared by the tests: tiny image folders and running the project's scripts."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


def make_avatar_folder(directory, n, first_index=0):
    """n real 32x32 default-data-set avatars (a few ms each)."""
    sys.path.insert(0, os.path.join(REPO, "images"))
    from avatars import render_avatar
    os.makedirs(directory, exist_ok=True)
    for i in range(first_index, first_index + n):
        render_avatar(i).save(os.path.join(directory, f"{i}.png"))
    return str(directory)


def run(args, cwd=REPO, env=None, timeout=600):
    """Run a command; returns the CompletedProcess (text output, never raises on failure)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([str(a) for a in args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def run_script(script, *args, **kw):
    return run([PYTHON, os.path.join(REPO, script), *map(str, args)], **kw)


def tiny_train_args(train_dir, val_dir, run_dir, *extra):
    """train.py's flags for a tiny CPU run. Eager, fp32 and contiguous unless extra says otherwise:
    the same numbers on every machine, whatever speed.py would measure there, and no compiling."""
    return ["--preset", "tiny", "--train_dataset_directory", train_dir, "--validate_dataset_directory", val_dir,
            "--model_checkpoint_dir", run_dir, "--device", "cpu", "--no_visdom", "--precision", "fp32",
            "--layout", "contiguous", "--compile", "off", *map(str, extra)]


def one_line_error(result):
    """The stderr of a failed run, checked to be exactly one line and no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    return lines[0]
