"""A multi-task run: every task prepared as its own single run (data, teacher, cached outputs), one
shared student trained through the shared loop (`loop.train`) on batches of one task at a time."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from pathlib import Path

import jax
import numpy as np

from pkd_jax import checks, checkpoints, evaluate, fsutil, loop, metrics, optim, partitioning, setup, steps
from pkd_jax.errors import ConfigError, PkdError
from pkd_jax.multitask import mixing
from pkd_jax.multitask import student as student_
from pkd_jax.multitask import tasks as tasks_

log = logging.getLogger(__name__)
METRIC = "mean of main metrics"  # model selection: the mean of each task's main dev metric


def _prepare(config) -> dict[str, setup.Setup]:
    """Each task's Setup, from its single-run config; errors name the task."""
    setups = {}
    for task in config.tasks:
        try:
            setups[task] = setup.prepare(tasks_.task_config(config, task))
        except PkdError as e:
            raise type(e)(f"task {task} (config.per_task.{task}): {e}") from None
    pretrained = {t: s.pretrained for t, s in setups.items()}
    if len(set(pretrained.values())) > 1:
        listed = ", ".join(f"{t}: {p}" for t, p in pretrained.items())
        raise ConfigError(f"config.model=None: the teachers were fine-tuned from different checkpoints ({listed}) "
                          "and the shared student starts from one: name it with model=... in the config's args")
    return setups


