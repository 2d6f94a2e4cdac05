"""scripts/reproduce.py end to end at toy scale: teacher, advisor, grids (KD's point handed to the patient
methods), seeds, reused points, the statistics in the tables, the sittings ledger, resume, --report-only, --doc."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from scipy import stats as sps

REPO = Path(__file__).resolve().parents[1]
GLUE = REPO.parent / "shared" / "glue"


def _scores(sweep_dir: Path) -> dict[int, float]:
    with open(sweep_dir / "sweep.csv", newline="") as f:
        return {int(r["seed"]): float(r["score"]) for r in csv.DictReader(f)}


def _ci(x) -> tuple[float, float, float]:
    """mean and the 95 % Student t interval, transcribed from the textbook formula."""
    x = np.asarray(x, np.float64)
    half = sps.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size)
    return x.mean(), x.mean() - half, x.mean() + half


def _run(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_reproduce_small(tmp_path, tokenizer):
    out = tmp_path / "study"
    cmd = [sys.executable, str(REPO / "scripts" / "reproduce.py"), f"--glue-dir={GLUE}", f"--out={out}",
           "--tasks=rte", "--layers=3,2", "--tune-layers=3", "--methods=KD,Advised", "--seeds=0,1",
           "--train-examples=48", "--max-seq-length=32", "--teacher-epochs=1", "--student-epochs=1",
           "--temperatures=5", "--alphas=0.5,0.9", "--advised-betas=2", "--students-per-chunk=1",
           "--speed-repeats=1", "--speed-shape=8x32", "--multitask-method=KD", "--multitask-seeds=1"]
    first = _run(cmd, tmp_path)
    # KD's students ignore the teacher's near-constant [CLS] features (beta = 0): no warning about them.
    assert "hardly vary" not in first.stderr
    summary = json.loads((out / "results.json").read_text())
    k3 = summary["students"]["rte"]["3"]

    # KD searched alpha; the advised method trained KD's point with its own beta grid, and the
    # advisor's features and map (MiniLM: mean features, skip) with the cka distance.
    kd_best = json.loads((out / "rte/k3/kd/grid/results.json").read_text())["best"]
    assert k3["KD"]["grid_size"] == 2
    assert k3["KD"]["point"] == {k: kd_best[k] for k in ("temperature", "alpha", "beta")}
    assert k3["Advised"]["point"] == {**k3["KD"]["point"], "beta": 2.0}
    advice = json.loads((out / "rte/advice-k3/advice.json").read_text())["recommendation"]
    assert (advice["features"], advice["strategy"]) == ("mean", "skip")
    config = json.loads((out / "rte/k3/advised/grid/config.json").read_text())
    assert (config["patient_features"], config["strategy"], config["distance"]) == ("mean", "skip", "cka")

    # Seed 0 comes from each grid, seed 1 from the chosen point's own sweep.
    with open(out / "rte/k3/kd/grid/sweep.csv", newline="") as f:
        kd0 = [float(r["score"]) for r in csv.DictReader(f) if float(r["alpha"]) == kd_best["alpha"]][0]
    assert k3["KD"]["seeds"] == [0, 1]
    assert k3["KD"]["score"] == [kd0, _scores(out / "rte/k3/kd/seeds")[1]]

    # The 2-layer students did not search: they trained the 3-layer points, every seed.
    k2 = summary["students"]["rte"]["2"]
    assert all(k2[m]["grid_size"] == 0 and k2[m]["point"] == k3[m]["point"] for m in ("KD", "Advised"))
    assert not (out / "rte/k2/kd/grid").exists()
    assert k2["KD"]["score"] == [_scores(out / "rte/k2/kd/seeds")[s] for s in (0, 1)]

    # The tables hold the statistics of those scores: mean ± std [t interval], and the paired
    # difference against scipy's paired t-test.
    text = (out / "results.md").read_text()
    mean, low, high = _ci(k3["KD"]["score"])
    std = np.std(k3["KD"]["score"], ddof=1)
    assert f"| KD-3 | {100 * mean:.1f} ± {100 * std:.1f} [{100 * low:.1f}, {100 * high:.1f}] |" in text
    d = np.subtract(k3["Advised"]["score"], k3["KD"]["score"])
    row = next(line for line in text.splitlines() if line.startswith("| the advised objective above KD"))
    mean, low, high = _ci(d) if np.ptp(d) > 0 else (d[0], d[0], d[0])  # equal differences: a zero-width CI
    assert f"{100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}], p=" in row
    if np.ptp(d) > 0:
        p = sps.ttest_rel(k3["Advised"]["score"], k3["KD"]["score"]).pvalue
        assert (f"p={p:.2g}" if p >= 0.001 else "p<0.001") in row
    assert ("holds" in row) == (low > 0) and ("reversed" in row) == (high < 0)

    # The data table counts the examples the length cuts, on the whole split.
    from pkd_jax.data import glue
    dev = glue.load_split("rte", "validation", GLUE)
    cut = sum(len(ids) > 32 for ids in tokenizer(list(dev["text_a"]), list(dev["text_b"]))["input_ids"])
    assert f"| {cut} of {len(dev)} (" in text
    assert [r["layers"] for r in summary["speed"]] == [6, 3, 2]
    assert "### Inference speed (batch 8, seq 32, exported models)" in text

    # The multi-task student (here of one task and one seed: the orchestration, not the mixing, is
    # under test) trains KD's chosen point per task and is compared with the same seed's student.
    config = json.loads((out / "multitask/kd/seed1/config.json").read_text())
    rte = config["per_task"]["rte"]
    assert (config["seed"], rte["alpha"], rte["beta"]) == (1, kd_best["alpha"], 0.0)
    mt = json.loads((out / "multitask/kd/seed1/results.json").read_text())["per_task"]["rte"]["metrics"]["score"]
    row = next(line for line in text.splitlines() if line.startswith("| RTE (Accuracy) | "))
    single = dict(zip(k3["KD"]["seeds"], k3["KD"]["score"]))[1]  # the single-task KD student of seed 1
    assert f"| {100 * single:.1f} ± – [–, –] | {100 * mt:.1f} ± – [–, –] | {100 * (mt - single):+.1f} [–, –]" in row

    # One sitting, counting every run it trained: the teacher, 5 + 4 students and the multi-task one.
    sittings = [json.loads(line) for line in (out / "sittings.jsonl").read_text().splitlines()]
    assert [s["runs_trained"] for s in sittings] == [11] and sittings[0]["cpu_s"] > 0

    # Everything is finished: a rerun trains nothing, adds no sitting and gives the same students.
    again = _run(cmd, tmp_path)
    assert "[reproduce]" not in again.stdout
    assert len((out / "sittings.jsonl").read_text().splitlines()) == 1
    rerun = json.loads((out / "results.json").read_text())
    assert rerun["students"] == summary["students"]
    assert rerun["speed"] == summary["speed"]  # measured once (OUT/speed.json), not timed again

    # --report-only trains nothing: a task not run yet shows "–"; --doc rewrites only the marked part.
    page = tmp_path / "results.md"
    page.write_text("# Head\n<!-- study:begin -->\nold\n<!-- study:end -->\n## Tail\n")
    partial = [a.replace("--tasks=rte", "--tasks=rte,mrpc") for a in cmd] + ["--report-only", f"--doc={page}"]
    proc = _run(partial, tmp_path)
    assert "[reproduce]" not in proc.stdout and not (out / "mrpc").exists()
    generated = (out / "results.md").read_text()
    assert next(line for line in generated.splitlines() if line.startswith("| KD-3 |")).count("| – |") == 1
    assert page.read_text() == f"# Head\n<!-- study:begin -->\n{generated}<!-- study:end -->\n## Tail\n"


def test_a_run_another_invocation_is_training_is_left_to_it(tmp_path):
    """Two invocations side by side: one reaching a workdir the other holds (here the teacher's)
    leaves it to that one, skips what needs its result, and still writes the tables."""
    out = tmp_path / "study"
    teacher = out / "rte" / "teacher"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pkd_jax import fsutil; "
                               "fsutil.hold_workdir(sys.argv[1]); print('held', flush=True); time.sleep(600)",
                               str(teacher)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = _run([sys.executable, str(REPO / "scripts" / "reproduce.py"), f"--glue-dir={GLUE}", f"--out={out}",
                     "--tasks=rte", "--layers=2", "--methods=KD", "--seeds=0", "--train-examples=48",
                     "--max-seq-length=32"], tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert f"[reproduce] {teacher}: another invocation is training it; left to that one" in proc.stdout
    assert list(teacher.iterdir()) == [] and not (out / "rte" / "k2").exists()
    assert not (out / "sittings.jsonl").exists()  # this invocation trained nothing
    assert "| Teacher BERT | – | 100 |" in (out / "results.md").read_text()  # tables of what is finished
