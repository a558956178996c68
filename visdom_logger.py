"""Live training curves in visdom. Training never fails, and never waits long, because of visdom.

One visdom env per run (named after the run) with fixed window ids, so a resumed run continues
its own windows instead of opening new ones (it keeps the points from before its first step; a
fresh run in the same env replaces them):
    config      the run's full configuration
    loss        train loss (smoothed) and validation loss against thousands of images seen
    lr          the learning rate
    throughput  training images per second
    samples     the latest EMA sample grid

Every point is kept in memory and sent with short timeouts. When the server is absent, killed or
restarted, training goes on; the logger retries (after 1 s, 2 s, ... at most every 30 s) and, once
a server answers again, sends what it missed: windows the server still has get the missing points
appended, windows it lost are drawn again from the whole history. `plot_log.py` replays a run's
log.jsonl the same way.
"""
import atexit
import base64
import html
import io
import json
import math
import sys
import time
import urllib.parse

SMOOTHING = 0.9  # weight of the past in the train loss's moving average

SIZES = {"loss": (560, 400), "lr": (400, 300), "throughput": (400, 300)}  # pane width, height in pixels
TITLES = {"config": "configuration", "loss": "loss", "lr": "learning rate",
          "throughput": "throughput", "samples": "EMA samples"}
# Traces, in drawing order: (window, name, y-axis label, plotly style). Marker styles carry no
# colour (it follows the line's): the server concatenates marker colours when it appends points.
TRACES = [
    ("loss", "train (smoothed)", "loss", {"mode": "lines", "line": {"color": "#ff7f0e", "width": 2}}),
    ("loss", "validation", "loss", {"mode": "lines+markers", "line": {"color": "#2ca02c"}, "marker": {"size": 6}}),
    ("loss", "validation (EMA weights)", "loss",
     {"mode": "lines+markers", "line": {"color": "#1f77b4", "dash": "dash"}, "marker": {"size": 5}}),
    ("lr", "learning rate", "learning rate", {"mode": "lines", "line": {"color": "#9467bd"}}),
    ("throughput", "img/s", "training images per second", {"mode": "lines", "line": {"color": "#8c564b"}}),
]
X_LABEL = "thousands of images seen"


def smooth(values, beta=SMOOTHING):
    """Bias-corrected exponential moving average, the same correction as Adam's (Kingma & Ba 2015,
    Algorithm 1): the first value is kept as it is instead of being pulled towards zero. A value
    that is not finite (a diverged step) gives None and leaves the average as it was."""
    out, average, count = [], 0.0, 0
    for value in values:
        if value is None or not math.isfinite(value):
            out.append(None)
            continue
        count += 1
        average = beta * average + (1 - beta) * value
        out.append(average / (1 - beta ** count))
    return out


def sample_grid_png(samples, columns=8, padding=2, scale=2):
    """PNG bytes of an N x 3 x H x W uint8 batch laid out as a grid on white, enlarged `scale`
    times with nearest-neighbour so that 32x32 images stay crisp in the browser."""
    import numpy as np
    from PIL import Image

    if hasattr(samples, "detach"):
        samples = samples.detach().cpu().numpy()
    samples = np.asarray(samples)
    if samples.ndim != 4 or samples.shape[1] not in (1, 3):
        raise ValueError(f"samples must be N x 3 x H x W, got shape {samples.shape}")
    samples = samples.astype(np.uint8)
    n, channels, h, w = samples.shape
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[top:top + h, left:left + w] = samples[i].transpose(1, 2, 0)  # 1 channel broadcasts
    image = Image.fromarray(grid)
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), image.size


def server_answers(port=8097, server="http://127.0.0.1", timeout=1.0):
    """True when a visdom server answers at server:port."""
    import requests
    session = requests.Session()
    session.trust_env = False
    try:
        response = session.post(f"{server}:{port}/win_exists", data=json.dumps({"win": "", "eid": "main"}),
                                timeout=timeout)
        return response.ok and response.text in ("true", "false")
    except requests.RequestException:
        return False


