"""The command line: ``python -m benchmarks [SUITE] [--flags] [--json]`` from the repository root
(the package docstring describes the suites); human-readable tables unless --json."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

import benchmarks
from benchmarks import efficiency, input as input_suite, sweep, train_steps
from benchmarks.common import Bench, default_model, device_info, device_peak, resolve_model, versions
from pkd_jax import checks, partitioning

SUITES = ("efficiency", "train", "torch", "input", "sweep", "all")


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
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=benchmarks.__doc__.split("\n")[0])
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
    p.add_argument("--student-attention-dropout", type=float, default=None, metavar="P",
                   help="train and torch: the students' attention-probability dropout (default: the "
                        "model's, 0.1). 0 lets a GPU student's attention take cuDNN's fused kernel")
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
                   help="the peak of all devices together, for MFU (default: the table's per-device "
                        "peak times the device count, or measured on CPU)")
    p.add_argument("--task", default="sst2", help="GLUE task of the input suite")
    p.add_argument("--glue-dir", type=Path,  # ../shared/glue beside the repository, as the tests use
                   default=Path(__file__).resolve().parents[2] / "shared" / "glue")
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
    p_drop = args.student_attention_dropout
    if p_drop is not None and not 0 <= p_drop < 1:
        p.error(f"--student-attention-dropout must be in [0, 1), got {p_drop}")
    if args.warmup is not None and args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def make_bench(args: argparse.Namespace) -> Bench:
    accelerator = jax.default_backend() != "cpu"
    if args.repeats is None:
        args.repeats = 20 if accelerator else 5
    if args.warmup is None:
        args.warmup = 3 if accelerator else 1
    dtype = jnp.dtype(checks.compute_dtype(args.dtype)).name  # "bfloat16" / "float32"
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
        tables.append(("efficiency", efficiency.run_efficiency(b)))
    if suite in ("train", "all"):
        tables.append(("train", train_steps.run_train(b)))
    if suite == "torch":
        tables.append(("train", train_steps.run_torch(b)))
    if suite == "sweep":
        tables.append(("sweep", sweep.run_sweep(b)))
    if suite in ("input", "all"):
        steps = [line for line in b.results
                 if line["suite"] == "train" and line["framework"] == "jax"]
        if not steps:  # input alone: time the hungrier PKD step (cached, unless told online)
            mode = "online" if b.args.teacher == "online" else "cached"
            spec = resolve_model(b.args.model or default_model(b), b.args.teacher_layers)
            steps = train_steps.run_jax_steps(b, spec, [f"pkd_{mode}"])
            tables.append(("train", steps))
        # The fastest step is the hungriest consumer of batches.
        tables.append(("input", input_suite.run_input(b, max(steps, key=lambda line: line["examples_per_s"]))))
    if not b.args.json:
        for name, lines in tables:
            print_table(lines, name)
    return b.results


if __name__ == "__main__":
    main()
