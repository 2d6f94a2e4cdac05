"""Timing of jitted calls, as the benchmarks and the report's inference speed measure it.

A call is compiled ahead of time (its compile time reported apart), run `warmup` times untimed
(first-call allocations), then `repeats` times, each ending in `jax.block_until_ready`, so the
figures are device time plus dispatch, never a queue of unfinished work.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np


def measure(run_once: Callable[[], Any], *, warmup: int, repeats: int,
            sync: Callable[[Any], Any] = jax.block_until_ready) -> list[float]:
    """Seconds per call of `run_once` after `warmup` untimed calls; each call synchronised."""
    for _ in range(warmup):
        sync(run_once())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(run_once())
        times.append(time.perf_counter() - start)
    return times


def compile_ahead(jitted, *args) -> tuple[Any, float]:
    """(the compiled function, seconds it took to lower and compile) for these arguments."""
    return compile_ahead_all([(jitted, args)])[0]


def compile_ahead_all(calls: Sequence[tuple[Any, tuple]], threads: int | None = None) -> list[tuple[Any, float]]:
    """`compile_ahead` of each `(jitted, args)`: lowered one after another (tracing is Python),
    then compiled side by side on a thread pool of `threads` (default: one per call, at most the
    host's CPUs), as XLA's compilation releases the GIL. A call's seconds are its own lowering plus
    the wall time of its compilation, which overlaps the others'."""
    lowered = []
    for jitted, args in calls:
        start = time.perf_counter()
        lowered.append((jitted.lower(*args), time.perf_counter() - start))

    def compile_one(item):
        program, lower_s = item
        start = time.perf_counter()
        return program.compile(), lower_s + time.perf_counter() - start

    workers = threads or max(1, min(len(lowered), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="compile") as pool:
        return list(pool.map(compile_one, lowered))


def random_inputs(vocab_size: int, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Full-length random token ids, one segment, no padding: the cost of a full bucket."""
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(1, vocab_size, (batch_size, seq_len), dtype=np.int32),
            "token_type_ids": np.zeros((batch_size, seq_len), np.int32),
            "attention_mask": np.ones((batch_size, seq_len), np.int32)}
