r"""The paper's comparison, and this project's new objectives, over seeds: docs/results.md.

  python scripts/reproduce.py --glue-dir=../shared/glue --out=runs/study ...   # docs/results.md has the command

For each task: the teacher (`--model`, all its layers, fine-tuned with cross-entropy), the
advisor's measurement of it (`pkd_jax.advise`, per student depth), then for each student depth k
and method a sweep (`configs/sweep.py`):

  FT             alpha = beta = 0 (plain cross-entropy; the teacher is not used)
  KD             beta = 0; grid over --temperatures x --alphas
  PKD-Last       the paper's patient loss on [CLS] vectors, strategy=last
  PKD-Skip       the same, strategy=skip
  PKD-Last-mean  PKD-Last on the mean over real tokens (patient_features=mean)
  PKD-Skip-mean  PKD-Skip on the mean over real tokens
  Advised        the features and layer map the advisor recommends for this teacher, task and k,
                 with the distance --advised-distance (default cka); beta grid --advised-betas

Protocol: every grid is trained with the first seed, and the point with the best dev score (the
task's main metric, each student's best evaluation) is then trained with the other --seeds; the
tables report those seeds. KD searches T x alpha; the patient methods then search beta at KD's
chosen T and alpha (with --patient-grid=joint, or when KD is not among --methods, they search
T x alpha x beta, as the paper did). Every method
sees the same data order and initial head with the same seed, so methods are compared seed by seed
(paired). --tune-tasks / --tune-layers restrict the search: the other tasks and depths train the
points chosen on the first tuned task and depth (the Advised method keeps its own task's features
and map). --depth-tasks limits depths after the first to some tasks (2:sst2 trains 2-layer
students on SST-2 only).

Every run is a run.py workdir under OUT/<task>/...; a finished one is skipped and an interrupted
one resumes, so rerunning the same command continues where it stopped, in sittings. Each
invocation appends its wall and CPU seconds to OUT/sittings.jsonl (kept current after every run).
A run of a small model uses about one core of a CPU: start the same command twice to use two.
A workdir has one writer (a lock): an invocation that reaches a run another one is training
leaves it to that one and goes on with the runs that do not need its result.
Writes OUT/results.md (the tables, `scripts/study_tables.py`) and OUT/results.json; --report-only
writes them from the runs finished so far (a missing cell shows "–") and trains nothing;
--doc=docs/results.md also puts the tables between that page's `<!-- study:begin -->` and
`<!-- study:end -->` lines.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import fcntl
import json
import logging
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

import flax
import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ lives at the repo root, beside run.py
from configs import finetune, multitask as multitask_config, sweep as sweep_config
from pkd_jax import advise, checkpoints, fsutil, metrics, multitask, sweep, train
from pkd_jax.data import glue
from pkd_jax.errors import WorkdirInUse

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study_tables  # noqa: E402

PATIENT = {  # method -> (strategy, patient_features); the distance is mse
    "PKD-Last": ("last", "cls"), "PKD-Skip": ("skip", "cls"),
    "PKD-Last-mean": ("last", "mean"), "PKD-Skip-mean": ("skip", "mean"),
}
METHODS = ("FT", "KD", *PATIENT, "Advised")
BEGIN, END = "<!-- study:begin -->", "<!-- study:end -->"


def _per_task(cast):
    """'96' (every task) or 'sst2:10000,mrpc:0' (0: the whole set) -> {task or '*': value}."""
    def parse(text: str) -> dict:
        out = {}
        for item in text.split(","):
            task, _, value = item.rpartition(":")
            out[task or "*"] = cast(value)
        return out
    return parse


def _shape(text: str) -> tuple[int, int]:
    batch, _, seq = text.partition("x")
    return int(batch), int(seq)


def _depth_tasks(text: str) -> dict[int, tuple[str, ...]]:
    return {int(k): tuple(v.split("+")) for k, _, v in (item.partition(":") for item in text.split(",") if item)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    floats = lambda s: tuple(float(x) for x in s.split(","))  # noqa: E731
    ints = lambda s: tuple(int(x) for x in s.split(","))  # noqa: E731
    names = lambda s: tuple(s.split(","))  # noqa: E731
    p.add_argument("--out", default="runs/study")
    p.add_argument("--glue-dir", default=None, help="a local GLUE folder; default: the HF hub")
    p.add_argument("--model", default="minilm-l6", help="teacher checkpoint; students start from its first k layers")
    p.add_argument("--tasks", default=("sst2", "mrpc", "stsb"), type=names)
    p.add_argument("--layers", default=(3,), type=ints, help="student depths; the first is the main one")
    p.add_argument("--depth-tasks", default={}, type=_depth_tasks,
                   help="tasks of the other depths, e.g. 2:sst2+mrpc (default: every task)")
    p.add_argument("--tune-layers", default=None, type=ints,
                   help="depths that search the grid (default: all); the others reuse the first one's points")
    p.add_argument("--tune-tasks", default=None, type=names,
                   help="tasks that search the grid (default: all); the others reuse the first one's points")
    p.add_argument("--methods", default=METHODS, type=names)
    p.add_argument("--seeds", default=(0, 1, 2, 3, 4), type=ints, help="the first one runs the grid")
    p.add_argument("--temperatures", default=(10.0,), type=floats)
    p.add_argument("--alphas", default=(0.5, 0.7), type=floats)
    p.add_argument("--betas", default=(100.0, 500.0), type=floats, help="the mse patient methods' beta grid")
    p.add_argument("--patient-grid", default="after-kd", choices=("after-kd", "joint"),
                   help="after-kd: the patient methods search beta at KD's T and alpha; joint: T x alpha x beta "
                        "(the paper's grid)")
    p.add_argument("--advised-distance", default="cka")
    p.add_argument("--advised-betas", default=(1.0, 10.0), type=floats)
    p.add_argument("--multitask-method", default=None, choices=(*PATIENT, "KD"),
                   help="also train one multi-task student of the first depth over every task with this method "
                        "(each task at its own chosen point and data size), against its single-task students")
    p.add_argument("--multitask-seeds", default=(0, 1, 2), type=ints)
    p.add_argument("--train-examples", default={"*": 0}, type=_per_task(int),
                   help="a fixed random subset of each training set: N or task:N,... (0: all)")
    p.add_argument("--max-seq-length", default={"*": 128}, type=_per_task(int), help="N or task:N,...")
    p.add_argument("--teacher-epochs", default=3.0, type=float)
    p.add_argument("--teacher-lr", default=5e-5, type=float)
    p.add_argument("--student-epochs", default=3.0, type=float)
    p.add_argument("--student-lr", default=2e-4, type=float,
                   help="MiniLM's lower layers need 2e-4 (README); 5e-5 suits BERT-base")
    p.add_argument("--batch-size", default=32, type=int)
    p.add_argument("--students-per-chunk", default=0, type=int,
                   help="students vmapped together (0: the sweep's automatic size: as many as fit on an "
                        "accelerator, 1 on CPU, where vmap does not pay)")
    p.add_argument("--speed-repeats", default=5, type=int,
                   help="timed forward passes per model for the speed table (measured once: OUT/speed.json)")
    p.add_argument("--speed-shape", default=(128, 128), type=_shape, metavar="BATCHxSEQ",
                   help="the batch size and sequence length of the speed table's forward passes")
    p.add_argument("--report-only", action="store_true", help="tables from the finished runs only; train nothing")
    p.add_argument("--doc", default=None, help="also write the tables into this page between its study markers")
    args = p.parse_args(argv)
    for bad in set(args.methods) - set(METHODS):
        p.error(f"--methods: unknown method {bad!r}; known: {', '.join(METHODS)}")
    if args.tune_layers and not set(args.tune_layers) <= set(args.layers):
        p.error(f"--tune-layers={args.tune_layers}: every depth must be in --layers={args.layers}")
    if args.tune_tasks and not set(args.tune_tasks) <= set(args.tasks):
        p.error(f"--tune-tasks={args.tune_tasks}: every task must be in --tasks={args.tasks}")
    return args


def _of(table: dict, task: str):
    return table.get(task, table.get("*"))


def common_overrides(task, args) -> dict:
    """Fields every run of the task shares."""
    return {"max_seq_length": _of(args.max_seq_length, task), "batch_size": args.batch_size,
            "train_examples": _of(args.train_examples, task) or None, "predict_test": False, "progress": False}


def _apply(config, overrides: dict):
    for key, value in overrides.items():
        config[key] = value
    return config


def _arg(task, args, **extra) -> str:
    items = {"task": task, **({"glue_dir": args.glue_dir} if args.glue_dir else {}), **extra}
    return ",".join(f"{k}={v}" for k, v in items.items())


def teacher_config(task, args):
    c = finetune.get_config(_arg(task, args, model=args.model))
    return _apply(c, {**common_overrides(task, args), "num_epochs": args.teacher_epochs,
                      "learning_rate": args.teacher_lr})


def method_fields(method: str, advice: dict, args) -> dict:
    """The config fields that make a sweep this method (beside the grid)."""
    if method in PATIENT:
        strategy, features = PATIENT[method]
        return {"strategy": strategy, "patient_features": features, "distance": "mse"}
    if method == "Advised":
        rec = advice["recommendation"]
        strategy = rec["strategy"] if rec["strategy"] in ("skip", "last") else ",".join(map(str, rec["layer_map"]))
        return {"strategy": strategy, "patient_features": rec["features"], "distance": args.advised_distance}
    return {}


def method_grid(method: str, args, kd_point: dict | None) -> dict:
    """The sweep axes of one method (seed and learning rate excluded)."""
    if method == "FT":
        return {"temperatures": (1.0,), "alphas": (0.0,), "betas": (0.0,)}
    if method == "KD":
        return {"temperatures": args.temperatures, "alphas": args.alphas, "betas": (0.0,)}
    betas = args.advised_betas if method == "Advised" else args.betas
    if kd_point is None:
        return {"temperatures": args.temperatures, "alphas": args.alphas, "betas": betas}
    return {"temperatures": (kd_point["temperature"],), "alphas": (kd_point["alpha"],), "betas": betas}


def student_config(task, k, fields: dict, teacher_dir, args, grid: dict, seeds):
    c = sweep_config.get_config(_arg(task, args, teacher=teacher_dir, layers=k))
    return _apply(c, {**common_overrides(task, args), **fields, **grid, "num_epochs": args.student_epochs,
                      "learning_rates": (args.student_lr,), "seeds": tuple(seeds),
                      "students_per_chunk": args.students_per_chunk})


def _finished(workdir: Path) -> dict | None:
    path = workdir / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


class Unfinished(Exception):
    """A run not finished: --report-only met it, or another invocation is training it."""


def _train(workdir: Path, train_fn):
    """train_fn() trains in workdir; a workdir another invocation is training in is left to it (the
    runs that need its result wait for a later sitting)."""
    try:
        return train_fn()
    except WorkdirInUse:
        print(f"[reproduce] {workdir}: another invocation is training it; left to that one", flush=True)
        raise Unfinished(workdir) from None


class Ledger:
    """This invocation's line of OUT/sittings.jsonl (its wall and CPU seconds and the runs it trained),
    rewritten after every finished run, so a sitting killed at any moment loses at most one run's
    time. Invocations may run side by side on disjoint work: each replaces only its own line, under
    a lock."""

    def __init__(self, out: Path):
        self.path, self.start, self.trained = out / "sittings.jsonl", time.time(), 0
        self.id = f"{_now()} pid {os.getpid()}"

    @staticmethod
    def cpu_seconds() -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        return own.ru_utime + own.ru_stime

    def add(self, runs: int) -> None:
        self.trained += runs
        line = {"date": _now(), "wall_s": round(time.time() - self.start, 1), "cpu_s": round(self.cpu_seconds(), 1),
                "runs_trained": self.trained, "sitting": self.id}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (or the process dies)
            lines = self.path.read_text().splitlines() if self.path.exists() else []
            lines = [x for x in lines if json.loads(x).get("sitting") != self.id]
            fsutil.write_text(self.path, "".join(f"{x}\n" for x in [*lines, json.dumps(line)]))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run_teacher(task, args, out: Path, ledger: Ledger) -> Path:
    workdir = out / task / "teacher"
    if _finished(workdir) is None:
        if args.report_only:
            raise Unfinished(workdir)
        print(f"[reproduce] {task}: fine-tuning the teacher in {workdir}", flush=True)
        _train(workdir, lambda: train.train_and_evaluate(teacher_config(task, args), workdir))
        ledger.add(1)
    return workdir


def teacher_advice(task, k, teacher_dir: Path, args, out: Path) -> dict:
    """The advisor on the finished teacher for k-layer students (computed once, kept in OUT)."""
    where = out / task / f"advice-k{k}"
    if (where / "advice.json").exists():
        return json.loads((where / "advice.json").read_text())
    advice = advise.advise(str(teacher_dir), task, student_init=args.model, layers=k, glue_dir=args.glue_dir,
                           max_seq_length=_of(args.max_seq_length, task))
    advice["command"] = f"scripts/reproduce.py (advise.advise on {teacher_dir}, layers={k})"
    advise.write(advice, where)
    return advice


def finished_sweep(config, workdir: Path, args, ledger: Ledger) -> dict:
    done = _finished(workdir)
    if done is None:
        if args.report_only:
            raise Unfinished(workdir)
        print(f"[reproduce] {config.task}: {workdir} ({len(sweep.grid(config))} students)", flush=True)
        done = _train(workdir, lambda: sweep.train_grid(config, workdir))
        ledger.add(len(sweep.grid(config)))
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


def _metric_names(rows: list[dict]) -> list[str]:
    """The dev metrics sweep.csv holds for this task (its columns after `score`)."""
    header = list(rows[0])
    return header[header.index("score") + 1:header.index("last_step")]


def run_method(task, k, method, fields: dict, teacher_dir: Path, args, out: Path, ledger: Ledger,
               tuned: dict | None = None, kd_point: dict | None = None) -> dict:
    """Grid with the first seed, then the best point with the other seeds; its per-seed rows.

    `tuned`: the result of this method where the grid was searched; train its point only.
    """
    base = out / task / f"k{k}" / method.lower()
    if tuned is None:
        grid = method_grid(method, args, kd_point)
        first, rest = args.seeds[:1], args.seeds[1:]
        results = finished_sweep(student_config(task, k, fields, teacher_dir, args, grid, first), base / "grid",
                                 args, ledger)
        best = {key: results["best"][key] for key in ("temperature", "alpha", "beta")}
        rows = [r for r in _rows(base / "grid") if all(r[key] == value for key, value in best.items())]
        grid_size, model = results["students"], base / "grid" / "best_model"
        source = {"task": task, "layers": k}
    else:
        best, rest, rows, grid_size, model = tuned["point"], args.seeds, [], 0, base / "seeds" / "best_model"
        source = tuned["source"]
    point = {"temperatures": (best["temperature"],), "alphas": (best["alpha"],), "betas": (best["beta"],)}
    if rest:
        finished_sweep(student_config(task, k, fields, teacher_dir, args, point, rest), base / "seeds", args, ledger)
        rows += _rows(base / "seeds")
    failed = [int(r["seed"]) for r in rows if r["status"] != "ok"]  # diverged (NaN): no score to report
    names, rows = _metric_names(rows), [r for r in rows if r["status"] == "ok"]
    return {"workdir": str(base), "model": str(model), "point": best, "grid_size": grid_size, "source": source,
            "fields": fields, "seeds": [int(r["seed"]) for r in rows], "failed_seeds": failed,
            "metrics": {name: [r[name] for r in rows] for name in names},
            "score": [r["score"] for r in rows]}


def dev_facts(task: str, args, tokenizer) -> dict:
    """Majority-class baseline on dev, and how many train / dev examples the length cuts."""
    dev = glue.load_split(task, "validation", args.glue_dir)
    labels = np.asarray(dev["label"])
    if labels.dtype.kind == "f":
        baseline = dict.fromkeys(metrics.compute(task, labels, labels), float("nan"))  # a constant has no correlation
    else:
        baseline = metrics.compute(task, np.full_like(labels, np.bincount(labels).argmax()), labels)
    n = _of(args.max_seq_length, task)
    cut = {}
    for split in ("train", "validation"):
        ds = glue.load_split(task, split, args.glue_dir)  # the whole train set, of which runs may take a subset
        pairs = [ds["text_a"]] + ([ds["text_b"]] if ds["text_b"][0] is not None else [])
        lengths = [len(x) for x in tokenizer(*[list(p) for p in pairs])["input_ids"]]
        cut[split] = [int(sum(length > n for length in lengths)), len(lengths)]
    return {"baseline": baseline, "truncated": cut, "max_seq_length": n,
            "train_examples": _of(args.train_examples, task)}


def _depths(args) -> list[int]:
    tune = args.tune_layers or args.layers
    return sorted(args.layers, key=lambda k: k not in tune)  # tuned depths first


def _tasks(args, k: int) -> list[str]:
    tune = args.tune_tasks or args.tasks
    tasks = args.depth_tasks.get(k, args.tasks) if k != args.layers[0] else args.tasks
    return sorted(tasks, key=lambda t: t not in tune)  # tuned tasks first


def run_students(summary: dict, k: int, task: str, args, out: Path, ledger: Ledger) -> None:
    """Every method of one (task, depth): searched, or the tuned task/depth's points reused."""
    tune_layers, tune_tasks = args.tune_layers or args.layers, args.tune_tasks or args.tasks
    students = summary["students"].setdefault(task, {})
    if task not in tune_tasks:
        tuned = summary["students"].get(tune_tasks[0], {}).get(str(tune_layers[0]), {})
    else:
        tuned = students.get(str(tune_layers[0]), {}) if k not in tune_layers else None
    done = students[str(k)] = {}
    teacher_dir = out / task / "teacher"
    advice = summary["advice"][task][str(k)]
    for m in sorted(args.methods, key=METHODS.index):  # KD before the patient methods that take its point
        if tuned is not None and tuned.get(m) is None:
            continue  # --report-only: the point to reuse is not known yet
        after_kd = (tuned is None and args.patient_grid == "after-kd" and "KD" in args.methods
                    and m not in ("FT", "KD"))
        if after_kd and "KD" not in done:
            continue  # --report-only: KD's point is not known yet
        kd = done["KD"]["point"] if after_kd else None
        try:
            done[m] = run_method(task, k, m, method_fields(m, advice, args), teacher_dir, args, out, ledger,
                                 None if tuned is None else tuned[m], kd)
        except Unfinished:
            pass


