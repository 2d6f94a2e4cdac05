"""Suite sweep: G students trained by one vmapped chunk step against the same G students trained
one after another (G calls of the single-student step), same shapes and batch."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks.common import (Bench, build_model, default_model, log, pkd_layer_map, resolve_model,
                               synthetic_batch, target, train_flops)
from configs import sweep as sweep_config
from pkd_jax import optim, partitioning, steps, sweep, timing
from pkd_jax.bert import param_count

# vmapped chunk over one-after-another, BERT_3 students on an accelerator (reported, never asserted).
SWEEP_SPEEDUP_TARGET = 2.0
# Peak learning rates the students cycle through: the grid of configs/sweep.py has a single one
# (pkd.py's), and the benchmark wants students that differ in every hyper-parameter.
LEARNING_RATES = (1e-5, 2e-5, 5e-5)


def _grid() -> list[sweep.Point]:
    """The grid of configs/sweep.py with its defaults: the paper's T × α × β, one seed."""
    return sweep.grid(sweep_config.get_config())


def sweep_points(g: int) -> list[sweep.Point]:
    """G students cycling through `_grid()` and through LEARNING_RATES, shifted by one at each pass
    through the grid: up to 3 · len(grid) students all differ. The hyper-parameters do not change
    the cost of a step."""
    grid = _grid()
    return [dataclasses.replace(grid[i % len(grid)], student=i,
                                learning_rate=LEARNING_RATES[(i + i // len(grid)) % len(LEARNING_RATES)])
            for i in range(g)]


def _time_vmapped(b: Bench, compiled, chain: list, batch) -> tuple[list[float], dict[str, str]]:
    """(step times, profile field) of one vmapped step of the stacked students in `chain`, a
    list holding the only reference to them (donated: each call consumes the previous call's)."""

    def chunk():
        chain[0], metrics = compiled(chain[0], None, batch)
        return metrics

    times = timing.measure(chunk, warmup=b.args.warmup, repeats=b.args.repeats)
    trace = b.profile("sweep", "vmapped", chunk)
    chain.clear()  # free the chunk's memory before the sequential students take theirs
    return times, trace


def _time_sequential(b: Bench, compiled, base, g: int, batch) -> tuple[list[float], dict[str, str]]:
    """The same for G single-student steps, each student with its own state, one after another."""
    states = [partitioning.place_state(jax.tree.map(jnp.copy, base), b.mesh) for _ in range(g)]

    def one_after_another():
        metrics = []
        for i in range(g):
            states[i], m = compiled(states[i], None, batch)
            metrics.append(m)
        return metrics

    times = timing.measure(one_after_another, warmup=b.args.warmup, repeats=b.args.repeats)
    trace = b.profile("sweep", "sequential", one_after_another)
    states.clear()
    return times, trace


def run_sweep(b: Bench) -> list[dict[str, Any]]:
    """G students: one vmapped chunk step against G single-student steps, same shapes and batch."""
    args = b.args
    spec = resolve_model(args.model or default_model(b), args.teacher_layers)
    n = spec.teacher_layers
    k = args.student_layers or max(1, min(3, n - 1))  # BERT_3, or shallower than a small teacher
    g = args.students or (8 if b.accelerator else 4)
    batch_size = args.batch_size or 32  # the paper's batch
    partitioning.check_batch_size(batch_size, b.mesh)
    layer_map = pkd_layer_map(n, k)
    tx = optim.make_optimizer(learning_rate=2e-5, total_steps=10_000, warmup_steps=100)
    model = build_model(spec, k, b.dtype, pretrained=True)
    graphdef, base = steps.create_train_state(model, tx, seed=0)
    step = steps.make_distill_step(graphdef, tx, layer_map=layer_map)
    batch = partitioning.shard_batch(synthetic_batch(spec.config, batch_size, args.seq_len,
                                                     cached_layers=len(layer_map)), b.mesh)
    flops = g * train_flops(spec.config, k, None, args.seq_len)  # per example of the shared batch
    common = dict(framework="jax", model=spec.name, teacher_layers=n, student_layers=k, students=g)

    chain = [sweep.stack_students(base, sweep_points(g), b.mesh)]
    log("sweep: compiling the vmapped and the single-student step side by side")
    (vmapped_fn, vmapped_s), (single_fn, single_s) = timing.compile_ahead_all([
        (sweep.compile_students_step(step, chain[0], b.mesh), (chain[0], None, batch)),
        (steps.compile_step(step, base, b.mesh), (base, None, batch))])
    log(f"sweep: {g} vmapped {spec.name} students {n}->{k}, batch {batch_size}")
    times, trace = _time_vmapped(b, vmapped_fn, chain, batch)
    lines = {"vmapped": b.step_line("sweep", "vmapped", times, batch_size, flops, compile_s=vmapped_s,
                                    **common, **trace)}
    log(f"sweep: the same {g} students one after another")
    times, trace = _time_sequential(b, single_fn, base, g, batch)
    lines["sequential"] = b.step_line("sweep", "sequential", times, batch_size, flops, compile_s=single_s,
                                      **common, **trace)
    sequential, vmapped = lines["sequential"], lines["vmapped"]
    for line in (sequential, vmapped):
        line["students_examples_per_s"] = g * batch_size / line["step_s_median"]
    vmapped["speedup"] = sequential["step_s_median"] / vmapped["step_s_median"]
    if b.accelerator:
        vmapped["targets"] = [target("vmapped/sequential students·examples/s", vmapped["speedup"], ">=",
                                     SWEEP_SPEEDUP_TARGET, where="accelerator, BERT_3 students, batch 32")]
    per_student = sweep.student_bytes(model.config, param_count(model), batch_size // b.mesh.devices.size,
                                      args.seq_len, jnp.dtype(b.dtype).itemsize)
    vmapped["auto_students_per_chunk"] = sweep.auto_chunk_size(
        per_student, sweep.device_memory_bytes(), max_students=len(_grid()),
        cpu=not b.accelerator)
    return [b.emit(line) for line in (sequential, vmapped)]
