"""The report's plots: a task's training curves and best dev scores per run, and a sweep's
heatmap. Figures are built without pyplot: no global backend state, safe in any thread. matplotlib
is imported by the functions that draw (importing it costs every run.py 0.7 s)."""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from pkd_jax import metrics
from pkd_jax.report.runs import Row, Run, method_of, metric_title, summary_rows, task_title, teachers
from pkd_jax.report.tables import percent
from pkd_jax.sweep import plan as sweep_plan

_TEACHER_COLOR = "#3a3a3a"
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
    methods = {r.name: method_of(r, pairs) for r in runs}
    colors = _colors(order, [r.name for r in runs if not r.finished],
                     {n for n, m in methods.items() if m == "Teacher"})
    metric = next((r.results["metric"] for r in runs if r.finished), "score")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5.2), layout="constrained")
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
    from matplotlib.figure import Figure

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
    labels = [percent(r.score) + (f"\n{percent(r.pct_of_teacher, fraction=False)}% of teacher"
                                  if r.pct_of_teacher is not None and not t else "")
              for r, t in zip(rows, teacher)]
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


def plot_heatmap(rows: Sequence[dict], task: str, path: str | os.PathLike) -> Path:
    """Dev main metric over the grid: a panel per (learning rate, T), α up and β across; cells
    annotated (mean over seeds, ± their spread), the best student's cell outlined, failed
    students marked †."""
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

    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

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
