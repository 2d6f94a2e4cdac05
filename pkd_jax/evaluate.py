"""Dev-set evaluation with GLUE's metrics, and GLUE submission files for the test splits."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import jax
import numpy as np
from flax import nnx

from pkd_jax import checkpoints, data, metrics, partitioning, steps


def predict(logits_fn: Callable, params, tok: data.Tokenized, mesh, batch_size: int,
            bucket: bool = True) -> np.ndarray:
    """Logits [N, C] of every example, in the split's row order (`logits_fn(params, batch)`)."""
    def split(batch):
        return batch["index"], batch["weight"], partitioning.shard_batch(
            {k: batch[k] for k in data.MODEL_INPUTS}, mesh)

    outputs = []
    with data.prefetch(data.eval_batches(tok, batch_size, bucket=bucket), split) as batches:
        for index, weight, batch in batches:
            outputs.append((index, weight, logits_fn(params, batch)))  # dispatched; fetched below
    logits = None
    for index, weight, out in outputs:
        out = partitioning.to_host(out)
        if logits is None:
            logits = np.zeros((len(tok), out.shape[-1]), np.float32)
        real = weight > 0
        logits[index[real]] = out[real]
    return logits


def split_calls(logits_fn: steps.Precompiled, params, tok: data.Tokenized, mesh,
                batch_size: int) -> Iterator[tuple[steps.Precompiled, tuple]]:
    """`(logits_fn, example args)` for each batch shape of `tok`'s evaluation: what
    `steps.compile_all` compiles ahead of the loop."""
    for length in data.eval_lengths(tok, batch_size):
        inputs = {k: np.zeros((batch_size, length), np.int32) for k in data.MODEL_INPUTS}  # the shape counts
        if not logits_fn.has(inputs):
            yield logits_fn, (params, partitioning.shard_batch(inputs, mesh))


def scores(task: str, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's GLUE metrics of `logits`, plus "score": the main one (model selection)."""
    result = metrics.compute(task, metrics.predictions_from_logits(task, logits), labels)
    result["score"] = metrics.main_score(task, result)
    return result


def evaluate(logits_fn: Callable, params, tok: data.Tokenized, task: str, mesh,
             batch_size: int) -> dict[str, float]:
    """Dev metrics of one model (see `scores`)."""
    return scores(task, predict(logits_fn, params, tok, mesh, batch_size), tok.labels)


def predict_test(setup, model_dir: Path, out_dir: Path, lead: bool) -> list[str]:
    """GLUE submission files in `out_dir` from the model in `model_dir`, for every test split of
    the task (read and checked by `setup.prepare`, before training). Returns the paths."""
    from jax.experimental import multihost_utils

    config = setup.config
    multihost_utils.sync_global_devices("model exported")
    graphdef, params = nnx.split(checkpoints.load_pretrained(model_dir, dtype=setup.dtype), nnx.Param)
    logits_fn = steps.Precompiled(jax.jit(steps.make_logits_fn(graphdef)), "test predictions")
    params = partitioning.place_state(params, setup.mesh, setup.fsdp)
    steps.compile_all(call for tok in setup.test_toks.values()  # every split's shapes, side by side
                      for call in split_calls(logits_fn, params, tok, setup.mesh, config.eval_batch_size))
    written = []
    for split, tok in setup.test_toks.items():
        preds = metrics.predictions_from_logits(
            config.task, predict(logits_fn, params, tok, setup.mesh, config.eval_batch_size))
        if lead:
            written.append(str(data.write_glue_predictions(config.task, preds, tok.idx, out_dir, split=split)))
    return written
