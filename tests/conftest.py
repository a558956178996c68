"""Shared fixtures. Visdom: a real visdom server on a free loopback port, and one tiny training
run that logs to it (used by test_visdom.py and test_browser.py). And the suite's split over
pytest-xdist workers (bash test.sh runs two)."""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The suite's own compile cache and speed ledger (speed.py), for every test and the scripts they
# start: timings measured under the suite's load must not become what a user's runs read, and no
# test may depend on what a user's ledger holds. (Each xdist worker has its own.)
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="simple_ddpm_tests_cache_")

# Under xdist the workers share the cores: each worker, and every script its tests start, gets
# cores / workers CPU threads (1 each on 2 cores). Two threads a worker would oversubscribe the
# cores, and torch's threads spin while they wait for each other. OMP_NUM_THREADS set by hand wins.
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(max(1, cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    import torch
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Under xdist (bash test.sh: -n 2) each test goes to whichever worker is free, except that the tests
# of these files go together to one worker: they share a costly module or session fixture (a trained
# checkpoint, a tiny pipeline, an attribute network, a visdom server and run, a 2-process run, a
# first timed run) that another worker would build again, and test_gpu.py's share the one GPU.
# test_train.py's module fixture (80 avatars, under a second) is cheap, so its tests, the suite's
# longest file, spread over both workers.
TOGETHER = {"test_generate.py": "generate", "test_evaluate.py": "evaluate", "test_attribute_net.py": "attribute_net",
            "test_avatars.py": "avatars", "test_generate_image.py": "generate_image", "test_gpu.py": "gpu",
            "test_distributed.py": "distributed", "test_speed.py": "speed", "test_visdom.py": "visdom",
            "test_browser.py": "visdom"}


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # tryfirst: before xdist's own schedulers
def pytest_xdist_make_scheduler(config, log):
    """xdist's scope scheduling (a unit at a time to a free worker, the largest units first), with
    TOGETHER's files as units and every other test a unit of its own. (Not --dist loadgroup with
    xdist_group marks: with pytest 9.2 it silently stops grouping, pytest-xdist issue 1386.)"""
    if config.getvalue("dist") != "load":  # another --dist asked for by hand
        return None
    from xdist.scheduler import LoadScopeScheduling

    class TogetherScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return TOGETHER.get(os.path.basename(nodeid.split("::")[0]), nodeid)

    return TogetherScheduling(config, log)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VisdomServer:
    """`python -m visdom.server` bound to 127.0.0.1. Its environment points every proxy at a
    closed port, so a server that tried to fetch its front-end from a CDN would log errors."""

    def __init__(self, directory, port=None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env_path = os.path.join(directory, "envs")
        self.log_path = os.path.join(directory, "visdom_server.log")
        self.proc = None

    def start(self, timeout=60):
        from visdom_logger import server_answers
        dead = "http://127.0.0.1:9"
        env = dict(os.environ, PYTHONUNBUFFERED="1", http_proxy=dead, https_proxy=dead, HTTP_PROXY=dead,
                   HTTPS_PROXY=dead, no_proxy="", NO_PROXY="")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "visdom.server", "-port", str(self.port), "-bind_local",
                                          "-env_path", self.env_path], stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while not server_answers(self.port):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                pytest.fail(f"visdom server did not start on port {self.port}:\n{self.log()[-2000:]}")
            time.sleep(0.2)
        return self

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def window(self, env, win):
        """A window's data as the server holds it, read through visdom's own client."""
        import visdom
        client = visdom.Visdom(server="http://127.0.0.1", port=self.port, env=env, use_incoming_socket=False,
                               raise_exceptions=True)
        return json.loads(client.get_window_data(win, env=env))


@pytest.fixture
def visdom_server_factory(tmp_path):
    """Start (and later stop) as many servers as a test needs: factory(port=None)."""
    servers = []

    def start(port=None):
        directory = tmp_path / f"visdom{len(servers)}"
        directory.mkdir()
        servers.append(VisdomServer(str(directory), port).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def visdom_server(tmp_path_factory):
    server = VisdomServer(str(tmp_path_factory.mktemp("visdom"))).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def visdom_image_dirs(tmp_path_factory):
    """8 train and 8 validation avatars (32x32 PNG)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from testkit import make_avatar_folder
    root = tmp_path_factory.mktemp("visdom_data")
    return make_avatar_folder(root / "train", 8), make_avatar_folder(root / "val", 8, first_index=1_000_000)


@pytest.fixture(scope="session")
def visdom_train_command(visdom_image_dirs):
    """command(run_dir, port, *extra): the train.py command line of a tiny CPU run, batches of 4
    (2 steps an epoch), that logs to visdom."""
    if not os.path.exists(os.path.join(REPO, "train.py")):
        pytest.skip("train.py is not written yet")

    def command(run_dir, port, *extra):
        return [sys.executable, os.path.join(REPO, "train.py"), "--preset", "tiny",
                "--train_dataset_directory", visdom_image_dirs[0], "--validate_dataset_directory", visdom_image_dirs[1],
                "--model_checkpoint_dir", str(run_dir), "--device", "cpu", "--batch_size", "4",
                "--precision", "fp32", "--layout", "contiguous", "--compile", "off",  # as testkit.tiny_train_args
                "--visdom_port", str(port), *map(str, extra)]
    return command


@pytest.fixture(scope="session")
def visdom_trained_run(visdom_server, visdom_train_command, tmp_path_factory):
    """train.py --preset tiny for one epoch of 2 steps and a validation, logging every step to
    visdom. Returns (server, run_dir, run name, the finished process)."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny_visdom_run"
    result = subprocess.run(visdom_train_command(run_dir, visdom_server.port, "--log_every", 1, "--validate_every", 1,
                                                 "--num_epochs", 1),
                            cwd=REPO, capture_output=True, text=True, timeout=900,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return visdom_server, str(run_dir), os.path.basename(run_dir), result
