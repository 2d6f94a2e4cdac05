"""Compare finished runs like the paper does (teacher vs students): a markdown table and plots.

  python -m pkd_jax.report runs/rte/teacher runs/rte/ft3 runs/rte/kd3 runs/rte/pkd-skip3 \
      [--out DIR] [--speed [--batch-size 128 --seq-len 128 --repeats 5]] [--json]

Each argument is a `run.py --workdir` (config.json, metrics.jsonl, results.json, model/). Writes
`DIR/report.md` (also printed), `DIR/curves_<task>.png` (train loss and dev main metric against
the step) and `DIR/summary_<task>.png` (best dev score per run). DIR defaults to the workdirs'
common parent (`./report` when that is the filesystem root). `--json` also prints one JSON line
per table row (metrics as fractions, not percent).

Method labels: Teacher (fine-tuned at full depth, or the model a distil run among the inputs
learnt from), FT-k (fine-tuned with layers=k), KD-k (distilled with beta=0), PKD-Skip-k /
PKD-Last-k / PKD-[2,4]-k (beta > 0 and strategy skip, last or an explicit teacher-layer list).

The teacher a row is compared with ("% of teacher", "speed-up"): for a distil run, the run among
the inputs whose `model/` is the results.json teacher.path (relative paths resolve from the
current directory, as run.py did); otherwise the task's deepest fine-tuned run, when some run of
the task is shallower. Several tasks: one section per task, in GLUE order.

Unfinished runs (metrics.jsonl but no results.json) are drawn in the curves, marked
"(unfinished)", and listed in a note; they get no table row. Any other path that is not a run
is an error naming the path and what is missing (exit status 2).

`--speed` times a jitted forward pass of each run's model/ on random token ids (compilation
and a warm-up call excluded, every call ends in block_until_ready, median of --repeats calls).

From Python: `load_run`, `summary_rows`, `measure_speed`, `markdown_table`, `plot_curves`,
`plot_summary`, `write_report`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from matplotlib.figure import Figure

import csv
import itertools

import numpy as np

from pkd_jax import data, metrics
from pkd_jax.sweep import plan as sweep_plan

# Same-depth rows are listed in the paper's order: baselines first, then the PKD variants.
_METHOD_ORDER = ("Teacher", "FT", "KD", "PKD-Last", "PKD-Skip", "PKD")
_TEACHER_COLOR = "#3a3a3a"


class RunError(ValueError):
    """A path that is not a (finished) run workdir; the message names the path and what is missing."""


@dataclasses.dataclass
class Run:
    """One workdir: its config, its metrics.jsonl history and, when finished, its results.json."""

    path: Path
    config: dict[str, Any]
    history: list[dict[str, Any]]
    results: dict[str, Any] | None  # None: training has not finished
    name: str = ""  # set by load_runs to a label unique among the inputs

    def __post_init__(self):
        self.name = self.name or self.path.name

    @property
    def task(self) -> str:
        return self.config["task"]

    @property
    def kind(self) -> str:
        return self.config["kind"]

    @property
    def finished(self) -> bool:
        return self.results is not None

    @property
    def layers(self) -> int | None:
        """Encoder depth: from results.json, else the config (None: the checkpoint's full depth)."""
        return self.results["model"]["layers"] if self.results else self.config.get("layers")

    def split(self, split: str) -> list[dict[str, Any]]:
        return [line for line in self.history if line.get("split") == split]


@dataclasses.dataclass
class Row:
    """One table row; metric values are fractions (the table shows them ×100)."""

    task: str
    name: str
    path: str
    method: str
    kind: str
    layers: int
    params: int
    params_without_embeddings: int
    metric: str  # the main (model-selection) metric
    score: float
    metrics: dict[str, float]  # the other dev metrics at the best step
    step: int
    total_steps: int
    train_examples_per_s: float
    teacher: str | None  # name of the run this row is compared with
    pct_of_teacher: float | None
    infer_examples_per_s: float | None = None
    speedup: float | None = None


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{path}: not valid JSON ({e})") from None


def _read_history(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise RunError(f"{path}: not valid JSON lines ({e})") from None


def load_run(path: str | os.PathLike, *, allow_unfinished: bool = False) -> Run:
    """A run workdir. Raises RunError when `path` is not one, or is unfinished and not allowed."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: {'not a directory' if path.exists() else 'no such directory'} "
                       "(expected a run.py --workdir)")
    results_file, metrics_file, config_file = (path / n for n in ("results.json", "metrics.jsonl", "config.json"))
    if results_file.exists():
        results = _read_json(results_file)
        config = results.get("config") or _read_json(config_file)
        return Run(path, config, _read_history(metrics_file), results)
    if not metrics_file.exists():
        raise RunError(f"{path}: not a run workdir: no results.json and no metrics.jsonl "
                       "(expected the --workdir of a run.py run)")
    if not allow_unfinished:
        raise RunError(f"{path}: unfinished run: metrics.jsonl but no results.json "
                       "(training stopped early or is still going; the same run.py command resumes it)")
    if not config_file.exists():
        raise RunError(f"{path}: unfinished run without config.json: cannot tell its task or method")
    return Run(path, _read_json(config_file), _read_history(metrics_file), None)


def load_runs(paths: Sequence[str | os.PathLike], *, allow_unfinished: bool = False) -> list[Run]:
    """load_run for each path; runs whose directory names collide are named parent/name."""
    runs = [load_run(p, allow_unfinished=allow_unfinished) for p in paths]
    names = [r.path.name for r in runs]
    for run in runs:
        if names.count(run.path.name) > 1:
            run.name = f"{run.path.resolve().parent.name}/{run.path.name}"
    return runs


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


def method_label(run: Run) -> str:
    """Teacher | FT-k | KD-k | PKD-Skip-k | PKD-Last-k | PKD-[i,j]-k (see the module docstring)."""
    k = run.layers
    if run.kind == "finetune":
        return "Teacher" if run.config.get("layers") is None else f"FT-{k}"
    if float(run.config.get("beta", 0.0)) == 0:
        return f"KD-{k}"
    strategy = str(run.config.get("strategy", "skip"))
    if strategy in ("skip", "last"):
        return f"PKD-{strategy.capitalize()}-{k}"
    return f"PKD-[{strategy}]-{k}"


def _same_dir(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _referenced_teacher(run: Run, runs: Sequence[Run]) -> Run | None:
    """The input run whose model/ the distil run `run` learnt from."""
    ref = (run.results or {}).get("teacher") or {}
    if "path" not in ref:
        return None
    return next((t for t in runs if t.finished and _same_dir(t.path / "model", ref["path"])), None)


def _task_teacher(task: str, runs: Sequence[Run]) -> Run | None:
    """The deepest fine-tuned run of `task` (first given on ties), if some run of it is shallower."""
    same = [r for r in runs if r.finished and r.task == task]
    tuned = [r for r in same if r.kind == "finetune"]
    if not tuned:
        return None
    deepest = max(tuned, key=lambda r: r.layers)  # max keeps the first of equals
    return deepest if any(r.layers < deepest.layers for r in same) else None


def teachers(runs: Sequence[Run]) -> dict[Path, Run]:
    """Each finished run's path -> the run it is compared with (itself for a teacher)."""
    finished = [r for r in runs if r.finished]
    referenced = {r.path: t for r in finished if (t := _referenced_teacher(r, runs)) is not None}
    out = {t.path: t for t in referenced.values()}
    for run in finished:
        teacher = out.get(run.path) or referenced.get(run.path) or _task_teacher(run.task, runs)
        if teacher is not None:
            out[run.path] = teacher
    return out


def _method(run: Run, pairs: dict[Path, Run]) -> str:
    """method_label, with "Teacher" too for a fine-tuned run that other runs are compared with."""
    if run.kind == "finetune" and any(t is run for t in pairs.values()):
        return "Teacher"
    return method_label(run)


def _task_order(task: str) -> int:
    return list(data.TASKS).index(task)


def task_title(task: str) -> str:
    return data.TASKS[task].glue_name  # RTE, SST-2, STS-B, ...


def _sort_key(row: Row) -> tuple:
    family = next(m for m in _METHOD_ORDER if row.method.startswith(m))  # PKD-Last before PKD
    return _task_order(row.task), row.method != "Teacher", -row.layers, _METHOD_ORDER.index(family)


def summary_rows(runs: Sequence[Run], speed: dict[Path, float] | None = None) -> list[Row]:
    """One Row per finished run, grouped by task (GLUE order), teacher first, then deeper first.

    speed: run path -> inference examples/s (from measure_speed) to fill the speed columns.
    """
    pairs = teachers(runs)
    rows = []
    for run in (r for r in runs if r.finished):
        res, teacher = run.results, pairs.get(run.path)
        best = res["metrics"]  # the best step's dev metrics
        t_score = teacher.results["metrics"]["score"] if teacher else None
        row = Row(
            task=run.task, name=run.name, path=str(run.path), method=_method(run, pairs), kind=run.kind,
            layers=run.layers, params=res["model"]["params"],
            params_without_embeddings=res["model"]["params_without_embeddings"],
            metric=res["metric"], score=best["score"],
            metrics={k: v for k, v in best.items() if k not in ("score", res["metric"])},
            step=res["step"], total_steps=res["total_steps"], train_examples_per_s=res["examples_per_s"],
            teacher=teacher.name if teacher else None,
            pct_of_teacher=100 * best["score"] / t_score if t_score and t_score > 0 else None)
        if speed and run.path in speed:
            row.infer_examples_per_s = speed[run.path]
            if teacher is not None and teacher.path in speed:
                row.speedup = speed[run.path] / speed[teacher.path]
        rows.append(row)
    return sorted(rows, key=_sort_key)  # stable: input order among equals


# --------------------------------------------------------------------------------------------
# Inference speed
# --------------------------------------------------------------------------------------------


def inference_examples_per_s(model_dir: str | os.PathLike, *, batch_size: int = 128, seq_len: int = 128,
                             repeats: int = 5, dtype: str = "auto", seed: int = 0) -> float:
    """Examples/s of a jitted forward pass of an HF BERT folder on random full-length token ids."""
    # JAX is imported here only: the table and the plots do not need it.
    import jax
    import numpy as np
    from flax import nnx

    from pkd_jax import checkpoints, setup, steps

    model = checkpoints.load_pretrained(model_dir, dtype=setup.compute_dtype(dtype))
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(seed)
    batch = {"input_ids": rng.integers(1, model.config.vocab_size, (batch_size, seq_len), dtype=np.int32),
             "token_type_ids": np.zeros((batch_size, seq_len), np.int32),
             "attention_mask": np.ones((batch_size, seq_len), np.int32)}
    batch = jax.device_put(batch)
    forward = jax.jit(steps.make_logits_fn(graphdef)).lower(params, batch).compile()
    jax.block_until_ready(forward(params, batch))  # warm-up: first-call allocations
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(forward(params, batch))
        times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times)


def measure_speed(runs: Sequence[Run], **kwargs) -> dict[Path, float]:
    """Run path -> inference examples/s for every finished run (kwargs: inference_examples_per_s)."""
    finished = [r for r in runs if r.finished]
    for run in finished:  # before any timing: fail in seconds, not after minutes
        if not (run.path / "model" / "config.json").exists():
            raise RunError(f"{run.path}: no model/config.json: --speed times the exported best model")
    return {r.path: inference_examples_per_s(r.path / "model", **kwargs) for r in finished}


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    """A metric x100 or a percentage, to 0.1."""
    return "–" if x is None or not math.isfinite(x) else f"{x:.1f}"


def _rate(x: float | None) -> str:
    """Examples/s: whole numbers once there are hundreds."""
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _millions(n: int) -> str:
    return f"{n / 1e6:.3g}"


def metric_title(metric: str) -> str:
    return {"matthews_correlation": "MCC", "pearson_spearmanr_mean": "Pearson/Spearman", "f1": "F1",
            "spearmanr": "Spearman"}.get(metric, metric.capitalize())


def _task_table(rows: Sequence[Row]) -> str:
    others = list(dict.fromkeys(k for r in rows for k in r.metrics))
    speed = any(r.infer_examples_per_s is not None for r in rows)
    header = ["Run", "Method", "Layers", "Params (M)", "Params w/o emb. (M)",
              f"Dev {metric_title(rows[0].metric)}", *(metric_title(k) for k in others), "% of teacher",
              "Best step", "Train ex/s", *(["Infer ex/s", "Speed-up"] if speed else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|"]
    for r in rows:
        cells = [r.name, f"**{r.method}**" if r.method == "Teacher" else r.method, str(r.layers),
                 _millions(r.params), _millions(r.params_without_embeddings), _pct(100 * r.score),
                 *(_pct(100 * r.metrics[k]) if k in r.metrics else "–" for k in others),
                 _pct(r.pct_of_teacher), f"{r.step}/{r.total_steps}", _rate(r.train_examples_per_s)]
        if speed:
            cells += [_rate(r.infer_examples_per_s), "–" if r.speedup is None else f"{r.speedup:.2f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _by_task(rows: Sequence[Row]) -> dict[str, list[Row]]:
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.task, []).append(r)
    return groups


def markdown_table(rows: Sequence[Row]) -> str:
    """One `## TASK` section with a table per task; metrics are dev-set values ×100."""
    return "\n\n".join(f"## {task_title(task)}\n\n{_task_table(group)}" for task, group in _by_task(rows).items())


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h")
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
            "#bcbd22", "#7f7f7f")


def _colors(finished: Sequence[str], unfinished: Sequence[str], teachers_: set[str]) -> dict[str, str]:
    """Run name -> colour; teachers dark grey. Finished runs come first, so a run has the same
    colour in the curves (all runs) as in the summary (finished runs only)."""
    others = [n for n in sorted(finished) + sorted(unfinished) if n not in teachers_]
    colors = {n: _PALETTE[i % len(_PALETTE)] for i, n in enumerate(others)}
    return colors | {n: _TEACHER_COLOR for n in teachers_}


def plot_curves(runs: Sequence[Run], out: str | os.PathLike) -> Path:
    """Train loss and dev main metric against the step, one colour and marker per run (one task)."""
    pairs, task = teachers(runs), runs[0].task
    order = [r.name for r in summary_rows(runs)]  # the table's order, unfinished runs last
    runs = sorted(runs, key=lambda r: order.index(r.name) if r.name in order else len(order))
    methods = {r.name: _method(r, pairs) for r in runs}
    colors = _colors(order, [r.name for r in runs if not r.finished],
                     {n for n, m in methods.items() if m == "Teacher"})
    metric = next((r.results["metric"] for r in runs if r.finished), "score")
    fig = Figure(figsize=(12, 5.2), layout="constrained")  # no pyplot: no global backend state
    loss_ax, dev_ax = fig.subplots(1, 2, sharex=True)
    for i, run in enumerate(runs):
        style = {"color": colors[run.name], "ls": "-" if run.finished else "--",
                 "label": f"{run.name} · {methods[run.name]}" + ("" if run.finished else " (unfinished)")}
        train, dev = run.split("train"), run.split("dev")
        loss_ax.plot([p["step"] for p in train], [p["loss"] for p in train], lw=1.8, **style)
        # Distinct markers: runs with equal dev scores would otherwise hide each other.
        dev_ax.plot([p["step"] for p in dev], [100 * p["score"] for p in dev], lw=1, alpha=0.8,
                    marker=_MARKERS[i % len(_MARKERS)], ms=11 - 1.2 * (i % 4), mfc="none", mew=1.8, **style)
        if run.finished:  # the selected (best) checkpoint, the exported model
            best = run.results["best"]
            dev_ax.plot(best["step"], 100 * best["metrics"]["score"], marker="*", ms=16, color=colors[run.name],
                        markeredgecolor="black", ls="none", zorder=3)
    loss_ax.set(title="Training loss (each run's own objective)", xlabel="step", ylabel="loss")
    dev_ax.set(title=f"Dev {metric_title(metric)} (★ best step of each run)", xlabel="step",
               ylabel=f"{metric_title(metric)} (%)")
    for ax in (loss_ax, dev_ax):
        ax.grid(alpha=0.3)
    fig.legend(*dev_ax.get_legend_handles_labels(), loc="outside lower center", ncols=min(len(runs), 5),
               fontsize=9, frameon=False)
    fig.suptitle(f"{task_title(task)}: training curves", fontsize=13, fontweight="bold")
    path = Path(out) / f"curves_{task}.png"
    fig.savefig(path, dpi=120)
    return path


def plot_summary(rows: Sequence[Row], out: str | os.PathLike) -> Path:
    """Bars of the best dev score per row of one task; the teacher's bar dark and hatched."""
    rows = list(rows)
    task, metric = rows[0].task, rows[0].metric
    fig = Figure(figsize=(max(6.0, 1.4 * len(rows) + 2), 4.8), layout="constrained")
    ax = fig.subplots()
    teacher = [r.method == "Teacher" for r in rows]
    colors = _colors([r.name for r in rows], [], {r.name for r, t in zip(rows, teacher) if t})
    scores = [100 * r.score for r in rows]
    bars = ax.bar(range(len(rows)), scores, width=0.65, color=[colors[r.name] for r in rows],
                  edgecolor="black", linewidth=0.6)
    for bar, is_teacher in zip(bars, teacher):
        if is_teacher:
            bar.set_hatch("//")
    labels = [_pct(s) + (f"\n{_pct(r.pct_of_teacher)}% of teacher" if r.pct_of_teacher is not None and not t else "")
              for s, r, t in zip(scores, rows, teacher)]
    # A white box keeps the labels readable over the teacher's line.
    ax.bar_label(bars, labels, padding=3, fontsize=9, bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    for t_score in {100 * r.score for r, t in zip(rows, teacher) if t}:
        ax.axhline(t_score, color=_TEACHER_COLOR, ls=":", lw=1, zorder=0)
    ax.set_xticks(range(len(rows)), [f"{r.method}\n{r.name}" for r in rows], fontsize=9)
    # Close scores would look equal from 0; zoom in, in steps of 10, leaving room for the labels.
    low, high = min(scores), max(scores)
    ax.set_ylim(max(0.0, 10 * math.floor((low - 10) / 10)) if low >= 0 else low - 10, max(high, 0) + 12)
    ax.set(ylabel=f"best dev {metric_title(metric)} (%)",
           title=f"{task_title(task)}: best dev {metric_title(metric)} per run")
    ax.grid(axis="y", alpha=0.3)
    path = Path(out) / f"summary_{task}.png"
    fig.savefig(path, dpi=120)
    return path


# --------------------------------------------------------------------------------------------
# Sweeps
# --------------------------------------------------------------------------------------------


def read_sweep_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a sweep.csv, typed as the sweep wrote them (empty cells: None)."""
    with open(path, newline="") as f:
        table = list(csv.reader(f))
    header, body = table[0], table[1:]
    names = header[header.index("score") + 1:header.index("last_step")]
    ints = {"student", "chunk", "seed", "failed_step", "best_step", "last_step"}
    rows = []
    for cells in body:
        values = {k: (None if v == "" else v if k == "status" else int(v) if k in ints else float(v))
                  for k, v in zip(header, cells)}
        found = {n: values.pop(n) for n in names}
        values["metrics"] = {n: v for n, v in found.items() if v is not None}
        rows.append(values)
    return rows


def write_sweep_report(workdir: str | os.PathLike) -> Path:
    """sweep.md and heatmap.png of a sweep workdir, from its sweep.csv and config.json."""
    workdir = Path(workdir)
    rows = read_sweep_rows(workdir / "sweep.csv")
    task = json.loads((workdir / "config.json").read_text())["task"]
    plot_heatmap(rows, task, workdir / "heatmap.png")
    path = workdir / "sweep.md"
    path.write_text(markdown_report(rows, task))
    return path


def _pct100(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.1f}"


def sweep_table(rows: Sequence[dict], task: str) -> str:
    """Students best first (metrics ×100); the best row bold and starred."""
    names = sweep_plan.metric_names(rows)
    main = metrics.main_metric(task)
    others = [n for n in names if n != main]
    header = ["Rank", "Student", "Seed", "Learning rate", "T", "α", "β", f"Dev {metric_title(main)}",
              *map(metric_title, others), "Best step", "Status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * (len(header) - 1) + "---|"]
    ranked = (sorted((r for r in rows if r["score"] is not None), key=sweep_plan.rank_key)
              + sorted((r for r in rows if r["score"] is None), key=lambda r: r["student"]))
    best = sweep_plan.best_row(rows)
    for rank, r in enumerate(ranked, 1):
        status = "ok" if r["status"] == "ok" else f"failed (NaN at step {r['failed_step']})"
        cells = [str(rank), str(r["student"]), str(r["seed"]), f"{r['learning_rate']:g}", f"{r['temperature']:g}",
                 f"{r['alpha']:g}", f"{r['beta']:g}", _pct100(r["score"]),
                 *(_pct100(r["metrics"].get(n)) for n in others),
                 "–" if r["best_step"] is None else str(r["best_step"]), status]
        if r is best:
            cells = [f"**{x}**" for x in cells]
            cells[0] = "★ " + cells[0]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(rows: Sequence[dict], task: str) -> str:
    """sweep.md: a heading, the best point, the table and the heatmap."""
    best = sweep_plan.best_row(rows)
    lines = [f"# {task_title(task)}: hyper-parameter sweep ({len(rows)} students)", ""]
    if best is not None:
        lines += [f"Best (★, exported to `best_model/`): dev {metric_title(metrics.main_metric(task))} "
                  f"{_pct100(best['score'])} at step {best['best_step']}{sweep_plan.describe(best)}.", ""]
    lines += ["Dev metrics ×100 at each student's best step.", "", sweep_table(rows, task), "",
              "![heatmap](heatmap.png)", ""]
    return "\n".join(lines)


def plot_heatmap(rows: Sequence[dict], task: str, path: str | os.PathLike) -> Path:
    """Dev main metric over the grid: a panel per (learning rate, T), α up and β across; cells
    annotated (mean over seeds, ± their spread), the best student's cell outlined, failed
    students marked †."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    axis_values = {k: sorted({r[k] for r in rows}) for k in ("learning_rate", "temperature", "alpha", "beta")}
    lrs, temps, alphas, betas = axis_values.values()
    seeds = sorted({r["seed"] for r in rows})
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["learning_rate"], r["temperature"], r["alpha"], r["beta"]), []).append(r)

    def mean(key):
        scores = [100 * r["score"] for r in cells.get(key, []) if r["score"] is not None]
        return (float(np.mean(scores)), float(np.std(scores))) if scores else (math.nan, math.nan)

    values = {key: mean(key) for key in cells}
    finite = [m for m, _ in values.values() if math.isfinite(m)]
    vmin, vmax = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if vmax - vmin < 1e-9:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    best = sweep_plan.best_row(rows)
    top = None if best is None else (best["learning_rate"], best["temperature"], best["alpha"], best["beta"])

    fig = Figure(figsize=(max(7.0, 0.85 * len(betas) * len(temps) + 2.4), 0.6 * len(alphas) * len(lrs) + 2.1),
                 layout="constrained")
    axes = fig.subplots(len(lrs), len(temps), squeeze=False, sharex=True, sharey=True)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")
    for (li, lr), (ti, t) in itertools.product(enumerate(lrs), enumerate(temps)):
        ax = axes[li][ti]
        grid_values = np.array([[values.get((lr, t, a, b), (math.nan, 0))[0] for b in betas] for a in alphas])
        image = ax.imshow(grid_values, cmap=cmap, vmin=vmin, vmax=vmax, origin="lower", aspect="auto")
        for (ai, a), (bi, b) in itertools.product(enumerate(alphas), enumerate(betas)):
            m, sd = values.get((lr, t, a, b), (math.nan, 0))
            failed = any(r["status"] == "failed" for r in cells.get((lr, t, a, b), []))
            text = "–" if not math.isfinite(m) else f"{m:.1f}" + (f"\n±{sd:.1f}" if len(seeds) > 1 else "")
            bright = math.isfinite(m) and (m - vmin) / (vmax - vmin) > 0.6
            ax.text(bi, ai, text + (" †" if failed else ""), ha="center", va="center", fontsize=9,
                    color="black" if bright or not math.isfinite(m) else "white")
            if (lr, t, a, b) == top:
                ax.add_patch(Rectangle((bi - 0.5, ai - 0.5), 1, 1, fill=False, edgecolor="#d62728", lw=3))
        ax.set_xticks(range(len(betas)), [f"{b:g}" for b in betas])
        ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_title(f"T = {t:g}" + (f", lr = {lr:g}" if len(lrs) > 1 else ""), fontsize=10)
    metric = metric_title(metrics.main_metric(task))
    fig.colorbar(image, ax=axes, shrink=0.9, label=f"dev {metric} (%)")
    fig.supxlabel("β (patient loss weight)")
    fig.supylabel("α (distillation weight)")
    seeds_note = f"mean ± std of {len(seeds)} seeds" if len(seeds) > 1 else f"seed {seeds[0]}"
    failed_note = "; †: a student failed (NaN)" if any(r["status"] == "failed" for r in rows) else ""
    fig.suptitle(f"{task_title(task)}: best dev {metric} of each student\n"
                 f"{seeds_note}; red box: the exported best student{failed_note}", fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def default_out(paths: Sequence[str | os.PathLike]) -> Path:
    """The workdirs' common parent; ./report when that is the filesystem root."""
    parent = Path(os.path.commonpath([Path(p).resolve().parent for p in paths]))
    return Path("report") if parent == Path(parent.anchor) else parent


def write_report(runs: Sequence[Run], rows: Sequence[Row], out: str | os.PathLike,
                 speed_note: str | None = None) -> Path:
    """report.md with each task's table and plots (written next to it) in DIR `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows_by_task = _by_task(rows)
    sections = ["# Run comparison", "Dev-set metrics ×100 at each run's best step (the exported model). "
                "% of teacher: the row's main metric / its teacher's."]
    if speed_note:
        sections.append(speed_note)
    unfinished = [r for r in runs if not r.finished]
    if unfinished:
        sections.append("Unfinished (no results.json; curves only): "
                        + ", ".join(f"{r.name} (`{r.path}`)" for r in unfinished))
    tasks = sorted({r.task for r in runs}, key=_task_order)
    for task in tasks:
        task_runs = [r for r in runs if r.task == task]
        section = [f"## {task_title(task)}"]
        if task in rows_by_task:
            section.append(_task_table(rows_by_task[task]))
            section.append(f"![summary]({plot_summary(rows_by_task[task], out).name})")
        if any(r.history for r in task_runs):
            section.append(f"![curves]({plot_curves(task_runs, out).name})")
        sections.append("\n\n".join(section))
    path = out / "report.md"
    path.write_text("\n\n".join(sections) + "\n")
    return path


def _speed_note(args: argparse.Namespace) -> str:
    import jax

    from pkd_jax import setup

    dtype = jax.numpy.dtype(setup.compute_dtype(args.dtype)).name
    return (f"Inference: jitted forward pass, batch {args.batch_size} x {args.seq_len} tokens, {dtype} on "
            f"{jax.devices()[0].device_kind}; median of {args.repeats} calls.")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pkd_jax.report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdirs", nargs="+", help="run.py --workdir folders")
    p.add_argument("--out", help="report folder (default: the workdirs' common parent)")
    p.add_argument("--speed", action="store_true", help="time inference of each run's model/")
    p.add_argument("--batch-size", type=int, default=128, help="--speed batch size")
    p.add_argument("--seq-len", type=int, default=128, help="--speed sequence length")
    p.add_argument("--repeats", type=int, default=5, help="--speed timed calls (the median is kept)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="--speed compute dtype (auto: bfloat16 on GPU/TPU, as in training)")
    p.add_argument("--json", action="store_true", help="also print the rows as JSON lines")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    speed, speed_note = None, None
    try:
        runs = load_runs(args.workdirs, allow_unfinished=True)
        if args.speed:
            speed = measure_speed(runs, batch_size=args.batch_size, seq_len=args.seq_len,
                                  repeats=args.repeats, dtype=args.dtype)
            speed_note = _speed_note(args)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for run in runs:
        if not run.finished:
            print(f"note: {run.path}: unfinished (no results.json): plotted, not tabled", file=sys.stderr)
    rows = summary_rows(runs, speed)
    out = Path(args.out) if args.out else default_out(args.workdirs)
    path = write_report(runs, rows, out, speed_note)
    print(markdown_table(rows))
    if args.json:
        for row in rows:
            print(json.dumps(dataclasses.asdict(row)))
    print(f"\nreport: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
