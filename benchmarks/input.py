"""Suite input: tokenisation and host batches against the examples/s of the step they feed."""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any

import jax

from benchmarks.common import Bench, default_model, log, resolve_model, target
from pkd_jax import checkpoints, data, partitioning, timing


def _rate_line(b: Bench, name: str, seconds: list[float], examples: int,
               step: dict[str, Any], with_target: bool, **fields) -> dict[str, Any]:
    median = statistics.median(seconds)
    line = {"suite": "input", "name": name, **fields, "seconds_median": median,
            "repeats": len(seconds), "examples": examples, "examples_per_s": examples / median,
            "step_name": step["name"], "step_examples_per_s": step["examples_per_s"]}
    line["headroom"] = line["examples_per_s"] / step["examples_per_s"]
    if with_target:
        line["targets"] = [target("headroom", line["headroom"], ">=", 1.0)]
    return b.emit(line)


def run_input(b: Bench, step: dict[str, Any]) -> list[dict[str, Any]]:
    """Tokenisation and host batches against `step`, the line of the step they feed."""
    args = b.args
    spec = resolve_model(args.model or default_model(b), args.teacher_layers)
    tokenizer = checkpoints.load_tokenizer(spec.tokenizer_source)
    dataset = data.load_split(args.task, "train", glue_dir=args.glue_dir)
    if args.max_examples:
        dataset = dataset.select(range(min(args.max_examples, len(dataset))))
    n = len(dataset)
    common = dict(task=args.task, seq_len=args.seq_len, model=spec.name)
    log(f"input: tokenising {args.task} train ({n} examples)")
    fresh, cached = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache_dir:  # fresh: nothing cached yet
            start = time.perf_counter()
            tok = data.tokenize(dataset, tokenizer, args.seq_len, cache_dir=cache_dir)
            fresh.append(time.perf_counter() - start)
            start = time.perf_counter()
            data.tokenize(dataset, tokenizer, args.seq_len, cache_dir=cache_dir)
            cached.append(time.perf_counter() - start)
    lines = [_rate_line(b, "tokenize", fresh, n, step, False, **common),
             _rate_line(b, "tokenize_cached", cached, n, step, False, **common)]

    batch_size = step["batch_size"]
    batches = data.train_batches(tok, batch_size, seed=0)
    per_chunk = 20  # batches per timed chunk: one batch alone is too short to time

    def host_chunk():
        for _ in range(per_chunk):
            next(batches)

    def device_chunk():
        return [partitioning.shard_batch(next(batches), b.mesh) for _ in range(per_chunk)]

    log(f"input: host batches of {batch_size}")
    for name, chunk, sync in (("host_batches", host_chunk, lambda _: None),
                              ("host_batches_to_device", device_chunk, jax.block_until_ready)):
        times = timing.measure(chunk, warmup=1, repeats=args.repeats, sync=sync)
        lines.append(_rate_line(b, name, times, per_chunk * batch_size, step, True,
                                batch_size=batch_size, **common))
    return lines
