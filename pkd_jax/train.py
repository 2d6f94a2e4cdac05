"""One run: fine-tune (config.kind="finetune") or distil ("distill") a BERT on a GLUE task.

`train_and_evaluate(config, workdir)` builds the run's parts (`setup.prepare`), resumes from the
workdir's last checkpoint, compiles the student's programs while the teacher's pass runs
(`Setup.teacher_pass`), trains one student through the shared loop (`loop.train`), exports
the best model and writes results.json. What a run writes is listed in the README.
"""

from __future__ import annotations

import importlib
import itertools
import json
import logging
import time
import warnings
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from pkd_jax import bert, checkpoints, checks, evaluate, fsutil, loop, metrics, optim, partitioning, setup, steps

log = logging.getLogger(__name__)


class _Student:
    """The loop's trainee in a single run: one student, stopped by a NaN loss, exported at its best."""

    def __init__(self, s: setup.Setup, workdir: Path, graphdef, tx, ckpt, meta: dict, lead: bool):
        self.s, self.workdir, self.graphdef, self.tx, self.ckpt, self.meta, self.lead = (
            s, workdir, graphdef, tx, ckpt, meta, lead)
        self.step = None  # built by compile, for the teacher's feed
        self.logits_fn = steps.Precompiled(jax.jit(steps.make_logits_fn(graphdef)), "evaluation")
        self.teacher_args, self.log = (), None  # set by begin, after the teacher's pass

    def compile(self, state, start: int, feed: setup.TeacherFeed) -> float:
        """Build the step for `feed` and compile it and the evaluation for every batch shape of the
        run, before the loop; returns the seconds it took. It runs alongside the teacher's pass
        (`Setup.teacher_pass`): `feed` has the final feed's teacher and batch shapes, and in a cached
        run zeros in place of the outputs."""
        s, t0 = self.s, time.perf_counter()
        jitted = steps.compile_step(s.make_step(self.graphdef, self.tx, feed.graphdef), state, s.mesh, fsdp=s.fsdp)
        self.step = steps.Precompiled(jitted, "train step")
        teacher_args = (feed.params,) if s.distill else ()
        steps.compile_all(itertools.chain(
            ((self.step, (state, *teacher_args, batch)) for batch in s.example_batches(start, feed)),
            evaluate.split_calls(self.logits_fn, state.params, s.dev_tok, s.mesh, s.config.eval_batch_size)))
        seconds = time.perf_counter() - t0
        log.info("compiled the train step for %d batch shape(s) and evaluation for %d in %.1f s",
                 len(self.step.compiled), len(self.logits_fn.compiled), seconds)
        return seconds

    def begin(self, feed: setup.TeacherFeed, log_: loop.MetricsLog) -> None:
        """After the teacher's pass: the final feed's teacher for the steps, and the run's log."""
        self.teacher_args = (feed.params,) if self.s.distill else ()
        self.log = log_

    def train_step(self, state, batch):
        return self.step(state, *self.teacher_args, batch)

    def record_train(self, host, step, seconds, num_steps) -> None:
        c = self.s.config
        for s, m in host:
            if not np.isfinite(m["loss"]):
                raise FloatingPointError(
                    f"training loss is {m['loss']} at step {s} (batch of training examples idx "
                    f"{self.s.batch_idx(s - 1)}); stopped without saving. The last good checkpoint "
                    f"(step {max(self.ckpt.all_steps(), default=0)}) is kept: lower "
                    "config.learning_rate or inspect those examples, then run the same command again.")
        values = {k: float(np.mean([m[k] for _, m in host])) for k in host[-1][1]}
        values["examples_per_s"] = num_steps * c.batch_size / max(seconds, 1e-9)
        schedule = optim.lr_schedule(1.0, self.s.total_steps, self.s.warmup_steps)
        values["learning_rate"] = float(c.learning_rate * schedule(step - 1))
        values["epoch"] = step / self.s.steps_per_epoch
        self.log.write(step, "train", values)
        self.log.postfix(f"loss={values['loss']:.4f}, ex_s={values['examples_per_s']:.0f}")

    def evaluate(self, state, step) -> float:
        s = self.s
        result = evaluate.evaluate(self.logits_fn, state.params, s.dev_tok, s.config.task, s.mesh,
                                   s.config.eval_batch_size)
        self.log.write(step, "dev", result)
        self.log.note(f"step {step} dev: " + ", ".join(f"{k}={v:.4f}" for k, v in result.items()))
        self.meta["last"] = {"step": step, "metrics": result}
        best = self.meta["best"]
        if best is None or result["score"] > best["metrics"]["score"]:
            self.meta["best"] = self.meta["last"]
            params = jax.tree.map(partitioning.to_host, state.params)
            if self.lead:
                checkpoints.save_pretrained(nnx.merge(self.graphdef, params), self.workdir / "model", s.tokenizer)
        return result["score"]

    def done(self) -> bool:
        return False


