"""Which task each step trains on: the sampling rules, and a task order that is a pure function of
(seed, step), so a resumed run replays the same tasks and, per task, the same batches.

Rules, with n_t a task's training examples:

    proportional  p_t = n_t / Σ_u n_u
    temperature   p_t = n_t^(1/τ) / Σ_u n_u^(1/τ)     (τ = 1: proportional; τ → ∞: equal)
    equal         p_t = 1 / T

Order: batch i (that of step i + 1) belongs to the first task t with u_i < p_1 + ... + p_t, where u_i
is number i mod 1024 of numpy's PCG64 stream seeded [seed, 1831, i // 1024]. Blocks of 1024 make
the counts before any step cheap to recompute (a resume needs each task's position in its own
stream) while keeping every batch's task independent of where a run started.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence

import numpy as np

RULES = ("proportional", "temperature", "equal")
_BLOCK = 1024
_STREAM = 1831  # keeps these draws apart from the data order's, which is seeded [seed, epoch]


def probabilities(rule: str, sizes: Sequence[int], temperature: float = 1.0) -> np.ndarray:
    """p_t of each task under `rule` (float64, sums to 1); sizes: each task's training examples."""
    n = np.asarray(sizes, np.float64)
    if rule == "proportional":
        weights = n
    elif rule == "temperature":
        weights = n ** (1.0 / temperature)
    elif rule == "equal":
        weights = np.ones_like(n)
    else:
        raise ValueError(f"task sampling rule {rule!r}: expected one of {', '.join(RULES)}")
    return weights / weights.sum()


def _block(probs: np.ndarray, seed: int, block: int) -> np.ndarray:
    cdf = np.cumsum(probs)
    cdf[-1] = 1.0  # rounding must never leave a draw past the last task
    u = np.random.default_rng([seed, _STREAM, block]).random(_BLOCK)
    return np.searchsorted(cdf, u, side="right").astype(np.int32)


def task_order(probs: np.ndarray, seed: int, start: int, stop: int) -> np.ndarray:
    """The task index of each batch in [start, stop)."""
    if stop <= start:
        return np.zeros(0, np.int32)
    first, last = start // _BLOCK, (stop - 1) // _BLOCK
    tasks = np.concatenate([_block(probs, seed, b) for b in range(first, last + 1)])
    return tasks[start - first * _BLOCK:stop - first * _BLOCK]


def counts(probs: np.ndarray, seed: int, stop: int) -> np.ndarray:
    """How many of batches [0, stop) each task has: where each task's own stream stands at `stop`."""
    total = np.zeros(len(probs), np.int64)
    for b in range(0, stop, _BLOCK):
        total += np.bincount(task_order(probs, seed, b, min(b + _BLOCK, stop)), minlength=len(probs))
    return total


def mixed_batches(streams: Sequence[Callable[[int], Iterator]], probs: np.ndarray, seed: int,
                  start: int) -> Iterator[tuple[int, object]]:
    """(task index, batch) of batches start, start + 1, ...: `streams[t](k)` yields task t's batches
    from its k-th on, and each is advanced only when its task is drawn."""
    at = counts(probs, seed, start)
    iterators = [stream(int(k)) for stream, k in zip(streams, at)]
    for block_start in itertools.count(start - start % _BLOCK, _BLOCK):
        for task in task_order(probs, seed, max(start, block_start), block_start + _BLOCK):
            yield int(task), next(iterators[task])
