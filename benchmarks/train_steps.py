"""Suites train and torch: the project's jitted training steps, and the PyTorch peer beside them."""

from __future__ import annotations

import argparse
from typing import Any, Iterable

from flax import nnx

from benchmarks import torch_peer
from benchmarks.common import (ALPHA, BETA, TEMPERATURE, Bench, ModelSpec, build_model, default_model, log,
                               pkd_layer_map, resolve_model, student_attention_dropout, student_depth,
                               student_overrides, synthetic_batch, target, train_flops)
from pkd_jax import optim, partitioning, steps, timing

# Targets of the project (reported next to the figures, never asserted).
CACHED_OVER_ONLINE_TARGET = 0.65
ACCELERATOR_MFU_TARGET = 0.5


def teacher_modes(args: argparse.Namespace) -> list[str]:
    return ["online", "cached"] if args.teacher == "both" else [args.teacher]


def run_jax_steps(b: Bench, spec: ModelSpec, kinds: Iterable[str]) -> list[dict[str, Any]]:
    """Time the project's steps; `kinds` among finetune, pkd_online, pkd_cached."""
    args = b.args
    k, n = student_depth(args, spec), spec.teacher_layers
    layer_map = pkd_layer_map(n, k)
    batch_size = args.batch_size or (256 if b.accelerator else 32)  # the targets' batches
    partitioning.check_batch_size(batch_size, b.mesh)
    tx = optim.make_optimizer(learning_rate=2e-5, total_steps=10_000, warmup_steps=100)
    graphdef, state = steps.create_train_state(
        build_model(spec, k, b.dtype, pretrained=True, **student_overrides(args)), tx, seed=0,
        alpha=ALPHA, beta=BETA, temperature=TEMPERATURE)
    state = partitioning.place_state(state, b.mesh)
    teacher_graphdef = teacher_params = None
    if "pkd_online" in kinds:
        teacher_graphdef, teacher_params = nnx.split(
            build_model(spec, n, b.dtype, pretrained=True, seed=1), nnx.Param)
        teacher_params = partitioning.place_state(teacher_params, b.mesh)
    batch = partitioning.shard_batch(synthetic_batch(spec.config, batch_size, args.seq_len,
                                                     cached_layers=len(layer_map)), b.mesh)
    common = dict(framework="jax", model=spec.name, teacher_layers=n, student_layers=k,
                  attention_probs_dropout_prob=student_attention_dropout(spec, args))
    plans = []  # (kind, jitted step, its arguments before the batch)
    for kind in kinds:
        if kind == "finetune":
            step = steps.make_finetune_step(graphdef, tx)
            extra: tuple = ()
        else:
            online = kind == "pkd_online"
            step = steps.make_distill_step(graphdef, tx, layer_map=layer_map,
                                           teacher_graphdef=teacher_graphdef if online else None)
            extra = (teacher_params if online else None,)
        plans.append((kind, steps.compile_step(step, state, b.mesh), extra))
    log(f"train: compiling {', '.join(kind for kind, _, _ in plans)} side by side")
    programs = timing.compile_ahead_all([(jitted, (state, *extra, batch)) for _, jitted, extra in plans])
    lines = []
    for (kind, _, extra), (compiled, compile_s) in zip(plans, programs):
        log(f"train: jax {kind} {spec.name} {n}->{k}, batch {batch_size}")
        chain = [state]  # the state is donated: each call consumes the previous call's

        def once():
            chain[0], metrics = compiled(chain[0], *extra, batch)
            return chain[0], metrics

        times = timing.measure(once, warmup=args.warmup, repeats=args.repeats)
        trace = b.profile("train", kind, once)
        state = chain[0]
        flops = train_flops(spec.config, k, n if kind == "pkd_online" else None, args.seq_len)
        lines.append(b.step_line("train", kind, times, batch_size, flops, compile_s=compile_s,
                                 **common, **trace))
    _add_train_targets(b, lines)
    return [b.emit(line) for line in lines]


def _add_train_targets(b: Bench, lines: list[dict[str, Any]]) -> None:
    by_name = {line["name"]: line for line in lines}
    online, cached = by_name.get("pkd_online"), by_name.get("pkd_cached")
    if online and b.accelerator:
        online["targets"] = [target("mfu", online["mfu"], ">=", ACCELERATOR_MFU_TARGET,
                                    where="H100, BERT-base 12->6, bf16, batch 256")]
    if online and cached:
        ratio = cached["step_s_median"] / online["step_s_median"]
        cached["vs_online_step_time"] = ratio
        cached["targets"] = [target("cached/online step time", ratio, "<=",
                                    CACHED_OVER_ONLINE_TARGET)]


def run_train(b: Bench) -> list[dict[str, Any]]:
    spec = resolve_model(b.args.model or default_model(b), b.args.teacher_layers)
    kinds = ["finetune"] + [f"pkd_{mode}" for mode in teacher_modes(b.args)]
    lines = run_jax_steps(b, spec, kinds)
    if torch_peer.torch_available():
        lines += torch_peer.run_torch_peers(b, spec, lines)
    else:
        log("train: torch is not importable; no PyTorch peer")
    return lines


def run_torch(b: Bench) -> list[dict[str, Any]]:
    if not torch_peer.torch_available():
        raise SystemExit("the torch suite needs torch and transformers (requirements-test.txt)")
    spec = resolve_model(b.args.model or default_model(b), b.args.teacher_layers)
    lines = run_jax_steps(b, spec, [f"pkd_{mode}" for mode in teacher_modes(b.args)])
    return lines + torch_peer.run_torch_peers(b, spec, lines)
