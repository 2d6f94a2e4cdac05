"""The accelerator check's CPU dry run: `python -m benchmarks.accel_check --smoke` must work end to
end before any accelerator time is spent on it (its correctness stage runs tests/test_accelerator.py
with small shapes, its loop stage distils in bfloat16 on real SST-2)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_smoke_run_passes_and_reports_every_stage(glue_dir, tmp_path):
    """The device check's every stage at small shapes on the CPU. Its correctness stage runs here
    (--tests) only the accelerator test without a CPU counterpart in the suite; the others have one
    (test_bert's bf16 bounds, test_sweep's vmapped students, test_accelerator's async checkpoint on
    the four fake devices), and on a device the check runs them all."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.accel_check", "--smoke", f"--glue-dir={glue_dir}",
                           f"--out={tmp_path}", "--tests=compiles_once"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.splitlines()[0])["accel_check"]
    assert summary["ok"] and summary["smoke"]
    checks = {row["check"].split(":")[0]: row for row in summary["rows"]}
    assert checks["correctness (pytest -m accelerator)"]["status"] == "ok"
    report = json.loads((tmp_path / "accel_check.json").read_text())
    tests = report["correctness"]["tests"]
    assert tests == {"test_distill_step_compiles_once_and_runs_without_host_transfers[online]": "passed",
                     "test_distill_step_compiles_once_and_runs_without_host_transfers[cached]": "passed"}
    assert {"train pkd_online", "efficiency", "sweep", "loop"} <= set(checks)
    assert {"profile finetune", "profile pkd_online", "profile pkd_cached"} <= set(checks)  # top ops
    loop = report["loop"]
    assert loop["ok"] and loop["steps"] == 10 and loop["steps_device_seconds"] > 0
    assert sum(v["steps"] for v in loop["by_length"].values()) == 10
    # Its steps are timed with the programs run.py compiled (read from its cache), not compiled twice.
    assert loop["step_programs_from_cache"] == len(loop["by_length"])
    # The loop's time splits into its steps and its evaluation and saving; every stage is timed.
    assert 0 < loop["train_seconds"] < loop["loop_seconds"]
    assert loop["train_seconds"] + loop["eval_save_seconds"] == pytest.approx(loop["loop_seconds"])
    assert set(report["stage_seconds"]) == {"correctness", "bench", "loop"}
    assert sum(report["stage_seconds"].values()) <= report["seconds"]
    run = json.loads((tmp_path / "loop" / "student" / "results.json").read_text())
    assert run["config"]["dtype"] == "bfloat16" and 0 < run["metrics"]["accuracy"] <= 1
    assert (tmp_path / "accel_check.md").read_text().startswith("Device: ")
