"""The report's files: report.md with each task's table and plots, and a sweep's sweep.md and
heatmap.png (written into the sweep workdir, where run.py also writes them after each chunk)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Sequence

from pkd_jax import fsutil
from pkd_jax.report.plots import plot_curves, plot_heatmap, plot_summary
from pkd_jax.report.runs import Row, Run, by_task, task_order, task_title, teachers
from pkd_jax.report.tables import markdown_report, read_sweep, task_table


def write_report(runs: Sequence[Run], rows: Sequence[Row], out: str | os.PathLike,
                 speed_note: str | None = None, extra: Sequence[str] = ()) -> Path:
    """report.md with each task's table and plots (written next to it) in DIR `out`; a task's
    teacher whose workdir holds advice/advice.md (python -m pkd_jax.advise) adds its per-layer table.
    extra: sections appended at the end (the multi-task students')."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows_by_task = by_task(rows)
    pairs = teachers(runs)
    compared = [r for r in runs if r.kind == "finetune" and any(t is r and p != r.path for p, t in pairs.items())]
    sections = ["# Run comparison", "Dev-set metrics ×100 at each run's best step (the exported model). "
                "% of teacher: the row's main metric / its teacher's."]
    if speed_note:
        sections.append(speed_note)
    unfinished = [r for r in runs if not r.finished]
    if unfinished:
        sections.append("Unfinished (no results.json; curves only): "
                        + ", ".join(f"{r.name} (`{r.path}`)" for r in unfinished))
    for task in sorted({r.task for r in runs} | set(rows_by_task), key=task_order):
        task_runs = [r for r in runs if r.task == task]
        section = [f"## {task_title(task)}"]
        if task in rows_by_task:
            section.append(task_table(rows_by_task[task]))
            section.append(f"![summary]({plot_summary(rows_by_task[task], out).name})")
        if any(r.history for r in task_runs):
            section.append(f"![curves]({plot_curves(task_runs, out).name})")
        section += [text for t in compared if t.task == task and (text := _advice(t, out))]
        sections.append("\n\n".join(section))
    if extra:
        sections += ["## Multi-task students", *extra]
    return fsutil.write_text(out / "report.md", "\n\n".join(sections) + "\n")


def _advice(teacher: Run, out: Path) -> str | None:
    """The per-layer table and recommendation of `python -m pkd_jax.advise` in a teacher's
    workdir (advice/advice.md), if it has one."""
    path = teacher.path / "advice" / "advice.md"
    if not path.is_file():
        return None
    lines = path.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("| Teacher layer")), len(lines))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    advice = [line for line in lines if line.startswith("**Recommendation:**")]
    link = Path(os.path.relpath(path.resolve(), out.resolve())).as_posix()
    return "\n\n".join([f"### Teacher {teacher.name}: patient features per layer ([advice]({link}))",
                         "\n".join(table), *advice])


def write_sweep_report(workdir: str | os.PathLike) -> Path:
    """sweep.md and heatmap.png of a sweep workdir, from its sweep.csv and config.json; returns sweep.md."""
    workdir = Path(workdir)
    rows, task = read_sweep(workdir)
    plot_heatmap(rows, task, workdir / "heatmap.png")
    return fsutil.write_text(workdir / "sweep.md", markdown_report(rows, task))
