r"""Reproduce the paper's comparison in miniature: teachers, then FT / KD / PKD-Last / PKD-Skip students.

  python scripts/reproduce.py --glue-dir=../shared/glue --out=runs/reproduce       # full tasks (accelerator)
  python scripts/reproduce.py --glue-dir=../shared/glue --out=runs/reproduce-cpu \
      --train-examples=1000 --max-seq-length=64 ...     # the CPU miniature: docs/results.md has the command

For each task: the teacher (`--model`, all its layers, fine-tuned with cross-entropy), then for
each student depth k and method a sweep (`configs/sweep.py`, students trained side by side):

  FT        alpha = beta = 0 (plain cross-entropy; the teacher is not used)
  KD        beta = 0, grid over --temperatures x --alphas
  PKD-Last  strategy=last, grid over --temperatures x --alphas x --betas
  PKD-Skip  strategy=skip, the same grid

Protocol: the grid is trained with seed 0; the point with the best dev score (the task's main
metric, each student's best evaluation) is then trained with the other --seeds, and the table
reports mean +- std over all seeds of that point. Selection and report both use the dev set (GLUE
test labels are hidden), so the figures are optimistic for every method alike. To save compute,
--tune-layers and --tune-tasks restrict the search: e.g. with --tune-layers=3 --tune-tasks=sst2
only SST-2's 3-layer students search the grid, and every other student trains the point chosen
there for its method, with every seed (a task that searches reuses its own first depth's points).

Every run is a run.py workdir under OUT/<task>/...; a finished one is skipped and an interrupted
one resumes, so rerunning the same command continues where it stopped. Writes OUT/results.md
(the tables, commands and wall time) and OUT/results.json; --report-only writes them from the
runs finished so far (a missing cell shows "–") and trains nothing.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import shlex
import statistics
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ lives at the repo root, beside run.py
from configs import finetune, sweep as sweep_config
from pkd_jax import advise, bert, checkpoints, fsutil, metrics, report, sweep, train

METHODS = ("FT", "KD", "PKD-Last", "PKD-Skip")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    floats = lambda s: tuple(float(x) for x in s.split(","))  # noqa: E731
    ints = lambda s: tuple(int(x) for x in s.split(","))  # noqa: E731
    p.add_argument("--out", default="runs/reproduce")
    p.add_argument("--glue-dir", default=None, help="a local GLUE folder; default: the HF hub")
    p.add_argument("--model", default="minilm-l6", help="teacher checkpoint; students start from its first k layers")
    p.add_argument("--tasks", default="sst2,mrpc,rte,stsb", type=lambda s: tuple(s.split(",")))
    p.add_argument("--layers", default=(3, 2), type=ints, help="student depths")
    p.add_argument("--tune-layers", default=None, type=ints,
                   help="depths that search the grid (default: all); the others reuse the first one's points")
    p.add_argument("--tune-tasks", default=None, type=lambda s: tuple(s.split(",")),
                   help="tasks that search the grid (default: all); the others reuse the first one's points")
    p.add_argument("--methods", default=METHODS, type=lambda s: tuple(s.split(",")))
    p.add_argument("--seeds", default=(0, 1, 2), type=ints, help="the first one runs the grid")
    p.add_argument("--temperatures", default=(5.0, 10.0), type=floats)
    p.add_argument("--alphas", default=(0.5, 0.7), type=floats)
    p.add_argument("--betas", default=(100.0, 500.0), type=floats)
    p.add_argument("--train-examples", default=None, type=int, help="a fixed random subset of each training set")
    p.add_argument("--max-seq-length", default=128, type=int)
    p.add_argument("--teacher-epochs", default=3.0, type=float)
    p.add_argument("--teacher-lr", default=5e-5, type=float)
    p.add_argument("--student-epochs", default=4.0, type=float)
    p.add_argument("--student-lr", default=2e-4, type=float,
                   help="MiniLM's lower layers need 2e-4 (README); 5e-5 suits BERT-base")
    p.add_argument("--batch-size", default=32, type=int)
    p.add_argument("--students-per-chunk", default=0, type=int,
                   help="students vmapped together (0: the sweep's automatic size: as many as fit on an "
                        "accelerator, 1 on CPU, where vmap does not pay)")
    p.add_argument("--speed-repeats", default=5, type=int)
    p.add_argument("--report-only", action="store_true", help="tables from the finished runs only; train nothing")
    return p.parse_args(argv)


def common_overrides(args) -> dict:
    """Fields every run of the reproduction shares."""
    return {"max_seq_length": args.max_seq_length, "batch_size": args.batch_size, "train_examples": args.train_examples,
            "predict_test": False, "progress": False}


def _apply(config, overrides: dict):
    for key, value in overrides.items():
        config[key] = value
    return config


def _arg(task, args, **extra) -> str:
    items = {"task": task, **({"glue_dir": args.glue_dir} if args.glue_dir else {}), **extra}
    return ",".join(f"{k}={v}" for k, v in items.items())


def teacher_config(task, args):
    c = finetune.get_config(_arg(task, args, model=args.model))
    return _apply(c, {**common_overrides(args), "num_epochs": args.teacher_epochs, "learning_rate": args.teacher_lr})


def method_grid(method: str, args) -> dict:
    """The sweep axes of one method (seed and learning rate excluded)."""
    if method == "FT":
        return {"temperatures": (1.0,), "alphas": (0.0,), "betas": (0.0,)}
    if method == "KD":
        return {"temperatures": args.temperatures, "alphas": args.alphas, "betas": (0.0,)}
    if method in ("PKD-Last", "PKD-Skip"):
        return {"temperatures": args.temperatures, "alphas": args.alphas, "betas": args.betas}
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def student_config(task, k, method, teacher_dir, args, grid: dict, seeds):
    strategy = "last" if method == "PKD-Last" else "skip"
    # A 2-layer student of a 6-layer teacher: skip maps layer 1 to teacher layer 3, last to 5.
    c = sweep_config.get_config(_arg(task, args, teacher=teacher_dir, layers=k, strategy=strategy))
    return _apply(c, {**common_overrides(args), **grid, "num_epochs": args.student_epochs,
                      "learning_rates": (args.student_lr,), "seeds": tuple(seeds),
                      "students_per_chunk": args.students_per_chunk})


def _finished(workdir: Path) -> dict | None:
    path = workdir / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


class Unfinished(Exception):
    """--report-only met a run that has not finished."""


def run_teacher(task, args, out: Path) -> Path:
    workdir = out / task / "teacher"
    if _finished(workdir) is None:
        if args.report_only:
            raise Unfinished(workdir)
        print(f"[reproduce] {task}: fine-tuning the teacher in {workdir}", flush=True)
        train.train_and_evaluate(teacher_config(task, args), workdir)
    return workdir


def finished_sweep(config, workdir: Path, report_only: bool) -> dict:
    done = _finished(workdir)
    if done is None:
        if report_only:
            raise Unfinished(workdir)
        print(f"[reproduce] {config.task}: {workdir} ({len(sweep.grid(config))} students)", flush=True)
        done = sweep.train_grid(config, workdir)
    return done


def _rows(workdir: Path) -> list[dict]:
    """sweep.csv rows of one sweep as dicts of floats (status and empty cells kept as text)."""
    with open(workdir / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for key, value in r.items():
            try:
                r[key] = float(value)
            except ValueError:
                pass
    return rows


def run_method(task, k, method, teacher_dir: Path, args, out: Path, tuned: dict | None = None) -> dict:
    """Grid with the first seed, then the best point with the other seeds; its per-seed rows.

    `tuned`: the result of this method where the grid was searched; train its point only.
    """
    base = out / task / f"k{k}" / method.lower()
    if tuned is None:
        grid = method_grid(method, args)
        first, rest = args.seeds[:1], args.seeds[1:]
        results = finished_sweep(student_config(task, k, method, teacher_dir, args, grid, first), base / "grid", args.report_only)
        best = {key: results["best"][key] for key in ("temperature", "alpha", "beta")}
        rows = [r for r in _rows(base / "grid") if all(r[key] == value for key, value in best.items())]
        grid_size, model = results["students"], base / "grid" / "best_model"
        source = {"task": task, "layers": k}
    else:
        best, rest, rows, grid_size, model = tuned["point"], args.seeds, [], 0, base / "seeds" / "best_model"
        source = tuned["source"]
    point = {"temperatures": (best["temperature"],), "alphas": (best["alpha"],), "betas": (best["beta"],)}
    if rest:
        finished_sweep(student_config(task, k, method, teacher_dir, args, point, rest), base / "seeds", args.report_only)
        rows += _rows(base / "seeds")
    return {"workdir": str(base), "model": str(model), "point": best, "grid_size": grid_size, "source": source,
            "seeds": [int(r["seed"]) for r in rows],
            "metrics": {name: [r[name] for r in rows] for name in _metric_names(rows)},
            "score": [r["score"] for r in rows]}


def _metric_names(rows: list[dict]) -> list[str]:
    """The dev metrics sweep.csv holds for this task (its columns after `score`)."""
    header = list(rows[0])
    return header[header.index("score") + 1:header.index("last_step")]


@dataclasses.dataclass
class Stat:
    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values) -> "Stat":
        values = [float(v) for v in values]
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))

    def __str__(self) -> str:
        text = f"{100 * self.mean:.1f}"
        return text + (f" ± {100 * self.std:.1f}" if self.n > 1 else "")


def _task_cell(task: str, values: dict[str, list[float]]) -> str:
    """The paper's cell: MRPC F1/accuracy, STS-B Pearson/Spearman, others the main metric."""
    names = {"mrpc": ("f1", "accuracy"), "qqp": ("f1", "accuracy"), "stsb": ("pearson", "spearmanr")}.get(
        task, (metrics.main_metric(task),))
    return " / ".join(str(Stat.of(values[n])) for n in names)


