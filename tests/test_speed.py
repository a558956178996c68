"""speed.py: the precision and layout probe, its ledger, compile_plan, and chunk-free sampling."""
import dataclasses
import json
import shutil
import time

import pytest
import torch

from testkit import make_avatar_folder, run_script, tiny_train_args


@pytest.fixture
def ledger_dir(tmp_path, monkeypatch):
    """An empty compile cache (and so an empty ledger) for this test alone."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def tiny(*overrides):
    from config import make_config
    return make_config("tiny", list(overrides))


def test_auto_measures_each_candidate_once_and_takes_the_fastest(ledger_dir, monkeypatch):
    import speed
    monkeypatch.setattr(speed, "native_bf16", lambda: True)
    calls = []
    fake = {"fp32/contiguous": 4.0, "fp32/channels_last": 3.0, "bf16/contiguous": 2.6, "bf16/channels_last": 2.0}

    def timed(model, batch, device, kind, dtype, channels_last, timed_steps=2):
        name = f"{'bf16' if dtype else 'fp32'}/{'channels_last' if channels_last else 'contiguous'}"
        calls.append(name)
        return fake[name] * batch

    monkeypatch.setattr(speed, "time_network", timed)
    plan = speed.choose_plan("auto", tiny(), torch.device("cpu"), 64)
    assert (plan.precision, plan.layout) == ("bf16", "channels_last")  # 3.0 / 2.0 = 1.5x >= 1.2x
    assert plan.timings == pytest.approx(fake) and sorted(calls) == sorted(fake)
    assert "1.50x" in plan.why and "bf16/channels_last 2000.00 ms/img" in plan.describe()
    # The ledger remembers: the same network on the same machine is not timed again.
    assert speed.choose_plan("auto", tiny("learning_rate=0.1"), "cpu", 64).timings == pytest.approx(fake)
    assert len(calls) == 4
    # Another network, another batch, or sampling instead of training: measured anew.
    speed.choose_plan("auto", tiny("channels=(16,32,32)"), "cpu", 64)
    speed.choose_plan("auto", tiny(), "cpu", 32)
    speed.choose_plan("auto", tiny(), "cpu", 64, kind="sample")
    assert len(calls) == 16
    # bf16 must be clearly faster: at 1.15x fp32 wins, with its own fastest layout.
    fake.update({"bf16/contiguous": 2.7, "bf16/channels_last": 2.6})
    plan = speed.choose_plan("auto", tiny("channels=(8,16)"), "cpu", 64)
    assert (plan.precision, plan.layout) == ("fp32", "channels_last") and "1.15x" in plan.why


def test_without_native_bf16_auto_stays_in_fp32_and_asked_bf16_warns_once(ledger_dir, monkeypatch, capsys):
    import speed
    monkeypatch.setattr(speed, "native_bf16", lambda: False)
    monkeypatch.setattr(speed, "time_network", lambda model, batch, device, kind, dtype, channels_last, **_:
                        (1.0 if dtype else 9.0) * batch)  # even if bf16 looked faster
    plan = speed.choose_plan("auto", tiny(), "cpu", 16)
    assert plan.precision == "fp32" and "no native bf16" in plan.why and set(plan.timings) == {
        "fp32/contiguous", "fp32/channels_last"}
    assert capsys.readouterr().err == ""
    plan = speed.choose_plan("bf16", tiny(), "cpu", 16)
    assert plan.precision == "bf16"
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "emulated" in warnings[0]


def test_the_plan_is_what_the_model_runs_in():
    """apply() lays the weights out; the train step runs the network under the plan's autocast."""
    from speed import Plan
    from train import make_ema, make_optimizer, make_train_step
    from unet import UNet
    config = tiny()
    for plan, dtype, channels_last in ((Plan("bf16", True, "test"), torch.bfloat16, True),
                                       (Plan("fp32", False, "test"), torch.float32, False)):
        model = plan.apply(UNet(config))
        assert model.head.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        seen = []
        model.head.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
        step = make_train_step(model, model, make_ema(model, config), make_optimizer(model, config, fused=False),
                               config, plan.autocast_dtype)
        x0 = torch.zeros(2, 3, 32, 32)
        step(x0, torch.randn_like(x0), torch.full((2,), 0.5), 0)
        assert seen == [dtype]


