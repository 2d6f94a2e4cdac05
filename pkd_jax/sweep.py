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
* **One step.** `jax.vmap(train.make_distill_step(...), in_axes=(0, None, None))`, jitted once
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

Outputs in W: `sweep.csv` (one row per student: hyper-parameters, status, best step, dev metrics
at the best step, last evaluation), `sweep.md` (the table sorted by score, best row marked, and
the heatmap), `heatmap.png`, `best_model/` (HF folder), `results.json` (best point and metrics,
grid, timing, students·examples/s), `metrics.jsonl` (lines tagged with `chunk` and `student`) and
`tensorboard/student_<id>/` (one TensorBoard run per student: the students overlay).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import itertools
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from pkd_jax import bert, checkpoints, data, metrics, optim, partitioning, train

log = logging.getLogger(__name__)

GRID_AXES = ("seeds", "learning_rates", "temperatures", "alphas", "betas")
_SWEEP_FIELDS = (*GRID_AXES, "students_per_chunk", "shard_students", "memory_gb")
_TRAIN_INPUTS = ("input_ids", "token_type_ids", "attention_mask", "labels", "teacher_logits", "teacher_cls")
_MEMORY_HEADROOM = 0.8  # of the free device memory: XLA scratch space, fragmentation, evaluation

# ============================================================================================
# The grid
# ============================================================================================


@dataclasses.dataclass(frozen=True)
class Point:
    """One student: its id (position in the grid) and hyper-parameters."""

    student: int
    seed: int
    learning_rate: float
    temperature: float
    alpha: float
    beta: float

    @property
    def hparams(self) -> dict[str, float]:
        return {"alpha": self.alpha, "beta": self.beta, "temperature": self.temperature}


def grid(config) -> list[Point]:
    """Every grid point, seeds outermost and betas innermost."""
    axes = [tuple(config[axis]) for axis in GRID_AXES]
    return [Point(i, int(s), float(lr), float(t), float(a), float(b))
            for i, (s, lr, t, a, b) in enumerate(itertools.product(*axes))]


def point_config(config, point: Point):
    """The configs/pkd.py config of one grid point: the single run that student equals."""
    c = copy.deepcopy(config)
    with c.unlocked():
        for key in _SWEEP_FIELDS:
            del c[key]
        c.kind = "distill"
        c.seed, c.learning_rate = point.seed, point.learning_rate
        c.alpha, c.beta, c.temperature = point.alpha, point.beta, point.temperature
        c.predict_test, c.test_examples = False, None
    return c


def check_sweep_config(config) -> None:
    """Fail at once, naming the key; the per-run fields are checked by train.check_config."""
    if config.kind != "sweep":
        raise ValueError(f"config.kind={config.kind!r}: expected sweep (configs/sweep.py)")
    ranges = {"seeds": (lambda v: float(v).is_integer() and v >= 0, "integers >= 0"),
              "learning_rates": (lambda v: v > 0, "positive numbers"),
              "temperatures": (lambda v: v > 0, "positive numbers"),
              "alphas": (lambda v: 0 <= v <= 1, "numbers in [0, 1]"),
              "betas": (lambda v: v >= 0, "numbers >= 0")}
    for axis, (ok, expected) in ranges.items():
        values = tuple(config[axis])
        if not values or not all(ok(v) for v in values) or len(set(values)) != len(values):
            raise ValueError(f"config.{axis}={values!r}: expected distinct {expected}, at least one")
    if config.students_per_chunk < 0 or config.memory_gb < 0:
        key = "students_per_chunk" if config.students_per_chunk < 0 else "memory_gb"
        raise ValueError(f"config.{key}={config[key]!r}: expected >= 0 (0: automatic)")
    if config.shard_students and config.mesh.fsdp > 1:
        raise ValueError(f"config.shard_students=True with mesh.fsdp={config.mesh.fsdp}: split either "
                         "the students or their parameters over the devices, not both")


# ============================================================================================
# Chunk size from device memory
# ============================================================================================


def device_memory_bytes(override_gb: float = 0.0) -> int:
    """Free memory of one device: `override_gb`, else the allocator's limit minus what is in use,
    else (CPU: no allocator statistics) half the host RAM shared by the local devices."""
    if override_gb:
        return int(override_gb * 2**30)
    stats = jax.local_devices()[0].memory_stats()
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // 2 // jax.local_device_count()


