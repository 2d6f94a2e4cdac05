"""Batches of tokenised splits, and their prefetching onto devices.

``train_batches`` is an endless, seeded stream in which the batch of global step s depends only on
(data, batch size, seed, s), so a resumed run continues the identical stream; ``eval_batches``
visits every example once. Both group examples by length and pad each batch to one of a few
bucket lengths, so XLA compiles a handful of shapes. ``prefetch`` runs a batch iterator (and the
placement of its batches on the mesh) in a background thread.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from pkd_jax.data.tokenization import Tokenized

# What the model reads from a batch; the rest (labels, index, weight, teacher outputs) the step
# or the host reads.
MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")

_BUCKET_WINDOW = 50  # batches per length-sorting window: similar lengths, still well mixed


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch; the remainder is dropped (it is reshuffled in next epoch)."""
    return num_examples // batch_size


def bucket_sizes(max_seq_length: int, buckets: Sequence[int] | None = None) -> tuple[int, ...]:
    """The padded lengths batches may have: ``buckets`` (default multiples of 32) up to the max."""
    if buckets is None:
        buckets = range(32, max_seq_length, 32)
    if any(int(b) <= 0 for b in buckets):
        raise ValueError(f"bucket lengths must be positive, got {list(buckets)}")
    return tuple(sorted({int(b) for b in buckets if b < max_seq_length} | {max_seq_length}))


def _make_batch(tok: Tokenized, rows: np.ndarray, length: int,
                batch_size: int) -> dict[str, np.ndarray]:
    """Rows ``rows`` padded to ``length`` tokens; missing rows up to ``batch_size`` get weight 0."""
    n = len(rows)
    input_ids = np.full((batch_size, length), tok.pad_id, np.int32)
    input_ids[:n] = tok.input_ids[rows, :length]
    token_type_ids = np.zeros((batch_size, length), np.int32)
    token_type_ids[:n] = tok.token_type_ids[rows, :length]
    lengths = np.zeros(batch_size, np.int32)
    lengths[:n] = tok.lengths[rows]
    labels = np.zeros(batch_size, tok.labels.dtype)
    labels[:n] = tok.labels[rows]
    index = np.zeros(batch_size, np.int32)
    index[:n] = rows
    weight = np.zeros(batch_size, np.float32)
    weight[:n] = 1.0
    return {
        "input_ids": input_ids,
        "token_type_ids": token_type_ids,
        "attention_mask": (np.arange(length) < lengths[:, None]).astype(np.int32),
        "labels": labels,
        "index": index,
        "weight": weight,
    }


def _batch_length(tok: Tokenized, rows: np.ndarray, sizes: tuple[int, ...]) -> int:
    return sizes[int(np.searchsorted(sizes, tok.lengths[rows].max()))]


def _epoch_plan(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                bucket: bool) -> np.ndarray:
    """Rows of every batch of one epoch, [steps_per_epoch, batch_size]; a function of its args."""
    rng = np.random.default_rng([seed, epoch])
    num_steps = steps_per_epoch(len(lengths), batch_size)
    order = rng.permutation(len(lengths))[: num_steps * batch_size]
    if not bucket:
        return order.reshape(num_steps, batch_size)
    window = _BUCKET_WINDOW * batch_size  # a multiple of batch_size: no batch spans two windows
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        order[start:start + window] = chunk[np.argsort(lengths[chunk], kind="stable")]
    return order.reshape(num_steps, batch_size)[rng.permutation(num_steps)]


