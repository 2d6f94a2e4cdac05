"""Every markdown table of the report: the runs' table (one section per task) and a sweep's
table and sweep.md text, read back from its sweep.csv."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Sequence

from pkd_jax import metrics
from pkd_jax.report.runs import Row, RunError, by_task, metric_title, read_json, task_title
from pkd_jax.sweep import plan as sweep_plan


def percent(x: float | None, *, fraction: bool = True) -> str:
    """x as a percentage to 0.1; '–' when missing or not finite. Metrics are fractions (0.875 ->
    "87.5"); fraction=False for a value already in percent (Row.pct_of_teacher)."""
    if x is None or not math.isfinite(x):
        return "–"
    return f"{100 * x:.1f}" if fraction else f"{x:.1f}"


def _rate(x: float | None) -> str:
    """Examples/s: whole numbers once there are hundreds."""
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _millions(n: int) -> str:
    return f"{n / 1e6:.3g}"


def _line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


def task_table(rows: Sequence[Row]) -> str:
    """The table of one task's rows; the speed columns only when some row was timed."""
    others = list(dict.fromkeys(k for r in rows for k in r.metrics))
    speed = any(r.infer_examples_per_s is not None for r in rows)
    header = ["Run", "Method", "Layers", "Params (M)", "Params w/o emb. (M)",
              f"Dev {metric_title(rows[0].metric)}", *(metric_title(k) for k in others), "% of teacher",
              "Best step", "Train ex/s", *(["Infer ex/s", "Speed-up"] if speed else [])]
    lines = [_line(header), "|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|"]
    for r in rows:
        cells = [r.name, f"**{r.method}**" if r.method == "Teacher" else r.method, str(r.layers),
                 _millions(r.params), _millions(r.params_without_embeddings), percent(r.score),
                 *(percent(r.metrics.get(k)) for k in others),
                 percent(r.pct_of_teacher, fraction=False), f"{r.step}/{r.total_steps}",
                 _rate(r.train_examples_per_s)]
        if speed:
            cells += [_rate(r.infer_examples_per_s), "–" if r.speedup is None else f"{r.speedup:.2f}×"]
        lines.append(_line(cells))
    return "\n".join(lines)


def markdown_table(rows: Sequence[Row]) -> str:
    """One `## TASK` section with a table per task; metrics are dev-set values ×100."""
    return "\n\n".join(f"## {task_title(task)}\n\n{task_table(group)}" for task, group in by_task(rows).items())


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


def read_sweep(workdir: str | os.PathLike) -> tuple[list[dict], str]:
    """(the rows of W/sweep.csv, the task of W/config.json) of a sweep workdir."""
    workdir = Path(workdir)
    if not (workdir / "sweep.csv").is_file():
        raise RunError(f"{workdir}: a sweep workdir without sweep.csv: no chunk of students has finished yet")
    if not (workdir / "config.json").is_file():
        raise RunError(f"{workdir}: sweep.csv but no config.json: cannot tell the sweep's task")
    return read_sweep_rows(workdir / "sweep.csv"), read_json(workdir / "config.json")["task"]


def sweep_table(rows: Sequence[dict], task: str) -> str:
    """Students best first (metrics ×100); the best row bold and starred."""
    names = sweep_plan.metric_names(rows)
    main = metrics.main_metric(task)
    others = [n for n in names if n != main]
    header = ["Rank", "Student", "Seed", "Learning rate", "T", "α", "β", f"Dev {metric_title(main)}",
              *map(metric_title, others), "Best step", "Status"]
    lines = [_line(header), "|" + "---:|" * (len(header) - 1) + "---|"]
    ranked = (sorted((r for r in rows if r["score"] is not None), key=sweep_plan.rank_key)
              + sorted((r for r in rows if r["score"] is None), key=lambda r: r["student"]))
    best = sweep_plan.best_row(rows)
    for rank, r in enumerate(ranked, 1):
        status = "ok" if r["status"] == "ok" else f"failed (NaN at step {r['failed_step']})"
        cells = [str(rank), str(r["student"]), str(r["seed"]), f"{r['learning_rate']:g}", f"{r['temperature']:g}",
                 f"{r['alpha']:g}", f"{r['beta']:g}", percent(r["score"]),
                 *(percent(r["metrics"].get(n)) for n in others),
                 "–" if r["best_step"] is None else str(r["best_step"]), status]
        if r is best:
            cells = [f"**{x}**" for x in cells]
            cells[0] = "★ " + cells[0]
        lines.append(_line(cells))
    return "\n".join(lines)


def markdown_report(rows: Sequence[dict], task: str) -> str:
    """sweep.md: a heading, the best point, the table and the heatmap."""
    best = sweep_plan.best_row(rows)
    lines = [f"# {task_title(task)}: hyper-parameter sweep ({len(rows)} students)", ""]
    if best is not None:
        lines += [f"Best (★, exported to `best_model/`): dev {metric_title(metrics.main_metric(task))} "
                  f"{percent(best['score'])} at step {best['best_step']}{sweep_plan.describe(best)}.", ""]
    lines += ["Dev metrics ×100 at each student's best step.", "", sweep_table(rows, task), "",
              "![heatmap](heatmap.png)", ""]
    return "\n".join(lines)