def student_bytes(config: bert.BertConfig, num_params: int, rows: int, seq_len: int,
                  dtype_bytes: int, param_shards: int = 1) -> int:
    """Device bytes one student needs in a training step (an estimate).

    State: 5 float32 copies of the parameters (params, Adam's two moments, gradients, updates),
    split over `param_shards` (FSDP). Activations kept for the backward pass, for the `rows`
    examples of length S this device computes: ≈ (10·H + 2·I + 3·heads·S) values per token and
    layer (Q, K, V, attention output, residuals, LayerNorms; the FFN's two wide tensors;
    attention probabilities and dropout masks) in the compute dtype.
    """
    h, i, a = config.hidden_size, config.intermediate_size, config.num_attention_heads
    per_token = config.num_hidden_layers * (10 * h + 2 * i + 3 * a * seq_len)
    return 20 * num_params // param_shards + rows * seq_len * per_token * dtype_bytes


def auto_chunk_size(per_student: int, free: int, *, max_students: int, reserved: int = 0,
                    devices: int = 1, shard_students: bool = False, cpu: bool = False) -> int:
    """Students per chunk: as many as fit in `_MEMORY_HEADROOM` of `free` bytes per device after
    `reserved` (e.g. an online teacher), at least 1 and at most `max_students` (the largest
    group of one seed). With `shard_students` each device holds its own students: a multiple
    of `devices`. On a `cpu` one student per device: one already keeps the cores busy."""
    fit = 1 if cpu else max(1, (int(_MEMORY_HEADROOM * free) - reserved) // max(per_student, 1))
    if shard_students:
        return min(fit, math.ceil(max_students / devices)) * devices
    return min(fit, max_students)


# ============================================================================================
# Stacked students: placement, initial state, step, evaluation
# ============================================================================================


def student_shardings(state, mesh, *, shard_students: bool = False, fsdp: bool = False):
    """Shardings of a stacked state: the student axis over all devices, or a single run's layout."""
    if shard_students:
        return jax.tree.map(lambda _: NamedSharding(mesh, P(partitioning.BATCH_AXES)), state)
    return partitioning.state_sharding(state, mesh, fsdp)


def stack_students(state: train.TrainState, points: Sequence[Point], mesh, *,
                   shard_students: bool = False, fsdp: bool = False) -> train.TrainState:
    """G copies of one student's initial state (same seed), each with its point's α, β, T and peak
    learning rate; built on the devices, each holding only its own shard."""
    hparams = {k: np.array([p.hparams[k] for p in points], np.float32) for k in ("alpha", "beta", "temperature")}
    lrs = np.array([p.learning_rate for p in points], np.float32)

    def build(state, hparams, lrs):
        stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (len(points), *jnp.shape(x))), state)
        opt = stacked.opt_state
        opt = opt._replace(hyperparams={**opt.hyperparams, "learning_rate": lrs})
        return stacked.replace(hparams=hparams, opt_state=opt)

    shardings = student_shardings(jax.eval_shape(build, state, hparams, lrs), mesh,
                                  shard_students=shard_students, fsdp=fsdp)
    return jax.jit(build, out_shardings=shardings)(state, hparams, lrs)


def compile_students_step(step: Callable, state, mesh, *, shard_students: bool = False,
                          fsdp: bool = False) -> Callable:
    """jit `vmap(step)` once: `(stacked state, teacher params, batch) -> (state, metrics [G])`;
    the teacher params and the batch are shared, the state donated."""
    shardings = student_shardings(state, mesh, shard_students=shard_students, fsdp=fsdp)
    return jax.jit(jax.vmap(step, in_axes=(0, None, None)), donate_argnums=0,
                   out_shardings=(shardings, partitioning.replicated(mesh)))


def make_students_eval(graphdef) -> Callable:
    """Jitted `(stacked params, batch) -> logits [B, G·C]`: every student in one forward pass, in
    the [B, ·] layout that train.predict gathers."""
    forward = jax.vmap(train.make_eval_step(graphdef), in_axes=(0, None))

    def eval_fn(params, batch):
        logits = forward(params, batch)  # [G, B, C]
        return jnp.swapaxes(logits, 0, 1).reshape(logits.shape[1], -1)

    return jax.jit(eval_fn)


