"""Running a sweep: each chunk of stacked students goes through the shared loop (`loop.train`)."""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pkd_jax import bert, checkpoints, checks, evaluate, fsutil, loop, metrics, optim, partitioning, setup, steps
from pkd_jax.sweep import plan as plan_
from pkd_jax.sweep import students as students_

log = logging.getLogger(__name__)


class ChunkResult(NamedTuple):
    state: steps.TrainState  # the final stacked state (padding students included)
    summary: dict  # what W/chunk_<i>/summary.json holds: rows, timing


class _Chunk:
    """The loop's trainee in a sweep: G stacked students; a NaN student fails alone; the sweep's
    best student so far is exported to W/best_model whenever an evaluation changes it."""

    def __init__(self, sweep: "Sweep", index: int, graphdef, points: list[plan_.Point], finished: list[dict],
                 meta: dict, log_: loop.MetricsLog):
        self.sweep, self.index, self.graphdef, self.points = sweep, index, graphdef, points
        self.finished, self.meta, self.log = finished, meta, log_
        self.tracked = meta["students"]
        self.ids = [p.student for p in points]

    def active(self) -> list[int]:
        return [j for j in range(len(self.points)) if self.tracked[j]["failed"] is None]

    def done(self) -> bool:
        return not self.active()  # every student failed: nothing left to train

    def train_step(self, state, batch):
        return self.sweep.step(state, self.sweep.feed.params, batch)

    def record_train(self, host, step, seconds, num_steps) -> None:
        s, c = self.sweep.setup, self.sweep.config
        for at, m in host:
            for j in self.active():
                if not np.isfinite(m["loss"][j]):
                    self.tracked[j]["failed"] = {"step": at, "loss": str(m["loss"][j])}
                    self.log.note(f"student {self.ids[j]} failed: loss {m['loss'][j]} at step {at}")
                    log.warning("chunk %d: student %d (%s) failed: training loss %s at step %d; "
                                "the others go on", self.index, self.ids[j], self.points[j], m["loss"][j], at)
        schedule = optim.lr_schedule(1.0, s.total_steps, s.warmup_steps)(step - 1)
        for j in self.active():
            values = {k: float(np.mean([m[k][j] for _, m in host])) for k in host[-1][1]}
            values["learning_rate"] = float(self.points[j].learning_rate * schedule)
            values["epoch"] = step / s.steps_per_epoch
            self.log.write(step, "train", values, stream=f"student_{self.ids[j]:03d}", student=self.ids[j])
        rate = num_steps * c.batch_size * len(self.points) / max(seconds, 1e-9)
        self.log.postfix(f"students·ex/s={rate:.0f}")

    def evaluate(self, state, step) -> None:
        s, c = self.sweep.setup, self.sweep.config
        results = students_.evaluate_students(self.sweep.logits_fn, state.params, s.dev_tok, c.task, s.mesh,
                                              c.eval_batch_size, len(self.points))
        for j in self.active():
            tracked = self.tracked[j]
            tracked["last"] = {"step": step, "metrics": results[j]}
            self.log.write(step, "dev", results[j], stream=f"student_{self.ids[j]:03d}", student=self.ids[j])
            if tracked["best"] is None or results[j]["score"] > tracked["best"]["metrics"]["score"]:
                tracked["best"] = tracked["last"]
        self._export_leader(state)
        return None  # chunk checkpoints are not ranked: students differ in their best steps

    def rows(self) -> list[dict]:
        return [plan_.student_row(self.index, p, t) for p, t in zip(self.points, self.tracked)]

    def _export_leader(self, state) -> None:
        """Export the sweep's best student so far when this evaluation made a new one."""
        leader = plan_.best_row(self.finished + self.rows())
        if leader is None or [leader["student"], leader["best_step"]] == self.meta["exported"]:
            return
        params = self.sweep.take(state.params, self.ids.index(leader["student"]))
        if self.sweep.lead:
            checkpoints.save_pretrained(nnx.merge(self.graphdef, jax.tree.map(partitioning.to_host, params)),
                                        self.sweep.workdir / "best_model", self.sweep.setup.tokenizer)
        self.meta["exported"] = [leader["student"], leader["best_step"]]


