r"""Multi-task PKD: one student with a head per task, each task distilled from its own teacher.

  python run.py --config=configs/multitask.py:tasks=sst2+stsb,teachers=runs/sst2/teacher+runs/stsb/teacher,layers=3,glue_dir=../shared/glue \
      --workdir=runs/mt/sst2-stsb --config.learning_rate=2e-4

  # Per-task overrides (None: the shared field) and temperature sampling with tau = 2:
  python run.py --config=configs/multitask.py:tasks=sst2+stsb,teachers=runs/sst2/teacher+runs/stsb/teacher,layers=3,glue_dir=../shared/glue \
      --workdir=runs/mt/sst2-stsb-t2 --config.per_task.stsb.alpha=0.2 --config.per_task.stsb.weight=2 \
      --config.per_task.sst2.strategy=last --config.sampling=temperature --config.sampling_temperature=2

Args: tasks (GLUE names joined by +), teachers (one per task, in the same order, joined by +: a
finished run's workdir or an HF folder fine-tuned on that task), model (the student's pretrained
checkpoint; default: the one the teacher runs started from, which must agree), layers, strategy,
glue_dir, runlocal (a CPU run of a minute or two).

The student is the first `layers` layers of the pretrained checkpoint, shared by every task, with
one head per task (STS-B: a regression head). Every other field is configs/pkd.py's, shared by
all tasks; `per_task.<task>` holds the teacher and what one task may change: alpha, beta,
temperature, strategy, train_examples (None: the shared value) and weight, which multiplies that
task's loss.

Task sampling (`sampling`; n_t: the task's training examples, after train_examples):
  proportional  p_t = n_t / sum_u n_u                      (the default; MT-DNN's)
  temperature   p_t = n_t^(1/tau) / sum_u n_u^(1/tau)      tau = sampling_temperature (1: proportional)
  equal         p_t = 1 / (number of tasks)
Each step trains on one batch of one task. The task of step s is a pure function of (seed, s):
u_s, the ((s-1) mod 1024)-th number of numpy's PCG64 stream seeded [seed, 1831, (s-1) // 1024],
picks the first task t with u_s < p_1 + ... + p_t. Each task's own batches follow today's seeded
order, so a resumed run replays the same tasks and batches.

An epoch is sum_t (n_t // batch_size) steps (proportional sampling visits each task's set about
once); evaluation, the schedule and num_epochs count those. Every evaluation scores each task on
its dev set with its own metric; the model is selected by the mean of the tasks' main metrics
(accuracy, F1 for MRPC/QQP, MCC for CoLA, the mean of Pearson and Spearman for STS-B).
The best student is exported as WORKDIR/model/<task>/ (shared encoder and that task's head, a
BertForSequenceClassification folder) and WORKDIR/model/encoder/ (the encoder alone, a BertModel
folder); test predictions go to WORKDIR/predictions/.
"""

import ml_collections
from ml_collections import config_dict

from configs import common, pkd

# pkd.py fields a multi-task run does not have: the task and teacher are per task; a learned
# projection would be one per teacher.
_PER_TASK = ("task", "teacher", "projection")


def get_config(arg=None):
    arg = common.parse_arg(arg, tasks="", teachers="", model="", layers=3, strategy="skip", glue_dir="",
                           runlocal=False)
    tasks = tuple(filter(None, arg.tasks.split("+")))
    teachers = tuple(filter(None, arg.teachers.split("+")))
    if teachers and len(teachers) != len(tasks):
        raise ValueError(f"config args tasks={arg.tasks!r}, teachers={arg.teachers!r}: {len(teachers)} "
                         f"teacher(s) for {len(tasks)} task(s); give one teacher per task, in the same order, "
                         "joined by +")
    shared = {"model": arg.model, "layers": arg.layers, "strategy": arg.strategy, "glue_dir": arg.glue_dir,
              "runlocal": arg.runlocal}
    c = pkd.get_config(",".join(f"{k}={v}" for k, v in shared.items()))
    for key in _PER_TASK:
        del c[key]
    c.kind = "multitask"
    c.tasks = tasks  # the order gives each task its index in the sampling order and its head's seed (seed + index)
    c.per_task = ml_collections.ConfigDict()
    for task, teacher in zip(tasks, teachers or (None,) * len(tasks)):
        t = c.per_task[task] = ml_collections.ConfigDict()
        t.teacher = config_dict.placeholder(str)
        t.teacher = teacher
        t.alpha = config_dict.placeholder(float)
        t.beta = config_dict.placeholder(float)
        t.temperature = config_dict.placeholder(float)
        t.strategy = config_dict.placeholder(str)
        t.train_examples = config_dict.placeholder(int)  # this task's subset (e.g. SST-2 cut, the others whole)
        t.weight = 1.0
    c.sampling = "proportional"  # proportional | temperature | equal
    c.sampling_temperature = 2.0  # tau of sampling=temperature
    return c
