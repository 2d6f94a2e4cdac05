"""What the suites share: the resolved settings (`Bench`) and the result lines it emits, device
peaks, the FLOP model (the package docstring), the benchmarked models and synthetic batches."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import functools
import gzip
import json
import os
import platform
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax
from flax import nnx

from pkd_jax import checkpoints, losses, timing
from pkd_jax.bert import BertConfig, BertForSequenceClassification

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
# Dense bfloat16 peaks in TFLOP/s of one JAX device, by a substring of its device_kind; the first
# match wins, so more specific names come first. A JAX device is a GPU, or a TPU chip from v4 on
# (megacore) and on v5e/v6e (one core); on TPU v2 and v3 it is one of the chip's two cores, so
# half the chip's 45 / 123 TFLOP/s.
PEAK_TFLOPS_BF16 = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
    ("TPU v6 lite", 918.0), ("TPU v6e", 918.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0),
    ("TPU v5p", 459.0), ("TPU v5", 459.0), ("TPU v4", 275.0), ("TPU v3", 61.5), ("TPU v2", 22.5),
)


# ============================================================================================
# FLOPs and peaks
# ============================================================================================


def forward_flops(config: BertConfig, layers: int, seq_len: int) -> float:
    """Model FLOPs of one forward pass per example (package docstring)."""
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
    tflops: float | None  # of all the devices a step runs on (the mesh)
    source: str  # "table", "measured", "flag" or "unknown"
    dtype: str
    devices: int = 1


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
    times = timing.measure(lambda: matmul(a, a), warmup=2, repeats=repeats)
    return 2 * n**3 / statistics.median(times) / 1e12


def device_peak(dtype: str, override: float | None) -> Peak:
    """The peak of the mesh a step runs on (every device): the table's per-device peak times the
    device count; on a CPU the measured matmul peak of the machine (its devices share the cores);
    `override`: the mesh's peak, as given."""
    if override:
        return Peak(override, "flag", dtype, jax.device_count())
    if jax.default_backend() == "cpu":
        return Peak(measured_matmul_peak(dtype), "measured", dtype)
    per_device = table_peak(jax.devices()[0].device_kind)
    n = jax.device_count()
    return Peak(per_device and per_device * n, "table" if per_device else "unknown", "bfloat16", n)


# ============================================================================================
# Result lines
# ============================================================================================


def target(metric: str, value: float | None, op: str, goal: float, *, aim: float | None = None,
           where: str | None = None) -> dict[str, Any]:
    """A target entry of a line: reported with its verdict, never asserted."""
    ok = None if value is None else (value >= goal if op == ">=" else
                                     value > goal if op == ">" else value <= goal)
    out = {"metric": metric, "value": value, "op": op, "target": goal, "ok": ok}
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


# An XLA op in a trace is named after its HLO instruction: "fusion.44", "dot.3", "cublas-gemm.7".
_HLO_OP = re.compile(r"^[a-z][\w-]*\.\d+$")
_MATMUL = ("dot", "gemm", "matmul", "cublas", "conv")
_ATTENTION = ("fmha", "flash", "cudnn", "attention")


