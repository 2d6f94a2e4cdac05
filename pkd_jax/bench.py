"""Efficiency and throughput benchmarks: ``python -m pkd_jax.bench [SUITE] [--flags] [--json]``.

Suites (``all``, the default, runs efficiency, train and input in one process):

* ``efficiency``: the paper's table. Parameters (total and without embeddings) and inference
  time of BERT_12/6/3 (``--layers``) at batch 128, seq 128: ms per batch, examples/s and the
  speed-up over the deepest model. Random weights of the ``--model`` size (speed only).
* ``train``: the project's own jitted steps (``train.make_finetune_step`` /
  ``make_distill_step`` + ``train.compile_step`` on ``partitioning.make_mesh()``): fine-tuning the
  student, the PKD step with the teacher online and with cached teacher outputs; plus the
  PyTorch peer when torch is importable.
* ``torch``: the PKD step(s) in JAX and the same step written with PyTorch ``transformers``
  (eager; ``torch.compile`` too when CUDA is there), on the same device and shapes, and the ratio.
* ``input``: tokenisation (uncached and cached) and host batch assembly examples/s against the
  examples/s the step consumes (the headroom must exceed 1: the accelerator must never wait).
* ``sweep`` (not in ``all``): ``--students`` G students (BERT_3 by default) trained by one
  vmapped chunk step (``pkd_jax.sweep``, cached teacher outputs, every student with other α/β/T
  and learning rate) against the same G students trained one after another (G calls of the
  single-student step), in students·examples/s; plus the chunk size ``sweep`` would pick here.

Timing: the step is compiled ahead of time (``compile_s``, reported apart), run ``--warmup``
times untimed, then ``--repeats`` times, each call ending in ``jax.block_until_ready``; figures
are medians. The batch stays on the device and the train state is chained (donated) through
the calls, as in training.

Model FLOPs (the MFU convention: analytic, not XLA's count). One forward pass of a BERT with L
layers, hidden H, intermediate I, sequence S and C classes costs per example::

    F(L) = (L−1)·(2·S·(4H² + 2H·I) + 4·S²·H) + 2·S·2H² + 2·(2H² + 2H·I) + 4·S·H + 2H² + 2HC

(the Q, K, V, output and two FFN matmuls; QKᵀ and attention·V; in the top layer, which computes
only the [CLS] row (``bert.BertEncoder``), the keys and values of every row and the rest of one
row; the pooler and the classifier; embedding lookups, LayerNorm, softmax and the losses are
not counted). A training step costs 3·F(student) (forward + backward), plus F(teacher) when the
teacher runs online; inference costs F. ``tflops_per_s`` = FLOPs per step / median step time, ``mfu`` = that / the device's peak:
dense bfloat16 peaks from a table keyed by the device kind on GPU/TPU (also for float32 runs,
``peak_dtype`` says so), or on CPU the measured matmul peak of the machine in the run's dtype.

``--profile DIR``: after timing, each JAX step runs ``--repeats`` more times under
``jax.profiler.trace`` into ``DIR/<suite>-<name>`` (the timings exclude the profiler): open it with
TensorBoard's or XProf's profile tool, or its ``perfetto_trace.json.gz`` in ui.perfetto.dev. A
trace lists every XLA op of the step with its time; ``XLA_FLAGS=--xla_dump_to=DIR`` adds the
optimised HLO that names them. The line of a profiled step has ``trace_dir``.

Every JSON line carries ``suite``, ``name``, the shapes, ``device``, ``versions`` and ``date``;
step lines also ``step_s_median``, ``examples_per_s``, ``tflops_per_s``, ``mfu`` and, where the
project sets one, ``targets`` (value, target, ok); targets are reported, never asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax
from flax import nnx

from pkd_jax import checkpoints, data, losses, optim, partitioning, train
from pkd_jax.bert import BertConfig, BertForSequenceClassification, param_count

SUITES = ("efficiency", "train", "torch", "input", "sweep", "all")
NUM_LABELS = 2
# PKD hyper-parameters of the benchmarked step; they do not change its cost.
ALPHA, BETA, TEMPERATURE = 0.5, 100.0, 5.0
# Sizes with random weights. bert-tiny (Turc et al. 2019) keeps smoke tests fast.
RANDOM_SIZES = {
    "bert-tiny": BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=512, num_labels=NUM_LABELS),
    "bert-base": BertConfig(num_labels=NUM_LABELS),
    "bert-large": BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                             intermediate_size=4096, num_labels=NUM_LABELS),
}
# Dense bfloat16 peaks in TFLOP/s by a substring of jax's device_kind; the first match wins,
# so more specific names come first.
PEAK_TFLOPS_BF16 = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
    ("TPU v6 lite", 918.0), ("TPU v6e", 918.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0),
    ("TPU v5p", 459.0), ("TPU v5", 459.0), ("TPU v4", 275.0), ("TPU v3", 123.0),
)
# Targets of the project (reported next to the figures, never asserted).
INFERENCE_SPEEDUP_TARGETS = {(12, 6): 1.95, (12, 3): 3.8}
CACHED_OVER_ONLINE_TARGET = 0.65
SWEEP_SPEEDUP_TARGET = 2.0  # vmapped chunk over one-after-another, BERT_3 students on an accelerator
ACCELERATOR_MFU_TARGET = 0.5


# ============================================================================================
# FLOPs and peaks
# ============================================================================================


def forward_flops(config: BertConfig, layers: int, seq_len: int) -> float:
    """Model FLOPs of one forward pass per example (module docstring)."""
    h, i, s, c = config.hidden_size, config.intermediate_size, seq_len, config.num_labels
    layer = 2 * s * (4 * h * h + 2 * h * i) + 4 * s * s * h
    top = 2 * s * 2 * h * h + 2 * (2 * h * h + 2 * h * i) + 4 * s * h  # keys and values; [CLS] row
    return float((layers - 1) * layer + top + 2 * h * h + 2 * h * c)


def train_flops(config: BertConfig, student_layers: int, teacher_layers: int | None,
                seq_len: int) -> float:
    """Per example: 3 student forwards (fwd + bwd), plus the online teacher's forward."""
    flops = 3 * forward_flops(config, student_layers, seq_len)
    if teacher_layers is not None:
        flops += forward_flops(config, teacher_layers, seq_len)
    return flops


