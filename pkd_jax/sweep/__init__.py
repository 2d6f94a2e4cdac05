"""The paper's hyper-parameter grid in one run: G students stacked on a leading axis, one vmapped step.

  python run.py --config=configs/sweep.py:task=rte,teacher=runs/rte/teacher,layers=3,strategy=skip,glue_dir=../shared/glue \
      --workdir=runs/rte/sweep-skip3 --config.learning_rates=2e-4

The paper tunes T in {5, 10, 20} x alpha in {0.2, 0.5, 0.7} x beta in {10, 100, 500, 1000}: 36 students
per task and strategy, normally 36 jobs that each re-read the data and re-run or re-load the
teacher. Here the grid (seeds x learning_rates x temperatures x alphas x betas) runs in one process:

* **Chunks.** The grid is cut into chunks of G students of one seed (students of a chunk see the
  same batches, which are a function of the seed). A chunk's train states are stacked along a
  leading axis: each student has its own parameters, Adam moments, step, dropout key, α/β/T
  (`state.hparams`) and peak learning rate (`opt_state.hyperparams["learning_rate"]`).
* **One step.** `jax.vmap(steps.make_distill_step(...), in_axes=(0, None, None))`, jitted once
  with the state donated. The batch and the teacher are shared: cached teacher outputs arrive
  once in the batch; an online teacher's forward pass does not depend on the student, so vmap
  leaves it unbatched and it runs once per step for all G students.
* **Placement.** By default the students are replicated and the batch split over the mesh, as in
  a single run (`mesh.fsdp` shards the stacked parameters as well). With `shard_students` the
  student axis is split over the devices instead: each holds G/n students and sees the whole
  batch; G is then a multiple of the device count (a short chunk is padded with copies of its
  last student, trained and discarded).
* **Chunk size.** `students_per_chunk=0` picks G from device memory on an accelerator
  (`auto_chunk_size`), and 1 on a CPU, where a vmapped chunk measured no faster than the same
  students one after another (docs/benchmarks.md); any G may still be set.
* **Equivalence.** A student ends with the parameters and dev metrics of the single run
  `train.train_and_evaluate(point_config(config, point))` (same seed: same classifier init,
  dropout keys and batches), up to float rounding: vmap batches the matmuls differently.
  tests/test_sweep.py asserts it.
* **Evaluation** runs on the same schedule as single runs (end of each epoch, every
  `eval_every_steps`, the end), one vmapped forward pass for the whole chunk. Each student's
  best score and step are tracked; the best student of the sweep so far (by the task's main
  metric; ties: the one that got there first) is exported at once to `W/best_model/`.
* **NaN.** A student whose training loss turns NaN/inf is marked failed (step and loss in the
  table); the others go on. Its best evaluation before the failure stays in the table and may
  still be the sweep's best. A chunk whose students all failed stops early.
* **Resume.** `W/plan.json` fixes the grid and the chunks. A chunk checkpoints its stacked state
  and per-student tracking under `W/chunk_<i>/checkpoints` (orbax, like a single run); a finished
  chunk writes `W/chunk_<i>/summary.json` and drops its checkpoints. Running the same command
  again skips finished chunks and resumes the current one from its last checkpoint.
* **Layout.** `plan.py`: the grid, the plan and the chunk size, the per-student rows;
  `students.py`: stacked states, the vmapped step and evaluation; `trainer.py`: each chunk through
  the shared loop (`loop.train`), like a single run.

Outputs in W: `sweep.csv` (one row per student: hyper-parameters, status, best step, dev metrics
at the best step, last evaluation), `best_model/` (HF folder), `results.json` (best point and
metrics, grid, timing, students·examples/s), `metrics.jsonl` (lines tagged with `chunk` and
`student`) and `tensorboard/student_<id>/` (one TensorBoard run per student: the students
overlay). `run.py` adds the report's `sweep.md` (the table sorted by score, best row marked) and
`heatmap.png` (`python -m pkd_jax.report W` draws them again).
"""

from pkd_jax.sweep.plan import (GRID_AXES, Plan, Point, auto_chunk_size, best_row, check_sweep_config,
                                csv_table, describe, device_memory_bytes, grid, make_chunks, point_config,
                                student_bytes, student_row)
from pkd_jax.sweep.students import (compile_students_step, evaluate_students, make_students_logits_fn,
                                    replicate_batch, stack_students, student_shardings)
from pkd_jax.sweep.trainer import ChunkResult, Sweep, train_grid

__all__ = [
    "GRID_AXES", "Plan", "Point", "auto_chunk_size", "best_row", "check_sweep_config", "csv_table",
    "describe", "device_memory_bytes", "grid", "make_chunks", "point_config", "student_bytes",
    "student_row", "compile_students_step", "evaluate_students", "make_students_logits_fn",
    "replicate_batch", "stack_students", "student_shardings", "ChunkResult", "Sweep", "train_grid",
]