def _headline(task: str) -> str:
    names = {"mrpc": "F1 / acc.", "qqp": "F1 / acc.", "stsb": "Pearson / Spearman"}
    return f"{report.task_title(task)} ({names.get(task, report.metric_title(metrics.main_metric(task)))})"


def speed_table(model_dirs: dict[str, str], repeats: int) -> list[dict]:
    """Inference examples/s of each model (batch 128, seq 128), parameters, and speed-up over the first."""
    rows = []
    for label, path in model_dirs.items():
        model = checkpoints.load_pretrained(path)
        params = bert.param_count(model)
        rate = report.inference_examples_per_s(path, batch_size=128, seq_len=128, repeats=repeats)
        rows.append({"model": label, "layers": model.config.num_hidden_layers, "params": params, "examples_per_s": rate})
    for r in rows:
        r["speedup"] = r["examples_per_s"] / rows[0]["examples_per_s"]
    return rows


def _student(summary: dict, task: str, k: int, method: str) -> dict | None:
    """One method's result, or None where --report-only found it unfinished."""
    return summary["students"].get(task, {}).get(str(k), {}).get(method)


def markdown(summary: dict, args, command: str) -> str:
    tasks = summary["tasks"]
    lines = ["# PKD in miniature: results", "",
             f"Command: `{command}`", "",
             f"Device: {summary['device']}; jax {jax.__version__}; wall time {summary['wall_minutes']:.0f} min "
             f"(this invocation; finished runs are skipped on a rerun). Dev-set metrics ×100 of each "
             f"run's best evaluation; students: mean ± std over seeds {', '.join(map(str, args.seeds))} of the "
             "grid point chosen with the first seed.", "",
             "| Model | " + " | ".join(_headline(t) for t in tasks) + " | Avg % of teacher |",
             "|---|" + "---:|" * (len(tasks) + 1)]
    teacher = summary["teacher"]
    lines.append(f"| Teacher BERT{teacher.get('layers', '')} | "
                 + " | ".join(_task_cell(t, {n: [v] for n, v in teacher["metrics"][t].items()})
                              if t in teacher["metrics"] else "–" for t in tasks) + " | 100 |")
    for k in args.layers:
        for method in args.methods:
            cells, ratios = [], []
            for t in tasks:
                res = _student(summary, t, k, method)
                cells.append("–" if res is None else _task_cell(t, res["metrics"]))
                if res is not None:
                    ratios.append(statistics.fmean(res["score"]) / teacher["score"][t])
            average = "–" if not ratios else f"{100 * statistics.fmean(ratios):.1f}" + (
                f" ({len(ratios)} of {len(tasks)} tasks)" if len(ratios) < len(tasks) else "")
            lines.append(f"| {method}-{k} | " + " | ".join(cells) + f" | {average} |")
    lines += ["", "Chosen grid points (T, α, β; of how many grid points, or reused from another depth):", "",
              "| Student | " + " | ".join(report.task_title(t) for t in tasks) + " |", "|---|" + "---|" * len(tasks)]
    for k in args.layers:
        for method in args.methods:
            cells = []
            for t in tasks:
                res = _student(summary, t, k, method)
                if res is None:
                    cells.append("–")
                    continue
                p = res["point"]
                src = res["source"]
                source = (f"of {res['grid_size']}" if res["grid_size"] else f"k={src['layers']}'s" if src["task"] == t
                          else f"{report.task_title(src['task'])} k={src['layers']}'s")
                cells.append("–" if method == "FT" else f"T={p['temperature']:g}, α={p['alpha']:g}, β={p['beta']:g} "
                             f"({source})")
            lines.append(f"| {method}-{k} | " + " | ".join(cells) + " |")
    lines += ["", "Inference (batch 128, seq 128, the exported models, float32 on CPU / bfloat16 on accelerators):", "",
              "| Model | Layers | Parameters | Examples/s | Speed-up |", "|---|---:|---:|---:|---:|"]
    for r in summary["speed"]:
        lines.append(f"| {r['model']} | {r['layers']} | {r['params'] / 1e6:.1f}M | {r['examples_per_s']:.1f} | "
                     f"{r['speedup']:.2f}× |")
    spread = summary["teacher"]["cls_spread"]
    if spread:
        layers = len(next(iter(spread.values())))
        lines += ["", "How much the teacher's L2-normalised [CLS] vector varies with the input, per layer (mean "
                  "squared distance to the mean over 256 dev examples; 0: the same vector for every input, so a "
                  "patient loss towards that layer carries no information):", "",
                  "| Teacher | " + " | ".join(f"layer {l + 1}" for l in range(layers)) + " |",
                  "|---|" + "---:|" * layers]
        lines += [f"| {report.task_title(t)} | " + " | ".join(f"{x:.4f}" for x in values) + " |"
                  for t in tasks if (values := spread.get(t))]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tune_layers and not set(args.tune_layers) <= set(args.layers):
        raise SystemExit(f"--tune-layers={args.tune_layers}: every depth must be in --layers={args.layers}")
    if args.tune_tasks and not set(args.tune_tasks) <= set(args.tasks):
        raise SystemExit(f"--tune-tasks={args.tune_tasks}: every task must be in --tasks={args.tasks}")
    tune_layers, tune_tasks = args.tune_layers or args.layers, args.tune_tasks or args.tasks
    logging.getLogger("absl").setLevel(logging.WARNING)
    out = Path(args.out)
    start = time.time()
    summary = {"tasks": list(args.tasks), "teacher": {"metrics": {}, "score": {}, "cls_spread": {}}, "students": {},
               "device": f"{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()})"}
    for task in sorted(args.tasks, key=lambda t: t not in tune_tasks):  # tuned tasks first
        try:
            teacher_dir = run_teacher(task, args, out)
        except Unfinished:
            continue
        res = _finished(teacher_dir)
        summary["teacher"]["metrics"][task] = res["metrics"]
        summary["teacher"]["score"][task] = res["metrics"]["score"]
        summary["teacher"]["layers"] = res["model"]["layers"]
        summary["teacher"]["cls_spread"][task] = advise.layer_spreads(
            str(teacher_dir / "model"), task, glue_dir=args.glue_dir, max_seq_length=args.max_seq_length)["cls"]
        students = summary["students"][task] = {}
        for k in sorted(args.layers, key=lambda k: k not in tune_layers):  # tuned depths first
            if task not in tune_tasks:
                tuned = summary["students"].get(tune_tasks[0], {}).get(str(tune_layers[0]), {})
            else:
                tuned = students[str(tune_layers[0])] if k not in tune_layers else None
            students[str(k)] = {}
            for m in args.methods:
                if tuned is not None and tuned.get(m) is None:
                    continue  # --report-only: the point to reuse is not known yet
                try:
                    students[str(k)][m] = run_method(task, k, m, teacher_dir, args, out, None if tuned is None else tuned[m])
                except Unfinished:
                    pass
    first = args.tasks[0]
    models = {f"Teacher ({first})": out / first / "teacher" / "model"}
    models.update({f"Student k={k} ({first})": Path(res["model"]) for k in args.layers
                   if (res := _student(summary, first, k, args.methods[0])) is not None})
    summary["speed"] = speed_table({label: str(path) for label, path in models.items() if path.exists()},
                                   args.speed_repeats)
    summary["wall_minutes"] = (time.time() - start) / 60
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    text = markdown(summary, args, command)
    out.mkdir(parents=True, exist_ok=True)
    fsutil.write_text(out / "results.md", text)
    fsutil.write_text(out / "results.json", json.dumps(summary, indent=1) + "\n")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
