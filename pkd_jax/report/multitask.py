"""Multi-task students (configs/multitask.py) in the report: a row per task in that task's table,
beside its teacher and single-task students, and a table of what sharing the encoder costs in
dev score and saves in parameters."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

from pkd_jax.report.runs import Row, Run, RunError, read_json, task_title
from pkd_jax.report.tables import percent


@dataclasses.dataclass
class MultiTask:
    """A finished multi-task workdir: its results.json (config included)."""

    path: Path
    results: dict[str, Any]
    name: str = ""

    def __post_init__(self):
        self.name = self.name or self.path.name

    @property
    def tasks(self) -> list[str]:
        return self.results["tasks"]

    @property
    def layers(self) -> int:
        return self.results["model"]["layers"]


def is_multitask(path: str | os.PathLike) -> bool:
    """Whether `path` is a multi-task workdir: its config.json says kind "multitask"."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("kind") == "multitask"
    except (OSError, json.JSONDecodeError):
        return False


def load_multitask(path: str | os.PathLike) -> MultiTask:
    path = Path(path)
    if not (path / "results.json").is_file():
        raise RunError(f"{path}: unfinished multi-task run: no results.json (the same run.py command resumes it)")
    return MultiTask(path, read_json(path / "results.json"))


def _method(student: MultiTask, task: str) -> str:
    """MT-PKD-Skip-k, MT-PKD-Last-k, MT-PKD-[2,4]-k or MT-KD-k: the task's objective, multi-task."""
    c, k = student.results["config"], student.layers
    if student.results["per_task"][task]["beta"] == 0:
        return f"MT-KD-{k}"
    strategy = str(c["per_task"][task].get("strategy") or c["strategy"])
    return f"MT-PKD-{strategy.capitalize()}-{k}" if strategy in ("skip", "last") else f"MT-PKD-[{strategy}]-{k}"


def _teacher(student: MultiTask, task: str, runs: Sequence[Run]) -> Run | None:
    """The input run whose model/ is the teacher the student learnt `task` from."""
    path = Path(student.results["per_task"][task]["teacher"]["path"]).resolve()
    return next((r for r in runs if r.finished and (r.path / "model").resolve() == path), None)


def multitask_rows(students: Sequence[MultiTask], runs: Sequence[Run]) -> list[Row]:
    """One Row per task of each student: its dev metrics at the student's best step (selected by
    the mean of the tasks' main metrics), and the parameters of that task's exported model."""
    rows = []
    for s in students:
        res = s.results
        for task in s.tasks:
            own, teacher = res["per_task"][task], _teacher(s, task, runs)
            best, metric = own["metrics"], own["metric"]
            t_score = teacher.results["metrics"]["score"] if teacher else None
            rows.append(Row(
                task=task, name=s.name, path=str(s.path), method=_method(s, task), kind="multitask",
                layers=s.layers, params=own["model"]["params"],
                params_without_embeddings=own["model"]["params_without_embeddings"], metric=metric,
                score=best["score"], metrics={k: v for k, v in best.items() if k not in ("score", metric)},
                step=res["step"], total_steps=res["total_steps"], train_examples_per_s=res["examples_per_s"],
                teacher=teacher.name if teacher else None,
                pct_of_teacher=100 * best["score"] / t_score if t_score and t_score > 0 else None))
    return rows


def sharing_table(student: MultiTask, rows: Sequence[Row]) -> str:
    """Per task: the teacher, the best single-task student of the same depth among the inputs and
    the multi-task student; then the parameters one shared encoder saves against a student per task."""
    lines = [f"### Multi-task student {student.name} ({', '.join(map(task_title, student.tasks))})", "",
             "| Task | Teacher | Best single-task student | Multi-task student | Δ vs single-task |",
             "|---|---:|---:|---:|---:|"]
    for task in student.tasks:
        here = [r for r in rows if r.task == task]
        teacher = next((r for r in here if r.method == "Teacher"), None)
        singles = [r for r in here if r.kind != "multitask" and r.method != "Teacher" and r.layers == student.layers]
        single = max(singles, key=lambda r: r.score, default=None)
        mt = next(r for r in here if r.kind == "multitask" and r.name == student.name)
        delta = "–" if single is None else f"{100 * (mt.score - single.score):+.1f}"
        lines.append(f"| {task_title(task)} | {percent(teacher.score) if teacher else '–'} | "
                     + (f"{percent(single.score)} ({single.method}, {single.name})" if single else "–")
                     + f" | {percent(mt.score)} ({mt.method}) | {delta} |")
    model = student.results["model"]
    separate = sum(t["model"]["params"] for t in student.results["per_task"].values())
    saved = separate - model["params"]
    lines += ["", f"One student for {len(student.tasks)} tasks: {model['params'] / 1e6:.3g} M parameters (a shared "
              f"encoder of {model['encoder_params'] / 1e6:.3g} M and {sum(model['heads'].values()):,} in heads); "
              f"a student per task would hold {separate / 1e6:.3g} M: {saved / 1e6:.3g} M "
              f"({100 * saved / separate:.0f} %) saved. Dev metrics ×100; the multi-task student's at its best "
              "step by the mean of the tasks' main metrics."]
    return "\n".join(lines)
