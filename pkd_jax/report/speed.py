"""Inference speed of a run's exported model: examples/s of a jitted forward pass, timed as
pkd_jax.timing times every call (compiled ahead, warm-up excluded, each call synchronised)."""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Sequence

import jax
from flax import nnx

from pkd_jax import checkpoints, checks, steps, timing
from pkd_jax.report.runs import Run, RunError


def inference_examples_per_s(model_dir: str | os.PathLike, *, batch_size: int = 128, seq_len: int = 128,
                             repeats: int = 5, dtype: str = "auto", seed: int = 0) -> float:
    """Examples/s of a jitted forward pass of an HF BERT folder on random full-length token ids:
    the median of `repeats` calls, after compilation and one untimed call (first-call allocations)."""
    model = checkpoints.load_pretrained(model_dir, dtype=checks.compute_dtype(dtype))
    graphdef, params = nnx.split(model, nnx.Param)
    batch = jax.device_put(timing.random_inputs(model.config.vocab_size, batch_size, seq_len, seed))
    forward, _ = timing.compile_ahead(jax.jit(steps.make_logits_fn(graphdef)), params, batch)
    times = timing.measure(lambda: forward(params, batch), warmup=1, repeats=repeats)
    return batch_size / statistics.median(times)


def measure_speed(runs: Sequence[Run], **kwargs) -> dict[Path, float]:
    """Run path -> inference examples/s for every finished run (kwargs: inference_examples_per_s)."""
    finished = [r for r in runs if r.finished]
    for run in finished:  # before any timing: fail in seconds, not after minutes
        if not (run.path / "model" / "config.json").exists():
            raise RunError(f"{run.path}: no model/config.json: --speed times the exported best model")
    return {r.path: inference_examples_per_s(r.path / "model", **kwargs) for r in finished}


def speed_note(*, batch_size: int, seq_len: int, repeats: int, dtype: str) -> str:
    """The report's sentence on how inference was timed (shape, dtype, device)."""
    name = jax.numpy.dtype(checks.compute_dtype(dtype)).name
    return (f"Inference: jitted forward pass, batch {batch_size} x {seq_len} tokens, {name} on "
            f"{jax.devices()[0].device_kind}; median of {repeats} calls.")