def run_multitask(summary: dict, args, out: Path, ledger: Ledger) -> None:
    """The multi-task student of --multitask-method, one run per --multitask-seeds seed: every task at
    the point its single-task students use, on the same data (an epoch visits each training set once)."""
    k, m, tasks = args.layers[0], args.multitask_method, args.tasks
    singles = {t: summary["students"].get(t, {}).get(str(k), {}).get(m) for t in tasks}
    lengths = {_of(args.max_seq_length, t) for t in tasks}
    if any(r is None for r in singles.values()) or len(lengths) > 1:
        return  # not every task's students are there yet (or lengths differ: one shared max_seq_length)
    teachers = "+".join(str(out / t / "teacher") for t in tasks)
    found = {}
    for seed in args.multitask_seeds:
        workdir = out / "multitask" / m.lower() / f"seed{seed}"
        done = _finished(workdir)
        if done is None and args.report_only:
            continue
        if done is None:
            arg = {"tasks": "+".join(tasks), "teachers": teachers, "layers": k, "model": args.model,
                   **({"glue_dir": args.glue_dir} if args.glue_dir else {})}
            c = multitask_config.get_config(",".join(f"{key}={value}" for key, value in arg.items()))
            _apply(c, {"max_seq_length": next(iter(lengths)), "batch_size": args.batch_size,
                       "predict_test": False, "progress": False, "num_epochs": args.student_epochs,
                       "learning_rate": args.student_lr, "seed": seed, **method_fields(m, {}, args)})
            for t in tasks:
                point = singles[t]["point"]
                _apply(c.per_task[t], {"alpha": point["alpha"], "beta": point["beta"],
                                       "temperature": point["temperature"],
                                       "train_examples": _of(args.train_examples, t) or None})
            print(f"[reproduce] multi-task {m} seed {seed}: {workdir}", flush=True)
            try:
                done = _train(workdir, lambda: multitask.train_multitask(c, workdir))
            except Unfinished:
                continue
            ledger.add(1)
        found[seed] = done
    if found:
        any_run = next(iter(found.values()))
        summary["multitask"] = {
            "method": m, "layers": k, "seeds": sorted(found), "params": any_run["model"]["params"],
            "single_params": {t: any_run["per_task"][t]["model"]["params"] for t in tasks},
            "per_task": {t: {"score": [found[s]["per_task"][t]["metrics"]["score"] for s in sorted(found)]}
                         for t in tasks}}