class Sweep:
    """A sweep in a workdir: `Sweep(config, workdir).run()`; `train_chunk(i)` trains one chunk."""

    def __init__(self, config, workdir, *, restart: bool = False):
        plan_.check_sweep_config(config)
        self.config, self.workdir = config, Path(workdir)
        self.points = plan_.grid(config)
        saved = None
        if not restart:  # before the slow set-up: a wrong workdir fails at once
            checks.check_workdir(config, self.workdir)
            saved = plan_.load_plan(self.workdir / "plan.json", self.points, config.students_per_chunk,
                                    config.shard_students)
        self.setup = setup.prepare(plan_.point_config(config, self.points[0]))
        self.lead = jax.process_index() == 0
        setup.open_workdir(config, self.workdir, self.lead, restart)  # held until run() ends
        try:
            self.tx = self.setup.optimizer()  # its peak learning rate is replaced per student
            # The teacher placed now; its pass runs while the first chunk to train compiles.
            self.teacher = self.setup.teacher_pass(self.lead)
            self.feed: setup.TeacherFeed | None = None  # the final feed, once the pass has run
            self.plan = saved or self._new_plan()
            log.info("%d students in %d chunk(s) of up to %d", len(self.plan.points), len(self.plan.chunks),
                     self.plan.students_per_chunk)
        except BaseException:  # a failed set-up leaves the workdir to the next run
            fsutil.release_workdir(self.workdir)
            raise
        self.step = self.logits_fn = self.take = None  # compiled on the first chunk, reused by the others

    # ---- Plan ----------------------------------------------------------------------------------

    def _new_plan(self) -> plan_.Plan:
        c = self.config
        size = c.students_per_chunk or self.auto_chunk_size()
        plan = plan_.Plan(self.points, plan_.make_chunks(self.points, size), size, c.shard_students)
        if self.lead:
            plan.save(self.workdir / "plan.json")
        return plan

    def auto_chunk_size(self) -> int:
        """G from the free memory of a device and `grid.student_bytes` (documented there)."""
        c, s = self.config, self.setup
        devices = s.mesh.devices.size
        model = s.new_student(0)
        rows = c.batch_size if c.shard_students else c.batch_size // devices
        per_student = plan_.student_bytes(model.config, bert.param_count(model), rows, c.max_seq_length,
                                          jnp.dtype(s.dtype).itemsize, param_shards=c.mesh.fsdp)
        reserved = 0
        params = self.teacher.early.params
        if params is not None:  # the online teacher's parameters stay on every device
            reserved = sum(x.nbytes for x in jax.tree.leaves(params)) // c.mesh.fsdp
        largest = max(sum(p.seed == seed for p in self.points) for seed in c.seeds)
        free, cpu = plan_.device_memory_bytes(c.memory_gb), jax.default_backend() == "cpu"
        size = plan_.auto_chunk_size(per_student, free, max_students=largest, reserved=reserved,
                                     devices=devices, shard_students=c.shard_students, cpu=cpu)
        if cpu:
            log.info("auto chunk size %d: on a CPU students train one after another (a vmapped chunk is "
                     "no faster there); set students_per_chunk to vmap them anyway", size)
        else:
            log.info("auto chunk size %d: ~%.2f GiB per student, %.2f GiB free per device", size,
                     per_student / 2**30, free / 2**30)
        return size

    def _chunk_dir(self, index: int) -> Path:
        return self.workdir / f"chunk_{index:03d}"

    def load_summary(self, index: int) -> dict | None:
        path = self._chunk_dir(index) / "summary.json"
        return json.loads(path.read_text()) if path.exists() else None

    # ---- One chunk -----------------------------------------------------------------------------

    def _stacked_state(self, points: list[plan_.Point], width: int):
        """(graphdef, the chunk's stacked initial state); compiles the chunk functions once."""
        s, shard = self.setup, self.config.shard_students
        seed = points[0].seed
        model = s.new_student(seed)
        graphdef, base = steps.create_train_state(model, self.tx, seed, **s.loss_weights(),
                                                  projection_to=s.projection_to)  # α/β/T replaced below
        padded = points + [points[-1]] * (width - len(points))
        state = students_.stack_students(base, padded, s.mesh, shard_students=shard, fsdp=s.fsdp)
        if self.step is None:
            self.step = steps.Precompiled(students_.compile_students_step(
                s.make_step(graphdef, self.tx, self.teacher.early.graphdef), state, s.mesh, shard_students=shard,
                fsdp=s.fsdp), "students step")
            self.logits_fn = steps.Precompiled(students_.make_students_logits_fn(graphdef), "evaluation")
            self.take = jax.jit(lambda tree, j: jax.tree.map(lambda x: x[j], tree),  # one student, whole
                                out_shardings=partitioning.replicated(s.mesh))
        return graphdef, state

    def _compile(self, state, start: int, seed: int, to_devices, feed: setup.TeacherFeed) -> None:
        """The chunk's step and evaluation for every batch shape it will meet, before its loop
        (`feed`: the teacher's final feed, or its early one while the pass runs)."""
        s, t0 = self.setup, time.perf_counter()
        steps.compile_all(itertools.chain(
            ((self.step, (state, feed.params, batch))
             for batch in s.example_batches(start, feed, seed=seed, to_devices=to_devices)),
            evaluate.split_calls(self.logits_fn, state.params, s.dev_tok, s.mesh, self.config.eval_batch_size)))
        log.info("compiled the students step for %d batch shape(s) and evaluation for %d in %.1f s",
                 len(self.step.compiled), len(self.logits_fn.compiled), time.perf_counter() - t0)

    def train_chunk(self, index: int) -> ChunkResult:
        """Train chunk `index` (resuming from its checkpoint), then write its summary."""
        c, s, plan = self.config, self.setup, self.plan
        points = [plan.points[i] for i in plan.chunks[index]]
        width = plan.width(index, s.mesh.devices.size)
        graphdef, state = self._stacked_state(points, width)

        ckpt = checkpoints.TrainCheckpointer(self._chunk_dir(index) / "checkpoints", keep=c.keep_checkpoints)
        try:
            finished = [r for i in range(index) for r in (self.load_summary(i) or {"rows": []})["rows"]]
            leader = plan_.best_row(finished)
            meta = {"students": [{"best": None, "last": None, "failed": None} for _ in points],
                    "last_eval": None, "train_seconds": 0.0,
                    "exported": None if leader is None else [leader["student"], leader["best_step"]]}
            restored = ckpt.restore_latest(state)
            if restored is not None:
                _, state, saved = restored
                meta.update(saved)
                log.info("chunk %d: resumed from step %d", index, int(jax.device_get(state.step)[0]))
            start = int(jax.device_get(state.step)[0])
            to_devices = ((lambda b: students_.replicate_batch(b, s.mesh)) if c.shard_students
                          else (lambda b: partitioning.shard_batch(b, s.mesh)))
            if self.feed is None:  # the first chunk to train compiles while the teacher's pass runs
                with setup.alongside(self._compile, state, start, points[0].seed, to_devices, self.teacher.early):
                    self.feed = self.teacher.finish()
            else:
                self._compile(state, start, points[0].seed, to_devices, self.feed)
            chunk_log = loop.MetricsLog(self.workdir, start=start, total=s.total_steps, enabled=self.lead,
                                        progress=c.progress, tags={"chunk": index},
                                        desc=f"chunk {index + 1}/{len(plan.chunks)} ({len(points)} students)")
            chunk = _Chunk(self, index, graphdef, points, finished, meta, chunk_log)
            state = loop.train(chunk, state, start=start,
                               schedule=loop.Schedule.from_config(c, s.steps_per_epoch, s.total_steps),
                               batches=s.train_batches(start, self.feed, seed=points[0].seed, to_devices=to_devices),
                               ckpt=ckpt, meta=meta, log=chunk_log, what=f"chunk {index}")
        finally:
            ckpt.close()  # waits for a save in flight, even when an error ends the chunk

        summary = {"chunk": index, "students": [p.student for p in points], "width": width,
                   "steps": int(jax.device_get(state.step)[0]), "train_seconds": meta["train_seconds"],
                   "rows": chunk.rows()}
        if self.lead:  # the chunk is done: never retrained, its checkpoints no longer needed
            fsutil.write_text(self._chunk_dir(index) / "summary.json", json.dumps(summary, indent=1) + "\n")
            shutil.rmtree(self._chunk_dir(index) / "checkpoints", ignore_errors=True)
        return ChunkResult(state, summary)

    # ---- The whole grid ------------------------------------------------------------------------

    def run(self, on_progress: Callable[[Path], None] | None = None) -> dict:
        """Train every unfinished chunk; write sweep.csv (after each chunk too) and results.json.

        on_progress(workdir): called on process 0 after each chunk and at the end, once sweep.csv
        holds every finished student (run.py renders the report's tables and heatmap there).
        """
        try:
            return self._run(on_progress)
        finally:
            fsutil.release_workdir(self.workdir)

    def _run(self, on_progress: Callable[[Path], None] | None) -> dict:
        summaries = []
        for index in range(len(self.plan.chunks)):
            summary = self.load_summary(index)
            if summary is None:
                summary = self.train_chunk(index).summary
            else:
                log.info("chunk %d: finished earlier, skipped", index)
            summaries.append(summary)
            if self.lead:
                fsutil.write_text(self.workdir / "sweep.csv", plan_.csv_table([r for s in summaries for r in s["rows"]]))
                if on_progress and index < len(self.plan.chunks) - 1:
                    on_progress(self.workdir)
        rows = [r for s in summaries for r in s["rows"]]
        best = plan_.best_row(rows)
        if best is None:
            raise FloatingPointError(f"every student failed before its first evaluation; see "
                                     f"{self.workdir / 'sweep.csv'} and lower config.learning_rates")
        results = self._results(rows, best, summaries)
        if self.lead:
            fsutil.write_text(self.workdir / "results.json", json.dumps(results, indent=1) + "\n")
            if on_progress:
                on_progress(self.workdir)
        return results

    def _results(self, rows: list[dict], best: dict, summaries: list[dict]) -> dict:
        c, s = self.config, self.setup
        seconds = sum(x["train_seconds"] for x in summaries)
        student_examples = sum(len(x["students"]) * x["steps"] * c.batch_size for x in summaries)
        model = checkpoints.load_config(s.pretrained, num_layers=c.layers)
        point = {k: best[k] for k in ("student", "seed", "learning_rate", "temperature", "alpha", "beta")}
        return {
            "task": c.task, "kind": "sweep", "metric": metrics.main_metric(c.task),
            "metrics": {**best["metrics"], "score": best["score"]}, "step": best["best_step"],
            "best": {**point, "step": best["best_step"], "status": best["status"],
                     "metrics": {**best["metrics"], "score": best["score"]}},
            "grid": {axis: list(c[axis]) for axis in plan_.GRID_AXES},
            "students": len(rows), "failed": [r["student"] for r in rows if r["status"] == "failed"],
            "students_per_chunk": self.plan.students_per_chunk, "chunks": len(summaries),
            "shard_students": c.shard_students, "total_steps": s.total_steps,
            "train_seconds": seconds,
            "students_examples_per_s": student_examples / max(seconds, 1e-9),
            "model": {"pretrained": s.pretrained, "layers": model.num_hidden_layers,
                      "hidden_size": model.hidden_size},
            "teacher": {"path": s.teacher_path, "layers": s.teacher.config.num_hidden_layers,
                        "layer_map": list(s.layer_map)},
            "train_examples": len(s.train_tok), "dev_examples": len(s.dev_tok),
            "config": json.loads(c.to_json_best_effort()),
        }


def train_grid(config, workdir, on_progress: Callable[[Path], None] | None = None, *,
               restart: bool = False) -> dict:
    """Train the config's grid (configs/sweep.py) in `workdir`; returns results.json. `restart`
    moves a run of another config in `workdir` aside instead of refusing it."""
    return Sweep(config, workdir, restart=restart).run(on_progress)
