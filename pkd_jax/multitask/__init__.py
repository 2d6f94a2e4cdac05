"""Multi-task PKD: one student, an encoder shared by every task and a head per task, each task
distilled from its own fine-tuned teacher (configs/multitask.py; the paper's future work on
"Patient-KD in more complex settings such as multi-task learning").

* **Tasks.** Each task is prepared as the configs/pkd.py run it would be alone
  (`tasks.task_config`): its data, its teacher (checked against the task), its layer map and
  its teacher outputs, cached with the same fingerprints or online. `per_task.<task>` may change
  alpha, beta, temperature and strategy, and weights the task's loss.
* **Student.** The first k layers of the shared pretrained checkpoint, with one head per task
  (STS-B: one output, regression), seeded per task (`student.MultiTaskStudent`). NNX shares the
  encoder module between the tasks' models, so the state holds it once.
* **Steps.** Every step trains one batch of one task, drawn by `mixing` (proportional,
  temperature p ∝ n^(1/τ), or equal) as a pure function of (seed, step). Each task has its own
  compiled step, `steps.make_distill_step` on that task's view of the student, jitted once per
  batch shape before the loop; alternating tasks never recompiles. A step moves the encoder and
  its task's head; the other heads keep their parameters and Adam moments.
* **Loop.** `loop.train`, like single runs and sweeps: its schedule, checkpoints (the whole
  student and optimizer), NaN stop, SIGTERM and resume; the trainee (`trainer._Students`)
  supplies the per-task step, logs and evaluation.
* **Selection and outputs.** Each evaluation scores every task on its dev set with its metric;
  the best student by the mean of the tasks' main metrics is exported as `W/model/<task>/`
  (BertForSequenceClassification folders) and `W/model/encoder/` (BertModel); test predictions
  go to `W/predictions/`, results to `W/results.json` (per task under "per_task").
* **Layout.** `tasks.py`: the config's checks and each task's run config; `mixing.py`: the task
  order; `student.py`: the shared model, its per-task views, steps and export; `trainer.py`: the
  run through the loop.
"""

from pkd_jax.multitask.mixing import RULES, counts, mixed_batches, probabilities, task_order
from pkd_jax.multitask.student import MultiTaskStudent, export, param_counts, task_step, views, weighted
from pkd_jax.multitask.tasks import check_multitask_config, task_config
from pkd_jax.multitask.trainer import METRIC, MultiTaskRun, train_multitask

__all__ = [
    "RULES", "counts", "mixed_batches", "probabilities", "task_order", "MultiTaskStudent", "export",
    "param_counts", "task_step", "views", "weighted", "check_multitask_config", "task_config", "METRIC",
    "MultiTaskRun", "train_multitask",
]
