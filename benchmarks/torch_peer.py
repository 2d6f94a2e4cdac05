"""The PyTorch peer of the PKD step: the same loss, optimizer and shapes in `transformers`.

torch is imported only inside these functions: a benchmark/test dependency, never a runtime one.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time
from typing import Any, Callable

import jax
import numpy as np

from benchmarks.common import (ALPHA, BETA, NUM_LABELS, TEMPERATURE, Bench, ModelSpec, log, pkd_layer_map,
                               student_attention_dropout, student_overrides, synthetic_batch, target)
from pkd_jax import checkpoints, data, timing


def torch_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def _torch_device():
    """The torch device matching JAX's, or None (no torch on TPU)."""
    import torch

    backend = jax.default_backend()
    if backend == "cpu":
        return torch.device("cpu")
    if backend == "gpu" and torch.cuda.is_available():
        return torch.device("cuda")
    return None


def _torch_models(spec: ModelSpec, teacher_layers: int, student_layers: int, device, **student_config):
    """(teacher in eval mode, student in train mode); student_config: the student's overrides."""
    import transformers

    transformers.logging.set_verbosity_error()  # the fresh classifier is expected
    transformers.logging.disable_progress_bar()
    cls = transformers.BertForSequenceClassification
    if spec.pretrained:
        folder = str(checkpoints.resolve(spec.name))
        teacher, student = (cls.from_pretrained(folder, num_labels=NUM_LABELS,
                                                num_hidden_layers=depth, **extra)
                            for depth, extra in ((teacher_layers, {}), (student_layers, student_config)))
    else:
        teacher, student = (
            cls(transformers.BertConfig(**dataclasses.replace(
                spec.config, num_hidden_layers=depth, **extra).to_hf_dict()))
            for depth, extra in ((teacher_layers, {}), (student_layers, student_config)))
    return teacher.to(device).eval(), student.to(device).train()


def make_torch_pkd_step(teacher, student, batch: dict[str, np.ndarray],
                        layer_map: tuple[int, ...], *, cached: bool, compile_: bool,
                        bf16: bool) -> Callable[[], Any]:
    """The PKD step in PyTorch: (1−α)CE + α·KD·T² + β·MSE of normalised [CLS], AdamW, clipping.

    The same loss as `losses.pkd_loss(mode="compat")`; the teacher runs under no_grad (or its
    outputs come from the batch), hidden_states[l] is the output of layer l. A call returns
    the loss before the update.
    """
    import torch
    import torch.nn.functional as F

    device = next(student.parameters()).device
    on_device = {k: torch.as_tensor(v, device=device) for k, v in batch.items()}
    inputs = {k: on_device[k].long() for k in data.MODEL_INPUTS}
    labels = on_device["labels"].long()
    student_index = range(1, len(layer_map) + 1)

    def cls_vectors(hidden_states, layers):  # [M, B, H]; None for M = 0 (a 1-layer student)
        return torch.stack([hidden_states[l][:, 0] for l in layers]) if layers else None

    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-5, weight_decay=0.01, eps=1e-6)

    def teacher_outputs():
        if cached:
            return on_device["teacher_logits"], on_device["teacher_features"].transpose(0, 1)
        with torch.no_grad():
            out = teacher(**inputs, output_hidden_states=True)
        return out.logits, cls_vectors(out.hidden_states, layer_map)

    def loss_fn():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            t_logits, t_cls = teacher_outputs()
            out = student(**inputs, output_hidden_states=True)
            s_cls = cls_vectors(out.hidden_states, student_index)
        logits, t_logits = out.logits.float(), t_logits.float()
        ce = F.cross_entropy(logits, labels)
        log_ps = F.log_softmax(logits / TEMPERATURE, -1)
        log_pt = F.log_softmax(t_logits / TEMPERATURE, -1)
        # KLDivLoss(reduction="mean"): the mean over batch × classes (the compat scaling).
        kd = (log_pt.exp() * (log_pt - log_ps)).mean() * TEMPERATURE**2
        pt = 0.0
        if layer_map:
            pt = F.mse_loss(F.normalize(s_cls.float(), dim=-1), F.normalize(t_cls.float(), dim=-1))
        return (1 - ALPHA) * ce + ALPHA * kd + BETA * pt

    loss_fn = torch.compile(loss_fn) if compile_ else loss_fn

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        return loss.detach()

    return step


def run_torch_peers(b: Bench, spec: ModelSpec, jax_lines: list[dict[str, Any]]
                    ) -> list[dict[str, Any]]:
    """The PyTorch step for every measured JAX PKD step, with the JAX/torch ratio."""
    import torch

    device = _torch_device()
    if device is None:
        log(f"torch: no torch device matches jax's {jax.default_backend()}; peer skipped")
        return []
    torch.set_num_threads(os.cpu_count() or 1)
    sync = (lambda _: torch.cuda.synchronize()) if device.type == "cuda" else (lambda _: None)
    compile_modes = {"auto": [False] + ([True] if device.type == "cuda" else []),
                     "on": [False, True], "off": [False]}[b.args.torch_compile]
    lines = []
    for ref in (line for line in jax_lines if line["name"].startswith("pkd_")):
        n, k, batch_size = ref["teacher_layers"], ref["student_layers"], ref["batch_size"]
        layer_map = pkd_layer_map(n, k)
        cached = ref["name"] == "pkd_cached"
        batch = synthetic_batch(spec.config, batch_size, b.args.seq_len,
                                cached_layers=len(layer_map))
        teacher, student = _torch_models(spec, n, k, device, **student_overrides(b.args))
        for compiled in compile_modes:
            variant = "compiled" if compiled else "eager"
            log(f"torch: {ref['name']} {variant} on {device}")
            step = make_torch_pkd_step(teacher, student, batch, layer_map, cached=cached,
                                       compile_=compiled, bf16=b.dtype == "bfloat16")
            start = time.perf_counter()  # the first call: torch.compile compiles in it
            step()
            sync(None)
            first_s = time.perf_counter() - start
            times = timing.measure(step, warmup=b.args.warmup, repeats=b.args.repeats, sync=sync)
            line = b.step_line("torch", f"torch_{ref['name']}_{variant}", times, batch_size,
                               ref["flops_per_example"], framework="torch", model=spec.name,
                               teacher_layers=n, student_layers=k, torch_device=str(device),
                               attention_probs_dropout_prob=student_attention_dropout(spec, b.args))
            if compiled:
                line["compile_s"] = first_s - line["step_s_median"]
            line["jax_name"] = ref["name"]
            line["jax_over_torch"] = ref["examples_per_s"] / line["examples_per_s"]
            if not cached:
                line["targets"] = [_peer_target(b, line["jax_over_torch"], compiled)]
            lines.append(b.emit(line))
    return lines


def _peer_target(b: Bench, ratio: float, compiled: bool) -> dict[str, Any]:
    if not b.accelerator:
        return target("jax/torch", ratio, ">=", 1.0, aim=1.3,
                      where="CPU, MiniLM 6->3, batch 32, seq 128")
    where = "H100, BERT-base 12->6, bf16, batch 256"
    if compiled:
        return target("jax/torch.compile", ratio, ">", 1.0, where=where)
    return target("jax/torch", ratio, ">=", 1.5, where=where)