class MultiTaskRun:
    """The parts of a multi-task run: `MultiTaskRun(config, workdir).train()`."""

    def __init__(self, config, workdir, *, restart: bool = False):
        tasks_.check_multitask_config(config)
        self.config, self.workdir, self.tasks = config, Path(workdir), tuple(config.tasks)
        if not restart:  # before the slow set-up: a wrong workdir fails at once
            checks.check_workdir(config, self.workdir)
        setups = _prepare(config)
        sizes = [len(s.train_tok) for s in setups.values()]
        steps_per_epoch = sum(s.steps_per_epoch for s in setups.values())
        total = config.max_steps or math.ceil(config.num_epochs * steps_per_epoch)
        checks.check_schedule(config, sum(sizes), steps_per_epoch, total)
        # Every task's Setup now has the run's schedule: its optimizer and batch indices use it.
        self.setups = {t: dataclasses.replace(s, steps_per_epoch=steps_per_epoch, total_steps=total)
                       for t, s in setups.items()}
        self.first = self.setups[self.tasks[0]]
        self.probs = mixing.probabilities(config.sampling, sizes, config.sampling_temperature)
        log.info("task sampling (%s): %s", config.sampling,
                 ", ".join(f"{t} {p:.3f}" for t, p in zip(self.tasks, self.probs)))
        self.lead = jax.process_index() == 0
        setup.open_workdir(config, self.workdir, self.lead, restart)  # held until train() ends
        try:
            self.tx = self.first.optimizer()
            # Each teacher placed now; its pass runs while the student compiles (_train).
            self.teachers = {t: s.teacher_pass(self.lead) for t, s in self.setups.items()}
            self.feeds: dict[str, setup.TeacherFeed] = {}
        except BaseException:  # a failed set-up leaves the workdir to the next run
            fsutil.release_workdir(self.workdir)
            raise

    def new_state(self):
        """(the student, each task's graphdef, the placed initial train state)."""
        c, s = self.config, self.first
        # A seed per head: two tasks with as many labels do not start from the same head.
        student = student_.MultiTaskStudent({t: setup_.new_student(c.seed + i)
                                             for i, (t, setup_) in enumerate(self.setups.items())})
        views = student_.views(student)
        _, state = steps.create_train_state(student, self.tx, c.seed)
        state = state.replace(hparams={t: {k: np.float32(v) for k, v in setup_.loss_weights().items()}
                                       for t, setup_ in self.setups.items()})
        return student, views, partitioning.place_state(state, s.mesh, s.fsdp)

    def train(self) -> dict:
        """Train (resuming the workdir's run), export the best student, write results.json."""
        try:
            return self._train()
        finally:
            fsutil.release_workdir(self.workdir)

    def _train(self) -> dict:
        clock = {"start": time.perf_counter()}
        c, s = self.config, self.first
        student, views, state = self.new_state()
        ckpt = checkpoints.TrainCheckpointer(self.workdir / "checkpoints", keep=c.keep_checkpoints)
        try:
            meta = {"best": None, "last": None, "train_seconds": 0.0}
            state = loop.resume(ckpt, state, meta)
            start = int(state.step)
            trainee, compiled = _Students(self, views, state, ckpt, meta), []
            clock["setup"] = time.perf_counter()
            with setup.alongside(lambda: compiled.append(trainee.compile(state, start))):
                self.feeds = {t: teacher.finish() for t, teacher in self.teachers.items()}
            clock["compile"] = time.perf_counter()
            # After the teachers' passes and their progress bars.
            trainee.log = run_log = loop.MetricsLog(self.workdir, start=start, total=s.total_steps,
                                                    enabled=self.lead, progress=c.progress, desc=self.workdir.name)
            streams = [functools.partial(setup_.train_batches, feed=self.feeds[t])
                       for t, setup_ in self.setups.items()]
            loop.train(trainee, state, start=start,
                       schedule=loop.Schedule.from_config(c, s.steps_per_epoch, s.total_steps),
                       batches=mixing.mixed_batches(streams, self.probs, c.seed, start), ckpt=ckpt, meta=meta,
                       log=run_log)
            clock["loop"] = time.perf_counter()
            results = self._results(meta, student)
            results["timing"] = {"setup_seconds": clock["setup"] - clock["start"],
                                 "teacher_and_compile_seconds": clock["compile"] - clock["setup"],
                                 "compile_seconds": compiled[0], "loop_seconds": clock["loop"] - clock["compile"]}
            if c.predict_test:
                for t, setup_ in self.setups.items():
                    results["per_task"][t]["test_predictions"] = evaluate.predict_test(
                        setup_, self.workdir / "model" / t, self.workdir / "predictions", self.lead)
            if self.lead:
                fsutil.write_text(self.workdir / "results.json", json.dumps(results, indent=1) + "\n")
        finally:
            ckpt.close()
        return results

    def task_at(self, step: int) -> str:
        """The task trained at `step` (1-based)."""
        return self.tasks[int(mixing.task_order(self.probs, self.config.seed, step - 1, step)[0])]

    def _results(self, meta: dict, student: student_.MultiTaskStudent) -> dict:
        c, s = self.config, self.first
        best, last, total = meta["best"], meta["last"], s.total_steps
        drawn = mixing.counts(self.probs, c.seed, total)
        counts = student_.param_counts(student)
        per_task = {t: {
            "metric": metrics.main_metric(t), "metrics": best["tasks"][t], "last": last["tasks"][t],
            "probability": float(p), "steps": int(n), "weight": float(c.per_task[t].weight),
            **setup_.loss_weights(),
            "teacher": {"path": setup_.teacher_path, "layers": setup_.teacher.config.num_hidden_layers,
                        "layer_map": list(setup_.layer_map)},
            "model": counts["per_task"][t], "train_examples": len(setup_.train_tok),
            "dev_examples": len(setup_.dev_tok),
            "truncated": {"train": setup_.train_tok.num_truncated, "dev": setup_.dev_tok.num_truncated},
        } for (t, setup_), p, n in zip(self.setups.items(), self.probs, drawn)}
        config = next(iter(student.models.values())).config
        return {
            "kind": "multitask", "tasks": list(self.tasks), "metric": METRIC, "metrics": best["metrics"],
            "step": best["step"], "best": best, "last": last, "total_steps": total,
            "steps_per_epoch": s.steps_per_epoch, "train_seconds": meta["train_seconds"],
            "examples_per_s": total * c.batch_size / max(meta["train_seconds"], 1e-9),
            "sampling": {"rule": c.sampling, "temperature": c.sampling_temperature},
            "model": {"pretrained": s.pretrained, "layers": config.num_hidden_layers,
                      "hidden_size": config.hidden_size, **{k: v for k, v in counts.items() if k != "per_task"}},
            "per_task": per_task, "config": json.loads(c.to_json_best_effort()),
        }


