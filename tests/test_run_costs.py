"""tools/run_costs.py end to end on the CPU with preset tiny: the GPU numbers come from the same code."""
import json
import sys

import pytest

from testkit import REPO, make_avatar_folder, one_line_error, run_script

sys.path.insert(0, f"{REPO}/tools")


@pytest.mark.slow
def test_run_costs_times_compile_modes_and_concurrent_runs(tmp_path):
    train_dir, val_dir = make_avatar_folder(tmp_path / "train", 64), make_avatar_folder(tmp_path / "val", 16, 10 ** 6)
    common = ["--preset", "tiny", "--device", "cpu", "--train_dir", train_dir, "--val_dir", val_dir]
    result = run_script("tools/run_costs.py", "compile", "--out", tmp_path / "c", "--modes", "off", "--steps", 50, *common)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "c" / "run_costs_compile.json").read_text())
    [row] = report["rows"]
    assert row["mode"] == "off" and row["steps"] == 50 and row["first_50_steps_s"] > 0
    assert "| off | - |" in (tmp_path / "c" / "run_costs_compile.md").read_text()

    result = run_script("tools/run_costs.py", "concurrency", "--out", tmp_path / "k", "--processes", "2",
                        "--kimg", 0.16, "--compile", "off", *common)  # 0.16 kimg: 10 steps of 16
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "k" / "run_costs_concurrency.json").read_text())["rows"]
    assert [r["processes"] for r in rows] == [2] and len(rows[0]["img_per_s_each"]) == 2
    for r in rows:
        assert r["runs_per_hour"] == pytest.approx(r["processes"] * 3600 / r["seconds"])
    assert all(json.loads(line)["step"] <= 10 for line in (tmp_path / "k" / "concurrent_2_1" / "log.jsonl").open()
               if '"train"' in line)
    table = (tmp_path / "k" / "run_costs_concurrency.md").read_text()
    assert "| 2 |" in table and "1.00x" in table


def test_run_costs_refuses_fewer_than_50_steps(tmp_path):
    line = one_line_error(run_script("tools/run_costs.py", "compile", "--steps", 20, "--out", tmp_path))
    assert "--steps 20" in line
