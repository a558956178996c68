"""Visdom: offline front-end files, the loopback-only server, the logger train.py uses, its
survival when the server comes and goes, and the replay of a run's log."""
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests
import torch

from visdom_logger import VisdomLogger, smooth

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, env=None, timeout=120):
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))


def traces(window):
    return {t["name"]: t for t in window["content"]["data"]}


def read_records(run_dir, kind):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def wait_for(condition, timeout, what):
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def fake_training(logger, first_step, last_step, batch=16, validate_every=4):
    """What train.py does, without a model: returns the (images_seen, loss) pairs logged."""
    logged = []
    for step in range(first_step, last_step + 1):
        loss = 1 / math.sqrt(step)
        logger.log_train(step * batch, loss, 1e-3, 100.0 + step)
        logged.append((step * batch, loss))
        if step % validate_every == 0:
            logger.log_validation(step * batch, 0.9 * loss, 0.8 * loss,
                                  torch.full((4, 3, 32, 32), step % 256, dtype=torch.uint8))
    return logged


# ---- the front-end files ------------------------------------------------------------------------

@pytest.mark.slow
def test_front_end_files_are_the_ones_build_py_lists():
    import visdom
    from visdom.utils.shared_utils import get_visdom_path
    result = run([sys.executable, "tools/visdom_assets.py", "--check"])
    assert result.returncode == 0, result.stderr
    static = get_visdom_path("static")
    with open(os.path.join(static, "version.built")) as f:
        assert f.read().strip() == visdom.__version__
    # Every file visdom's own build.py would download, at the path it would use.
    with open(get_visdom_path("server/build.py")) as f:
        build_py = f.read()
    names = re.findall(r'% ?[bB]{1,2}\s*:\s*"([^"]+)"|"(?:https?://[^"]+)":\s*"([^"]+)"', build_py)
    names = [a or b for a, b in names]
    mathjax = re.findall(r'"((?:config|extensions|jax)/[^"?]+|MathJax\.js)\?', build_py)
    assert len(names) == 21 and len(mathjax) == 8, (names, mathjax)
    for name in names:
        sub = "js" if name.endswith((".js", ".js.map")) else "css" if name.endswith(".css") else "fonts"
        path = os.path.join(static, sub, name)
        assert os.path.getsize(path) > 100, path
    for name in mathjax:
        assert os.path.getsize(os.path.join(static, "js", "mathjax", "2.7.5", name)) > 100, name
    with open(os.path.join(static, "js", "plotly-plotly.min.js")) as f:
        assert "2.11.1" in f.read(300)


@pytest.mark.slow
def test_front_end_install_is_idempotent_and_fast():
    start = time.time()
    result = run([sys.executable, "tools/visdom_assets.py"])
    assert result.returncode == 0 and "complete" in result.stdout, result.stdout + result.stderr
    assert time.time() - start < 10


@pytest.mark.slow
def test_a_failed_fetch_is_an_install_error(tmp_path):
    result = run([sys.executable, "tools/visdom_assets.py", "--static_dir", str(tmp_path), "--tries", "1"],
                 env={"NPM_CONFIG_REGISTRY": "http://127.0.0.1:9"})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("visdom_assets: error: ") and "cannot fetch" in lines[0], result.stderr
    assert not (tmp_path / "version.built").exists()
    # and a check of that folder fails too
    assert run([sys.executable, "tools/visdom_assets.py", "--static_dir", str(tmp_path), "--check"]).returncode == 1


def test_the_check_notices_a_damaged_file(tmp_path):
    import shutil
    from visdom.utils.shared_utils import get_visdom_path
    static = tmp_path / "static"
    shutil.copytree(get_visdom_path("static"), static)
    check = [sys.executable, "tools/visdom_assets.py", "--static_dir", str(static), "--check"]
    assert run(check).returncode == 0
    with open(static / "js" / "plotly-plotly.min.js", "r+b") as f:
        f.truncate(1000)  # a download cut short
    result = run(check)
    assert result.returncode == 1
    assert result.stderr.strip() == ("visdom_assets: incomplete: js/plotly-plotly.min.js has the wrong size; "
                                     "run: python tools/visdom_assets.py")


