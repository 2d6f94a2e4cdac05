"""Suite efficiency: the paper's parameter and inference-time table (BERT_12/6/3 by default)."""

from __future__ import annotations

import argparse
import math
from typing import Any

import jax
from flax import nnx

from benchmarks.common import (Bench, ModelSpec, build_model, forward_flops, log, resolve_model,
                               synthetic_batch, target)
from pkd_jax import data, partitioning, steps, timing
from pkd_jax.bert import param_count

# Speed-ups of the shallower models over the deepest (the paper's table); reported, never asserted.
INFERENCE_SPEEDUP_TARGETS = {(12, 6): 1.95, (12, 3): 3.8}


def efficiency_layers(args: argparse.Namespace, spec: ModelSpec) -> list[int]:
    if args.layers:
        return sorted({int(x) for x in args.layers.split(",")}, reverse=True)
    n = spec.teacher_layers
    return sorted({n, math.ceil(n / 2), math.ceil(n / 4)}, reverse=True)


def run_efficiency(b: Bench) -> list[dict[str, Any]]:
    args = b.args
    spec = resolve_model(args.model or "bert-base", args.teacher_layers)
    batch_size = args.batch_size or 128  # the paper's table
    partitioning.check_batch_size(batch_size, b.mesh)
    batch = partitioning.shard_batch(
        synthetic_batch(spec.config, batch_size, args.seq_len), b.mesh)
    inputs = {k: batch[k] for k in data.MODEL_INPUTS}
    lines = []
    for layers in efficiency_layers(args, spec):
        log(f"efficiency: {spec.name} BERT_{layers}")
        model = build_model(spec, layers, b.dtype, pretrained=False)
        graphdef, params = nnx.split(model, nnx.Param)
        params = partitioning.place_state(params, b.mesh)
        infer, compile_s = timing.compile_ahead(jax.jit(steps.make_logits_fn(graphdef)), params, inputs)
        times = timing.measure(lambda: infer(params, inputs), warmup=args.warmup, repeats=args.repeats)
        line = b.step_line("efficiency", f"inference_bert_{layers}", times, batch_size,
                           forward_flops(spec.config, layers, args.seq_len), framework="jax",
                           model=spec.name, layers=layers, compile_s=compile_s,
                           params_total=param_count(model),
                           params_no_embeddings=param_count(model, embeddings=False),
                           **b.profile("efficiency", f"inference_bert_{layers}",
                                       lambda: infer(params, inputs)))
        lines.append(line)
    deepest = lines[0]
    for line in lines:
        line["speedup"] = deepest["step_s_median"] / line["step_s_median"]
        goal = INFERENCE_SPEEDUP_TARGETS.get((deepest["layers"], line["layers"]))
        if goal:
            line["targets"] = [target("speedup", line["speedup"], ">=", goal)]
        b.emit(line)
    return lines
