"""Compare finished runs like the paper does (teacher vs students), and render sweeps.

  python -m pkd_jax.report runs/rte/teacher runs/rte/ft3 runs/rte/kd3 runs/rte/pkd-skip3 runs/rte/sweep-skip3 \
      [--out DIR] [--speed [--batch-size 128 --seq-len 128 --repeats 5]] [--json]

Each argument is a `run.py --workdir`: a run (config.json, metrics.jsonl, results.json, model/),
a sweep (configs/sweep.py: sweep.csv, config.json, results.json with kind "sweep") or a
multi-task student (configs/multitask.py: config.json with kind "multitask", results.json).

Runs are compared in `DIR/report.md` (its tables also printed), `DIR/curves_<task>.png` (train
loss and dev main metric against the step) and `DIR/summary_<task>.png` (best dev score per run).
DIR defaults to the run workdirs' common parent (`./report` when that is the filesystem root).
`--json` also prints one JSON line per run's table row (metrics as fractions, not percent).

A sweep is not a run: its results.json describes its best student, so `load_run` refuses a sweep
workdir (`is_sweep`: it holds sweep.csv, or its config.json says kind "sweep"). Each sweep given
gets its `W/sweep.md` (students ranked by dev score, the best starred) and `W/heatmap.png`
rewritten in place by `write_sweep_report`, as run.py writes them after each chunk, and its
table printed. Sweeps and runs may be mixed; with sweeps only, no report.md is written.

Method labels: Teacher (fine-tuned at full depth, or the model a distil run among the inputs
learnt from), FT-k (fine-tuned with layers=k), KD-k (distilled with beta=0), PKD-Skip-k /
PKD-Last-k / PKD-[2,4]-k (beta > 0 and strategy skip, last or an explicit teacher-layer list).

The teacher a row is compared with ("% of teacher", "speed-up"): for a distil run, the run among
the inputs whose `model/` is the results.json teacher.path (relative paths resolve from the
current directory, as run.py did); otherwise the task's deepest fine-tuned run, when some run of
the task is shallower. Several tasks: one section per task, in GLUE order.

A multi-task student adds a row to the table of each of its tasks (method MT-PKD-Skip-k, ...: its
dev metrics at its best step, selected by the mean of the tasks' main metrics, and the parameters
of that task's exported model), compared with the task's teacher when that run is among the
inputs. Its section under "Multi-task students" puts, per task, the teacher, the best single-task
student of the same depth among the inputs and the multi-task student side by side, and counts
the parameters one shared encoder saves against a student per task.

Unfinished runs (metrics.jsonl but no results.json) are drawn in the curves, marked
"(unfinished)", and listed in a note; they get no table row. Any other path that is not a run
or a sweep is an error naming the path and what is missing (exit status 2).

`--speed` times a jitted forward pass of each run's model/ on random token ids with
`pkd_jax.timing` (compilation and a warm-up call excluded, every call ends in
block_until_ready, median of --repeats calls).

Layout: `runs.py` loading runs, labels, teachers and rows; `tables.py` every markdown table
(runs and sweeps); `plots.py` the figures; `speed.py` inference timing; `stats.py` statistics over
seeds (mean ± std, t CIs, paired comparisons and their verdicts); `write.py` the files (report.md,
sweep.md); `multitask.py` multi-task students' rows and tables; `cli.py` the command line.
"""

from pkd_jax.report.cli import default_out, main, parse_args
from pkd_jax.report.multitask import MultiTask, is_multitask, load_multitask, multitask_rows, sharing_table
from pkd_jax.report.plots import plot_curves, plot_heatmap, plot_summary
from pkd_jax.report.runs import (Row, Run, RunError, is_sweep, load_run, load_runs, method_label, metric_title,
                                 summary_rows, task_title, teachers)
from pkd_jax.report.speed import inference_examples_per_s, measure_speed
from pkd_jax.report.stats import Paired, Summary, format_paired, format_summary, of_teacher, paired, summary
from pkd_jax.report.tables import (markdown_report, markdown_table, percent, read_sweep, read_sweep_rows,
                                   sweep_table)
from pkd_jax.report.write import write_report, write_sweep_report

__all__ = [
    "default_out", "main", "parse_args", "MultiTask", "is_multitask", "load_multitask", "multitask_rows",
    "sharing_table", "plot_curves", "plot_heatmap", "plot_summary", "Row", "Run",
    "RunError", "is_sweep", "load_run", "load_runs", "method_label", "metric_title", "summary_rows",
    "task_title", "teachers", "inference_examples_per_s", "measure_speed", "markdown_report",
    "markdown_table", "percent", "read_sweep", "read_sweep_rows", "sweep_table", "write_report",
    "write_sweep_report", "Paired", "Summary", "format_paired", "format_summary", "of_teacher", "paired",
    "summary",
]