def test_the_server_serves_every_page_file_without_internet(visdom_server):
    page = requests.get(visdom_server.url + "/", timeout=10)
    assert page.status_code == 200 and "<title>visdom</title>" in page.text
    assets = re.findall(r'(?:src|href)=["\']?(/(?:static|user)/[^"\'\s>]+)', page.text)
    assert len(assets) >= 15, assets
    for asset in assets:
        response = requests.get(visdom_server.url + asset, timeout=10)
        assert response.status_code == 200, asset
        assert len(response.content) > 0 or asset.startswith("/user/"), asset  # user CSS is empty by default
    assert "while downloading" not in visdom_server.log(), visdom_server.log()


# ---- the launcher's server: loopback only ---------------------------------------------------------

def listening_addresses(port):
    """Local addresses of the sockets listening on `port`, from /proc/net/tcp{,6}."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:
                    found.append(address)
    return found


def non_loopback_address():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent; this only picks the outgoing interface
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


@pytest.mark.slow
def test_start_visdom_listens_on_loopback_only_and_stays_up(tmp_path):
    from visdom_logger import server_answers
    from conftest import free_port
    port = free_port()
    env = {"VISDOM_LOG": str(tmp_path / "visdom.log"), "VISDOM_ENV_PATH": str(tmp_path / "envs")}
    result = run(["bash", "tools/start_visdom.sh", str(port)], env=env)
    pid = int((tmp_path / "visdom.log.pid").read_text())
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"visdom: started at http://localhost:{port}" in result.stdout
        assert f"ssh -L {port}:localhost:{port}" in result.stdout
        assert server_answers(port)  # the script returned; the server stays up
        if not os.path.exists("/proc/net/tcp"):
            pytest.skip("no /proc/net/tcp to read the bound address from")
        assert listening_addresses(port) == ["0100007F"]  # 127.0.0.1, and no IPv6 or wildcard socket
        address = non_loopback_address()
        if address is not None:
            with pytest.raises(OSError):
                socket.create_connection((address, port), timeout=2).close()
        again = run(["bash", "tools/start_visdom.sh", str(port)], env=env)
        assert again.returncode == 0 and "already running" in again.stdout
        assert "It's Alive!" in (tmp_path / "visdom.log").read_text()
    finally:
        os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_start_visdom_rejects_a_bad_port():
    result = run(["bash", "tools/start_visdom.sh", "80a"])
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "start_visdom.sh: port must be a number from 1 to 65535, got '80a'"]


# ---- the logger -----------------------------------------------------------------------------------

def test_logger_windows_hold_every_point(visdom_server):
    env = "fake_run_points"
    logger = VisdomLogger(port=visdom_server.port, env=env)
    assert logger.online
    logger.log_config({"preset": "tiny", "learning_rate": 1e-3, "note": "<b>escaped</b>"})
    logged = fake_training(logger, 1, 12)
    loss = traces(visdom_server.window(env, "loss"))
    assert loss["train (smoothed)"]["x"] == [images / 1e3 for images, _ in logged]
    assert loss["train (smoothed)"]["y"] == pytest.approx(smooth([value for _, value in logged]))
    assert loss["validation"]["x"] == [0.064, 0.128, 0.192]
    assert loss["validation"]["y"][-1] == pytest.approx(0.9 / math.sqrt(12))
    assert loss["validation (EMA weights)"]["y"][-1] == pytest.approx(0.8 / math.sqrt(12))
    assert visdom_server.window(env, "loss")["title"] == f"{env}: loss"
    assert traces(visdom_server.window(env, "lr"))["learning rate"]["y"] == [1e-3] * 12
    assert traces(visdom_server.window(env, "throughput"))["img/s"]["y"][-1] == 112.0
    samples = visdom_server.window(env, "samples")
    assert samples["content"]["src"].startswith("data:image/png;base64,")
    assert samples["title"] == f"{env}: EMA samples after 192 images"
    config = visdom_server.window(env, "config")["content"]
    assert "&quot;learning_rate&quot;: 0.001" in config and "&lt;b&gt;escaped" in config


def test_a_resumed_run_continues_its_windows_and_a_fresh_run_replaces_them(visdom_server):
    env = "fake_run_resumed"
    first = fake_training(VisdomLogger(port=visdom_server.port, env=env), 1, 8)
    # resumed from a checkpoint at step 5: steps 6 to 8 are trained, and logged, again
    second = fake_training(VisdomLogger(port=visdom_server.port, env=env), 6, 9)
    loss = traces(visdom_server.window(env, "loss"))
    assert loss["train (smoothed)"]["x"] == [images / 1e3 for images, _ in first[:5] + second]
    # the smoothing goes on where it stopped: the curve equals a replay of the resumed run's log
    assert loss["train (smoothed)"]["y"] == pytest.approx(smooth([value for _, value in first[:5] + second]))
    assert loss["validation"]["x"] == [0.064, 0.128]  # step 4 kept, step 8 logged again
    fresh = fake_training(VisdomLogger(port=visdom_server.port, env=env), 1, 3)  # --fresh in the same folder
    assert traces(visdom_server.window(env, "loss"))["train (smoothed)"]["x"] == [i / 1e3 for i, _ in fresh]
    assert "validation" not in traces(visdom_server.window(env, "loss"))


def test_a_diverged_loss_does_not_break_logging(visdom_server):
    env = "fake_run_nan"
    logger = VisdomLogger(port=visdom_server.port, env=env)
    logger.log_train(16, 0.5, 1e-3, 10.0)
    logger.log_train(32, float("nan"), 1e-3, 10.0)
    logger.log_train(48, 0.25, 1e-3, 10.0)
    assert logger.online
    y = traces(visdom_server.window(env, "loss"))["train (smoothed)"]["y"]
    assert y[0] == 0.5 and y[1] is None and y[2] == pytest.approx(smooth([0.5, 0.25])[-1])
    assert y == pytest.approx(smooth([0.5, float("nan"), 0.25]))


def test_no_server_costs_one_warning_line_and_no_time(capfd):
    from conftest import free_port
    start = time.time()
    logger = VisdomLogger(port=free_port(), env="nobody_listens")
    logger.log_config({"a": 1})
    fake_training(logger, 1, 40)
    assert time.time() - start < 5
    assert not logger.online
    err = capfd.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("warning: no visdom server answers"), err


def test_a_disabled_logger_says_and_sends_nothing(capfd, visdom_server):
    logger = VisdomLogger(port=visdom_server.port, env="disabled_run", enabled=False)  # --no_visdom
    logger.log_config({"a": 1})
    fake_training(logger, 1, 8)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    envs = json.loads(requests.post(f"{visdom_server.url}/env_state", data="{}", timeout=5).text)
    assert isinstance(envs, list) and "disabled_run" not in envs


def test_a_hung_server_blocks_training_only_briefly(capfd):
    """A server that accepts connections and never answers: each try costs one timeout, and
    tries back off, so 40 steps take seconds, not minutes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(50)
    accepted = []

    def accept_and_say_nothing():
        try:
            while True:
                accepted.append(listener.accept())
        except OSError:  # the listener was closed
            pass
    threading.Thread(target=accept_and_say_nothing, daemon=True).start()
    start = time.time()
    logger = VisdomLogger(port=listener.getsockname()[1], env="hung")
    fake_training(logger, 1, 40)
    assert time.time() - start < 3 * sum(VisdomLogger.timeout) + 2
    assert not logger.online
    listener.close()