def train_and_evaluate(config, workdir, *, restart: bool = False) -> dict:
    """Fine-tune or distil on a GLUE task in `workdir` (resuming it); returns results.json.

    A workdir holding a run of another config is refused (checks.check_workdir), unless `restart`
    moves that run aside first.
    """
    clock = {"start": time.perf_counter()}
    workdir = Path(workdir)
    if not restart:
        checks.check_workdir(config, workdir)
    s = setup.prepare(config)
    lead = jax.process_index() == 0
    setup.open_workdir(config, workdir, lead, restart)
    try:
        return _train(config, workdir, s, lead, clock)
    finally:
        fsutil.release_workdir(workdir)


def _train(config, workdir: Path, s: setup.Setup, lead: bool, clock: dict) -> dict:
    tx = s.optimizer()
    model = s.new_student(config.seed)
    graphdef, state = steps.create_train_state(model, tx, config.seed, **s.loss_weights(),
                                               projection_to=s.projection_to)
    state = partitioning.place_state(state, s.mesh, s.fsdp)

    ckpt = checkpoints.TrainCheckpointer(workdir / "checkpoints", keep=config.keep_checkpoints)
    try:
        meta = {"best": None, "last": None, "train_seconds": 0.0}  # saved with every checkpoint
        state = loop.resume(ckpt, state, meta)
        start = int(state.step)
        student = _Student(s, workdir, graphdef, tx, ckpt, meta, lead)
        clock["setup"] = time.perf_counter()
        teacher, compiled = s.teacher_pass(lead), []  # the compilation's seconds, on its thread
        with setup.alongside(lambda: compiled.append(student.compile(state, start, teacher.early))):
            feed = teacher.finish()
        clock["compile"] = time.perf_counter()
        run_log = loop.MetricsLog(workdir, start=start, total=s.total_steps, enabled=lead,
                                  progress=config.progress, desc=workdir.name)  # after the pass's progress bar
        student.begin(feed, run_log)
        loop.train(student, state, start=start, schedule=loop.Schedule.from_config(config, s.steps_per_epoch,
                                                                                   s.total_steps),
                   batches=s.train_batches(start, feed), ckpt=ckpt, meta=meta, log=run_log)
        clock["loop"] = time.perf_counter()
        results = _results(s, meta, model)
        # Wall time of this invocation's phases (a resumed run counts its own only): the teacher's
        # pass and the compilation run side by side, and compile_seconds is the latter alone.
        results["timing"] = {"setup_seconds": clock["setup"] - clock["start"],
                             "teacher_and_compile_seconds": clock["compile"] - clock["setup"],
                             "compile_seconds": compiled[0], "loop_seconds": clock["loop"] - clock["compile"]}
        if config.predict_test:
            results["test_predictions"] = evaluate.predict_test(s, workdir / "model", workdir / "predictions", lead)
        if lead:
            fsutil.write_text(workdir / "results.json", json.dumps(results, indent=1) + "\n")
    finally:
        ckpt.close()
    return results


def _results(s: setup.Setup, meta: dict, model: bert.BertForSequenceClassification) -> dict:
    config, total = s.config, s.total_steps
    return {
        "task": config.task, "kind": config.kind, "metric": metrics.main_metric(config.task),
        "metrics": meta["best"]["metrics"], "step": meta["best"]["step"],
        "best": meta["best"], "last": meta["last"], "total_steps": total,
        "train_seconds": meta["train_seconds"],
        "examples_per_s": total * config.batch_size / max(meta["train_seconds"], 1e-9),
        "model": {"pretrained": s.pretrained, "layers": model.config.num_hidden_layers,
                  "hidden_size": model.config.hidden_size, "params": bert.param_count(model),
                  "params_without_embeddings": bert.param_count(model, embeddings=False)},
        "teacher": None if not s.distill else {
            "path": s.teacher_path, "layers": s.teacher.config.num_hidden_layers,
            "layer_map": list(s.layer_map)},
        "train_examples": len(s.train_tok), "dev_examples": len(s.dev_tok),
        "truncated": {"train": s.train_tok.num_truncated, "dev": s.dev_tok.num_truncated},
        "config": json.loads(config.to_json_best_effort()),
    }


# The step factories moved to pkd_jax.steps; these names keep working, with a warning, for one release.
_MOVED = {"make_finetune_step": "steps", "make_distill_step": "steps", "compile_step": "steps",
          "create_train_state": "steps", "TrainState": "steps", "Preempted": "loop",
          "check_config": "setup", "prepare": "setup"}


def __getattr__(name: str):
    if name in _MOVED:
        module = _MOVED[name]
        warnings.warn(f"pkd_jax.train.{name} moved to pkd_jax.{module}.{name}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(f"pkd_jax.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
