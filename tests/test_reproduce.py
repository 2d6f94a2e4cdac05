"""scripts/reproduce.py end to end at toy scale: teacher, grid, seeds, reused points, tables, resume."""

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GLUE = REPO.parent / "shared" / "glue"


def _scores(sweep_dir: Path) -> dict[int, float]:
    with open(sweep_dir / "sweep.csv", newline="") as f:
        return {int(r["seed"]): float(r["score"]) for r in csv.DictReader(f)}


def test_reproduce_small(tmp_path):
    out = tmp_path / "repro"
    cmd = [sys.executable, str(REPO / "scripts" / "reproduce.py"), f"--glue-dir={GLUE}", f"--out={out}",
           "--tasks=rte", "--layers=3,2", "--tune-layers=3", "--methods=FT,PKD-Skip", "--seeds=0,1",
           "--train-examples=48", "--max-seq-length=32", "--teacher-epochs=1", "--student-epochs=1",
           "--temperatures=5", "--alphas=0.5,0.9", "--betas=100", "--students-per-chunk=1", "--speed-repeats=1"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())

    skip3 = summary["students"]["rte"]["3"]["PKD-Skip"]
    assert skip3["grid_size"] == 2  # alpha 0.5 and 0.9 with seed 0
    grid = json.loads((out / "rte/k3/pkd-skip/grid/results.json").read_text())["best"]
    assert skip3["point"] == {k: grid[k] for k in ("temperature", "alpha", "beta")}
    # Seed 0 of the chosen point comes from the grid, seed 1 from its own sweep; the table's
    # figures are exactly those runs' dev scores.
    with open(out / "rte/k3/pkd-skip/grid/sweep.csv", newline="") as f:
        seed0 = [float(r["score"]) for r in csv.DictReader(f) if float(r["alpha"]) == grid["alpha"]]
    assert skip3["seeds"] == [0, 1]
    assert skip3["score"] == [seed0[0], _scores(out / "rte/k3/pkd-skip/seeds")[1]]

    # The 2-layer students did not search the grid: they trained the 3-layer point, every seed.
    skip2 = summary["students"]["rte"]["2"]["PKD-Skip"]
    assert skip2["grid_size"] == 0 and skip2["point"] == skip3["point"]
    assert not (out / "rte/k2/pkd-skip/grid").exists()
    assert sorted(_scores(out / "rte/k2/pkd-skip/seeds")) == [0, 1]
    ft2 = summary["students"]["rte"]["2"]["FT"]
    assert ft2["score"] == [_scores(out / "rte/k2/ft/seeds")[s] for s in (0, 1)]

    text = (out / "results.md").read_text()
    teacher = summary["teacher"]["score"]["rte"]
    cell = f"{100 * statistics.fmean(skip3['score']):.1f} ± {100 * statistics.stdev(skip3['score']):.1f}"
    ratio = f"{100 * statistics.fmean(skip3['score']) / teacher:.1f}"
    assert f"| PKD-Skip-3 | {cell} | {ratio} |" in text
    assert "(k=3's)" in text and "(of 2)" in text
    assert [r["layers"] for r in summary["speed"]] == [6, 3, 2]
    # E|u - mean(u)|^2 = 1 - |mean(u)|^2 for unit vectors u: within [0, 1]. MiniLM's lower-layer
    # [CLS] hardly depends on the input; its top layer's does (docs/results.md).
    spread = summary["teacher"]["cls_spread"]["rte"]
    assert len(spread) == 6 and all(0 <= x <= 1 for x in spread)
    assert spread[0] < 1e-3 < spread[-1]
    assert "| RTE | " + " | ".join(f"{x:.4f}" for x in spread) + " |" in text

    # Everything is finished: a rerun trains nothing and writes the same table.
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[reproduce]" not in again.stdout
    assert json.loads((out / "results.json").read_text())["students"] == summary["students"]

    # --report-only trains nothing: a task not run yet shows "–" and the average says so.
    partial = [a.replace("--tasks=rte", "--tasks=rte,mrpc") for a in cmd] + ["--report-only"]
    proc = subprocess.run(partial, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[reproduce]" not in proc.stdout and not (out / "mrpc").exists()
    assert f"| PKD-Skip-3 | {cell} | – | {ratio} (1 of 2 tasks) |" in (out / "results.md").read_text()

