"""Run workdirs: loading them, telling them from sweep workdirs, labelling each run's method,
pairing students with their teacher and summarising a finished run as a table Row."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

from pkd_jax import data

# Same-depth rows are listed in the paper's order: baselines first, then the PKD variants, then
# multi-task students (report/multitask.py).
_METHOD_ORDER = ("Teacher", "FT", "KD", "PKD-Last", "PKD-Skip", "PKD", "MT")


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
    pct_of_teacher: float | None  # a percentage (87.5), not a fraction
    infer_examples_per_s: float | None = None
    speedup: float | None = None


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def read_json(path: Path) -> Any:
    """A JSON file; RunError naming it when it is not valid JSON."""
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


def is_sweep(path: str | os.PathLike) -> bool:
    """Whether `path` is a sweep workdir (configs/sweep.py): it holds sweep.csv, or its config.json
    says kind "sweep" (a sweep whose first chunk has not finished). Its results.json (kind "sweep")
    describes the best student, not a run: the report renders it as sweep.md, never as a Row."""
    path = Path(path)
    if (path / "sweep.csv").is_file():
        return True
    try:
        return json.loads((path / "config.json").read_text()).get("kind") == "sweep"
    except (OSError, json.JSONDecodeError):  # no or a broken config.json: load_run says what is wrong
        return False


def load_run(path: str | os.PathLike, *, allow_unfinished: bool = False) -> Run:
    """A run workdir. Raises RunError when `path` is not one (a sweep workdir included), or is
    unfinished and not allowed."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: {'not a directory' if path.exists() else 'no such directory'} "
                       "(expected a run.py --workdir)")
    if is_sweep(path):
        raise RunError(f"{path}: a sweep workdir, not a run: its table is sweep.md "
                       "(write_sweep_report, or python -m pkd_jax.report on it)")
    results_file, metrics_file, config_file = (path / n for n in ("results.json", "metrics.jsonl", "config.json"))
    if results_file.exists():
        results = read_json(results_file)
        config = results.get("config") or read_json(config_file)
        return Run(path, config, _read_history(metrics_file), results)
    if not metrics_file.exists():
        raise RunError(f"{path}: not a run workdir: no results.json and no metrics.jsonl "
                       "(expected the --workdir of a run.py run)")
    if not allow_unfinished:
        raise RunError(f"{path}: unfinished run: metrics.jsonl but no results.json "
                       "(training stopped early or is still going; the same run.py command resumes it)")
    if not config_file.exists():
        raise RunError(f"{path}: unfinished run without config.json: cannot tell its task or method")
    return Run(path, read_json(config_file), _read_history(metrics_file), None)


def load_runs(paths: Sequence[str | os.PathLike], *, allow_unfinished: bool = False) -> list[Run]:
    """load_run for each path; runs whose directory names collide are named parent/name."""
    runs = [load_run(p, allow_unfinished=allow_unfinished) for p in paths]
    names = [r.path.name for r in runs]
    for run in runs:
        if names.count(run.path.name) > 1:
            run.name = f"{run.path.resolve().parent.name}/{run.path.name}"
    return runs


# --------------------------------------------------------------------------------------------
# Labels and teachers
# --------------------------------------------------------------------------------------------


def task_title(task: str) -> str:
    return data.TASKS[task].glue_name  # RTE, SST-2, STS-B, ...


def metric_title(metric: str) -> str:
    return {"matthews_correlation": "MCC", "pearson_spearmanr_mean": "Pearson/Spearman", "f1": "F1",
            "spearmanr": "Spearman"}.get(metric, metric.capitalize())


def task_order(task: str) -> int:
    """Position in GLUE order, the order of a report's sections."""
    return list(data.TASKS).index(task)


def method_label(run: Run) -> str:
    """Teacher | FT-k | KD-k | PKD-Skip-k | PKD-Last-k | PKD-[i,j]-k (see the package docstring),
    followed by what differs from the paper's objective: " (mean, cka, +hidden, +attention)"."""
    k, c = run.layers, run.config
    if run.kind == "finetune":
        return "Teacher" if c.get("layers") is None else f"FT-{k}"
    extras = [name for name, on in (("+hidden", float(c.get("hidden_mse", 0.0)) > 0),
                                     ("+attention", float(c.get("attention_kl", 0.0)) > 0)) if on]
    suffix = lambda parts: f" ({', '.join(parts)})" if parts else ""  # noqa: E731
    if float(c.get("beta", 0.0)) == 0:
        return f"KD-{k}" + suffix(extras)
    patient = [v for key, default in (("patient_features", "cls"), ("distance", "mse"))
               if (v := str(c.get(key, default))) != default]
    strategy = str(c.get("strategy", "skip"))
    name = f"PKD-{strategy.capitalize()}-{k}" if strategy in ("skip", "last") else f"PKD-[{strategy}]-{k}"
    return name + suffix(patient + extras)


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


def method_of(run: Run, pairs: dict[Path, Run]) -> str:
    """method_label, with "Teacher" too for a fine-tuned run that other runs are compared with."""
    if run.kind == "finetune" and any(t is run for t in pairs.values()):
        return "Teacher"
    return method_label(run)


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


def _sort_key(row: Row) -> tuple:
    family = next(m for m in _METHOD_ORDER if row.method.startswith(m))  # PKD-Last before PKD
    return task_order(row.task), row.method != "Teacher", -row.layers, _METHOD_ORDER.index(family)


def summary_rows(runs: Sequence[Run], speed: dict[Path, float] | None = None,
                 extra: Sequence[Row] = ()) -> list[Row]:
    """One Row per finished run, grouped by task (GLUE order), teacher first, then deeper first.

    speed: run path -> inference examples/s (from measure_speed) to fill the speed columns.
    extra: rows made elsewhere (a multi-task student's), sorted in among them.
    """
    pairs = teachers(runs)
    rows = []
    for run in (r for r in runs if r.finished):
        res, teacher = run.results, pairs.get(run.path)
        best = res["metrics"]  # the best step's dev metrics
        t_score = teacher.results["metrics"]["score"] if teacher else None
        row = Row(
            task=run.task, name=run.name, path=str(run.path), method=method_of(run, pairs), kind=run.kind,
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
    return sorted([*rows, *extra], key=_sort_key)  # stable: input order among equals


def by_task(rows: Sequence[Row]) -> dict[str, list[Row]]:
    """Rows grouped by task, in the rows' order."""
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.task, []).append(r)
    return groups