class _Students:
    """The loop's trainee in a multi-task run: the shared student, a compiled step per task."""

    def __init__(self, run: MultiTaskRun, views: dict, state, ckpt, meta: dict):
        self.run, self.views, self.ckpt, self.meta = run, views, ckpt, meta
        self.log: loop.MetricsLog | None = None  # opened after the teachers' passes
        self.steps, self.logits_fns = {}, {}
        for t, s in run.setups.items():
            tx = student_.weighted(run.tx, float(run.config.per_task[t].weight))
            step = student_.task_step(s.make_step(views[t], tx, run.teachers[t].early.graphdef), t)
            self.steps[t] = steps.Precompiled(steps.compile_step(step, state, s.mesh, fsdp=s.fsdp), f"{t} step")
            self.logits_fns[t] = steps.Precompiled(jax.jit(steps.make_logits_fn(views[t])), f"{t} evaluation")

    def compile(self, state, start: int) -> float:
        """Every task's step for each batch shape its batches from `start` on will have, and every
        task's evaluation, before the loop, for the teachers' early feeds (while their passes run:
        `Setup.teacher_pass`); returns the seconds it took."""
        run, t0 = self.run, time.perf_counter()
        seed, total = run.config.seed, run.first.total_steps
        at, end = mixing.counts(run.probs, seed, start), mixing.counts(run.probs, seed, total)
        calls = []
        for i, (t, s) in enumerate(run.setups.items()):
            feed = run.teachers[t].early
            calls += [(self.steps[t], (state, feed.params, batch))
                      for batch in s.example_batches(int(at[i]), feed, stop=int(end[i]))]
            calls += evaluate.split_calls(self.logits_fns[t], state.params, s.dev_tok, s.mesh,
                                          run.config.eval_batch_size)
        steps.compile_all(calls)
        seconds = time.perf_counter() - t0
        log.info("compiled %d task step(s) and %d evaluation(s) in %.1f s",
                 sum(len(p.compiled) for p in self.steps.values()),
                 sum(len(p.compiled) for p in self.logits_fns.values()), seconds)
        return seconds

    def train_step(self, state, item):
        index, batch = item
        task = self.run.tasks[index]
        return self.steps[task](state, self.run.feeds[task].params, batch)

    def record_train(self, host, step, seconds, num_steps) -> None:
        run, c = self.run, self.run.config
        by_task: dict[str, list[dict]] = {}
        for at, m in host:
            task = run.task_at(at)
            if not np.isfinite(m["loss"]):
                k = int(mixing.counts(run.probs, c.seed, at - 1)[run.tasks.index(task)])
                raise FloatingPointError(
                    f"training loss is {m['loss']} at step {at} (task {task}, batch of training examples idx "
                    f"{run.setups[task].batch_idx(k)}); stopped without saving. The last good checkpoint "
                    f"(step {max(self.ckpt.all_steps(), default=0)}) is kept: lower config.learning_rate (or "
                    f"config.per_task.{task}.weight) or inspect those examples, then run the same command again.")
            by_task.setdefault(task, []).append(m)
        for task, logged in by_task.items():
            values = {k: float(np.mean([m[k] for m in logged])) for k in logged[-1]}
            self.log.write(step, "train", {**values, "steps": len(logged)}, stream=task, task=task)
        schedule = optim.lr_schedule(1.0, run.first.total_steps, run.first.warmup_steps)
        values = {"loss": float(np.mean([m["loss"] for _, m in host])),
                  "examples_per_s": num_steps * c.batch_size / max(seconds, 1e-9),
                  "learning_rate": float(c.learning_rate * schedule(step - 1)),
                  "epoch": step / run.first.steps_per_epoch}
        self.log.write(step, "train", values)
        self.log.postfix(f"loss={values['loss']:.4f}, ex_s={values['examples_per_s']:.0f}")

    def evaluate(self, state, step) -> float:
        run, c = self.run, self.run.config
        results = {t: evaluate.evaluate(self.logits_fns[t], state.params, s.dev_tok, t, s.mesh, c.eval_batch_size)
                   for t, s in run.setups.items()}
        for t, result in results.items():
            self.log.write(step, "dev", result, stream=t, task=t)
        score = float(np.mean([r["score"] for r in results.values()]))
        self.log.write(step, "dev", {"score": score})
        self.log.note(f"step {step} dev: mean score {score:.4f}; "
                      + "; ".join(f"{t} {r['score']:.4f}" for t, r in results.items()))
        self.meta["last"] = {"step": step, "metrics": {"score": score}, "tasks": results}
        best = self.meta["best"]
        if best is None or score > best["metrics"]["score"]:
            self.meta["best"] = self.meta["last"]
            params = jax.tree.map(partitioning.to_host, state.params)
            if run.lead:
                student_.export(self.views[run.tasks[0]], params, run.workdir / "model", run.first.tokenizer)
        return score

    def done(self) -> bool:
        return False


def train_multitask(config, workdir, *, restart: bool = False) -> dict:
    """Train the config's multi-task student (configs/multitask.py) in `workdir`, resuming it;
    returns results.json. `restart` moves a run of another config in `workdir` aside first."""
    return MultiTaskRun(config, workdir, restart=restart).train()
