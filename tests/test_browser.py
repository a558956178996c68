"""The visdom tab in a real browser. Headless Chromium, driven over the DevTools protocol, opens a
tiny training run's env: every script loads (offline, from visdom's static folder), and the page
draws the loss plot (plotly) under the run's title. The test saves a screenshot; with
VISDOM_SCREENSHOT=docs/visdom_tab.png it also writes that file. docs/visdom_tab.png itself shows a
longer tiny run, pictured with this module's open_env() and save_screenshot() (see
docs/watching_training.md).
Without Chromium the test is skipped, and fails when CI=true."""
import base64
import io
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser():
    for name in BROWSERS:
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("Chromium is missing: install the Debian package chromium (.ci/run does)")
    pytest.skip("no Chromium here (apt-get install chromium); with CI=true this test fails instead")


class Browser:
    """Headless Chromium and one page, spoken to over the DevTools protocol with websocket-client
    (a dependency of visdom). Every protocol event is kept in `events`."""

    def __init__(self, executable, profile, width=1400, height=1000):
        import websocket
        os.makedirs(profile, exist_ok=True)
        self.log_path = os.path.join(profile, "chromium.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}",
                 "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                 f"--window-size={width},{height}", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        port_file = os.path.join(profile, "DevToolsActivePort")
        deadline = time.time() + 60
        page = None
        while page is None:
            if self.proc.poll() is not None or time.time() > deadline:
                self.close()
                with open(self.log_path, errors="replace") as f:
                    pytest.fail(f"Chromium did not start:\n{f.read()[-2000:]}")
            try:
                with open(port_file) as f:
                    port = int(f.readline())
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as response:
                    page = next(t for t in json.load(response) if t["type"] == "page")
            except (OSError, ValueError, StopIteration):
                time.sleep(0.2)
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        self.next_id, self.events = 0, []
        for domain in ("Page", "Network", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def failed_loads(self):
        """URL and reason of every request that failed or answered 4xx/5xx."""
        urls = {e["params"]["requestId"]: e["params"]["request"]["url"]
                for e in self.events if e.get("method") == "Network.requestWillBeSent"}
        failed = [(urls.get(e["params"]["requestId"], "?"), e["params"].get("errorText"))
                  for e in self.events if e.get("method") == "Network.loadingFailed"]
        failed += [(e["params"]["response"]["url"], e["params"]["response"]["status"])
                   for e in self.events if e.get("method") == "Network.responseReceived"
                   and e["params"]["response"]["status"] >= 400]
        return failed

    def script_errors(self):
        return [e["params"]["exceptionDetails"].get("exception", {}).get("description")
                or e["params"]["exceptionDetails"].get("text")
                for e in self.events if e.get("method") == "Runtime.exceptionThrown"]

    def requested(self):
        return [(e["params"]["request"]["url"], e["params"].get("type"))
                for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def close(self):
        if getattr(self, "ws", None) is not None:
            try:
                self.call("Browser.close")
            except Exception:
                pass
            self.ws.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:  # Chromium's helper processes are in the session it started
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


# The state of the page: the panes' titles, and what the loss pane holds.
PAGE_STATE = """(() => {
  const panes = [...document.querySelectorAll('.react-grid-item')];
  const title = p => (p.querySelector('.bar .pull-right:not(button)') || {}).textContent || '';
  const loss = panes.find(p => title(p) === %s);
  const box = panes.reduce((b, p) => { const r = p.getBoundingClientRect();
    return [Math.min(b[0], r.left), Math.min(b[1], r.top), Math.max(b[2], r.right), Math.max(b[3], r.bottom)]; },
    [1e9, 1e9, 0, 0]);
  return {
    titles: panes.map(title),
    loss_plot: !!(loss && loss.querySelector('.js-plotly-plot .main-svg')),
    loss_traces: loss ? loss.querySelectorAll('.scatterlayer .trace').length : 0,
    legend: loss ? [...loss.querySelectorAll('.legendtext')].map(e => e.textContent) : [],
    x_title: loss ? ((loss.querySelector('.xtitle') || {}).textContent || '') : '',
    images: [...document.querySelectorAll('img.content-image')].filter(i => i.complete && i.naturalWidth > 0).length,
    online: !!document.querySelector('.btn-success'),
    box: box,
  };
})()"""


def open_env(server_url, name, profile, executable=None, timeout=60):
    """Load a run's env page; returns what the page showed, a PNG screenshot, and what failed."""
    browser = Browser(executable or find_browser(), profile)
    try:
        browser.call("Page.navigate", url=f"{server_url}/env/{name}")
        deadline, state = time.time() + timeout, {}
        while time.time() < deadline:
            state = browser.evaluate(PAGE_STATE % json.dumps(f"{name}: loss")) or {}
            if state.get("loss_traces", 0) >= 2 and state.get("images", 0) >= 1 and state.get("online"):
                break
            time.sleep(0.25)
        time.sleep(1)  # let plotly finish drawing and the grid settle before the picture
        state["box"] = (browser.evaluate(PAGE_STATE % json.dumps(f"{name}: loss")) or state)["box"]
        shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
        scripts = [url for url, kind in browser.requested() if kind == "Script"]
        return dict(state=state, screenshot=shot, failed=browser.failed_loads(), errors=browser.script_errors(),
                    scripts=scripts)
    finally:
        browser.close()


@pytest.mark.slow
def test_the_tab_shows_the_runs_loss_plot(visdom_trained_run, tmp_path):
    server, run_dir, name, _ = visdom_trained_run
    page = open_env(server.url, name, str(tmp_path / "profile"))
    (tmp_path / "visdom_tab.png").write_bytes(page["screenshot"])
    state = page["state"]
    assert not page["failed"], page["failed"]  # no script, stylesheet or font failed to load
    assert not page["errors"], page["errors"]  # and no script threw
    assert state.get("loss_plot"), state
    assert {f"{name}: loss", f"{name}: learning rate", f"{name}: throughput", f"{name}: configuration",
            f"{name}: EMA samples after 8 images"} <= set(state["titles"]), state
    assert state["loss_traces"] == 3 and state["legend"] == ["train (smoothed)", "validation", "validation (EMA weights)"]
    assert state["x_title"] == "thousands of images seen"
    assert state["images"] == 1 and state["online"]
    # Every script came from this server, none from a CDN.
    assert len(page["scripts"]) >= 10 and all(url.startswith(server.url) for url in page["scripts"]), page["scripts"]
    if os.environ.get("VISDOM_SCREENSHOT"):
        save_screenshot(page["screenshot"], state["box"], os.environ["VISDOM_SCREENSHOT"])


def save_screenshot(png, box, path):
    """Crop the picture to the panes (plus a margin and visdom's top bar) and store it small."""
    from PIL import Image
    image = Image.open(io.BytesIO(png)).convert("RGB")
    right, bottom = min(image.width, int(box[2]) + 10), min(image.height, int(box[3]) + 10)
    image = image.crop((0, 0, right, bottom)).quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path, optimize=True)