def op_summary(perfetto: Path, calls: int, top: int = 15) -> dict[str, Any]:
    """Where a profiled step's op time goes, from its trace (`perfetto_trace.json.gz`).

    The ops are the events named as HLO instructions. On a GPU or TPU they come from the device's
    busiest line (its ops run one after another there); on a CPU from every XLA thread (ops run
    side by side, so op time exceeds wall time). Returns the op time of one call, the shares of
    matmul-like and attention-like ops (by name), and the `top` ops with their share.
    """
    events = json.loads(gzip.decompress(perfetto.read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    lines: dict[tuple, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in events:
        if e.get("ph") == "X" and _HLO_OP.match(e.get("name", "")):
            lines[e["pid"], e["tid"]][e["name"]] += float(e.get("dur", 0.0))  # microseconds
    device = [key for key in lines if processes.get(key[0], "").startswith("/device:")]
    if device:
        ops = lines[max(device, key=lambda key: sum(lines[key].values()))]
    else:
        ops = sum(lines.values(), collections.Counter())
    total = sum(ops.values())

    def share(words):
        return sum(t for name, t in ops.items() if any(w in name for w in words)) / total if total else None

    return {"where": "device" if device else "host threads", "op_ms_per_call": total / 1e3 / calls,
            "matmul_share": share(_MATMUL), "attention_share": share(_ATTENTION),
            "top": [{"op": name, "ms_per_call": t / 1e3 / calls, "share": t / total}
                    for name, t in ops.most_common(top)]}


def device_info() -> dict[str, Any]:
    dev = jax.devices()[0]
    return {"platform": dev.platform, "kind": dev.device_kind, "count": jax.device_count(),
            "host_cpus": os.cpu_count()}


def log(message: str) -> None:
    """Progress on stderr, so that --json keeps stdout to one object per line."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


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
            "peak_dtype": self.peak.dtype, "peak_devices": self.peak.devices,
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
        log(f"profile of {suite} {name}: {trace_dir}")
        (perfetto,) = trace_dir.glob("plugins/profile/*/perfetto_trace.json.gz")
        return {"trace_dir": str(trace_dir), "ops": op_summary(perfetto, calls=self.args.repeats)}

    def emit(self, line: dict[str, Any]) -> dict[str, Any]:
        line.update(device=device_info(), versions=versions(),
                    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        self.results.append(line)
        if self.args.json:
            print(json.dumps(line), flush=True)
        return line


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


def default_model(b: Bench) -> str:
    return "bert-base" if b.accelerator else "minilm-l6"


def resolve_model(name: str, teacher_layers: int | None) -> ModelSpec:
    if name in RANDOM_SIZES:
        config = RANDOM_SIZES[name]
        if teacher_layers:
            config = dataclasses.replace(config, num_hidden_layers=teacher_layers)
        return ModelSpec(name, config, pretrained=False)
    config = checkpoints.load_config(name, num_labels=NUM_LABELS, num_layers=teacher_layers)
    return ModelSpec(name, config, pretrained=True)


def build_model(spec: ModelSpec, layers: int, dtype: str, *, pretrained: bool,
                seed: int = 0, **overrides) -> BertForSequenceClassification:
    """overrides: BertConfig fields (e.g. attention_probs_dropout_prob)."""
    if pretrained and spec.pretrained:
        return checkpoints.load_pretrained(spec.name, num_labels=NUM_LABELS, num_layers=layers,
                                           dtype=jnp.dtype(dtype), seed=seed, **overrides)
    config = dataclasses.replace(spec.config, num_hidden_layers=layers, **overrides)
    return BertForSequenceClassification(config, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(seed))


def synthetic_batch(config: BertConfig, batch_size: int, seq_len: int, *,
                    cached_layers: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """A full-length bucket (`timing.random_inputs`), labels, and teacher outputs when cached."""
    batch = timing.random_inputs(config.vocab_size, batch_size, seq_len, seed)
    rng = np.random.default_rng((seed, 1))  # a stream apart from the token ids'
    batch["labels"] = rng.integers(0, NUM_LABELS, batch_size, dtype=np.int32)
    if cached_layers is not None:
        batch["teacher_logits"] = rng.normal(size=(batch_size, NUM_LABELS)).astype(np.float32)
        batch["teacher_features"] = rng.normal(
            size=(batch_size, cached_layers, config.hidden_size)).astype(np.float32)
    return batch


def student_overrides(args: argparse.Namespace) -> dict[str, float]:
    """The students' config overrides asked for on the command line (JAX and torch alike)."""
    p = getattr(args, "student_attention_dropout", None)
    return {} if p is None else {"attention_probs_dropout_prob": p}


def student_attention_dropout(spec: ModelSpec, args: argparse.Namespace) -> float:
    """The students' attention dropout: asked for, or the model's (recorded on every step line)."""
    return student_overrides(args).get("attention_probs_dropout_prob", spec.config.attention_probs_dropout_prob)


def student_depth(args: argparse.Namespace, spec: ModelSpec) -> int:
    return args.student_layers or max(1, spec.teacher_layers // 2)


def pkd_layer_map(teacher: int, student: int) -> tuple[int, ...]:
    return losses.layer_map(teacher, student, "skip" if teacher % student == 0 else "last")