def versions() -> str:
    return (f"Python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}, "
            f"{platform.processor() or platform.machine()}")


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.getLogger("absl").setLevel(logging.WARNING)
    out = Path(args.out)
    ledger = Ledger(out)
    summary = {"tasks": list(args.tasks), "layers": list(args.layers), "seeds": list(args.seeds),
               "teacher": {"metrics": {}, "score": {}}, "advice": {}, "data": {}, "students": {},
               "device": f"{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()})",
               "versions": versions()}
    tokenizer = checkpoints.load_tokenizer(checkpoints.resolve(args.model))
    for task in args.tasks:  # every teacher first: the students of each need all of them anyway
        summary["data"][task] = dev_facts(task, args, tokenizer)
        try:
            teacher_dir = run_teacher(task, args, out, ledger)
        except Unfinished:
            continue
        res = _finished(teacher_dir)
        summary["teacher"]["metrics"][task] = res["metrics"]
        summary["teacher"]["score"][task] = res["metrics"]["score"]
        summary["teacher"]["layers"] = res["model"]["layers"]
        summary["advice"][task] = {str(k): teacher_advice(task, k, teacher_dir, args, out) for k in args.layers}
    for k in _depths(args):
        for task in _tasks(args, k):
            if task in summary["advice"]:
                run_students(summary, k, task, args, out, ledger)
        if k == args.layers[0] and args.multitask_method:
            run_multitask(summary, args, out, ledger)  # it compares with these students: before other depths
    first = args.tasks[0]
    models = {f"Teacher ({first})": out / first / "teacher" / "model"}
    models.update({f"Student k={k} ({first})": Path(res["model"]) for k in args.layers
                   if (res := summary["students"].get(first, {}).get(str(k), {}).get(args.methods[0])) is not None})
    summary["speed"] = measured_speed(out, {label: str(path) for label, path in models.items() if path.exists()},
                                      args.speed_repeats, args.speed_shape, summary["device"])
    summary["speed_shape"] = list(args.speed_shape)
    sittings = out / "sittings.jsonl"
    summary["sittings"] = [json.loads(line) for line in sittings.read_text().splitlines()] if sittings.exists() else []
    summary["date"] = datetime.date.today().isoformat()
    summary["command"] = "python " + " ".join(
        shlex.quote(a) for a in ["scripts/reproduce.py", *(argv if argv is not None else sys.argv[1:])])
    text = study_tables.markdown(summary)
    out.mkdir(parents=True, exist_ok=True)
    fsutil.write_text(out / "results.md", text)
    fsutil.write_text(out / "results.json", json.dumps(summary, indent=1) + "\n")
    if args.doc:
        write_into(Path(args.doc), text)
    print(text, flush=True)
    return 0