def evaluate_students(eval_fn, params, tok: data.Tokenized, task: str, mesh, batch_size: int,
                      students: int) -> list[dict[str, float]]:
    """Dev metrics (with "score", the main one) of each of the first `students` students."""
    num_labels = data.get_task(task).num_labels
    logits = train.predict(eval_fn, params, tok, mesh, batch_size).reshape(len(tok), -1, num_labels)
    results = []
    for g in range(students):
        result = metrics.compute(task, metrics.predictions_from_logits(task, logits[:, g]), tok.labels)
        result["score"] = metrics.main_score(task, result)
        results.append(result)
    return results


def _replicate_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """The whole batch on every device (shard_students: each device trains its own students)."""
    sharding = partitioning.replicated(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


# ============================================================================================
# The plan: grid and chunks, fixed in W/plan.json
# ============================================================================================


@dataclasses.dataclass
class Plan:
    points: list[Point]
    chunks: list[list[int]]  # student ids; a chunk holds one seed
    students_per_chunk: int
    shard_students: bool

    def width(self, index: int, devices: int) -> int:
        """Students actually stacked: shard_students pads to a multiple of the device count."""
        n = len(self.chunks[index])
        return -(-n // devices) * devices if self.shard_students else n

    def to_json(self) -> dict:
        return {"points": [dataclasses.asdict(p) for p in self.points], "chunks": self.chunks,
                "students_per_chunk": self.students_per_chunk, "shard_students": self.shard_students}


def make_chunks(points: Sequence[Point], size: int) -> list[list[int]]:
    """Consecutive students of one seed, at most `size` per chunk."""
    chunks = []
    for seed in dict.fromkeys(p.seed for p in points):
        ids = [p.student for p in points if p.seed == seed]
        chunks += [ids[i:i + size] for i in range(0, len(ids), size)]
    return chunks


def _load_plan(path: Path, points: list[Point], requested: int, shard_students: bool) -> Plan | None:
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    plan = Plan([Point(**p) for p in saved["points"]], saved["chunks"], saved["students_per_chunk"],
                saved["shard_students"])
    if plan.points != points or plan.shard_students != shard_students or (
            requested and requested != plan.students_per_chunk):
        raise ValueError(f"{path}: this workdir holds a sweep of another grid or chunking "
                         f"({len(plan.points)} students, {plan.students_per_chunk} per chunk, "
                         f"shard_students={plan.shard_students}); use a new --workdir")
    return plan


# ============================================================================================
# Logging: metrics.jsonl, one TensorBoard run per student, progress bar (process 0 only)
# ============================================================================================


def _position(line: str) -> tuple[float, float]:
    """(chunk, step) of a metrics.jsonl line; a line cut short by a kill sorts last (dropped)."""
    try:
        record = json.loads(line)
        return record["chunk"], record["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf, math.inf


class SweepLog:
    def __init__(self, workdir: Path, chunk: int, start: int, total: int, students: Sequence[int],
                 enabled: bool, progress: bool, desc: str):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter
        from tqdm.auto import tqdm

        path = workdir / "metrics.jsonl"
        if path.exists():  # drop lines a killed run wrote after this chunk's last checkpoint
            kept = [l for l in path.read_text().splitlines() if _position(l) <= (chunk, start)]
            train.write_atomic(path, "".join(l + "\n" for l in kept))
        self.chunk = chunk
        self.jsonl = path.open("a")
        self.tb = {s: SummaryWriter(str(workdir / "tensorboard" / f"student_{s:03d}")) for s in students}
        self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, disable=not progress,
                        desc=desc)

    def write(self, step: int, split: str, student: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"chunk": self.chunk, "student": student, "step": step, "split": split,
                                     **values}) + "\n")
        for k, v in values.items():
            self.tb[student].add_scalar(f"{split}/{k}", v, step)

    def flush(self, postfix: str | None = None) -> None:
        if self.enabled:
            self.jsonl.flush()
            if postfix:
                self.bar.set_postfix_str(postfix)

    def note(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def advance(self) -> None:
        if self.enabled:
            self.bar.update(1)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.jsonl.close()
            for writer in self.tb.values():
                writer.close()


# ============================================================================================
# The sweep
# ============================================================================================


@dataclasses.dataclass
class ChunkResult:
    state: train.TrainState  # the final stacked state (padding students included)
    summary: dict  # what W/chunk_<i>/summary.json holds: rows, timing


def _rank_key(row: dict) -> tuple:
    """Best first: highest score, then whoever reached it first (chunk, step, student)."""
    return -row["score"], row["chunk"], row["best_step"], row["student"]


def best_row(rows: Sequence[dict]) -> dict | None:
    scored = [r for r in rows if r["score"] is not None]
    return min(scored, key=_rank_key) if scored else None


class Sweep:
    """A sweep in a workdir: `Sweep(config, workdir).run()`; `train_chunk(i)` trains one chunk."""

    def __init__(self, config, workdir):
        check_sweep_config(config)
        self.config, self.workdir = config, Path(workdir)
        self.points = grid(config)
        saved = _load_plan(self.workdir / "plan.json", self.points, config.students_per_chunk,
                           config.shard_students)  # before the slow set-up: a wrong workdir fails at once
        self.setup = train.prepare(point_config(config, self.points[0]))
        self.lead = jax.process_index() == 0
        if self.lead:
            self.workdir.mkdir(parents=True, exist_ok=True)
            train.write_atomic(self.workdir / "config.json", config.to_json_best_effort(indent=1) + "\n")
        self.tx = self.setup.optimizer()  # its peak learning rate is replaced per student
        self.t_graphdef, self.t_params, self.add_teacher = self.setup.teacher_inputs(self.lead)
        self.plan = saved or self._new_plan()
        log.info("%d students in %d chunk(s) of up to %d", len(self.plan.points), len(self.plan.chunks),
                 self.plan.students_per_chunk)
        self._step = self._eval = self._take = None  # compiled on the first chunk, reused by the others

    # ---- Plan ----------------------------------------------------------------------------------

    def _new_plan(self) -> Plan:
        c = self.config
        size = c.students_per_chunk or self.auto_chunk_size()
        plan = Plan(self.points, make_chunks(self.points, size), size, c.shard_students)
        if self.lead:
            train.write_atomic(self.workdir / "plan.json", json.dumps(plan.to_json(), indent=1) + "\n")
        return plan

    def auto_chunk_size(self) -> int:
        """G from the free memory of a device and `student_bytes` (documented there)."""
        c, setup = self.config, self.setup
        devices = setup.mesh.devices.size
        model = setup.new_student(0)
        rows = c.batch_size if c.shard_students else c.batch_size // devices
        per_student = student_bytes(model.config, bert.param_count(model), rows, c.max_seq_length,
                                    jnp.dtype(setup.dtype).itemsize, param_shards=c.mesh.fsdp)
        reserved = 0
        if self.t_params is not None:  # the online teacher's parameters stay on every device
            reserved = sum(x.nbytes for x in jax.tree.leaves(self.t_params)) // c.mesh.fsdp
        largest = max(sum(p.seed == s for p in self.points) for s in c.seeds)
        free, cpu = device_memory_bytes(c.memory_gb), jax.default_backend() == "cpu"
        size = auto_chunk_size(per_student, free, max_students=largest, reserved=reserved, devices=devices,
                               shard_students=c.shard_students, cpu=cpu)
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

    def train_chunk(self, index: int) -> ChunkResult:
        """Train chunk `index` (resuming from its checkpoint), then write its summary."""
        c, setup, plan = self.config, self.setup, self.plan
        mesh, shard, fsdp = setup.mesh, c.shard_students, setup.fsdp
        ids = plan.chunks[index]
        points = [plan.points[i] for i in ids]
        real, width = len(ids), plan.width(index, mesh.devices.size)
        padded = points + [points[-1]] * (width - real)
        total, steps_per_epoch = setup.total_steps, setup.steps_per_epoch
        chunk_dir = self._chunk_dir(index)

        # ---- Students, step, evaluation ------------------------------------------------------------
        seed = points[0].seed
        # hparams() also carries what else a single run's state holds (its α/β/T are replaced).
        graphdef, base = train.create_train_state(setup.new_student(seed), self.tx, seed, **setup.hparams())
        state = stack_students(base, padded, mesh, shard_students=shard, fsdp=fsdp)
        del base
        if self._step is None:
            self._step = compile_students_step(setup.make_step(graphdef, self.tx, self.t_graphdef), state,
                                               mesh, shard_students=shard, fsdp=fsdp)
            self._eval = make_students_eval(graphdef)
            self._take = jax.jit(lambda tree, j: jax.tree.map(lambda x: x[j], tree),  # one student, whole
                                 out_shardings=partitioning.replicated(mesh))

        # ---- Resume ----------------------------------------------------------------------------
        ckpt = checkpoints.TrainCheckpointer(chunk_dir / "checkpoints", keep=c.keep_checkpoints)
        finished = [r for i in range(index) for r in (self.load_summary(i) or {"rows": []})["rows"]]
        leader = best_row(finished)
        meta = {"students": [{"best": None, "last": None, "failed": None} for _ in ids],
                "last_eval": None, "train_seconds": 0.0,
                "exported": None if leader is None else [leader["student"], leader["best_step"]]}
        restored = ckpt.restore_latest(state)
        if restored is not None:
            _, state, saved = restored
            meta.update(saved)
            log.info("chunk %d: resumed from step %d", index, int(jax.device_get(state.step)[0]))
        start = int(jax.device_get(state.step)[0])
        tracked = meta["students"]

        def active() -> list[int]:
            return [j for j in range(real) if tracked[j]["failed"] is None]

        # ---- Loop ------------------------------------------------------------------------------
        run_log = SweepLog(self.workdir, index, start, total, ids, self.lead, c.progress,
                           f"chunk {index + 1}/{len(plan.chunks)} ({real} students)")
        stop = train.SigtermFlag()
        window = train.MetricsWindow(start)

        def fetch_train_metrics(step: int) -> None:
            fetched = window.fetch(step)
            if fetched is None:
                return
            host, elapsed, steps = fetched
            for s, m in host:
                for j in active():
                    if not np.isfinite(m["loss"][j]):
                        tracked[j]["failed"] = {"step": s, "loss": str(m["loss"][j])}
                        run_log.note(f"student {ids[j]} failed: loss {m['loss'][j]} at step {s}")
                        log.warning("chunk %d: student %d (%s) failed: training loss %s at step %d; "
                                    "the others go on", index, ids[j], points[j], m["loss"][j], s)
            meta["train_seconds"] += elapsed
            schedule = optim.lr_schedule(1.0, total, setup.warmup_steps)(step - 1)
            for j in active():
                values = {k: float(np.mean([m[k][j] for _, m in host])) for k in host[-1][1]}
                values["learning_rate"] = float(points[j].learning_rate * schedule)
                values["epoch"] = step / steps_per_epoch
                run_log.write(step, "train", ids[j], values)
            rate = steps * c.batch_size * real / max(elapsed, 1e-9)
            run_log.flush(f"students·ex/s={rate:.0f}")

        def save(step: int) -> None:
            fetch_train_metrics(step)
            ckpt.save(step, state, meta)

        def export_leader(step: int) -> None:
            """Export the sweep's best student so far when this evaluation made a new one."""
            rows = finished + [self._row(index, ids[j], points[j], tracked[j]) for j in range(real)]
            leader = best_row(rows)
            if leader is None or [leader["student"], leader["best_step"]] == meta["exported"]:
                return
            params = self._take(state.params, ids.index(leader["student"]))
            if self.lead:
                checkpoints.save_pretrained(nnx.merge(graphdef, jax.tree.map(partitioning.to_host, params)),
                                            self.workdir / "best_model", setup.tokenizer)
            meta["exported"] = [leader["student"], leader["best_step"]]

        def run_eval(step: int) -> None:
            fetch_train_metrics(step)
            results = evaluate_students(self._eval, state.params, setup.dev_tok, c.task, mesh,
                                        c.eval_batch_size, real)
            for j in active():
                tracked[j]["last"] = {"step": step, "metrics": results[j]}
                run_log.write(step, "dev", ids[j], results[j])
                if tracked[j]["best"] is None or results[j]["score"] > tracked[j]["best"]["metrics"]["score"]:
                    tracked[j]["best"] = tracked[j]["last"]
            run_log.flush()
            meta["last_eval"] = step
            export_leader(step)
            save(step)
            window.restart(step)  # evaluation time is not training time

        def batches():
            for b in data.train_batches(setup.train_tok, c.batch_size, seed, start_step=start, bucket=c.bucket):
                b = self.add_teacher(b) if self.add_teacher else b
                yield {k: b[k] for k in _TRAIN_INPUTS if k in b}

        place = (lambda b: _replicate_batch(b, mesh)) if shard else (lambda b: partitioning.shard_batch(b, mesh))
        try:
            with data.prefetch(batches(), place, size=2) as stream:
                for step in range(start + 1, total + 1):
                    if not active():
                        break  # every student failed: nothing left to train
                    if stop.requested:
                        save(step - 1)
                        ckpt.wait()
                        raise train.Preempted(f"SIGTERM: saved chunk {index} at step {step - 1}; "
                                              "run the same command to resume")
                    state, m = self._step(state, self.t_params, next(stream))
                    window.add(step, m)
                    run_log.advance()
                    train.after_step(step, c, steps_per_epoch, total, evaluate=run_eval, save=save,
                                     fetch=fetch_train_metrics, window=window)
            trained = int(jax.device_get(state.step)[0])
            if active() and meta["last_eval"] != trained:  # e.g. preempted during the last eval
                run_eval(trained)
            fetch_train_metrics(trained)
        finally:
            stop.restore()
            run_log.close()
            ckpt.close()  # waits for a save in flight, even when an error ends the chunk

        # ---- Summary ---------------------------------------------------------------------------
        summary = {"chunk": index, "students": ids, "width": width, "steps": trained,
                   "train_seconds": meta["train_seconds"],
                   "rows": [self._row(index, ids[j], points[j], tracked[j]) for j in range(real)]}
        if self.lead:  # the chunk is done: never retrained, its checkpoints no longer needed
            train.write_atomic(chunk_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
            shutil.rmtree(chunk_dir / "checkpoints", ignore_errors=True)
        return ChunkResult(state, summary)

    @staticmethod
    def _row(chunk: int, student: int, point: Point, tracked: dict) -> dict:
        best, last, failed = tracked["best"], tracked["last"], tracked["failed"]
        return {"student": student, "chunk": chunk, "seed": point.seed, "learning_rate": point.learning_rate,
                "temperature": point.temperature, "alpha": point.alpha, "beta": point.beta,
                "status": "ok" if failed is None else "failed",
                "failed_step": None if failed is None else failed["step"],
                "best_step": None if best is None else best["step"],
                "score": None if best is None else best["metrics"]["score"],
                "metrics": {} if best is None else {k: v for k, v in best["metrics"].items() if k != "score"},
                "last_step": None if last is None else last["step"],
                "last_score": None if last is None else last["metrics"]["score"]}

    # ---- The whole grid ------------------------------------------------------------------------

    def run(self) -> dict:
        """Train every unfinished chunk, then write the table, heatmap and results.json."""
        summaries = []
        for index in range(len(self.plan.chunks)):
            summary = self.load_summary(index)
            if summary is None:
                summary = self.train_chunk(index).summary
            else:
                log.info("chunk %d: finished earlier, skipped", index)
            summaries.append(summary)
            if self.lead:  # partial tables while the sweep runs
                self._write_tables([r for s in summaries for r in s["rows"]])
        rows = [r for s in summaries for r in s["rows"]]
        best = best_row(rows)
        if best is None:
            raise FloatingPointError(f"every student failed before its first evaluation; see "
                                     f"{self.workdir / 'sweep.csv'} and lower config.learning_rates")
        results = self._results(rows, best, summaries)
        if self.lead:
            self._write_tables(rows)
            plot_heatmap(rows, self.config.task, self.workdir / "heatmap.png")
            train.write_atomic(self.workdir / "results.json", json.dumps(results, indent=1) + "\n")
        return results

    def _write_tables(self, rows: list[dict]) -> None:
        train.write_atomic(self.workdir / "sweep.csv", csv_table(rows))
        train.write_atomic(self.workdir / "sweep.md", markdown_report(rows, self.config.task))

    def _results(self, rows: list[dict], best: dict, summaries: list[dict]) -> dict:
        c, setup = self.config, self.setup
        seconds = sum(s["train_seconds"] for s in summaries)
        student_examples = sum(len(s["students"]) * s["steps"] * c.batch_size for s in summaries)
        model = checkpoints.load_config(setup.pretrained, num_layers=c.layers)
        point = {k: best[k] for k in ("student", "seed", "learning_rate", "temperature", "alpha", "beta")}
        return {
            "task": c.task, "kind": "sweep", "metric": metrics.main_metric(c.task),
            "metrics": {**best["metrics"], "score": best["score"]}, "step": best["best_step"],
            "best": {**point, "step": best["best_step"], "status": best["status"],
                     "metrics": {**best["metrics"], "score": best["score"]}},
            "grid": {axis: list(c[axis]) for axis in GRID_AXES},
            "students": len(rows), "failed": [r["student"] for r in rows if r["status"] == "failed"],
            "students_per_chunk": self.plan.students_per_chunk, "chunks": len(summaries),
            "shard_students": c.shard_students, "total_steps": setup.total_steps,
            "train_seconds": seconds,
            "students_examples_per_s": student_examples / max(seconds, 1e-9),
            "model": {"pretrained": setup.pretrained, "layers": model.num_hidden_layers,
                      "hidden_size": model.hidden_size},
            "teacher": {"path": setup.teacher_path, "layers": setup.teacher.config.num_hidden_layers,
                        "layer_map": list(setup.layer_map)},
            "train_examples": len(setup.train_tok), "dev_examples": len(setup.dev_tok),
            "config": json.loads(c.to_json_best_effort()),
        }


def describe(point: dict) -> str:
    """' (student 7: T=5, alpha=0.7, beta=500, lr=0.0002, seed 0)' of a row or results["best"]."""
    return (f" (student {point['student']}: T={point['temperature']:g}, alpha={point['alpha']:g}, "
            f"beta={point['beta']:g}, lr={point['learning_rate']:g}, seed {point['seed']})")


def run_sweep(config, workdir) -> dict:
    """Train the config's grid (configs/sweep.py) in `workdir`; returns results.json."""
    return Sweep(config, workdir).run()


# ============================================================================================
# Tables and the heatmap
# ============================================================================================

_POINT_COLUMNS = ("student", "chunk", "seed", "learning_rate", "temperature", "alpha", "beta")


def _metric_names(rows: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r["metrics"]))


def csv_table(rows: Sequence[dict]) -> str:
    """sweep.csv: one row per student, in grid order; dev metrics at the student's best step."""
    names = _metric_names(rows)
    header = [*_POINT_COLUMNS, "status", "failed_step", "best_step", "score", *names, "last_step", "last_score"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for r in sorted(rows, key=lambda r: r["student"]):
        values = {**r, **r["metrics"]}
        writer.writerow(["" if values.get(k) is None else values[k] for k in header])
    return out.getvalue()


def _pct(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.1f}"


def markdown_table(rows: Sequence[dict], task: str) -> str:
    """Students best first (metrics ×100); the best row bold and starred."""
    from pkd_jax.report import metric_title

    names = _metric_names(rows)
    main = metrics.main_metric(task)
    others = [n for n in names if n != main]
    header = ["Rank", "Student", "Seed", "Learning rate", "T", "α", "β", f"Dev {metric_title(main)}",
              *map(metric_title, others), "Best step", "Status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * (len(header) - 1) + "---|"]
    ranked = (sorted((r for r in rows if r["score"] is not None), key=_rank_key)
              + sorted((r for r in rows if r["score"] is None), key=lambda r: r["student"]))
    best = best_row(rows)
    for rank, r in enumerate(ranked, 1):
        status = "ok" if r["status"] == "ok" else f"failed (NaN at step {r['failed_step']})"
        cells = [str(rank), str(r["student"]), str(r["seed"]), f"{r['learning_rate']:g}", f"{r['temperature']:g}",
                 f"{r['alpha']:g}", f"{r['beta']:g}", _pct(r["score"]),
                 *(_pct(r["metrics"].get(n)) for n in others),
                 "–" if r["best_step"] is None else str(r["best_step"]), status]
        if r is best:
            cells = [f"**{x}**" for x in cells]
            cells[0] = "★ " + cells[0]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(rows: Sequence[dict], task: str) -> str:
    """sweep.md: a heading, the best point, the table and the heatmap."""
    from pkd_jax.report import metric_title, task_title

    best = best_row(rows)
    lines = [f"# {task_title(task)}: hyper-parameter sweep ({len(rows)} students)", ""]
    if best is not None:
        lines += [f"Best (★, exported to `best_model/`): dev {metric_title(metrics.main_metric(task))} "
                  f"{_pct(best['score'])} at step {best['best_step']}{describe(best)}.", ""]
    lines += ["Dev metrics ×100 at each student's best step.", "", markdown_table(rows, task), "",
              "![heatmap](heatmap.png)", ""]
    return "\n".join(lines)


def plot_heatmap(rows: Sequence[dict], task: str, path: str | os.PathLike) -> Path:
    """Dev main metric over the grid: a panel per (learning rate, T), α up and β across; cells
    annotated (mean over seeds, ± their spread), the best student's cell outlined, failed
    students marked †."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from pkd_jax.report import metric_title, task_title

    axis_values = {k: sorted({r[k] for r in rows}) for k in ("learning_rate", "temperature", "alpha", "beta")}
    lrs, temps, alphas, betas = axis_values.values()
    seeds = sorted({r["seed"] for r in rows})
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["learning_rate"], r["temperature"], r["alpha"], r["beta"]), []).append(r)

    def mean(key):
        scores = [100 * r["score"] for r in cells.get(key, []) if r["score"] is not None]
        return (float(np.mean(scores)), float(np.std(scores))) if scores else (math.nan, math.nan)

    values = {key: mean(key) for key in cells}
    finite = [m for m, _ in values.values() if math.isfinite(m)]
    vmin, vmax = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if vmax - vmin < 1e-9:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    best = best_row(rows)
    top = None if best is None else (best["learning_rate"], best["temperature"], best["alpha"], best["beta"])

    fig = Figure(figsize=(max(7.0, 0.85 * len(betas) * len(temps) + 2.4), 0.6 * len(alphas) * len(lrs) + 2.1),
                 layout="constrained")
    axes = fig.subplots(len(lrs), len(temps), squeeze=False, sharex=True, sharey=True)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")
    for (li, lr), (ti, t) in itertools.product(enumerate(lrs), enumerate(temps)):
        ax = axes[li][ti]
        grid_values = np.array([[values.get((lr, t, a, b), (math.nan, 0))[0] for b in betas] for a in alphas])
        image = ax.imshow(grid_values, cmap=cmap, vmin=vmin, vmax=vmax, origin="lower", aspect="auto")
        for (ai, a), (bi, b) in itertools.product(enumerate(alphas), enumerate(betas)):
            m, sd = values.get((lr, t, a, b), (math.nan, 0))
            failed = any(r["status"] == "failed" for r in cells.get((lr, t, a, b), []))
            text = "–" if not math.isfinite(m) else f"{m:.1f}" + (f"\n±{sd:.1f}" if len(seeds) > 1 else "")
            bright = math.isfinite(m) and (m - vmin) / (vmax - vmin) > 0.6
            ax.text(bi, ai, text + (" †" if failed else ""), ha="center", va="center", fontsize=9,
                    color="black" if bright or not math.isfinite(m) else "white")
            if (lr, t, a, b) == top:
                ax.add_patch(Rectangle((bi - 0.5, ai - 0.5), 1, 1, fill=False, edgecolor="#d62728", lw=3))
        ax.set_xticks(range(len(betas)), [f"{b:g}" for b in betas])
        ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_title(f"T = {t:g}" + (f", lr = {lr:g}" if len(lrs) > 1 else ""), fontsize=10)
    metric = metric_title(metrics.main_metric(task))
    fig.colorbar(image, ax=axes, shrink=0.9, label=f"dev {metric} (%)")
    fig.supxlabel("β (patient loss weight)")
    fig.supylabel("α (distillation weight)")
    seeds_note = f"mean ± std of {len(seeds)} seeds" if len(seeds) > 1 else f"seed {seeds[0]}"
    failed_note = "; †: a student failed (NaN)" if any(r["status"] == "failed" for r in rows) else ""
    fig.suptitle(f"{task_title(task)}: best dev {metric} of each student\n"
                 f"{seeds_note}; red box: the exported best student{failed_note}", fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