@dataclasses.dataclass(frozen=True)
class Peak:
    tflops: float | None
    source: str  # "table", "measured", "flag" or "unknown"
    dtype: str


def table_peak(device_kind: str) -> float | None:
    for key, tflops in PEAK_TFLOPS_BF16:
        if key.lower() in device_kind.lower():
            return tflops
    return None


@functools.cache
def measured_matmul_peak(dtype: str, n: int = 2048, repeats: int = 10) -> float:
    """The machine's matmul TFLOP/s: median of a jitted n×n @ n×n product."""
    a = jnp.ones((n, n), dtype)
    matmul = jax.jit(jnp.matmul)
    times = _measure(lambda: matmul(a, a), warmup=2, repeats=repeats)
    return 2 * n**3 / statistics.median(times) / 1e12


def device_peak(dtype: str, override: float | None) -> Peak:
    if override:
        return Peak(override, "flag", dtype)
    if jax.default_backend() == "cpu":
        return Peak(measured_matmul_peak(dtype), "measured", dtype)
    tflops = table_peak(jax.devices()[0].device_kind)
    return Peak(tflops, "table" if tflops else "unknown", "bfloat16")


# ============================================================================================
# Timing and result lines
# ============================================================================================


def _measure(run_once: Callable[[], Any], *, warmup: int, repeats: int,
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


def _compile(jitted, *args) -> tuple[Any, float]:
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def _target(metric: str, value: float | None, op: str, target: float, *, aim: float | None = None,
            where: str | None = None) -> dict[str, Any]:
    ok = None if value is None else (value >= target if op == ">=" else
                                     value > target if op == ">" else value <= target)
    out = {"metric": metric, "value": value, "op": op, "target": target, "ok": ok}
    if aim is not None:
        out["aim"] = aim
    if where is not None:
        out["where"] = where
    return out


def versions() -> dict[str, str]:
    """Library versions; torch and transformers once a suite has imported them."""
    out = {"python": platform.python_version(), "jax": jax.__version__,
           "jaxlib": jaxlib.__version__, "flax": flax.__version__, "optax": optax.__version__,
           "numpy": np.__version__}
    for name in ("torch", "transformers"):
        if name in sys.modules:
            out[name] = sys.modules[name].__version__
    return out


def device_info() -> dict[str, Any]:
    dev = jax.devices()[0]
    return {"platform": dev.platform, "kind": dev.device_kind, "count": jax.device_count(),
            "host_cpus": os.cpu_count()}


@dataclasses.dataclass
class Bench:
    """Resolved settings shared by the suites, and the lines emitted so far."""

    args: argparse.Namespace
    mesh: Any
    dtype: str
    peak: Peak
    results: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def accelerator(self) -> bool:
        return jax.default_backend() != "cpu"

    def step_line(self, suite: str, name: str, times: list[float], batch_size: int,
                  flops_per_example: float, **fields) -> dict[str, Any]:
        median = statistics.median(times)
        tflops = flops_per_example * batch_size / median / 1e12
        return {
            "suite": suite, "name": name, **fields,
            "batch_size": batch_size, "seq_len": self.args.seq_len, "dtype": self.dtype,
            "step_s_median": median, "step_s_min": min(times), "step_s_max": max(times),
            "repeats": len(times), "warmup": self.args.warmup,
            "examples_per_s": batch_size / median,
            "flops_per_example": flops_per_example, "tflops_per_s": tflops,
            "peak_tflops": self.peak.tflops, "peak_source": self.peak.source,
            "peak_dtype": self.peak.dtype,
            "mfu": tflops / self.peak.tflops if self.peak.tflops else None,
        }

    def profile(self, suite: str, name: str, run_once: Callable[[], Any],
                sync: Callable[[Any], Any] = jax.block_until_ready) -> dict[str, str]:
        """With --profile: trace --repeats more calls; the field to add to the step's line."""
        if self.args.profile is None:
            return {}
        trace_dir = self.args.profile / f"{suite}-{name}"
        with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
            for _ in range(self.args.repeats):
                sync(run_once())
        _log(f"profile of {suite} {name}: {trace_dir}")
        return {"trace_dir": str(trace_dir)}

    def emit(self, line: dict[str, Any]) -> dict[str, Any]:
        line.update(device=device_info(), versions=versions(),
                    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        self.results.append(line)
        if self.args.json:
            print(json.dumps(line), flush=True)
        return line


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ============================================================================================
# Models and batches
# ============================================================================================


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    config: BertConfig  # at teacher depth
    pretrained: bool  # real weights (a HF folder or known name) rather than random ones

    @property
    def teacher_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def tokenizer_source(self) -> str:
        # Random sizes borrow the packaged uncased BERT vocabulary (the same 30522 word pieces).
        return self.name if self.pretrained else "minilm-l6"


def resolve_model(name: str, teacher_layers: int | None) -> ModelSpec:
    if name in RANDOM_SIZES:
        config = RANDOM_SIZES[name]
        if teacher_layers:
            config = dataclasses.replace(config, num_hidden_layers=teacher_layers)
        return ModelSpec(name, config, pretrained=False)
    config = checkpoints.load_config(name, num_labels=NUM_LABELS, num_layers=teacher_layers)
    return ModelSpec(name, config, pretrained=True)


def build_model(spec: ModelSpec, layers: int, dtype: str, *, pretrained: bool,
                seed: int = 0) -> BertForSequenceClassification:
    if pretrained and spec.pretrained:
        return checkpoints.load_pretrained(spec.name, num_labels=NUM_LABELS, num_layers=layers,
                                           dtype=jnp.dtype(dtype), seed=seed)
    config = dataclasses.replace(spec.config, num_hidden_layers=layers)
    return BertForSequenceClassification(config, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(seed))


def synthetic_batch(config: BertConfig, batch_size: int, seq_len: int, *,
                    cached_layers: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Full-length random token ids (the cost of a padded bucket); teacher outputs when cached."""
    rng = np.random.default_rng(seed)
    batch = {
        "input_ids": rng.integers(1000, config.vocab_size, (batch_size, seq_len), dtype=np.int32),
        "token_type_ids": np.zeros((batch_size, seq_len), np.int32),
        "attention_mask": np.ones((batch_size, seq_len), np.int32),
        "labels": rng.integers(0, NUM_LABELS, batch_size, dtype=np.int32),
    }
    if cached_layers is not None:
        batch["teacher_logits"] = rng.normal(size=(batch_size, NUM_LABELS)).astype(np.float32)
        batch["teacher_cls"] = rng.normal(
            size=(batch_size, cached_layers, config.hidden_size)).astype(np.float32)
    return batch


def student_depth(args: argparse.Namespace, spec: ModelSpec) -> int:
    return args.student_layers or max(1, spec.teacher_layers // 2)


def pkd_layer_map(teacher: int, student: int) -> tuple[int, ...]:
    return losses.layer_map(teacher, student, "skip" if teacher % student == 0 else "last")


# ============================================================================================
# Suite: efficiency (the paper's parameter / inference-time table)
# ============================================================================================


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
    inputs = {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    lines = []
    for layers in efficiency_layers(args, spec):
        _log(f"efficiency: {spec.name} BERT_{layers}")
        model = build_model(spec, layers, b.dtype, pretrained=False)
        graphdef, params = nnx.split(model, nnx.Param)
        params = train.place(params, b.mesh)
        infer, compile_s = _compile(jax.jit(train.make_eval_step(graphdef)), params, inputs)
        times = _measure(lambda: infer(params, inputs), warmup=args.warmup, repeats=args.repeats)
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
        target = INFERENCE_SPEEDUP_TARGETS.get((deepest["layers"], line["layers"]))
        if target:
            line["targets"] = [_target("speedup", line["speedup"], ">=", target)]
        b.emit(line)
    return lines


# ============================================================================================
# Suite: train (JAX steps) and torch (the PyTorch peer)
# ============================================================================================


def _teacher_modes(args: argparse.Namespace) -> list[str]:
    return ["online", "cached"] if args.teacher == "both" else [args.teacher]


def run_jax_steps(b: Bench, spec: ModelSpec, kinds: Iterable[str]) -> list[dict[str, Any]]:
    """Time the project's steps; `kinds` among finetune, pkd_online, pkd_cached."""
    args = b.args
    k, n = student_depth(args, spec), spec.teacher_layers
    layer_map = pkd_layer_map(n, k)
    batch_size = args.batch_size or (256 if b.accelerator else 32)  # the targets' batches
    partitioning.check_batch_size(batch_size, b.mesh)
    tx = optim.make_optimizer(learning_rate=2e-5, total_steps=10_000, warmup_steps=100)
    graphdef, state = train.create_train_state(
        build_model(spec, k, b.dtype, pretrained=True), tx, seed=0,
        alpha=ALPHA, beta=BETA, temperature=TEMPERATURE)
    state = train.place(state, b.mesh)
    teacher_graphdef = teacher_params = None
    if "pkd_online" in kinds:
        teacher_graphdef, teacher_params = nnx.split(
            build_model(spec, n, b.dtype, pretrained=True, seed=1), nnx.Param)
        teacher_params = train.place(teacher_params, b.mesh)
    batch = partitioning.shard_batch(synthetic_batch(spec.config, batch_size, args.seq_len,
                                                     cached_layers=len(layer_map)), b.mesh)
    common = dict(framework="jax", model=spec.name, teacher_layers=n, student_layers=k)
    lines = []
    for kind in kinds:
        _log(f"train: jax {kind} {spec.name} {n}->{k}, batch {batch_size}")
        if kind == "finetune":
            step = train.make_finetune_step(graphdef, tx)
            extra: tuple = ()
        else:
            online = kind == "pkd_online"
            step = train.make_distill_step(graphdef, tx, layer_map=layer_map,
                                           teacher_graphdef=teacher_graphdef if online else None)
            extra = (teacher_params if online else None,)
        jitted = train.compile_step(step, state, b.mesh)
        compiled, compile_s = _compile(jitted, state, *extra, batch)
        chain = [state]  # the state is donated: each call consumes the previous call's

        def once():
            chain[0], metrics = compiled(chain[0], *extra, batch)
            return chain[0], metrics

        times = _measure(once, warmup=args.warmup, repeats=args.repeats)
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
        online["targets"] = [_target("mfu", online["mfu"], ">=", ACCELERATOR_MFU_TARGET,
                                     where="H100, BERT-base 12->6, bf16, batch 256")]
    if online and cached:
        ratio = cached["step_s_median"] / online["step_s_median"]
        cached["vs_online_step_time"] = ratio
        cached["targets"] = [_target("cached/online step time", ratio, "<=",
                                     CACHED_OVER_ONLINE_TARGET)]


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


def _torch_models(spec: ModelSpec, teacher_layers: int, student_layers: int, device):
    import transformers

    transformers.logging.set_verbosity_error()  # the fresh classifier is expected
    transformers.logging.disable_progress_bar()
    cls = transformers.BertForSequenceClassification
    if spec.pretrained:
        folder = str(checkpoints.resolve(spec.name))
        teacher, student = (cls.from_pretrained(folder, num_labels=NUM_LABELS,
                                                num_hidden_layers=depth)
                            for depth in (teacher_layers, student_layers))
    else:
        teacher, student = (
            cls(transformers.BertConfig(**dataclasses.replace(
                spec.config, num_hidden_layers=depth).to_hf_dict()))
            for depth in (teacher_layers, student_layers))
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
    inputs = {k: on_device[k].long() for k in ("input_ids", "token_type_ids", "attention_mask")}
    labels = on_device["labels"].long()
    student_index = range(1, len(layer_map) + 1)

    def cls_vectors(hidden_states, layers):  # [M, B, H]; None for M = 0 (a 1-layer student)
        return torch.stack([hidden_states[l][:, 0] for l in layers]) if layers else None

    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-5, weight_decay=0.01, eps=1e-6)

    def teacher_outputs():
        if cached:
            return on_device["teacher_logits"], on_device["teacher_cls"].transpose(0, 1)
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
        _log(f"torch: no torch device matches jax's {jax.default_backend()}; peer skipped")
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
        teacher, student = _torch_models(spec, n, k, device)
        for compiled in compile_modes:
            variant = "compiled" if compiled else "eager"
            _log(f"torch: {ref['name']} {variant} on {device}")
            step = make_torch_pkd_step(teacher, student, batch, layer_map, cached=cached,
                                       compile_=compiled, bf16=b.dtype == "bfloat16")
            start = time.perf_counter()
            step()
            sync(None)
            first_s = time.perf_counter() - start
            times = _measure(step, warmup=b.args.warmup, repeats=b.args.repeats, sync=sync)
            line = b.step_line("torch", f"torch_{ref['name']}_{variant}", times, batch_size,
                               ref["flops_per_example"], framework="torch", model=spec.name,
                               teacher_layers=n, student_layers=k, torch_device=str(device))
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
        return _target("jax/torch", ratio, ">=", 1.0, aim=1.3,
                       where="CPU, MiniLM 6->3, batch 32, seq 128")
    where = "H100, BERT-base 12->6, bf16, batch 256"
    if compiled:
        return _target("jax/torch.compile", ratio, ">", 1.0, where=where)
    return _target("jax/torch", ratio, ">=", 1.5, where=where)


def default_model(b: Bench) -> str:
    return "bert-base" if b.accelerator else "minilm-l6"


def run_train(b: Bench) -> list[dict[str, Any]]:
    spec = resolve_model(b.args.model or default_model(b), b.args.teacher_layers)
    kinds = ["finetune"] + [f"pkd_{mode}" for mode in _teacher_modes(b.args)]
    lines = run_jax_steps(b, spec, kinds)
    if torch_available():
        lines += run_torch_peers(b, spec, lines)
    else:
        _log("train: torch is not importable; no PyTorch peer")
    return lines


def run_torch(b: Bench) -> list[dict[str, Any]]:
    if not torch_available():
        raise SystemExit("the torch suite needs torch and transformers (requirements-test.txt)")
    spec = resolve_model(b.args.model or default_model(b), b.args.teacher_layers)
    lines = run_jax_steps(b, spec, [f"pkd_{mode}" for mode in _teacher_modes(b.args)])
    return lines + run_torch_peers(b, spec, lines)


# ============================================================================================
# Suite: input pipeline
# ============================================================================================


def _rate_line(b: Bench, name: str, seconds: list[float], examples: int,
               step: dict[str, Any], target: bool, **fields) -> dict[str, Any]:
    median = statistics.median(seconds)
    line = {"suite": "input", "name": name, **fields, "seconds_median": median,
            "repeats": len(seconds), "examples": examples, "examples_per_s": examples / median,
            "step_name": step["name"], "step_examples_per_s": step["examples_per_s"]}
    line["headroom"] = line["examples_per_s"] / step["examples_per_s"]
    if target:
        line["targets"] = [_target("headroom", line["headroom"], ">=", 1.0)]
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
    _log(f"input: tokenising {args.task} train ({n} examples)")
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

    _log(f"input: host batches of {batch_size}")
    for name, chunk, sync in (("host_batches", host_chunk, lambda _: None),
                              ("host_batches_to_device", device_chunk, jax.block_until_ready)):
        times = _measure(chunk, warmup=1, repeats=args.repeats, sync=sync)
        lines.append(_rate_line(b, name, times, per_chunk * batch_size, step, True,
                                batch_size=batch_size, **common))
    return lines


# ============================================================================================
# Suite: sweep (vmapped students against students one after another)
# ============================================================================================


def _sweep_points(g: int) -> list[Any]:
    """G grid points cycling through the paper's grid, so every student differs."""
    from pkd_jax import sweep

    grid = [(t, a, b) for t in (5.0, 10.0, 20.0) for a in (0.2, 0.5, 0.7) for b in (10.0, 100.0, 500.0, 1000.0)]
    return [sweep.Point(i, 0, (1e-5, 2e-5, 5e-5)[i % 3], *grid[i % len(grid)]) for i in range(g)]


def run_sweep(b: Bench) -> list[dict[str, Any]]:
    """G students: one vmapped chunk step against G single-student steps, same shapes and batch."""
    from pkd_jax import sweep

    args = b.args
    spec = resolve_model(args.model or default_model(b), args.teacher_layers)
    n = spec.teacher_layers
    k = args.student_layers or min(3, n)
    g = args.students or (8 if b.accelerator else 4)
    batch_size = args.batch_size or 32  # the paper's batch
    partitioning.check_batch_size(batch_size, b.mesh)
    layer_map = pkd_layer_map(n, k)
    tx = optim.make_optimizer(learning_rate=2e-5, total_steps=10_000, warmup_steps=100)
    model = build_model(spec, k, b.dtype, pretrained=True)
    graphdef, base = train.create_train_state(model, tx, seed=0)
    step = train.make_distill_step(graphdef, tx, layer_map=layer_map)
    batch = partitioning.shard_batch(synthetic_batch(spec.config, batch_size, args.seq_len,
                                                     cached_layers=len(layer_map)), b.mesh)
    flops = g * train_flops(spec.config, k, None, args.seq_len)  # per example of the shared batch
    common = dict(framework="jax", model=spec.name, teacher_layers=n, student_layers=k, students=g)

    _log(f"sweep: {g} vmapped {spec.name} students {n}->{k}, batch {batch_size}")
    stacked = sweep.stack_students(base, _sweep_points(g), b.mesh)
    compiled, compile_s = _compile(sweep.compile_students_step(step, stacked, b.mesh), stacked, None, batch)
    chain = [stacked]  # donated: each call consumes the previous call's state

    def chunk():
        chain[0], metrics = compiled(chain[0], None, batch)
        return metrics

    vmapped = b.step_line("sweep", "vmapped", _measure(chunk, warmup=args.warmup, repeats=args.repeats),
                          batch_size, flops, compile_s=compile_s, **common,
                          **b.profile("sweep", "vmapped", chunk))
    chain.clear()  # free the chunk's memory before the sequential students take theirs
    del stacked

    _log(f"sweep: the same {g} students one after another")
    states = [train.place(jax.tree.map(jnp.copy, base), b.mesh) for _ in range(g)]
    compiled, compile_s = _compile(train.compile_step(step, base, b.mesh), states[0], None, batch)

    def one_after_another():
        metrics = []
        for i in range(g):
            states[i], m = compiled(states[i], None, batch)
            metrics.append(m)
        return metrics

    sequential = b.step_line("sweep", "sequential", _measure(one_after_another, warmup=args.warmup,
                                                             repeats=args.repeats),
                             batch_size, flops, compile_s=compile_s, **common,
                             **b.profile("sweep", "sequential", one_after_another))
    states.clear()

    for line in (sequential, vmapped):
        line["students_examples_per_s"] = g * batch_size / line["step_s_median"]
    vmapped["speedup"] = sequential["step_s_median"] / vmapped["step_s_median"]
    if b.accelerator:
        vmapped["targets"] = [_target("vmapped/sequential students·examples/s", vmapped["speedup"], ">=",
                                      SWEEP_SPEEDUP_TARGET, where="accelerator, BERT_3 students, batch 32")]
    per_student = sweep.student_bytes(model.config, param_count(model), batch_size // b.mesh.devices.size,
                                      args.seq_len, jnp.dtype(b.dtype).itemsize)
    vmapped["auto_students_per_chunk"] = sweep.auto_chunk_size(per_student, sweep.device_memory_bytes(),
                                                               max_students=36, cpu=not b.accelerator)
    return [b.emit(line) for line in (sequential, vmapped)]


# ============================================================================================
# Human-readable tables
# ============================================================================================


def _targets_text(line: dict[str, Any]) -> str:
    parts = []
    for t in line.get("targets", []):
        status = "?" if t["ok"] is None else "ok" if t["ok"] else "MISS"
        aim = f" (aim {t['aim']:g})" if "aim" in t else ""
        where = f" [{t['where']}]" if "where" in t else ""
        parts.append(f"{t['metric']} {t['op']} {t['target']:g}{aim}: {status}{where}")
    return "; ".join(parts)


# (header, key, format, scale) per suite.
_COLUMNS = {
    "efficiency": [("model", "model", "", 1), ("layers", "layers", "d", 1),
                   ("params", "params_total", ",d", 1),
                   ("params w/o emb", "params_no_embeddings", ",d", 1),
                   ("ms/batch", "step_s_median", ".1f", 1e3),
                   ("examples/s", "examples_per_s", ".1f", 1), ("speed-up", "speedup", ".2f", 1),
                   ("TFLOP/s", "tflops_per_s", ".3f", 1), ("MFU", "mfu", ".1%", 1),
                   ("compile s", "compile_s", ".1f", 1)],
    "train": [("step", "name", "", 1), ("ms/step", "step_s_median", ".1f", 1e3),
              ("examples/s", "examples_per_s", ".1f", 1), ("TFLOP/s", "tflops_per_s", ".3f", 1),
              ("MFU", "mfu", ".1%", 1), ("jax/torch", "jax_over_torch", ".2f", 1),
              ("compile s", "compile_s", ".1f", 1)],
    "sweep": [("training", "name", "", 1), ("G", "students", "d", 1), ("ms/step", "step_s_median", ".1f", 1e3),
              ("students·ex/s", "students_examples_per_s", ".1f", 1), ("speed-up", "speedup", ".2f", 1),
              ("TFLOP/s", "tflops_per_s", ".3f", 1), ("MFU", "mfu", ".1%", 1),
              ("compile s", "compile_s", ".1f", 1), ("auto G", "auto_students_per_chunk", "d", 1)],
    "input": [("stage", "name", "", 1), ("examples/s", "examples_per_s", ",.0f", 1),
              ("s (median)", "seconds_median", ".3f", 1),
              ("step ex/s", "step_examples_per_s", ".1f", 1), ("headroom", "headroom", ".1f", 1)],
}


def _cell(value: Any, spec: str, scale: float) -> str:
    if value is None:
        return "-"
    return format(value * scale, spec) if spec else str(value)


def print_table(lines: list[dict[str, Any]], suite: str) -> None:
    columns = _COLUMNS[suite]
    rows = [[c[0] for c in columns] + ["targets"]]
    rows += [[_cell(line.get(key), spec, scale) for _, key, spec, scale in columns]
             + [_targets_text(line)] for line in lines]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    print()


def print_header(b: Bench) -> None:
    dev = device_info()
    peak = "unknown" if b.peak.tflops is None else f"{b.peak.tflops:.3g} TFLOP/s"
    print(f"device: {dev['kind']} ({dev['platform']}, {dev['count']} device(s), "
          f"{dev['host_cpus']} host CPUs); dtype {b.dtype}; "
          f"peak {b.peak.dtype} {peak} ({b.peak.source})")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    print()


# ============================================================================================
# Command line
# ============================================================================================


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pkd_jax.bench", description=__doc__.split("\n")[0])
    p.add_argument("suite", nargs="?", default="all", choices=SUITES)
    p.add_argument("--model", default=None,
                   help="minilm-l6 (real weights), bert-tiny|bert-base|bert-large (random), or a "
                        "HF folder; default bert-base on accelerators and for efficiency, "
                        "minilm-l6 for the other suites on CPU")
    p.add_argument("--teacher-layers", type=int, default=None,
                   help="teacher depth (default: the model's)")
    p.add_argument("--student-layers", type=int, default=None,
                   help="student depth (default: half the teacher's; sweep: 3)")
    p.add_argument("--students", type=int, default=None,
                   help="sweep: students per vmapped chunk (default 8 on accelerators, 4 on CPU)")
    p.add_argument("--layers", default=None,
                   help="efficiency depths, e.g. 12,6,3 (default: N, N/2, N/4)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="default 128 for efficiency; sweep 32; 256 on accelerators, 32 on CPU otherwise")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--teacher", default="both", choices=("online", "cached", "both"),
                   help="PKD step(s) to time")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="compute dtype; auto: bfloat16 on GPU/TPU, float32 on CPU")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls (median reported); default 20 on accelerators, 5 on CPU")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls after compilation; default 3 on accelerators, 1 on CPU")
    p.add_argument("--torch-compile", default="auto", choices=("auto", "on", "off"),
                   help="also time torch.compile (auto: only with CUDA)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak for MFU (default: table, or measured on CPU)")
    p.add_argument("--task", default="sst2", help="GLUE task of the input suite")
    p.add_argument("--glue-dir", type=Path,
                   default=Path(__file__).resolve().parents[1].parent / "shared" / "glue")
    p.add_argument("--max-examples", type=int, default=None,
                   help="input suite: tokenise only the first N examples")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="also trace each JAX step (jax.profiler) into DIR/<suite>-<name>")
    p.add_argument("--json", action="store_true", help="one JSON object per line, no tables")
    args = p.parse_args(argv)
    for name in ("batch_size", "seq_len", "repeats", "student_layers", "teacher_layers", "students"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.warmup is not None and args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def make_bench(args: argparse.Namespace) -> Bench:
    accelerator = jax.default_backend() != "cpu"
    if args.repeats is None:
        args.repeats = 20 if accelerator else 5
    if args.warmup is None:
        args.warmup = 3 if accelerator else 1
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if accelerator else "float32")
    return Bench(args, partitioning.make_mesh(), dtype, device_peak(dtype, args.peak_tflops))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the chosen suite(s); returns the emitted lines (also printed)."""
    args = parse_args(argv)
    if args.suite in ("train", "torch", "all"):
        # JAX grabs 75% of GPU memory up front; the torch peer in this process needs room too.
        # (No effect once JAX's backend is up, e.g. when called from tests.)
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    b = make_bench(args)
    suite = b.args.suite
    if not b.args.json:
        print_header(b)
    tables: list[tuple[str, list[dict[str, Any]]]] = []
    if suite in ("efficiency", "all"):
        tables.append(("efficiency", run_efficiency(b)))
    if suite in ("train", "all"):
        tables.append(("train", run_train(b)))
    if suite == "torch":
        tables.append(("train", run_torch(b)))
    if suite == "sweep":
        tables.append(("sweep", run_sweep(b)))
    if suite in ("input", "all"):
        steps = [line for line in b.results
                 if line["suite"] == "train" and line["framework"] == "jax"]
        if not steps:  # input alone: time the hungrier PKD step (cached, unless told online)
            mode = "online" if b.args.teacher == "online" else "cached"
            spec = resolve_model(b.args.model or default_model(b), b.args.teacher_layers)
            steps = run_jax_steps(b, spec, [f"pkd_{mode}"])
            tables.append(("train", steps))
        # The fastest step is the hungriest consumer of batches.
        tables.append(("input", run_input(b, max(steps, key=lambda line: line["examples_per_s"]))))
    if not b.args.json:
        for name, lines in tables:
            print_table(lines, name)
    return b.results


if __name__ == "__main__":
    main()