def auto_plans(images, run_dir, steps, *extra):
    """train.py --precision auto --layout auto for `steps` steps; (the plan records of its log, stdout)."""
    result = run_script("train.py", *tiny_train_args(images, images, str(run_dir), "--max_steps", steps,
                                                     "--precision", "auto", "--layout", "auto", *extra))
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in open(run_dir / "log.jsonl") if '"plan"' in line], result.stdout


@pytest.fixture(scope="module")
def first_auto_run(tmp_path_factory):
    """A first auto run of 1 step on 32 images with an empty compile cache, so an empty ledger: it
    times the candidates and records them. Shared by the two tests below (each such run takes about
    8 s), which work on copies of its folders: (images, run folder, cache folder, plans, stdout)."""
    root = tmp_path_factory.mktemp("auto_plan")
    images = make_avatar_folder(root / "data", 32)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(root / "cache"))
        plans, out = auto_plans(images, root / "run", 1)
    return images, root / "run", root / "cache", plans, out


def copy_of_the_ledger(first_auto_run, tmp_path, monkeypatch):
    """The first run's cache folder copied for this test, which its scripts use: (ledger path, key)."""
    shutil.copytree(first_auto_run[2], tmp_path / "cache")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    ledger_path = tmp_path / "cache" / "simple_ddpm_speed.json"
    (key,) = [k for k, v in json.loads(ledger_path.read_text()).items() if "timings" in v]
    return ledger_path, key


@pytest.mark.slow
def test_train_logs_the_plan_it_read_from_the_ledger(first_auto_run, tmp_path, monkeypatch):
    """A first run measures and records its timings; a second run of the same network reads them
    from the ledger (here edited so that fp32 with channels_last is the fastest) and says so."""
    images, _, _, plans, out = first_auto_run
    assert len(plans) == 1
    plan = plans[0]
    assert {"fp32/contiguous", "fp32/channels_last"} <= set(plan["timings_ms_per_image"])
    assert f"precision and layout: {plan['precision']}, {plan['layout']}" in out
    ledger_path, key = copy_of_the_ledger(first_auto_run, tmp_path, monkeypatch)
    ledger = json.loads(ledger_path.read_text())
    ledger[key]["timings"] = {name: (0.001 if name == "fp32/channels_last" else 0.5) for name in ledger[key]["timings"]}
    ledger_path.write_text(json.dumps(ledger))
    plans, out = auto_plans(images, tmp_path / "second", 1)
    assert len(plans) == 1
    plan = plans[0]
    assert (plan["precision"], plan["layout"]) == ("fp32", "channels_last")
    assert plan["timings_ms_per_image"]["fp32/channels_last"] == 1.0
    assert "precision and layout: fp32, channels_last" in out


@pytest.mark.slow
def test_a_resumed_run_keeps_the_plan_it_started_with(first_auto_run, tmp_path, monkeypatch):
    """The ledger now says another plan is fastest: the resumed run keeps its own (exact resume),
    a fresh one takes the new."""
    images, first_run, _, [first], _ = first_auto_run
    run_dir = tmp_path / "run"
    shutil.copytree(first_run, run_dir)
    ledger_path, key = copy_of_the_ledger(first_auto_run, tmp_path, monkeypatch)
    ledger = json.loads(ledger_path.read_text())
    other = next(name for name in ledger[key]["timings"] if name != f"{first['precision']}/{first['layout']}")
    ledger[key]["timings"] = {name: (0.001 if name == other else 0.5) for name in ledger[key]["timings"]}
    ledger_path.write_text(json.dumps(ledger))
    resumed = auto_plans(images, run_dir, 2)[0][-1]
    assert (resumed["precision"], resumed["layout"]) == (first["precision"], first["layout"])
    assert resumed["why"].startswith("resumed")
    fresh = auto_plans(images, run_dir, 1, "--fresh")[0][-1]
    assert f"{fresh['precision']}/{fresh['layout']}" == other


