"""`python -m pkd_jax.report W1 W2 ...`: sweep workdirs rendered in place, run workdirs compared
in one report (see the package docstring)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from pkd_jax.report.multitask import is_multitask, load_multitask, multitask_rows, sharing_table
from pkd_jax.report.runs import RunError, is_sweep, load_runs, summary_rows, task_title
from pkd_jax.report.speed import measure_speed, speed_note
from pkd_jax.report.tables import markdown_table, read_sweep, sweep_table
from pkd_jax.report.write import write_report, write_sweep_report


def default_out(paths: Sequence[str | os.PathLike]) -> Path:
    """The workdirs' common parent; ./report when that is the filesystem root."""
    parent = Path(os.path.commonpath([Path(p).resolve().parent for p in paths]))
    return Path("report") if parent == Path(parent.anchor) else parent


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    doc = sys.modules[__package__].__doc__  # the package docstring: its first paragraph is the usage
    p = argparse.ArgumentParser(prog="python -m pkd_jax.report", description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdirs", nargs="+", help="run.py --workdir folders: runs, sweeps or both")
    p.add_argument("--out", help="report folder (default: the run workdirs' common parent)")
    p.add_argument("--speed", action="store_true", help="time inference of each run's model/")
    p.add_argument("--batch-size", type=int, default=128, help="--speed batch size")
    p.add_argument("--seq-len", type=int, default=128, help="--speed sequence length")
    p.add_argument("--repeats", type=int, default=5, help="--speed timed calls (the median is kept)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="--speed compute dtype (auto: bfloat16 on GPU/TPU, as in training)")
    p.add_argument("--json", action="store_true", help="also print the runs' rows as JSON lines")
    return p.parse_args(argv)


def _render_sweep(workdir: Path, rows: list[dict], task: str) -> str:
    """(Re)write W/sweep.md and W/heatmap.png; returns the table to print."""
    print(f"sweep report: {write_sweep_report(workdir)}", file=sys.stderr)
    return f"## {task_title(task)} sweep: {workdir}\n\n{sweep_table(rows, task)}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    multitask_dirs = [w for w in args.workdirs if is_multitask(w)]
    run_dirs = [w for w in args.workdirs if not is_sweep(w) and w not in multitask_dirs]
    speed, note = None, None
    try:  # every input is read (and timed) before anything is written
        sweeps = [(Path(w), *read_sweep(w)) for w in args.workdirs if is_sweep(w)]
        students = [load_multitask(w) for w in multitask_dirs]
        runs = load_runs(run_dirs, allow_unfinished=True)
        if args.speed and runs:
            options = {"batch_size": args.batch_size, "seq_len": args.seq_len, "repeats": args.repeats,
                       "dtype": args.dtype}
            speed, note = measure_speed(runs, **options), speed_note(**options)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    printed = [_render_sweep(*sweep) for sweep in sweeps]
    for run in runs:
        if not run.finished:
            print(f"note: {run.path}: unfinished (no results.json): plotted, not tabled", file=sys.stderr)
    rows = summary_rows(runs, speed, multitask_rows(students, runs))
    shared = [sharing_table(s, rows) for s in students]
    if runs or students:
        out = Path(args.out) if args.out else default_out(run_dirs + multitask_dirs)
        path = write_report(runs, rows, out, note, shared)
        printed += [markdown_table(rows), *shared]
    print("\n\n".join(printed))
    if args.json:
        for row in rows:
            print(json.dumps(dataclasses.asdict(row)))
    if runs or students:
        print(f"\nreport: {path}", file=sys.stderr)
    return 0
