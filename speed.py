"""How the network runs fastest on this machine: precision, activation layout and torch.compile,
chosen by measurement, and remembered per machine in one ledger.

    plan = speed.choose_plan("auto", config, device, batch, kind="train")   # or kind="sample"
    model = plan.apply(model)                          # channels_last or not
    with speed.autocast(device, plan.autocast_dtype):  # bf16 autocast or full fp32
        ...

On CUDA the plan is fixed: bf16 autocast and channels_last (measured on H100s, docs/bench_h100.md).
On the CPU no one choice wins everywhere (issue 21: on a Xeon with AMX, channels_last halves the
bf16 training step of preset tiny and speeds up fp32's; on an AMD EPYC without AMX bf16 runs 1.7x
fp32, contiguous faster than channels_last), so `auto` times a few steps of the run's own network for each precision and layout
(`probe`) and takes the fastest, bf16 only when it is at least BF16_GAIN faster than fp32 and the
CPU runs bf16 natively (AMX or AVX512-BF16). The timings go into the ledger, so a second run of the
same network on the same machine does not probe again. Whether to compile is compile_plan's
decision, from the compile times and speeds the ledger holds.

The ledger is <compile cache>/simple_ddpm_speed.json: one entry per graph (the network's layers,
the batch, the precision and layout, the machine, torch's version and thread count), holding what
was measured of it. Delete the file to measure again.
"""
import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import platform
import sys
import time

import torch

from cli import atomic_write, compile_cache_dir

BF16_GAIN = 1.2  # auto takes bf16 only when it is at least this much faster than fp32
PROBE_BATCH = 64  # the training probe times batches of at most this many images
PROBE_STEPS = 2   # timed steps per candidate, after one untimed

# ---- the machine ---------------------------------------------------------------------------------


def cpu_info():
    """(model name, flags) of this machine's CPU, from /proc/cpuinfo where there is one."""
    name, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and name in ("", platform.processor(), platform.machine()):
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    return name, flags


def native_bf16():
    """Whether the CPU computes in bf16 itself (Intel AMX, AVX512-BF16, Arm's BF16); elsewhere
    oneDNN emulates bf16 in fp32, slower than fp32 itself."""
    _, flags = cpu_info()
    return bool(flags & {"amx_bf16", "avx512_bf16", "bf16"})


def machine(device):
    """The machine that runs `device`, as the ledger and the logs name it: the card, or the CPU
    and the threads torch uses."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_info()[0]}, {torch.get_num_threads()} threads" if device.type == "cpu" else device.type


# ---- the ledger ------------------------------------------------------------------------------------

class Ledger:
    """What was measured of each graph on this machine, in <compile cache>/simple_ddpm_speed.json."""

    def __init__(self, device, *graph):
        self.device = torch.device(device)
        graph = [*graph, machine(self.device), torch.__version__]
        self.key = hashlib.sha256(json.dumps(graph, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.path = os.path.join(compile_cache_dir(), "simple_ddpm_speed.json")

    def read_all(self):
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def get(self, name, default=None):
        return self.read_all().get(self.key, {}).get(name, default)

    def put(self, **values):
        """Merge values into this graph's entry; a ledger that cannot be written costs only a re-measure."""
        ledger = self.read_all()
        ledger.setdefault(self.key, {}).update(values)
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with atomic_write(self.path, "w") as f:
                json.dump(ledger, f, indent=1)