def measured_speed(out: Path, models: dict[str, str], repeats: int, shape: tuple[int, int],
                   device: str) -> list[dict]:
    """The speed table, measured once per set of models (OUT/speed.json): a rerun or --report-only
    reuses it unless a model was saved again, or the repeats, the shape or the device differ."""
    key = {"models": {label: [path, max(f.stat().st_mtime_ns for f in Path(path).iterdir())]
                      for label, path in models.items()}, "repeats": repeats, "device": device,
           "shape": list(shape)}
    cached = out / "speed.json"
    if cached.exists() and (old := json.loads(cached.read_text()))["key"] == key:
        return old["rows"]
    rows = study_tables.speed_table(models, repeats, *shape)
    out.mkdir(parents=True, exist_ok=True)
    fsutil.write_text(cached, json.dumps({"key": key, "rows": rows}, indent=1) + "\n")
    return rows


def write_into(page: Path, text: str) -> None:
    """Replace what lies between the page's study markers with text."""
    old = page.read_text()
    if BEGIN not in old or END not in old:
        raise SystemExit(f"--doc={page}: the page needs the lines {BEGIN} and {END} around the generated part")
    head, rest = old.split(BEGIN, 1)
    fsutil.write_text(page, f"{head}{BEGIN}\n{text}{END}{rest.split(END, 1)[1]}")


if __name__ == "__main__":
    sys.exit(main())