def train_batches(tok: Tokenized, batch_size: int, seed: int, *, start_step: int = 0,
                  bucket: bool = True, buckets: Sequence[int] | None = None
                  ) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches; the batch of global step s depends only on (data, batch_size,
    seed, s), so resuming with ``start_step=s`` continues the same stream.

    Each epoch is a fresh seeded permutation (remainder dropped). With ``bucket``, examples are
    sorted by length inside windows of 50 batches, the batch order is shuffled, and each batch
    is padded to the smallest of ``bucket_sizes(max_seq_length, buckets)`` that fits it;
    otherwise every batch is [batch_size, max_seq_length].
    """
    for rows, length in _train_plan(tok, batch_size, seed, start_step, bucket, buckets):
        yield _make_batch(tok, rows, length, batch_size)


def _train_plan(tok: Tokenized, batch_size: int, seed: int, start_step: int, bucket: bool,
                buckets: Sequence[int] | None) -> Iterator[tuple[np.ndarray, int]]:
    """(rows, padded length) of the batch of every step from ``start_step`` on."""
    num_steps = steps_per_epoch(len(tok), batch_size)
    if num_steps == 0:
        raise ValueError(f"batch_size={batch_size} exceeds the {len(tok)} examples")
    if seed < 0 or start_step < 0:
        raise ValueError(f"seed and start_step must be >= 0, got {seed}, {start_step}")
    sizes = bucket_sizes(tok.max_seq_length, buckets) if bucket else (tok.max_seq_length,)
    plan_epoch, plan = -1, np.empty(0)
    for step in itertools.count(start_step):
        epoch, pos = divmod(step, num_steps)
        if epoch != plan_epoch:
            plan_epoch, plan = epoch, _epoch_plan(tok.lengths, batch_size, seed, epoch, bucket)
        rows = plan[pos]
        yield rows, _batch_length(tok, rows, sizes)


def step_lengths(tok: Tokenized, batch_size: int, seed: int, start_step: int, stop_step: int, *,
                 bucket: bool = True, buckets: Sequence[int] | None = None) -> np.ndarray:
    """The padded length of the batch of each step in [start_step, stop_step), without building
    the batches: the shapes a run will meet (to compile its step for each before the loop) and
    how often (to weigh per-shape step times)."""
    plan = _train_plan(tok, batch_size, seed, start_step, bucket, buckets)
    return np.fromiter((length for _, (_, length) in zip(range(start_step, stop_step), plan)), np.int64,
                       count=max(stop_step - start_step, 0))


def eval_batches(tok: Tokenized, batch_size: int, *, bucket: bool = True,
                 buckets: Sequence[int] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Every example exactly once, in ``math.ceil(len(tok) / batch_size)`` batches.

    The last batch is filled up to ``batch_size`` with rows of weight 0 (all padding, index 0).
    With ``bucket`` the rows are ordered by length, so use ``batch["index"]`` to map outputs back.
    """
    for rows, length in _eval_plan(tok, batch_size, bucket, buckets):
        yield _make_batch(tok, rows, length, batch_size)


def eval_lengths(tok: Tokenized, batch_size: int, *, bucket: bool = True,
                 buckets: Sequence[int] | None = None) -> tuple[int, ...]:
    """The distinct padded lengths of ``eval_batches``' batches, ascending, without building them:
    the shapes to compile an evaluation pass for before it starts."""
    return tuple(sorted({length for _, length in _eval_plan(tok, batch_size, bucket, buckets)}))


def _eval_plan(tok: Tokenized, batch_size: int, bucket: bool,
               buckets: Sequence[int] | None) -> Iterator[tuple[np.ndarray, int]]:
    """(rows, padded length) of each evaluation batch."""
    sizes = bucket_sizes(tok.max_seq_length, buckets) if bucket else (tok.max_seq_length,)
    order = np.argsort(tok.lengths, kind="stable") if bucket else np.arange(len(tok))
    for start in range(0, len(tok), batch_size):
        rows = order[start:start + batch_size]
        yield rows, _batch_length(tok, rows, sizes)


# --------------------------------------------------------------------------------------------
# Prefetching
# --------------------------------------------------------------------------------------------

_ITEM, _END, _ERROR = range(3)


def _put(q: queue.Queue, item: tuple[int, Any], stop: threading.Event) -> bool:
    """Blocking put that gives up once ``stop`` is set; returns whether the item was queued."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _prefetch_worker(iterator: Iterator, place_fn: Callable | None, q: queue.Queue,
                     stop: threading.Event) -> None:
    # Holds no reference to the Prefetcher, so dropping the Prefetcher ends this thread.
    try:
        for item in iterator:
            if not _put(q, (_ITEM, place_fn(item) if place_fn else item), stop):
                return
        _put(q, (_END, None), stop)
    except BaseException as err:  # handed to the consumer, which re-raises it
        _put(q, (_ERROR, err), stop)


class Prefetcher(Iterator[Any]):
    """Iterates ``iterator`` in a background thread, ``size`` items (after ``place_fn``) ahead.

    Exceptions of the worker re-raise in the consumer; ``close()`` (or leaving a ``with``
    block, or dropping the object) stops the worker.
    """

    def __init__(self, iterator: Iterable, place_fn: Callable | None = None, size: int = 2):
        self._stop = threading.Event()  # first: __del__ needs it even if __init__ raises
        if size < 1:
            raise ValueError(f"prefetch size must be >= 1, got {size}")
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._done = False
        self._thread = threading.Thread(
            target=_prefetch_worker, args=(iter(iterator), place_fn, self._queue, self._stop),
            name="pkd_jax-prefetch", daemon=True)
        self._thread.start()

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == _ITEM:
            return value
        self.close()
        if kind == _ERROR:
            raise value
        raise StopIteration

    def close(self) -> None:
        self._done = True
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self._stop.set()


def prefetch(iterator: Iterable, place_fn: Callable | None = None, size: int = 2) -> Prefetcher:
    """Background prefetching of ``iterator``, applying ``place_fn`` (e.g. ``jax.device_put``)."""
    return Prefetcher(iterator, place_fn, size)