# ---- the plan ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    """How to run one network: bf16 autocast or fp32, channels_last or contiguous, and why."""
    precision: str          # bf16 | fp32
    channels_last: bool
    why: str
    timings: dict = dataclasses.field(default_factory=dict)  # candidate -> measured seconds per image

    @property
    def autocast_dtype(self):
        return torch.bfloat16 if self.precision == "bf16" else None

    @property
    def layout(self):
        return "channels_last" if self.channels_last else "contiguous"

    @property
    def seconds_per_image(self):
        """The probe's measurement of this plan's own candidate; None when nothing was timed."""
        return self.timings.get(f"{self.precision}/{self.layout}")

    def apply(self, model):
        """The model with its weights in this plan's layout (in place, as nn.Module.to is)."""
        return model.to(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def describe(self):
        timed = ", ".join(f"{name} {1e3 * s:.2f} ms/img" for name, s in sorted(self.timings.items(), key=lambda kv: kv[1]))
        return f"{self.precision}, {self.layout} ({self.why}{'; measured ' + timed if timed else ''})"

    def record(self):
        return dict(precision=self.precision, layout=self.layout, why=self.why, timings_ms_per_image={
            name: round(1e3 * s, 4) for name, s in self.timings.items()})


def autocast(device, dtype):
    """bf16 autocast when dtype is bf16, else nothing (full fp32)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def choose_plan(precision, config, device, batch, kind="train", layout="auto"):
    """The Plan for --precision auto|bf16|fp32 and --layout auto|contiguous|channels_last on
    `device` for a network of `config`, trained (kind="train": forward and backward) or sampled
    (kind="sample": forward only) in batches of `batch`. Auto on the CPU measures (probe), or reads
    the ledger's measurement."""
    device = torch.device(device)
    if device.type != "cpu":
        default = "bf16" if device.type == "cuda" else "fp32"
        why = "; ".join(f"--{flag} {value}" for flag, value in (("precision", precision), ("layout", layout))
                        if value != "auto") or f"auto: {device.type}"
        return Plan(default if precision == "auto" else precision,
                    device.type == "cuda" if layout == "auto" else layout == "channels_last", why)
    native = native_bf16()
    precisions = {"auto": ("fp32", "bf16") if native else ("fp32",), "fp32": ("fp32",), "bf16": ("bf16",)}[precision]
    if precision == "bf16" and not native:
        print(f"warning: --precision bf16: this CPU ({cpu_info()[0]}) has no native bf16 (AMX or AVX512-BF16); "
              f"it is emulated and slower than fp32", file=sys.stderr, flush=True)
    if precision != "auto" and layout != "auto":  # nothing to choose, nothing to measure
        return Plan(precision, layout == "channels_last", f"--precision {precision}; --layout {layout}")
    layouts = ("contiguous", "channels_last") if layout == "auto" else (layout,)
    timings = probe(config, device, batch, kind, precisions, layouts)
    fastest = {p: min((s, name) for name, s in timings.items() if name.startswith(p)) for p in precisions}
    if len(precisions) == 1:
        chosen, why = precisions[0], (f"--precision {precision}" if precision != "auto" else
                                      "auto: this CPU has no native bf16, so fp32")
    else:
        gain = fastest["fp32"][0] / fastest["bf16"][0]
        chosen = "bf16" if gain >= BF16_GAIN else "fp32"
        why = f"auto: bf16 is {gain:.2f}x fp32 here; bf16 from {BF16_GAIN}x"
    if layout != "auto":
        why += f"; --layout {layout}"
    chosen_layout = fastest[chosen][1].split("/")[1]
    return Plan(chosen, chosen_layout == "channels_last", why, timings)


def probe(config, device, batch, kind, precisions, layouts=("contiguous", "channels_last")):
    """Seconds per image of each candidate '<precision>/<layout>', timed on a fresh network of
    `config` (random weights: speed does not depend on them), or read from the ledger. The
    caller's random streams are left untouched."""
    from unet import make_network
    batch = min(batch, PROBE_BATCH) if kind == "train" else batch
    with torch.random.fork_rng(devices=[]):
        model = make_network(config)
    ledger = Ledger(device, "probe", kind, repr(model), batch)
    timings = ledger.get("timings", {})
    missing = [f"{p}/{layout}" for p in precisions for layout in layouts if f"{p}/{layout}" not in timings]
    for name in missing:
        p, layout = name.split("/")
        timings[name] = time_network(model, batch, device, kind, torch.bfloat16 if p == "bf16" else None,
                                     layout == "channels_last") / batch
    if missing:
        ledger.put(timings=timings, measured=time.strftime("%Y-%m-%d %H:%M"))
    return {name: s for name, s in timings.items() if name.split("/")[0] in precisions and name.split("/")[1] in layouts}


def time_network(model, batch, device, kind, dtype, channels_last, timed_steps=PROBE_STEPS):
    """Seconds of one pass of a batch through a copy of model: forward and backward (kind="train")
    or forward only (kind="sample"), the fastest of timed_steps after one untimed pass."""
    net = copy.deepcopy(model).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=memory_format).train(kind == "train")
    alpha_bar = torch.full((batch,), 0.5, device=device)
    best = float("inf")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            torch.set_grad_enabled(kind == "train"):
        x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
        for i in range(1 + timed_steps):
            synchronize(device)
            start = time.perf_counter()
            with autocast(device, dtype):
                out = net(x, alpha_bar)
            if kind == "train":
                out.float().square().mean().backward()
            synchronize(device)
            if i:
                best = min(best, time.perf_counter() - start)
    return best


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- torch.compile where it pays -----------------------------------------------------------------

