"""The multi-task config (configs/multitask.py): its checks, and each task's single-run config.

A task's config is the configs/pkd.py run it would be alone: the shared fields, that task's
teacher, and its per-task overrides (`per_task.<task>`: alpha, beta, temperature, strategy,
train_examples; None keeps the shared value). `setup.prepare` builds each task's data and teacher from it, so every
check of a single run applies to each task as well.
"""

from __future__ import annotations

import copy
import math

from pkd_jax import checks, data
from pkd_jax.errors import ConfigError
from pkd_jax.multitask import mixing

OVERRIDES = ("alpha", "beta", "temperature", "strategy", "train_examples")  # per-task values of shared fields
# Multi-task fields a single run does not have.
_MULTITASK_FIELDS = ("tasks", "per_task", "sampling", "sampling_temperature")


def _fail(key: str, value, expected: str):
    raise ConfigError(f"config.{key}={value!r}: expected {expected}")


def check_multitask_config(config) -> None:
    """Fail at once, naming the key, on the multi-task fields; each task's run is checked by
    `checks.check_config` when it is prepared."""
    tasks = tuple(config.tasks)
    if config.kind != "multitask":
        _fail("kind", config.kind, "multitask (configs/multitask.py)")
    if not tasks:
        _fail("tasks", tasks, "at least one GLUE task: configs/multitask.py:tasks=sst2+stsb,teachers=DIR1+DIR2")
    for task in tasks:
        if task not in data.TASKS:
            _fail("tasks", tasks, f"GLUE tasks ({', '.join(data.TASKS)}); {task!r} is not one")
    if len(set(tasks)) != len(tasks):
        repeated = sorted({t for t in tasks if tasks.count(t) > 1})
        _fail("tasks", tasks, f"each task once ({', '.join(repeated)} repeated): one head and teacher per task")
    if set(config.per_task) != set(tasks):
        _fail("per_task", sorted(config.per_task), f"one entry per task of config.tasks {list(tasks)}: "
              "give the tasks in the config's arg string (tasks=...), not by overriding config.tasks")
    for task in tasks:
        _check_task_fields(task, config.per_task[task])
    if config.sampling not in mixing.RULES:
        _fail("sampling", config.sampling, " or ".join(mixing.RULES))
    tau = config.sampling_temperature
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (math.isfinite(tau) and tau > 0):
        _fail("sampling_temperature", tau, "a number > 0 (the tau of p ∝ n^(1/tau))")


def _check_task_fields(task: str, fields) -> None:
    key = f"per_task.{task}"
    if not fields.teacher:
        _fail(f"{key}.teacher", fields.teacher, f"a run's workdir or an HF folder fine-tuned on {task} "
              "(the config arg teachers=DIR1+DIR2, one per task)")
    for name in ("alpha", "beta", "temperature", "train_examples"):
        ok, expected = checks.RANGES[name]
        if fields[name] is not None and not ok(fields[name]):
            _fail(f"{key}.{name}", fields[name], f"{expected}, or None for the shared config.{name}")
    if fields.strategy is not None:
        try:
            checks.layer_strategy(fields.strategy)
        except ConfigError:
            _fail(f"{key}.strategy", fields.strategy, "skip, last or teacher layers such as 2,4, or None")
    weight = fields.weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (math.isfinite(weight) and weight > 0):
        _fail(f"{key}.weight", weight, "a number > 0 (it multiplies the task's loss)")


def task_config(config, task: str):
    """The configs/pkd.py config of `task` alone: shared fields, its teacher and its overrides."""
    c = copy.deepcopy(config)
    fields = config.per_task[task]
    with c.unlocked():
        for key in _MULTITASK_FIELDS:
            del c[key]
        c.kind, c.task, c.teacher, c.projection = "distill", task, fields.teacher, False
        for key in OVERRIDES:
            if fields[key] is not None:
                c[key] = fields[key]
        # The schedule is the multi-task run's (checked there), not this task's alone.
        c.max_steps, c.eval_every_steps = None, 0
    return c