@pytest.mark.slow
def test_logging_resumes_after_the_server_is_killed_and_restarted(visdom_server_factory, capfd):
    env = "fake_run_restart"
    server = visdom_server_factory()
    logger = VisdomLogger(port=server.port, env=env)
    before = fake_training(logger, 1, 6)
    server.stop()
    start = time.time()
    while_down = fake_training(logger, 7, 12)  # the server is gone: nothing raises, nothing waits
    assert time.time() - start < 3 and not logger.online
    server.start()
    time.sleep(max(0.0, logger._retry_at - time.monotonic()) + 0.1)  # the logger's next try is due
    after = fake_training(logger, 13, 16)
    assert logger.online
    # The new server had nothing; the logger drew every point again, the missed ones included.
    x = traces(server.window(env, "loss"))["train (smoothed)"]["x"]
    assert x == [images / 1e3 for images, _ in before + while_down + after]
    assert server.window(env, "samples")["title"] == f"{env}: EMA samples after 256 images"
    err = capfd.readouterr().err
    assert "lost the visdom server" in err and "visdom: connected" in err


# ---- with train.py --------------------------------------------------------------------------------

@pytest.mark.slow
def test_training_logs_every_record_to_visdom(visdom_trained_run):
    server, run_dir, name, result = visdom_trained_run
    train, validation = read_records(run_dir, "train"), read_records(run_dir, "validation")
    assert len(train) == 2 and len(validation) == 1
    assert f"visdom: live plots at http://127.0.0.1:{server.port}/env/{name}" in result.stdout
    loss = traces(server.window(name, "loss"))
    # x: thousands of images seen, one point per log.jsonl record
    assert loss["train (smoothed)"]["x"] == [r["images_seen"] / 1e3 for r in train]
    assert loss["train (smoothed)"]["y"][-1] == pytest.approx(smooth([r["train_loss"] for r in train])[-1])
    assert loss["validation"]["x"] == [r["images_seen"] / 1e3 for r in validation]
    assert loss["validation"]["y"][-1] == validation[-1]["val_loss"]
    assert loss["validation (EMA weights)"]["y"][-1] == validation[-1]["val_loss_ema"]
    assert traces(server.window(name, "lr"))["learning rate"]["y"] == [r["lr"] for r in train]
    assert traces(server.window(name, "throughput"))["img/s"]["y"] == pytest.approx([r["img_per_s"] for r in train])
    samples = server.window(name, "samples")
    assert samples["title"] == f"{name}: EMA samples after {validation[-1]['images_seen']:,} images"
    assert samples["content"]["src"].startswith("data:image/png;base64,")
    assert "&quot;batch_size&quot;: 4" in server.window(name, "config")["content"]