# The whole default network compiled with an empty cache: its first 50 steps took 107 s on one
# H200 (issue 13). Until a graph has been compiled on this machine, auto expects this, for either
# mode; afterwards it expects what the ledger measured.
COLD_COMPILE_SECONDS = 110
COMPILE_SHARE = 0.10  # on CUDA, auto spends at most this share of a run's known length compiling
# On the CPU (inductor's C++ backend), 2 threads of an AMD EPYC (Zen 4, AVX512-BF16, no AMX), torch
# 2.14.1, 2026-12-02, bf16. Training: preset tiny's step at batch 64 in train.py's loop took 92 s
# for its first step with an empty cache and 2 to 3 s with a warm one, and the compiled step ran
# 1.12x the eager one (0.293 against 0.329 s; at channels (32, 64, 64, 64) compiled was slower,
# docs/bench_cpu.md). Sampling: tiny's forward pass at batch 128 compiled in 38 s and ran 1.62x
# eager (912 against 563 img/s). Until the ledger holds a graph's own figures, auto expects these:
# the cold time for a graph never compiled here, the warm time once one compile is recorded (the
# cache then holds it), and the gain.
COLD_COMPILE_SECONDS_CPU = {"train": 95, "sample": 40}
WARM_COMPILE_SECONDS_CPU = 5
CPU_COMPILE_GAIN = {"train": 1.12, "sample": 1.6}
STEADY_CALLS = 5  # calls after the first that CompileLedger times for a mode's steady speed


def cpp_compiler():
    """The C++ compiler inductor's CPU backend would use, or None."""
    import shutil
    return next((c for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c and shutil.which(c)), None)


def compile_plan(device, run_seconds, expected_seconds, expected_gain=lambda: CPU_COMPILE_GAIN["train"]):
    """--compile auto: (mode, reason).
    On CUDA: whole when its expected compile time is at most COMPILE_SHARE of the run's known
    length, else regional when its is, else off; a run with no known length compiles whole. whole
    comes first: compiled whole, the default network's step ran at 6,088 img/s on an H100
    (bench.py, row 4), against about 3,700 eager on an H200 (issue 13).
    On the CPU: whole when the time it saves over the run's known length, run x (1 - 1/gain),
    exceeds its expected compile time; a run with no known end compiles when the gain is above 1.
    Elsewhere (mps), and without a C++ compiler, off."""
    if device.type == "cpu":
        if cpp_compiler() is None:
            return "off", "auto: no C++ compiler for inductor's CPU backend (g++ or clang++)"
        gain, cost = expected_gain(), expected_seconds("whole")
        if run_seconds is None:
            return ("whole" if gain > 1 else "off"), f"auto: the run has no known end; compiled is {gain:.2f}x eager"
        saving = run_seconds * (1 - 1 / gain)
        return ("whole" if saving > cost else "off"), (
            f"auto: compiling would save {saving:.0f} s of this run's {run_seconds:.0f} s at {gain:.2f}x, "
            f"and is expected to take {cost:.0f} s")
    if device.type != "cuda":
        return "off", f"auto: {device.type}"
    if run_seconds is None:
        return "whole", "auto: the run has no known end"
    for mode in ("whole", "regional"):
        if expected_seconds(mode) <= COMPILE_SHARE * run_seconds:
            return mode, (f"auto: expect {expected_seconds(mode):.0f} s of compiling in a run of "
                          f"{run_seconds:.0f} s")
    return "off", (f"auto: compiling (expect {expected_seconds('regional'):.0f} s) would take more than "
                   f"{COMPILE_SHARE:.0%} of this run's {run_seconds:.0f} s")


