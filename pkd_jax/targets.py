"""What a student is asked to match: a model's per-layer patient features on a sample of inputs,
how much they vary across inputs, and how alike two models' layers are.

A patient loss pulls the student's features toward the teacher's mapped layers. A layer whose
L2-normalised feature is nearly the same for every input (all-MiniLM-L6-v2's [CLS] below its
top layers: it was trained for mean pooling) is a constant target: the student learns nothing
about the input from it. `spread` measures that; `run.py` warns when a mapped layer falls below
`NEAR_CONSTANT`, and `python -m pkd_jax.advise` tabulates every layer and feature.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from pkd_jax import bert, data, partitioning

# Spread below which a layer's normalised features count as constant across inputs. Measured on
# the pretrained all-MiniLM-L6-v2 over 256 SST-2 / MRPC dev examples (2026-11-30): [CLS] 1e-5 to
# 1e-3 in layers 1-5 and 0.29 / 0.37 in layer 6; mean features 0.28 to 0.36 in layers 1-5. The
# threshold sits ten times above the largest constant-like value and 28 times below the smallest
# informative one.
NEAR_CONSTANT = 0.01


def layer_features(graphdef, params, tok: data.Tokenized, mesh, batch_size: int = 64,
                   limit: int = 256, bucket: bool = True) -> dict[str, np.ndarray]:
    """{"cls": [L, N, H], "mean": [L-1, N, H]} float32 of the first `limit` examples of `tok`
    (index l-1 is after layer l), from one deterministic forward pass per batch (bucket=False:
    batches of the full length, so one compilation)."""
    n = min(limit, len(tok))
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_size = min(batch_size, -(-n // shards) * shards)  # a small sample is not padded to a full batch

    @jax.jit
    def forward(params, inputs):
        out = bert.apply(graphdef, params, inputs)
        return out.cls, out.mean

    out = {kind: None for kind in bert.FEATURES}
    for batch in data.eval_batches(_first(tok, n), batch_size, bucket=bucket):
        inputs = partitioning.shard_batch({k: batch[k] for k in data.MODEL_INPUTS}, mesh)
        real = batch["weight"] > 0
        for kind, values in zip(bert.FEATURES, forward(params, inputs)):
            values = partitioning.to_host(values)
            if out[kind] is None:
                out[kind] = np.zeros((values.shape[0], n, values.shape[-1]), np.float32)
            out[kind][:, batch["index"][real]] = values[:, real]
    return out


def _first(tok: data.Tokenized, n: int) -> data.Tokenized:
    return dataclasses.replace(tok, input_ids=tok.input_ids[:n], token_type_ids=tok.token_type_ids[:n],
                               lengths=tok.lengths[:n], labels=tok.labels[:n], idx=tok.idx[:n])


def spread(features: np.ndarray) -> np.ndarray:
    """[..., N, H] -> [...]: the mean squared distance of the L2-normalised rows to their mean, in
    [0, 1]: 0 when every input gives the same direction, 1 for directions spread evenly."""
    x = np.asarray(features, np.float64)
    unit = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return ((unit - unit.mean(-2, keepdims=True)) ** 2).sum(-1).mean(-1)


def warn_if_constant(mapped: np.ndarray, layer_map, kind: str, log) -> list[int]:
    """Log a warning naming the mapped teacher layers whose features (`mapped`: [M, N, H], in
    `layer_map` order) are near-constant; returns those 1-indexed layers."""
    values = spread(mapped)
    constant = [layer for layer, v in zip(layer_map, values) if v < NEAR_CONSTANT]
    if constant:
        log.warning("the teacher's %s features of mapped layer(s) %s hardly vary across inputs (spread %s < %g): "
                    "a patient loss toward them teaches the student nothing about the input. Try "
                    "--config.patient_features=%s, another --config.strategy, or see python -m pkd_jax.advise",
                    kind, constant, ", ".join(f"{v:.2g}" for v in values if v < NEAR_CONSTANT), NEAR_CONSTANT,
                    "mean" if kind == "cls" else "cls")
    return constant
