"""The grid of a sweep, its plan (chunks of students, fixed in W/plan.json), the chunk size that
fits in device memory, and the rows that record each student's outcome (sweep.csv)."""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import itertools
import json
import math
import os
from pathlib import Path
from typing import Sequence

import jax

from pkd_jax import bert, fsutil
from pkd_jax.errors import ConfigError

GRID_AXES = ("seeds", "learning_rates", "temperatures", "alphas", "betas")
_SWEEP_FIELDS = (*GRID_AXES, "students_per_chunk", "shard_students", "memory_gb")
_MEMORY_HEADROOM = 0.8  # of the free device memory: XLA scratch space, fragmentation, evaluation


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
    """Fail at once, naming the key; the per-run fields are checked by checks.check_config."""
    if config.kind != "sweep":
        raise ConfigError(f"config.kind={config.kind!r}: expected sweep (configs/sweep.py)")
    ranges = {"seeds": (lambda v: float(v).is_integer() and v >= 0, "integers >= 0"),
              "learning_rates": (lambda v: v > 0, "positive numbers"),
              "temperatures": (lambda v: v > 0, "positive numbers"),
              "alphas": (lambda v: 0 <= v <= 1, "numbers in [0, 1]"),
              "betas": (lambda v: v >= 0, "numbers >= 0")}
    for axis, (ok, expected) in ranges.items():
        values = tuple(config[axis])
        if not values or not all(ok(v) for v in values) or len(set(values)) != len(values):
            raise ConfigError(f"config.{axis}={values!r}: expected distinct {expected}, at least one")
    if config.students_per_chunk < 0 or config.memory_gb < 0:
        key = "students_per_chunk" if config.students_per_chunk < 0 else "memory_gb"
        raise ConfigError(f"config.{key}={config[key]!r}: expected >= 0 (0: automatic)")
    if config.shard_students and config.mesh.fsdp > 1:
        raise ConfigError(f"config.shard_students=True with mesh.fsdp={config.mesh.fsdp}: split either "
                          "the students or their parameters over the devices, not both")


# --------------------------------------------------------------------------------------------
# Chunk size from device memory
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# The plan: grid and chunks, fixed in W/plan.json
# --------------------------------------------------------------------------------------------


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

    def save(self, path: Path) -> None:
        fsutil.write_text(path, json.dumps(self.to_json(), indent=1) + "\n")


def make_chunks(points: Sequence[Point], size: int) -> list[list[int]]:
    """Consecutive students of one seed, at most `size` per chunk."""
    chunks = []
    for seed in dict.fromkeys(p.seed for p in points):
        ids = [p.student for p in points if p.seed == seed]
        chunks += [ids[i:i + size] for i in range(0, len(ids), size)]
    return chunks


def load_plan(path: Path, points: list[Point], requested: int, shard_students: bool) -> Plan | None:
    """The plan a workdir holds (None: a new sweep); refuses one of another grid or chunking."""
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    plan = Plan([Point(**p) for p in saved["points"]], saved["chunks"], saved["students_per_chunk"],
                saved["shard_students"])
    if plan.points != points or plan.shard_students != shard_students or (
            requested and requested != plan.students_per_chunk):
        raise ConfigError(f"{path}: this workdir holds a sweep of another grid or chunking "
                          f"({len(plan.points)} students, {plan.students_per_chunk} per chunk, "
                          f"shard_students={plan.shard_students}); use a new --workdir or --restart")
    return plan


# --------------------------------------------------------------------------------------------
# Rows: one per student (sweep.csv, the chunk summaries, the report's tables)
# --------------------------------------------------------------------------------------------

POINT_COLUMNS = ("student", "chunk", "seed", "learning_rate", "temperature", "alpha", "beta")


def student_row(chunk: int, point: Point, tracked: dict) -> dict:
    """A student's outcome: its point, status, best step and dev metrics there, last evaluation.

    tracked: {"best", "last", "failed"} as the chunk's loop keeps them.
    """
    best, last, failed = tracked["best"], tracked["last"], tracked["failed"]
    return {"student": point.student, "chunk": chunk, "seed": point.seed, "learning_rate": point.learning_rate,
            "temperature": point.temperature, "alpha": point.alpha, "beta": point.beta,
            "status": "ok" if failed is None else "failed",
            "failed_step": None if failed is None else failed["step"],
            "best_step": None if best is None else best["step"],
            "score": None if best is None else best["metrics"]["score"],
            "metrics": {} if best is None else {k: v for k, v in best["metrics"].items() if k != "score"},
            "last_step": None if last is None else last["step"],
            "last_score": None if last is None else last["metrics"]["score"]}


def rank_key(row: dict) -> tuple:
    """Best first: highest score, then whoever reached it first (chunk, step, student)."""
    return -row["score"], row["chunk"], row["best_step"], row["student"]


def best_row(rows: Sequence[dict]) -> dict | None:
    scored = [r for r in rows if r["score"] is not None]
    return min(scored, key=rank_key) if scored else None


def metric_names(rows: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r["metrics"]))


def csv_table(rows: Sequence[dict]) -> str:
    """sweep.csv: one row per student, in grid order; dev metrics at the student's best step."""
    names = metric_names(rows)
    header = [*POINT_COLUMNS, "status", "failed_step", "best_step", "score", *names, "last_step", "last_score"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for r in sorted(rows, key=lambda r: r["student"]):
        values = {**r, **r["metrics"]}
        writer.writerow(["" if values.get(k) is None else values[k] for k in header])
    return out.getvalue()


def describe(point: dict) -> str:
    """' (student 7: T=5, alpha=0.7, beta=500, lr=0.0002, seed 0)' of a row or results["best"]."""
    return (f" (student {point['student']}: T={point['temperature']:g}, alpha={point['alpha']:g}, "
            f"beta={point['beta']:g}, lr={point['learning_rate']:g}, seed {point['seed']})")