def test_compile_on_a_cpu_without_a_cpp_compiler_is_a_one_line_error(tmp_path):
    """inductor's CPU backend needs g++ or clang++: without one, --compile whole says so up front."""
    from testkit import one_line_error
    images = make_avatar_folder(tmp_path / "data", 16)
    env = {"PATH": str(tmp_path / "no_compilers_here"), "CXX": ""}
    result = run_script("train.py", *tiny_train_args(images, images, str(tmp_path / "run"), "--max_steps", 1,
                                                     "--compile", "whole"), env=env)
    assert "needs a C++ compiler" in one_line_error(result) and "--compile off" in one_line_error(result)
    assert not (tmp_path / "run" / "latest_model.pth").exists()


def test_compile_plan_spends_compile_time_only_where_it_pays(monkeypatch):
    import speed
    from speed import COLD_COMPILE_SECONDS, compile_plan
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(speed, "cpp_compiler", lambda: "g++")  # whatever this machine has
    cold = lambda mode: COLD_COMPILE_SECONDS
    warm = lambda mode: {"whole": 30, "regional": 12}[mode]
    # CUDA: at most a tenth of a known run.
    assert compile_plan(cuda, None, cold)[0] == "whole"  # no known end: a long run
    assert compile_plan(cuda, 180, cold)[0] == "off"  # a 3-minute run with an empty cache
    assert compile_plan(cuda, 1100, cold)[0] == "whole"
    assert compile_plan(cuda, 180, warm)[0] == "regional"  # 12 s <= 10% of 180 s < 30 s
    assert compile_plan(cuda, 100, warm)[0] == "off"
    assert compile_plan(cuda, 300, warm)[0] == "whole"
    mode, why = compile_plan(cuda, 180, lambda mode: COLD_COMPILE_SECONDS)
    assert "110 s" in why and "180 s" in why
    # CPU: when the time saved, run x (1 - 1/gain), exceeds the compile time.
    cpu_cold, cpu_warm = (lambda mode: 95), (lambda mode: 5)
    gain = lambda: 1.12
    assert compile_plan(cpu, 600, cpu_cold, gain)[0] == "off"  # saves 64 s, costs 95 s
    assert compile_plan(cpu, 1000, cpu_cold, gain)[0] == "whole"  # saves 107 s
    mode, why = compile_plan(cpu, 600, cpu_warm, gain)
    assert mode == "whole" and "save 64 s" in why and "take 5 s" in why
    assert compile_plan(cpu, 30, cpu_warm, gain)[0] == "off"  # saves 3 s
    assert compile_plan(cpu, None, cpu_cold, gain)[0] == "whole"
    assert compile_plan(cpu, None, cpu_cold, lambda: 0.9)[0] == "off"  # compiled measured slower
    assert compile_plan(torch.device("mps"), None, cold)[0] == "off"
    monkeypatch.setattr(speed, "cpp_compiler", lambda: None)
    mode, why = compile_plan(cpu, 10_000, cpu_warm, gain)
    assert mode == "off" and "C++ compiler" in why


