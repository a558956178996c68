"""torchrun with DistributedDataParallel, on the CPU with 2 processes (gloo)."""
import contextlib
import json
import os
import re
import signal
import subprocess
import time

import pytest
import torch

from testkit import PYTHON, REPO, make_avatar_folder, run, tiny_train_args

pytestmark = pytest.mark.slow  # every test here runs train.py under torchrun


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_avatar_folder(tmp_path_factory.mktemp("ddp") / "train", 64)


def train(images, run_dir, processes, *extra):
    launcher = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
        if processes > 1 else [PYTHON]
    result = run([*launcher, os.path.join(REPO, "train.py"),
                  *tiny_train_args(images, images, str(run_dir), "--log_every", 1, *extra)])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        losses = [r["train_loss"] for r in map(json.loads, f) if r["kind"] == "train"]
    return losses, torch.load(os.path.join(run_dir, "latest_model.pth"), weights_only=True)


@pytest.fixture(scope="module")
def two_processes_six_steps(images, tmp_path_factory):
    """One 2-process run of 6 steps, for the two tests below (each torchrun costs about 10 s):
    (losses, checkpoint, run folder). Neither test writes into its folder."""
    run_dir = tmp_path_factory.mktemp("ddp_two")
    return (*train(images, run_dir, 2, "--max_steps", 6), run_dir)


def test_two_processes_train_like_one_with_the_same_global_batch(images, two_processes_six_steps, tmp_path):
    one, one_ckpt = train(images, tmp_path / "one", 1, "--max_steps", 6)
    two, two_ckpt, two_dir = two_processes_six_steps
    # Each process draws the whole batch's noise and keeps its half, and gradients are averaged:
    # the same maths, summed in another order. Measured here: losses agree to 1e-6.
    assert two == pytest.approx(one, rel=1e-4)
    assert sorted(os.listdir(two_dir)) == sorted(os.listdir(tmp_path / "one"))  # rank 0 alone writes
    diffs = torch.cat([(one_ckpt["model"][k].float() - two_ckpt["model"][k].float()).flatten() for k in one_ckpt["model"]])
    # Adam's first steps move each weight by about +-lr whatever the gradient's size, so a weight
    # whose gradient is ~0 may go either way; all but a few of them agree closely.
    assert (diffs.abs() < 1e-4).float().mean() > 0.99


def test_two_processes_resume_exactly(images, two_processes_six_steps, tmp_path):
    straight, a, _ = two_processes_six_steps
    train(images, tmp_path / "resumed", 2, "--max_steps", 3)
    resumed, b = train(images, tmp_path / "resumed", 2, "--max_steps", 6)
    assert resumed == straight
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_processes_stop_together_on_the_clock(images, tmp_path):
    # Each process reads its own clock; they agree at the log steps (every 2 here) and stop there
    # together. (Processes in lock-step rarely disagree, so this mostly shows the stop is clean; the
    # test below forces a disagreement.)
    losses, checkpoint = train(images, tmp_path, 2, "--max_minutes", 0.05, "--num_epochs", 100000, "--log_every", 2)
    assert checkpoint["step"] % 2 == 0 and checkpoint["step"] == 2 * len(losses)


def descendants(pid):
    """The ids of every process below pid, read from /proc."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])  # the field after the state
        except OSError:
            continue  # exited meanwhile
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def proc_file(pid, name):
    """/proc/<pid>/<name> as a list of its NUL-separated items; empty once the process has gone."""
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="finds the workers through Linux's /proc")
def test_an_interrupt_of_one_process_stops_every_process_at_the_next_log_step(images, tmp_path):
    # Only the rank-1 worker gets the Ctrl-C, a few steps before a log step; rank 0 never sees it.
    # Without agree_on_stop rank 1 leaves alone at the log step, and rank 0 waits for it at its next
    # collective (on the CPU, gloo notices the closed connection and rank 0 fails; elsewhere it may
    # wait forever): rank 0 never says "stopped: interrupted" nor writes a checkpoint at a log step.
    log_every, run_dir = 10, tmp_path / "run"
    command = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", os.path.join(REPO, "train.py"),
               *tiny_train_args(images, images, str(run_dir), "--log_every", log_every, "--num_epochs", 100000,
                                "--validate_every", 100000, "--save_every", 1)]
    output_path = tmp_path / "output.txt"
    with open(output_path, "w") as output:
        launcher = subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
                                    env=dict(os.environ, PYTHONUNBUFFERED="1"))
    read_output = lambda: output_path.read_text(errors="replace")
    workers, survivors = {}, []
    try:
        # 64 images in batches of 16: 4 steps an epoch. The first epoch's checkpoint (step 4, with
        # --save_every 1) shows both workers are in the loop, with their signal handlers set, 6 steps
        # before a log step.
        deadline = time.time() + 300
        while not (run_dir / "latest_model.pth").exists():
            assert launcher.poll() is None and time.time() < deadline, read_output()[-4000:]
            time.sleep(0.05)
        workers = {rank: pid for pid in descendants(launcher.pid) for rank in (b"0", b"1")
                   if b"RANK=" + rank in proc_file(pid, "environ")
                   and any(arg.endswith(b"train.py") for arg in proc_file(pid, "cmdline"))}
        assert set(workers) == {b"0", b"1"}, workers
        logged = logged_steps(run_dir)  # rank 1 has passed the stop check of each logged step
        os.kill(workers[b"1"], signal.SIGINT)
        try:
            returncode = launcher.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the processes did not stop within 120 s of rank 1's interrupt:\n{read_output()[-4000:]}")
    finally:
        # torchrun starts each worker in a session of its own: kill the launcher and each worker.
        survivors = [pid for pid in {*workers.values(), *descendants(launcher.pid)} if alive(pid)]
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for pid in survivors:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    output = read_output()
    assert survivors == [], output[-4000:]
    assert "stopped: interrupted" in output, output[-4000:]  # printed by rank 0 alone, which only rank 1 was told
    # The workers return 130 (interrupted); torchrun reports a worker's non-zero status as its own 1.
    assert returncode == 1 and re.search(r"exitcode\s*:\s*130", output), output[-4000:]
    checkpoint = torch.load(run_dir / "latest_model.pth", weights_only=True)
    # The stop comes at the first or, if rank 1 had already passed it, the second log step after the
    # last one logged before the interrupt (rank 0 logs a step after every process has checked it).
    last = max(logged, default=0)
    assert checkpoint["step"] in (last + log_every, last + 2 * log_every), (checkpoint["step"], logged)
    train_steps = logged_steps(run_dir)
    assert train_steps[-1] == checkpoint["step"] and all(step % log_every == 0 for step in train_steps), train_steps


def logged_steps(run_dir):
    """The steps of the train records in log.jsonl so far (a line being written is left out)."""
    steps = []
    with contextlib.suppress(FileNotFoundError), open(run_dir / "log.jsonl") as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                if record["kind"] == "train":
                    steps.append(record["step"])
    return steps