def compile_blocks(model):
    """Regional compilation: each Stage (ResBlock and its attention) compiled in place. Stages of
    the same widths and resolution share one compiled graph, so the network compiles once per
    distinct block instead of as one large graph. A network without Stages (arch=diffusers) compiles
    whole."""
    import torch._dynamo
    from unet import Stage
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # a graph per distinct block
    stages = [module for module in model.modules() if isinstance(module, Stage)]
    for module in stages or [model]:
        module.compile(dynamic=False)


class CompileLedger(Ledger):
    """The ledger's entry for one training graph: the network's layers (its repr: a learning rate
    or a sampler changes nothing compiled), the batch per process, the precision and layout, the
    machine and torch's version. It holds, per mode, how long the first step took (<mode>: what
    compile_plan expects next time, when the cache holds the graph) and the steady seconds per
    step after it (<mode>_step, the fastest seen), from which compile_plan's gain comes. The first compile of a graph
    is recorded as <mode>_cold: on the CPU the next one is expected warm."""

    def __init__(self, model, device, batch_per_process, plan, world_size=1, kind="train"):
        super().__init__(device, "compile", kind, repr(model), batch_per_process, plan.precision, plan.layout, world_size)
        self.kind = kind

    def expected_seconds(self, mode):
        cpu = self.device.type == "cpu"
        if self.get(mode) is not None:
            return self.get(mode)
        if self.get(f"{mode}_cold") is not None:
            return WARM_COMPILE_SECONDS_CPU if cpu else self.get(f"{mode}_cold")
        return COLD_COMPILE_SECONDS_CPU[self.kind] if cpu else COLD_COMPILE_SECONDS

    def expected_gain(self, eager_estimate=None):
        """Eager over compiled steady seconds per step, as measured; eager_estimate (the probe's)
        stands in for an eager run never measured; else the prior CPU_COMPILE_GAIN."""
        eager, compiled = self.get("off_step", eager_estimate), self.get("whole_step")
        return eager / compiled if eager and compiled else CPU_COMPILE_GAIN[self.kind]

    def timing(self, step, mode, record=True):
        """The step, whose first call (the one that compiles) and the STEADY_CALLS after it are
        timed and recorded (record: by this process alone)."""
        calls, start = [0], [0.0]

        def timed_step(*args):
            n = calls[0]
            if n > STEADY_CALLS or not record:
                return step(*args)
            if n in (0, 1):
                start[0] = time.perf_counter()
            loss = step(*args)
            if n in (0, STEADY_CALLS):
                synchronize(loss.device)
                seconds = time.perf_counter() - start[0]
                if n == 0 and mode != "off":
                    cold = self.get(mode) is None and self.get(f"{mode}_cold") is None
                    self.put(**{mode + ("_cold" if cold else ""): round(seconds, 1)})
                elif n == STEADY_CALLS:  # the fastest seen: timings on a shared machine only err slow
                    best = min(seconds / STEADY_CALLS, self.get(f"{mode}_step", float("inf")))
                    self.put(**{f"{mode}_step": best})
            calls[0] += 1
            return loss

        return timed_step


def sampling_batch(device):
    """Images per network call when sampling or validating: on the CPU a batch whose activations
    stay in cache and below glibc's mmap threshold (at 1,000 images each activation of preset tiny
    is 65 MB, and every operation maps and faults fresh pages: 4 minutes of system time in 2,000
    samples, issue 21); on a GPU a large one."""
    return 1000 if torch.device(device).type == "cuda" else CPU_SAMPLING_BATCH


CPU_SAMPLING_BATCH = 128