@pytest.mark.slow
def test_training_previews_samples_between_validations(visdom_server, visdom_train_command, tmp_path):
    """--preview_minutes: the samples pane shows the EMA's samples during training, long before the
    first validation (here at epoch 100,000), so that a CPU run shows samples within minutes."""
    run_dir = tmp_path / "preview_run"
    process = subprocess.Popen(visdom_train_command(run_dir, visdom_server.port, "--num_epochs", 100_000,
                                                    "--validate_every", 100_000, "--preview_minutes", 0.001),
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples, deadline = None, time.time() + 300
    try:
        while samples is None and time.time() < deadline and process.poll() is None:
            time.sleep(1)
            try:
                samples = visdom_server.window("preview_run", "samples")
            except Exception:  # the window is not there yet
                pass
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    assert samples is not None, stderr[-3000:]
    assert re.fullmatch(r"preview_run: EMA samples after [\d,]+ images", samples["title"])
    assert samples["content"]["src"].startswith("data:image/png;base64,")
    with open(run_dir / "log.jsonl") as f:
        assert not [r for r in map(json.loads, f) if r["kind"] == "validation"]  # the samples came from a preview


def test_training_survives_the_server_being_killed_and_restarted(visdom_server_factory, visdom_train_command, tmp_path):
    server = visdom_server_factory()
    run_dir = tmp_path / "restarted_run"
    trainer = subprocess.Popen(visdom_train_command(run_dir, server.port, "--num_epochs", 100000,
                                                    "--log_every", 1, "--validate_every", 100000),
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        count = lambda: len(read_records(run_dir, "train")) if (run_dir / "log.jsonl").exists() else 0
        wait_for(lambda: count() >= 1, 300, "the first train record")
        server.stop()
        killed_at = count()
        wait_for(lambda: count() >= killed_at + 1, 300, "training to go on without a server")
        server.start()
        restarted_at = count()

        def arrived_after_restart():
            try:
                x = traces(server.window("restarted_run", "loss"))["train (smoothed)"]["x"]
            except Exception:
                return False
            return len(x) > restarted_at
        wait_for(arrived_after_restart, 300, "points logged after the restart to arrive")
        assert trainer.poll() is None, "training stopped"
        trainer.send_signal(signal.SIGINT)  # train.py saves a checkpoint and stops
        out, err = trainer.communicate(timeout=120)
    finally:
        if trainer.poll() is None:
            trainer.kill()
    assert trainer.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert "lost the visdom server" in err and "visdom: connected" in err
    assert (run_dir / "latest_model.pth").exists()
    # Nothing lost: the server holds every record of the log, those from while it was down included.
    train = read_records(run_dir, "train")
    x = traces(server.window("restarted_run", "loss"))["train (smoothed)"]["x"]
    assert x == [r["images_seen"] / 1e3 for r in train]


# ---- replaying a log ------------------------------------------------------------------------------

def write_log(path, run="replayed_run", steps=30, validate_every=10):
    records = [{"kind": "config", "run": run, "config": {"preset": "tiny", "batch_size": 16}}]
    for step in range(1, steps + 1):
        records.append({"kind": "train", "step": step, "epoch": step // 10, "images_seen": 16 * step,
                        "train_loss": 1 / step, "lr": 1e-3, "img_per_s": 50.0 + step, "time": step / 10})
        if step % validate_every == 0:
            records.append({"kind": "validation", "step": step, "epoch": step // 10, "images_seen": 16 * step,
                            "val_loss": 2 / step, "val_loss_ema": 1.5 / step})
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return records


@pytest.mark.slow
def test_plot_log_replays_a_run_into_visdom_and_png(visdom_server, tmp_path):
    log = tmp_path / "log.jsonl"
    records = write_log(log)
    for _ in range(2):  # a second replay replaces, it does not add points
        result = run([sys.executable, "plot_log.py", str(log), "--visdom_port", str(visdom_server.port)])
        assert result.returncode == 0, result.stderr
    assert f"replayed 33 records into http://127.0.0.1:{visdom_server.port}/env/replayed_run" in result.stdout
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    loss = traces(visdom_server.window("replayed_run", "loss"))
    train = [r for r in records if r["kind"] == "train"]
    assert loss["train (smoothed)"]["x"] == [r["images_seen"] / 1e3 for r in train]
    assert loss["train (smoothed)"]["y"][-1] == pytest.approx(smooth([r["train_loss"] for r in train])[-1])
    assert loss["validation"]["x"] == [0.16, 0.32, 0.48] and loss["validation"]["y"][-1] == 2 / 30
    assert "&quot;batch_size&quot;: 16" in visdom_server.window("replayed_run", "config")["content"]


@pytest.mark.slow
def test_plot_log_replay_needs_a_server_when_a_port_is_named(tmp_path):
    from conftest import free_port
    log = tmp_path / "log.jsonl"
    write_log(log)
    port = free_port()
    result = run([sys.executable, "plot_log.py", str(log), "--visdom_port", str(port)])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: no visdom server answers on port {port}: start one with: bash tools/start_visdom.sh {port}"]
    assert (tmp_path / "loss_curve.png").exists()  # the PNG is written all the same


def test_plot_log_bad_paths_are_one_line_errors(tmp_path):
    import plot_log
    from cli import UserError
    log = tmp_path / "log.jsonl"
    log.write_text('{"kind": "train", "step": 1, "images_seen": 16, "train_loss": 1.0, "lr": 0.001, "img_per_s": 9}\n')
    with pytest.raises(UserError, match=f"--png {tmp_path / 'none' / 'curve.png'}: its folder does not exist"):
        plot_log.main([str(log), "--png", str(tmp_path / "none" / "curve.png"), "--no_visdom"])
    with pytest.raises(UserError, match=f"{tmp_path / 'missing.jsonl'} does not exist"):
        plot_log.main([str(tmp_path / "missing.jsonl"), "--no_visdom"])
    with pytest.raises(UserError, match="argument --visdom_port: 0 must be at least 1"):
        plot_log.main([str(log), "--visdom_port", "0"])
    assert os.listdir(tmp_path) == ["log.jsonl"]