def test_the_compile_ledger_remembers_each_graphs_compile_and_speed(ledger_dir):
    from speed import COLD_COMPILE_SECONDS_CPU, CPU_COMPILE_GAIN, STEADY_CALLS, WARM_COMPILE_SECONDS_CPU, \
        CompileLedger, Plan
    from unet import UNet
    plan = Plan("fp32", False, "test")
    ledger = CompileLedger(UNet(tiny()), "cpu", 16, plan)
    assert ledger.expected_seconds("whole") == COLD_COMPILE_SECONDS_CPU["train"]
    assert ledger.expected_gain() == CPU_COMPILE_GAIN["train"]

    def run(mode, first, then):
        step = ledger.timing(lambda i: (time.sleep(first if i == 0 else then), torch.zeros(()))[1], mode)
        for i in range(STEADY_CALLS + 3):
            step(i)

    run("whole", 0.3, 0.01)  # the first compile of this graph: the next one is expected warm
    assert 0.3 <= ledger.get("whole_cold") < 1.5  # sleeps may run long on a loaded machine, never short
    assert ledger.expected_seconds("whole") == WARM_COMPILE_SECONDS_CPU
    run("whole", 0.2, 0.01)
    assert 0.2 <= ledger.expected_seconds("whole") < 1.5
    run("off", 0.04, 0.04)
    assert 2 < ledger.expected_gain() <= 4.5  # 0.04 s eager against 0.01 s compiled (the fastest seen)
    entry = json.loads((ledger_dir / "simple_ddpm_speed.json").read_text())[ledger.key]
    assert set(entry) == {"whole_cold", "whole", "whole_step", "off_step"}
    for other in (CompileLedger(UNet(tiny()), "cpu", 32, plan),  # another batch
                  CompileLedger(UNet(tiny("norm=batch")), "cpu", 16, plan),  # another network
                  CompileLedger(UNet(tiny()), "cpu", 16, Plan("bf16", False, "test")),  # another precision
                  CompileLedger(UNet(tiny()), "cpu", 16, Plan("fp32", True, "test"))):  # another layout
        assert other.key != ledger.key and other.expected_seconds("whole") == COLD_COMPILE_SECONDS_CPU["train"]
    sampling = CompileLedger(UNet(tiny()), "cpu", 16, plan, kind="sample")  # sampling's graph: its own entry
    assert sampling.key != ledger.key and sampling.expected_gain() == CPU_COMPILE_GAIN["sample"]
    assert CompileLedger(UNet(tiny("learning_rate=0.1")), "cpu", 16, plan).key == ledger.key  # nothing compiled changes


def test_regional_compile_compiles_each_block_in_place():
    from speed import compile_blocks
    from unet import Stage, UNet
    model = UNet(tiny())
    names = list(model.state_dict())
    compile_blocks(model)
    stages = [m for m in model.modules() if isinstance(m, Stage)]
    assert len(stages) == 14 and all(m._compiled_call_impl is not None for m in stages)
    assert model.head._compiled_call_impl is None
    assert list(model.state_dict()) == names  # checkpoints keep their keys


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm"])
def test_the_same_seed_gives_the_same_images_whatever_the_batch_size(sampler):
    """Image i has its own random stream. In fp32 the images were equal to the bit here (AMD EPYC),
    but oneDNN may pick other kernels for another batch size on another CPU, so a level of 255 at a
    few pixels is allowed; in bf16 a few levels (measured: up to 5 at a few pixels, channels_last,
    batches of 1 and 3)."""
    from generate import generate_images
    from speed import Plan
    from unet import UNet
    config = dataclasses.replace(tiny(), sampler=sampler, sampling_steps=6, eta=1.0)
    torch.manual_seed(0)
    model = UNet(config).sampling_mode()
    for p in model.parameters():
        p.data.normal_(0, 0.05)  # an untrained network with zero_init off would be too easy: make it wild
    for plan, tolerance in ((Plan("fp32", False, "t"), (1, 0.01)), (Plan("fp32", True, "t"), (1, 0.01)),
                            (Plan("bf16", True, "t"), (8, 0.05))):
        whole = generate_images(model, config, 7, seed=3, batch_size=7, progress=False, plan=plan).int()
        assert whole.float().std() > 30  # the images are not all alike
        for batch in (1, 3, 4):
            chunked = generate_images(model, config, 7, seed=3, batch_size=batch, progress=False, plan=plan).int()
            difference = (chunked - whole).abs()
            assert difference.max() <= tolerance[0] and difference.float().mean() <= tolerance[1], (plan, batch)
        other_seed = generate_images(model, config, 7, seed=4, batch_size=7, progress=False, plan=plan).int()
        assert (other_seed - whole).abs().float().mean() > 10