def _finite(value):
    # JSON has no NaN: a diverged loss would make the server reject every later message.
    value = float(value)
    return value if math.isfinite(value) else None


def _never_raise(method):
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # a bug in plotting must not end a training run
            if not self._warned_bug:
                self._warned_bug = True
                print(f"warning: visdom logging failed ({type(exc).__name__}: {exc}); training goes on",
                      file=sys.stderr)
    wrapper.__name__, wrapper.__doc__ = method.__name__, method.__doc__
    return wrapper


class VisdomLogger:
    timeout = (1.0, 2.0)  # seconds to connect and to read: a hung server costs at most this much
    max_retry_s = 30.0

    def __init__(self, port=8097, env="main", enabled=True, server="http://127.0.0.1"):
        self.server, self.port, self.env = server, port, env
        self.base_url = f"{server}:{port}"
        self.env_url = f"{self.base_url}/env/{urllib.parse.quote(env, safe='')}"
        self.autoflush = True  # plot_log.py turns this off to send a whole log at once
        self.online = False
        self._warned_bug = False
        self._http = None
        self._points = {(win, name): {"x": [], "y": []} for win, name, _, _ in TRACES}
        self._sent = {key: 0 for key in self._points}
        self._panes = {}  # "config" and "samples": the latest message, sent whole
        self._dirty = set()  # panes changed since they were last sent
        self._synced = set()  # windows known to match the server's since the last failure
        self._met = set()  # windows this process has compared with the server's at least once
        self._train_average, self._train_count = 0.0, 0
        self._train_raw = []  # this process's train losses, to smooth again after a resume
        self._retry_at, self._backoff = 0.0, 1.0
        if not enabled:
            return
        try:
            import requests
            self._http = requests.Session()
            host = urllib.parse.urlparse(server).hostname or ""
            if host in ("127.0.0.1", "localhost", "::1"):
                self._http.trust_env = False  # never send loopback traffic through a proxy
            self.online = self._post("win_exists", {"win": "loss", "eid": env}) in ("true", "false")
        except Exception:
            self.online = False
        if self._http is None:
            print("warning: the requests package is missing; training goes on without live plots", file=sys.stderr)
        elif self.online:
            print(f"visdom: live plots at {self.env_url}")
        else:
            self._schedule_retry()
            print(f"warning: no visdom server answers at {self.base_url}; training goes on and plots appear "
                  f"when one starts (bash tools/start_visdom.sh {port}, or pass --no_visdom)", file=sys.stderr)
        if self._http is not None:
            atexit.register(self._flush_at_exit)

    # ---- what train.py calls ----------------------------------------------------------------
    @_never_raise
    def log_config(self, config):
        """A text pane with the run's full configuration."""
        if self._http is None:  # disabled: cost nothing
            return
        text = json.dumps(config, indent=1, sort_keys=True, default=str)
        content = f"<b>{html.escape(self.env)}</b><pre style='font-size:11px'>{html.escape(text)}</pre>"
        height = min(SIZES["loss"][1], 90 + 16 * text.count("\n"))  # taller text scrolls
        self._panes["config"] = {"data": [{"content": content, "type": "text"}],
                                 "opts": {"title": self._title("config"), "width": 320, "height": height}}
        self._dirty.add("config")
        self._maybe_flush()

    @_never_raise
    def log_train(self, images_seen, train_loss, lr, img_per_s):
        if self._http is None:
            return
        x = images_seen / 1e3
        self._train_raw.append(_finite(train_loss))
        self._add("loss", "train (smoothed)", x, self._smooth_next(self._train_raw[-1]))
        self._add("lr", "learning rate", x, _finite(lr))
        self._add("throughput", "img/s", x, _finite(img_per_s))
        self._maybe_flush()

    @_never_raise
    def log_validation(self, images_seen, val_loss, val_loss_ema=None, samples=None):
        if self._http is None:
            return
        x = images_seen / 1e3
        self._add("loss", "validation", x, _finite(val_loss))
        if val_loss_ema is not None:
            self._add("loss", "validation (EMA weights)", x, _finite(val_loss_ema))
        if samples is not None:
            self._set_samples(images_seen, samples)
        self._maybe_flush()

    @_never_raise
    def log_samples(self, images_seen, samples):
        """The samples pane alone, between validations."""
        if self._http is None:
            return
        self._set_samples(images_seen, samples)
        self._maybe_flush()

    def _set_samples(self, images_seen, samples):
        """The samples pane: a grid of the EMA's samples (uint8, N x 3 x H x W) after images_seen."""
        png, (width, height) = sample_grid_png(samples)
        src = "data:image/png;base64," + base64.b64encode(png).decode()
        # The count goes in the title: visdom shows an image's caption twice.
        title = f"{self._title('samples')} after {images_seen:,} images"
        self._panes["samples"] = {"data": [{"content": {"src": src, "caption": None}, "type": "image"}],
                                  "opts": {"title": title, "width": width + 20, "height": height + 45}}
        self._dirty.add("samples")

    # ---- sending ----------------------------------------------------------------------------
    def flush(self, force=False, replace=False):
        """Send everything the server has not seen. Returns True when nothing is left to send.
        `force` ignores the retry delay; `replace` redraws windows whole instead of appending to
        windows the server already has (for a replay)."""
        if self._http is None:
            return False
        if not self.online and not force and time.monotonic() < self._retry_at:
            return False
        try:
            for win in self._windows():
                self._sync_window(win, replace)
        except Exception as exc:  # the server is gone, hung, or lost our windows: retry later
            if self.online:
                print(f"warning: lost the visdom server at {self.base_url} ({type(exc).__name__}); "
                      f"training goes on, plots resume when it answers", file=sys.stderr)
            self.online = False
            self._synced.clear()
            self._schedule_retry()
            return False
        if not self.online:
            print(f"visdom: connected; live plots at {self.env_url}", file=sys.stderr)
        self.online, self._backoff = True, 1.0
        return True

    def _maybe_flush(self):
        if self.autoflush:
            self.flush()

    def _flush_at_exit(self):
        if not self.online and (self._unsent() or self._dirty):
            try:
                self.flush(force=True)
            except Exception:
                pass

    def _unsent(self):
        return any(len(p["x"]) > self._sent[key] for key, p in self._points.items())

    def _schedule_retry(self):
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(2 * self._backoff, self.max_retry_s)

    def _windows(self):
        # The configuration first: its pane lands top-left in the browser.
        wins = [w for w in ("config",) if w in self._panes]
        wins += [w for w in dict.fromkeys(win for win, *_ in TRACES)
                 if any(self._points[(w2, n)]["x"] for w2, n, *_ in TRACES if w2 == w)]
        return wins + [w for w in ("samples",) if w in self._panes]

    def _sync_window(self, win, replace):
        if win in self._panes:  # text and image panes are sent whole
            if win in self._dirty or win not in self._synced:
                self._post("events", dict(self._panes[win], win=win, eid=self.env))
                self._dirty.discard(win)
                self._synced.add(win)
            return
        if win not in self._synced:
            self._reconcile(win, replace)
            self._synced.add(win)
        for trace_win, name, _, style in TRACES:
            key = (trace_win, name)
            if trace_win != win or len(self._points[key]["x"]) == self._sent[key]:
                continue
            start, end = self._sent[key], len(self._points[key]["x"])
            data = dict(style, type="scatter", name=name,
                        x=self._points[key]["x"][start:end], y=self._points[key]["y"][start:end])
            # An append to a window the server lost fails (it has no layout), which triggers a
            # redraw; an append of a trace the window lacks adds the trace, with its style.
            self._post("update", {"data": [data], "win": win, "eid": self.env, "name": name, "append": True})
            self._sent[key] = end

    def _reconcile(self, win, replace):
        """Make the server's window hold exactly the points sent so far, before appending more.
        The first time this process meets a window the server already has (a resumed run), it
        adopts that window's points from before its own first point and redraws, so a resumed run
        continues its curves and a fresh run in the same env replaces them."""
        ours = [name for trace_win, name, *_ in TRACES if trace_win == win]
        if replace or self._post("win_exists", {"win": win, "eid": self.env}) != "true":
            self._met.add(win)
            return self._draw(win)
        server = self._server_points(win)
        if win not in self._met:
            self._met.add(win)
            start = min(self._points[(win, n)]["x"][0] for n in ours if self._points[(win, n)]["x"])
            for name in ours:
                x, y = server.get(name, ([], []))
                keep = [i for i, value in enumerate(x) if isinstance(value, (int, float)) and value < start
                        and (y[i] is None or isinstance(y[i], (int, float)))]
                self._points[(win, name)]["x"][:0] = [x[i] for i in keep]
                self._points[(win, name)]["y"][:0] = [y[i] for i in keep]
                if name == "train (smoothed)":
                    self._continue_smoothing([y[i] for i in keep])
            return self._draw(win)
        for name in ours:  # a server restarted from a saved env, or a closed pane, differs
            sent, x = self._sent[(win, name)], server.get(name, ([], []))[0]
            if len(x) != sent or (sent and x[-1] != self._points[(win, name)]["x"][sent - 1]):
                return self._draw(win)

    def _server_points(self, win):
        """{trace name: (x, y)} of a window on the server; {} when it is not a plot we understand."""
        text = self._post("win_data", {"win": win, "eid": self.env})
        try:
            window = json.loads(text)
            return {t["name"]: (list(t["x"]), list(t["y"])) for t in window["content"]["data"]
                    if isinstance(t, dict) and "name" in t and len(t.get("x", [])) == len(t.get("y", []))}
        except (ValueError, KeyError, TypeError):
            return {}

    def _draw(self, win):
        traces, ylabel = [], ""
        for trace_win, name, label, style in TRACES:
            key = (trace_win, name)
            if trace_win != win:
                continue
            ylabel = label
            if self._points[key]["x"]:
                traces.append(dict(style, type="scatter", name=name, x=self._points[key]["x"],
                                   y=self._points[key]["y"]))
        layout = {"showlegend": win == "loss", "legend": {"x": 1, "xanchor": "right", "y": 1},
                  "xaxis": {"title": {"text": X_LABEL}},
                  "yaxis": {"title": {"text": ylabel}, "type": "log" if win in ("loss", "lr") else "linear",
                            "exponentformat": "power" if win == "lr" else "B"},
                  "margin": {"l": 70, "r": 20, "t": 20, "b": 50}}
        width, height = SIZES[win]
        self._post("events", {"data": traces, "win": win, "eid": self.env, "layout": layout,
                              "opts": {"title": self._title(win), "width": width, "height": height}})
        for trace_win, name, *_ in TRACES:
            if trace_win == win:
                self._sent[(trace_win, name)] = len(self._points[(trace_win, name)]["x"])

    def _smooth_next(self, loss):
        """The next point of smooth(): a NaN step is skipped instead of poisoning the average."""
        if loss is None:
            return None
        self._train_count += 1
        self._train_average = SMOOTHING * self._train_average + (1 - SMOOTHING) * loss
        return self._train_average / (1 - SMOOTHING ** self._train_count)

    def _continue_smoothing(self, adopted):
        """After adopting a resumed run's earlier smoothed points, smooth this process's losses
        on from the last of them, so the curve has no jump and equals a replay of the whole log."""
        earlier = [y for y in adopted if y is not None]
        if not earlier:
            return
        self._train_count = len(earlier)
        self._train_average = earlier[-1] * (1 - SMOOTHING ** self._train_count)
        ours = [self._smooth_next(loss) for loss in self._train_raw]
        self._points[("loss", "train (smoothed)")]["y"][len(adopted):] = ours

    def _add(self, win, name, x, y):
        self._points[(win, name)]["x"].append(x)
        self._points[(win, name)]["y"].append(y)

    def _title(self, win):
        return f"{self.env}: {TITLES[win]}"

    def _post(self, endpoint, msg):
        response = self._http.post(f"{self.base_url}/{endpoint}", data=json.dumps(msg, allow_nan=False),
                                   timeout=self.timeout)
        response.raise_for_status()
        return response.text
