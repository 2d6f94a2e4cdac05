"""The report on synthetic run and sweep workdirs with hand-chosen numbers (no training)."""

import json
import math
from pathlib import Path

import pytest
from flax import nnx
from matplotlib import image

from pkd_jax import bert, checkpoints, report
from pkd_jax.sweep import plan

# name: (kind, config.layers, model layers, beta, strategy, best score, best step, train ex/s)
RUNS = {
    "teacher": ("finetune", None, 6, None, None, 0.80, 20, 100.0),
    "ft3": ("finetune", 3, 3, None, None, 0.60, 10, 200.0),
    "kd3": ("distill", 3, 3, 0.0, "skip", 0.64, 30, 180.0),
    "pkd_skip3": ("distill", 3, 3, 100.0, "skip", 0.70, 30, 170.0),
    "pkd_last3": ("distill", 3, 3, 100.0, "last", 0.68, 20, 170.0),
}
PARAMS = {6: (22_700_000, 10_800_000), 3: (17_400_000, 5_400_000)}


def make_run(root: Path, name: str, kind: str, config_layers, layers: int, beta, strategy, score: float,
             best_step: int, ex_s: float, *, task: str = "mrpc", teacher: Path | None = None,
             finished: bool = True) -> Path:
    """A workdir as train.py leaves it: config.json, metrics.jsonl and (finished) results.json."""
    w = root / name
    w.mkdir(parents=True)
    config = {"task": task, "kind": kind, "model": "minilm-l6", "layers": config_layers}
    if kind == "distill":
        config |= {"teacher": str(teacher), "beta": beta, "strategy": strategy, "alpha": 0.5, "temperature": 10.0}
    (w / "config.json").write_text(json.dumps(config))
    lines = []
    for step in (10, 20, 30):
        lines.append({"step": step, "split": "train", "loss": 1.0 / step, "accuracy": 0.5, "grad_norm": 1.0,
                      "examples_per_s": ex_s, "learning_rate": 1e-5, "epoch": step / 30})
        s = score if step == best_step else score - 0.05
        lines.append({"step": step, "split": "dev", "accuracy": s - 0.02, "f1": s, "score": s})
    (w / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if not finished:
        return w
    best = {"step": best_step, "metrics": {"accuracy": score - 0.02, "f1": score, "score": score}}
    results = {
        "task": task, "kind": kind, "metric": "f1", "metrics": best["metrics"], "step": best_step,
        "best": best, "last": {"step": 30, "metrics": lines[-1]}, "total_steps": 30, "train_seconds": 10.0,
        "examples_per_s": ex_s,
        "model": {"pretrained": "minilm-l6", "layers": layers, "hidden_size": 384,
                  "params": PARAMS[layers][0], "params_without_embeddings": PARAMS[layers][1]},
        "teacher": None if teacher is None else {"path": str(teacher / "model"), "layers": 6, "layer_map": [2, 4]},
        "train_examples": 100, "dev_examples": 50, "test_predictions": [], "config": config,
    }
    (w / "results.json").write_text(json.dumps(results))
    return w


@pytest.fixture
def workdirs(tmp_path) -> list[Path]:
    """The five runs, given in a shuffled order (the report sorts them)."""
    root = tmp_path / "runs"
    teacher = root / "teacher"
    paths = {name: make_run(root, name, *spec, teacher=teacher if spec[0] == "distill" else None)
             for name, spec in RUNS.items()}
    return [paths[n] for n in ("pkd_skip3", "ft3", "teacher", "pkd_last3", "kd3")]


def test_rows_labels_order_and_pct(workdirs):
    rows = report.summary_rows(report.load_runs(workdirs))
    assert [r.name for r in rows] == ["teacher", "ft3", "kd3", "pkd_last3", "pkd_skip3"]
    assert [r.method for r in rows] == ["Teacher", "FT-3", "KD-3", "PKD-Last-3", "PKD-Skip-3"]
    pct = {r.name: r.pct_of_teacher for r in rows}
    # score / 0.80 by hand
    assert pct == pytest.approx({"teacher": 100.0, "ft3": 75.0, "kd3": 80.0, "pkd_last3": 85.0, "pkd_skip3": 87.5})
    assert {r.teacher for r in rows} == {"teacher"}
    skip = rows[-1]
    assert (skip.metric, skip.score, skip.step, skip.layers) == ("f1", 0.70, 30, 3)
    assert skip.metrics == pytest.approx({"accuracy": 0.68})
    assert skip.params_without_embeddings == 5_400_000 and skip.speedup is None


def test_explicit_layer_list_label_and_referenced_teacher(tmp_path):
    root = tmp_path / "runs"
    # Two 6-layer fine-tuned runs: the student's results.json names the second as its teacher.
    make_run(root, "t_a", "finetune", None, 6, None, None, 0.90, 10, 1.0)
    t_b = make_run(root, "t_b", "finetune", None, 6, None, None, 0.50, 10, 1.0)
    student = make_run(root, "pkd", "distill", 3, 3, 10.0, "2,4", 0.45, 10, 1.0, teacher=t_b)
    rows = {r.name: r for r in report.summary_rows(report.load_runs([root / "t_a", t_b, student]))}
    assert rows["pkd"].method == "PKD-[2,4]-3"
    assert rows["pkd"].teacher == "t_b" and rows["pkd"].pct_of_teacher == pytest.approx(90.0)
    assert rows["t_b"].teacher == "t_b" and rows["t_b"].pct_of_teacher == pytest.approx(100.0)
    assert rows["t_a"].method == "Teacher"  # fine-tuned at full depth


def test_no_teacher_without_a_deeper_run(workdirs):
    rows = report.summary_rows(report.load_runs([workdirs[1]]))  # ft3 alone
    assert rows[0].method == "FT-3" and rows[0].pct_of_teacher is None and rows[0].teacher is None


def test_markdown_cells(workdirs):
    text = report.markdown_table(report.summary_rows(report.load_runs(workdirs)))
    lines = text.splitlines()
    assert lines[0] == "## MRPC"
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header[:8] == ["Run", "Method", "Layers", "Params (M)", "Params w/o emb. (M)", "Dev F1", "Accuracy",
                          "% of teacher"]
    assert "Infer ex/s" not in header
    cells = {row[0]: row for row in ([c.strip() for c in l.strip("|").split("|")] for l in lines[4:])}
    assert cells["teacher"][:8] == ["teacher", "**Teacher**", "6", "22.7", "10.8", "80.0", "78.0", "100.0"]
    assert cells["pkd_skip3"][:10] == ["pkd_skip3", "PKD-Skip-3", "3", "17.4", "5.4", "70.0", "68.0", "87.5",
                                       "30/30", "170"]
    assert cells["ft3"][7] == "75.0"


def test_several_tasks_are_grouped(workdirs, tmp_path):
    rte = make_run(tmp_path / "other", "rte_ft3", "finetune", 3, 3, None, None, 0.55, 10, 1.0, task="rte")
    rows = report.summary_rows(report.load_runs([rte, *workdirs]))
    assert [r.task for r in rows] == ["mrpc"] * 5 + ["rte"]  # GLUE order
    text = report.markdown_table(rows)
    assert text.index("## MRPC") < text.index("## RTE")
    out = tmp_path / "out"
    assert report.main([str(rte), *map(str, workdirs), "--out", str(out)]) == 0
    assert {p.name for p in out.glob("*.png")} == {f"{kind}_{task}.png" for kind in ("curves", "summary")
                                                   for task in ("mrpc", "rte")}


def _png_shape(path: Path) -> tuple[int, ...]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return image.imread(path).shape


def test_cli_writes_report_and_plots(workdirs, tmp_path, capsys):
    out = tmp_path / "out"
    assert report.main([*map(str, workdirs), "--out", str(out), "--json"]) == 0
    stdout = capsys.readouterr().out
    assert (out / "report.md").read_text().count("| pkd_last3 | PKD-Last-3 |") == 1
    assert "| kd3 | KD-3 |" in stdout
    rows = [json.loads(l) for l in stdout.splitlines() if l.startswith("{")]
    assert [r["method"] for r in rows] == ["Teacher", "FT-3", "KD-3", "PKD-Last-3", "PKD-Skip-3"]
    assert rows[2]["pct_of_teacher"] == pytest.approx(80.0)
    for name in ("curves_mrpc.png", "summary_mrpc.png"):
        shape = _png_shape(out / name)
        assert len(shape) == 3 and shape[0] > 300 and shape[1] > 500 and shape[2] in (3, 4)
        assert f"]({name})" in (out / "report.md").read_text()


def test_default_out_is_common_parent(workdirs):
    assert report.default_out(workdirs) == workdirs[0].parent.resolve()


def test_not_a_run_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(report.RunError, match=f"{empty}.*no results.json"):
        report.load_run(empty)
    assert report.main([str(empty), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "no results.json" in err
    with pytest.raises(report.RunError, match="no such directory"):
        report.load_run(tmp_path / "missing")


def test_speed_without_model_is_a_clear_error(workdirs, capsys):
    assert report.main([str(workdirs[0]), "--speed"]) == 2
    assert f"{workdirs[0]}: no model/config.json" in capsys.readouterr().err


def test_unfinished_run_is_plotted_not_tabled(workdirs, tmp_path, capsys):
    partial = make_run(tmp_path / "runs", "partial", "distill", 3, 3, 100.0, "skip", 0.5, 10, 1.0,
                       teacher=workdirs[2], finished=False)
    with pytest.raises(report.RunError, match="unfinished run: metrics.jsonl but no results.json"):
        report.load_run(partial)
    out = tmp_path / "out"
    assert report.main([str(workdirs[2]), str(partial), "--out", str(out)]) == 0
    assert "partial" not in capsys.readouterr().out  # no table row
    md = (out / "report.md").read_text()
    assert "Unfinished" in md and "partial" in md
    assert _png_shape(out / "curves_mrpc.png")[0] > 300


def _tiny_model(path: Path, layers: int) -> None:
    config = bert.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=64)
    checkpoints.save_pretrained(bert.BertForSequenceClassification(config, rngs=nnx.Rngs(0)), path)


def test_speed_columns(tmp_path, capsys):
    root = tmp_path / "runs"
    teacher = make_run(root, "teacher", "finetune", None, 6, None, None, 0.8, 10, 1.0)
    student = make_run(root, "pkd3", "distill", 3, 3, 100.0, "skip", 0.7, 10, 1.0, teacher=teacher)
    _tiny_model(teacher / "model", 2)
    _tiny_model(student / "model", 1)
    out = tmp_path / "out"
    args = [str(teacher), str(student), "--out", str(out), "--speed", "--batch-size", "4", "--seq-len", "16",
            "--repeats", "2", "--json"]
    assert report.main(args) == 0
    stdout = capsys.readouterr().out
    rows = {r["name"]: r for r in (json.loads(l) for l in stdout.splitlines() if l.startswith("{"))}
    for row in rows.values():
        assert math.isfinite(row["infer_examples_per_s"]) and row["infer_examples_per_s"] > 0
    assert rows["teacher"]["speedup"] == 1.0
    assert rows["pkd3"]["speedup"] == pytest.approx(
        rows["pkd3"]["infer_examples_per_s"] / rows["teacher"]["infer_examples_per_s"])
    assert "Infer ex/s" in stdout and "Speed-up" in stdout and "1.00×" in stdout
    assert "batch 4 x 16 tokens" in (out / "report.md").read_text()


# --------------------------------------------------------------------------------------------
# Sweeps: sweep.csv -> rows -> sweep.md, heatmap.png and the CLI (no training)
# --------------------------------------------------------------------------------------------

# (T, β, best step, best accuracy, failed at step): one seed, lr 2e-5, α 0.5.
STUDENTS = [(5.0, 10.0, 100, 0.875, None), (5.0, 100.0, 200, 0.91, None),
            (10.0, 10.0, 100, 0.5, 150),  # failed after an evaluation: keeps its score
            (10.0, 100.0, None, None, 20)]  # failed before any evaluation
SWEEP_HEADER = "| Rank | Student | Seed | Learning rate | T | α | β | Dev Accuracy | Best step | Status |"
SWEEP_LINES = [  # best first; the unevaluated student last
    "| ★ **1** | **1** | **0** | **2e-05** | **5** | **0.5** | **100** | **91.0** | **200** | **ok** |",
    "| 2 | 0 | 0 | 2e-05 | 5 | 0.5 | 10 | 87.5 | 100 | ok |",
    "| 3 | 2 | 0 | 2e-05 | 10 | 0.5 | 10 | 50.0 | 100 | failed (NaN at step 150) |",
    "| 4 | 3 | 0 | 2e-05 | 10 | 0.5 | 100 | – | – | failed (NaN at step 20) |",
]


def sweep_rows() -> list[dict]:
    """The rows the sweep records for STUDENTS (chunks of two)."""
    rows = []
    for i, (t, beta, step, acc, failed) in enumerate(STUDENTS):
        best = None if step is None else {"step": step, "metrics": {"accuracy": acc, "score": acc}}
        last = None if step is None else {"step": 300, "metrics": {"accuracy": acc - 0.01, "score": acc - 0.01}}
        tracked = {"best": best, "last": last, "failed": None if failed is None else {"step": failed, "loss": math.nan}}
        rows.append(plan.student_row(i // 2, plan.Point(i, 0, 2e-5, t, 0.5, beta), tracked))
    return rows


def make_sweep(workdir: Path) -> Path:
    """A sweep workdir as far as the report reads it: sweep.csv and config.json."""
    workdir.mkdir(parents=True)
    (workdir / "sweep.csv").write_text(plan.csv_table(sweep_rows()))
    (workdir / "config.json").write_text(json.dumps({"task": "sst2"}))
    return workdir


def test_read_sweep_rows_round_trips_csv_table(tmp_path):
    rows = sweep_rows()
    (tmp_path / "sweep.csv").write_text(plan.csv_table(rows))
    read = report.read_sweep_rows(tmp_path / "sweep.csv")
    assert read == rows
    assert [type(r["student"]) for r in read] == [int] * 4 and read[0]["learning_rate"] == 2e-5
    assert read[2]["status"] == "failed" and read[2]["failed_step"] == 150 and read[2]["metrics"] == {"accuracy": 0.5}
    assert read[3]["score"] is None and read[3]["best_step"] is None and read[3]["metrics"] == {}


def test_write_sweep_report(tmp_path):
    w = make_sweep(tmp_path / "sweep")
    assert report.write_sweep_report(w) == w / "sweep.md"
    md = (w / "sweep.md").read_text().splitlines()
    assert md[0] == "# SST-2: hyper-parameter sweep (4 students)"
    assert md[2] == ("Best (★, exported to `best_model/`): dev Accuracy 91.0 at step 200 "
                     "(student 1: T=5, alpha=0.5, beta=100, lr=2e-05, seed 0).")
    table = [line for line in md if line.startswith("|")]
    assert table[0] == SWEEP_HEADER and table[2:] == SWEEP_LINES  # one line per student
    assert "![heatmap](heatmap.png)" in md
    shape = _png_shape(w / "heatmap.png")
    assert len(shape) == 3 and shape[0] > 200 and shape[1] > 400


def test_cli_renders_a_sweep_workdir(tmp_path, capsys):
    w = make_sweep(tmp_path / "sweep")
    assert report.main([str(w)]) == 0
    stdout = capsys.readouterr().out.splitlines()
    assert stdout[0] == f"## SST-2 sweep: {w}"
    assert stdout[2] == SWEEP_HEADER and stdout[4:8] == SWEEP_LINES
    assert (w / "sweep.md").read_text().count("| 2 | 0 | 0 | 2e-05 |") == 1
    assert _png_shape(w / "heatmap.png")[0] > 200
    assert not list(tmp_path.rglob("report.md"))  # no runs: no run report


def test_cli_mixes_sweeps_and_runs(workdirs, tmp_path, capsys):
    w = make_sweep(tmp_path / "sweep")
    (w / "results.json").write_text(json.dumps({"task": "sst2", "kind": "sweep", "metric": "accuracy"}))
    with pytest.raises(report.RunError, match=f"{w}: a sweep workdir, not a run"):
        report.load_run(w)
    out = tmp_path / "out"
    assert report.main([str(workdirs[0]), str(w), *map(str, workdirs[1:]), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert SWEEP_LINES[0] in stdout and "| kd3 | KD-3 |" in stdout
    assert stdout.index("## SST-2 sweep") < stdout.index("## MRPC")
    md = (out / "report.md").read_text()
    assert "## MRPC" in md and "SST-2" not in md and "sweep" not in md
    assert (w / "sweep.md").exists() and (w / "heatmap.png").exists()


def test_sweep_without_sweep_csv_is_a_clear_error(tmp_path, capsys):
    w = tmp_path / "sweep"
    w.mkdir()
    (w / "config.json").write_text(json.dumps({"task": "sst2", "kind": "sweep"}))
    (w / "metrics.jsonl").write_text("")
    assert report.is_sweep(w)
    assert report.main([str(w)]) == 2
    assert f"{w}: a sweep workdir without sweep.csv" in capsys.readouterr().err


def test_method_labels_name_the_objectives_beyond_the_papers(tmp_path):
    def label(**config):
        return report.method_label(report.Run(tmp_path, {"kind": "distill", "layers": 3, **config}, [], None))

    assert label(beta=100.0, strategy="skip") == "PKD-Skip-3"
    assert label(beta=100.0, strategy="last", patient_features="mean", distance="cka") == "PKD-Last-3 (mean, cka)"
    assert label(beta=10.0, strategy="2,4", hidden_mse=1.0, attention_kl=0.5) == "PKD-[2,4]-3 (+hidden, +attention)"
    assert label(beta=0.0, attention_kl=1.0) == "KD-3 (+attention)"
