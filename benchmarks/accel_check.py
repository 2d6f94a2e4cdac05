"""`make accel-check`: prove the GPU/TPU paths and measure them, in one command (≤ 8 min on an H100).

  python -m benchmarks.accel_check [--smoke] [--glue-dir DIR] [--out DIR] [--stages correctness,bench,loop]

Run from the repository after installing jax[cuda13] or jax[tpu] (README, "GPUs and TPUs"). It
downloads nothing: random weights, a local GLUE folder (SST-2), the installed packages. Stages:

1. **correctness**: `pytest -m accelerator tests/test_accelerator.py` on the device: bf16
   forward and gradients against transformers' PyTorch BERT, cuDNN attention against the masked
   path, compile-once and no host transfers in the steady state, a vmapped sweep chunk, an orbax
   save racing a donated step.
2. **bench**: the suites at the paper's shapes: the PKD 12->6 step (BERT-base, bf16, batch 256,
   seq 128, teacher online and cached; MFU; PyTorch eager and torch.compile ratios; a profile of
   each JAX step, summarised as its top ops and matmul share), the efficiency table (BERT12/6/3,
   batch 128, seq 128) and the sweep chunk (8 BERT_3 students vmapped against one after another).
3. **loop**: `run.py` distils a random-init BERT-base-size teacher into a 6-layer student over the
   whole SST-2 training set for one epoch (batch 32, seq 128). The loop's wall time (evaluation,
   checkpoints and data included) is compared with the sum of its steps' device times: each
   length bucket's step timed alone, times the number of steps of that length. Then the
   projected time of the paper's 4-epoch SST-2 12->6 distillation.

Prints one JSON line (`{"accel_check": ...}`) and a markdown table for docs/benchmarks.md, and
writes both, the test log, the benchmark lines and the run under --out. Exits 1 when a
correctness check fails; speed targets are reported, never asserted. `--smoke` runs the same on a
CPU with small shapes in under 3 minutes (tests/test_accel_check.py), so the script is known to
work before accelerator time is spent on it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STAGES = ("correctness", "bench", "loop")
LOOP_OVERHEAD_TARGET = 0.05  # of the epoch
PAPER_RUN_TARGET_S = 180.0  # SST-2, 12 -> 6, 4 epochs
CHECK_TARGET_S = 480.0  # the whole check on one H100/H200, compilation included
_BENCH_FULL = [
    ["train", "--model=bert-base", "--student-layers=6", "--batch-size=256", "--seq-len=128"],
    ["efficiency", "--model=bert-base", "--layers=12,6,3", "--batch-size=128", "--seq-len=128"],
    ["sweep", "--model=bert-base", "--student-layers=3", "--students=8", "--batch-size=32", "--seq-len=128"],
]
_BENCH_SMOKE = [
    ["train", "--model=bert-tiny", "--batch-size=8", "--seq-len=32"],
    ["efficiency", "--model=bert-tiny", "--layers=2,1", "--batch-size=8", "--seq-len=32"],
    ["sweep", "--model=bert-tiny", "--students=2", "--batch-size=8", "--seq-len=32"],
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accel_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="small shapes: the CPU dry run (< 3 min)")
    p.add_argument("--glue-dir", type=Path, default=REPO.parent / "shared" / "glue",
                   help="a local GLUE folder holding SST-2 (official layout)")
    p.add_argument("--out", type=Path, default=Path("runs/accel_check"), help="where results go")
    p.add_argument("--tokenizer", default="minilm-l6",
                   help="the uncased BERT vocabulary for the loop stage: a known name or a folder")
    p.add_argument("--stages", default=",".join(STAGES), help=f"a subset of {','.join(STAGES)}")
    p.add_argument("--tests", default=None, metavar="EXPR",
                   help="only the correctness tests pytest -k EXPR selects (default: all of them)")
    args = p.parse_args(argv)
    args.stages = [s for s in args.stages.split(",") if s]
    if not set(args.stages) <= set(STAGES):
        p.error(f"--stages: unknown {sorted(set(args.stages) - set(STAGES))}; choose from {STAGES}")
    if "loop" in args.stages and not (args.glue_dir / "SST-2" / "train.tsv").exists():
        p.error(f"--glue-dir {args.glue_dir}: no SST-2/train.tsv (the loop stage trains on SST-2)")
    return args


def _log(message: str) -> None:
    print(f"[accel-check] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Stage 1: correctness (pytest in a child process, before this one touches the device)
# --------------------------------------------------------------------------------------------


def run_correctness(args, env) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-m", "accelerator", "tests/test_accelerator.py", "-q", "-rA",
           "-p", "no:cacheprovider", *(["-k", args.tests] if args.tests else [])]
    _log("correctness: " + " ".join(cmd[1:]))
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    (args.out / "correctness.log").write_text(proc.stdout + proc.stderr)
    tests = {name.split("::", 1)[-1]: status.lower()
             for status, name in re.findall(r"^(PASSED|FAILED|SKIPPED|ERROR) (\S+)", proc.stdout, re.M)}
    counts = {s: sum(v == s for v in tests.values()) for s in ("passed", "failed", "skipped", "error")}
    return {"ok": proc.returncode == 0 and counts["passed"] > 0, "returncode": proc.returncode,
            "seconds": time.perf_counter() - start, "counts": counts, "tests": tests}


# --------------------------------------------------------------------------------------------
# Stage 2: the benchmark suites (in this process)
# --------------------------------------------------------------------------------------------


def run_bench(args) -> list[dict[str, Any]]:
    from benchmarks import __main__ as bench

    lines = []
    common = ["--repeats=1", "--warmup=0"] if args.smoke else ["--repeats=10", "--warmup=2"]
    with open(args.out / "bench.jsonl", "w") as f:
        for suite in _BENCH_SMOKE if args.smoke else _BENCH_FULL:
            # The train steps are profiled too: where their op time goes is what MFU work starts from.
            suite = suite + ([f"--profile={args.out / 'profile'}"] if suite[0] == "train" else [])
            _log("bench: python -m benchmarks " + " ".join(suite + common))
            with contextlib.redirect_stdout(io.StringIO()):
                new = bench.main(suite + common + ["--json"])
            for line in new:
                f.write(json.dumps(line) + "\n")
            lines += new
    return lines


# --------------------------------------------------------------------------------------------
# Stage 3: the loop, end to end (run.py in a child process), against its steps' device time
# --------------------------------------------------------------------------------------------


def _teacher_folder(folder: Path, smoke: bool, tokenizer: str) -> Path:
    """A random-init BERT-base-size SST-2 classifier with the uncased BERT vocabulary."""
    from flax import nnx

    from pkd_jax import bert, checkpoints

    size = (dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512)
            if smoke else {})
    config = bert.BertConfig(**size, num_labels=2, label_names=("negative", "positive"))
    model = bert.BertForSequenceClassification(config, rngs=nnx.Rngs(0))
    return checkpoints.save_pretrained(model, folder, checkpoints.load_tokenizer(tokenizer))


def _loop_cache_dir(args) -> Path:
    return args.out / "loop" / "cache"


def _loop_config(args, teacher: Path):
    """The configs/pkd.py run of the loop stage, as config fields and as run.py flags."""
    layers = 2 if args.smoke else 6
    fields = {"num_epochs": 1.0, "batch_size": 32, "max_seq_length": 32 if args.smoke else 128,
              "predict_test": False, "progress": False, "cache_dir": str(_loop_cache_dir(args))}
    if args.smoke:  # bf16 end to end on a CPU as well
        fields.update(train_examples=320, eval_examples=64, dtype="bfloat16", checkpoint_every_steps=5)
    arg = f"task=sst2,teacher={teacher},model={teacher},layers={layers},strategy=skip,glue_dir={args.glue_dir}"
    return arg, fields


def run_loop(args, env) -> dict[str, Any]:
    teacher = _teacher_folder(args.out / "loop" / "teacher_model", args.smoke, args.tokenizer)
    arg, fields = _loop_config(args, teacher)
    workdir = args.out / "loop" / "student"
    cmd = [sys.executable, "run.py", f"--config=configs/pkd.py:{arg}", f"--workdir={workdir}",
           *(f"--config.{k}={v}" for k, v in fields.items())]
    _log("loop: " + " ".join(cmd[1:]))
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (args.out / "loop" / "run.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"ok": False, "error": (proc.stderr or proc.stdout)[-2000:]}
    results = json.loads((workdir / "results.json").read_text())
    step_s = _steps_device_seconds(arg, fields)
    timing = results["timing"]
    # train_seconds: the steps alone (the loop's clock stops for evaluation and saving).
    return {"ok": True, "wall_seconds": wall, **timing, "train_seconds": results["train_seconds"],
            "eval_save_seconds": timing["loop_seconds"] - results["train_seconds"],
            "steps": results["total_steps"], "steps_device_seconds": step_s["total"], "by_length": step_s["by_length"],
            "step_programs_from_cache": step_s["from_cache"],
            "overhead": timing["loop_seconds"] / step_s["total"] - 1,
            "steps_overhead": results["train_seconds"] / step_s["total"] - 1,
            "projected_4_epochs_seconds": wall - timing["loop_seconds"] + 4 * timing["loop_seconds"],
            "dev_accuracy": results["metrics"]["accuracy"]}


def _steps_device_seconds(arg: str, fields: dict) -> dict[str, Any]:
    """The run's train step timed alone for each length bucket, weighted by its number of steps."""
    import jax
    import numpy as np

    from configs import pkd
    from pkd_jax import data, partitioning, setup, steps, timing

    config = pkd.get_config(arg)
    for k, v in fields.items():
        config[k] = v
    s = setup.prepare(config)
    feed = s.teacher_feed(lead=False)  # the run's cached teacher outputs, reused
    tx = s.optimizer()
    graphdef, state = steps.create_train_state(s.new_student(config.seed), tx, config.seed, **s.loss_weights())
    state = partitioning.place_state(state, s.mesh, s.fsdp)
    jitted = steps.compile_step(s.make_step(graphdef, tx, feed.graphdef), state, s.mesh, fsdp=s.fsdp)
    lengths = data.step_lengths(s.train_tok, config.batch_size, config.seed, 0, s.total_steps, bucket=config.bucket)
    by_length = {}
    batches = s.example_batches(0, feed)  # one per length bucket, compiled side by side
    hits = []  # programs read back from run.py's compilation cache instead of compiled again

    def on_event(event, **_):
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)

    jax.monitoring.register_event_listener(on_event)
    try:
        programs = timing.compile_ahead_all([(jitted, (state, feed.params, batch)) for batch in batches])
    finally:
        jax.monitoring.unregister_event_listener(on_event)
    for batch, (compiled, _) in zip(batches, programs):
        chain = [state]

        def once():
            chain[0], m = compiled(chain[0], feed.params, batch)
            return m

        seconds = statistics.median(timing.measure(once, warmup=2, repeats=10))
        state = chain[0]
        n = batch["input_ids"].shape[1]
        by_length[n] = {"steps": int(np.sum(lengths == n)), "step_seconds": seconds}
    jax.clear_caches()
    return {"total": sum(v["steps"] * v["step_seconds"] for v in by_length.values()), "by_length": by_length,
            "from_cache": len(hits)}


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def _line(lines, suite, name):
    return next((l for l in lines if l["suite"] == suite and l["name"] == name), None)


def _fmt(value, spec):
    return "–" if value is None else format(value, spec)


def _bench_rows(lines) -> list[tuple[str, str, str, str]]:
    """(check, value, target, status) of the benchmark stage: key figures, then every target."""
    rows = []
    for name in ("pkd_online", "pkd_cached", "finetune"):
        line = _line(lines, "train", name)
        if line:
            rows.append((f"train {name}: {line['model']} {line['teacher_layers']}->{line['student_layers']}, "
                         f"{line['dtype']}, batch {line['batch_size']}, seq {line['seq_len']}",
                         f"{1e3 * line['step_s_median']:.1f} ms, {line['examples_per_s']:,.0f} ex/s, "
                         f"MFU {_fmt(line['mfu'], '.1%')}", "", ""))
    for line in lines:
        ops = line.get("ops")
        if ops:
            top = ", ".join(f"{o['op']} {o['share']:.0%}" for o in ops["top"][:4])
            rows.append((f"profile {line['name']}: op time a call ({ops['where']}); matmul-like, attention-like; top ops",
                         f"{ops['op_ms_per_call']:.1f} ms of {1e3 * line['step_s_median']:.1f} ms; "
                         f"{_fmt(ops['matmul_share'], '.0%')}, {_fmt(ops['attention_share'], '.0%')}; {top}", "", ""))
    efficiency = [l for l in lines if l["suite"] == "efficiency"]
    if efficiency:
        rows.append((f"efficiency: {efficiency[0]['model']} inference, batch {efficiency[0]['batch_size']}, "
                     f"seq {efficiency[0]['seq_len']}: speed-up of BERT_k over BERT_{efficiency[0]['layers']}",
                     ", ".join(f"{l['layers']}: {l['speedup']:.2f}x" for l in efficiency[1:]), "", ""))
    vmapped = _line(lines, "sweep", "vmapped")
    if vmapped:
        rows.append((f"sweep: {vmapped['students']} BERT_{vmapped['student_layers']} students vmapped vs one "
                     "after another", f"{vmapped['speedup']:.2f}x ({vmapped['students_examples_per_s']:,.0f} "
                     "students·ex/s)", "", ""))
    for line in lines:
        for t in line.get("targets", []):
            status = "?" if t["ok"] is None else "ok" if t["ok"] else "MISS"
            rows.append((f"{line['suite']} {line['name']}: {t['metric']}", _fmt(t["value"], ".3g"),
                         f"{t['op']} {t['target']:g}", status))
    return rows


def summarize(report: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The JSON summary and the markdown table of a finished check."""
    rows = []
    c = report.get("correctness")
    if c:
        n = c["counts"]
        rows.append(("correctness (pytest -m accelerator)",
                     f"{n['passed']} passed, {n['failed'] + n['error']} failed, {n['skipped']} skipped",
                     "all pass", "ok" if c["ok"] else "FAIL"))
    rows += _bench_rows(report.get("bench", []))
    loop_ = report.get("loop")
    if loop_ and loop_.get("ok"):
        rows.append(("loop: 1 epoch of SST-2, overhead over its steps' device time",
                     f"{loop_['overhead']:.1%} ({loop_['loop_seconds']:.1f} s vs {loop_['steps_device_seconds']:.1f} s: "
                     f"steps {loop_['train_seconds']:.1f} s, evaluation and saving {loop_['eval_save_seconds']:.1f} s)",
                     f"<= {LOOP_OVERHEAD_TARGET:.0%}", "ok" if loop_["overhead"] <= LOOP_OVERHEAD_TARGET else "MISS"))
        rows.append(("loop: the steps alone over their device time (host cost per step)",
                     f"{loop_['steps_overhead']:.1%} ({1e3 * (loop_['train_seconds'] - loop_['steps_device_seconds']) / loop_['steps']:.2f} ms a step)",
                     "", ""))
        rows.append(("loop: projected 4-epoch SST-2 12->6 distillation (wall)",
                     f"{loop_['projected_4_epochs_seconds']:.0f} s (before the first step: set-up "
                     f"{loop_['setup_seconds']:.0f} s, then the teacher's pass and compilation side by side "
                     f"{loop_['teacher_and_compile_seconds']:.0f} s, compilation alone "
                     f"{loop_['compile_seconds']:.0f} s)",
                     f"< {PAPER_RUN_TARGET_S:.0f} s",
                     "ok" if loop_["projected_4_epochs_seconds"] < PAPER_RUN_TARGET_S else "MISS"))
    elif loop_:
        rows.append(("loop: run.py end to end", "failed", "runs", "FAIL"))
    stages = report.get("stage_seconds", {})
    if len(stages) == len(STAGES) and not report["smoke"]:
        rows.append(("the whole check (" + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items()) + ")",
                     f"{report['seconds']:.0f} s", f"<= {CHECK_TARGET_S:.0f} s",
                     "ok" if report["seconds"] <= CHECK_TARGET_S else "MISS"))
    table = "\n".join(["| Check | Value | Target | Status |", "|---|---|---|---|"]
                       + [f"| {a} | {b} | {t} | {st} |" for a, b, t, st in rows])
    header = (f"Device: {report['device']}; {report['versions']}; {report['date']}; "
              f"`{report['command']}`{' (smoke)' if report['smoke'] else ''}.")
    summary = {"ok": report["ok"], "device": report["device"], "date": report["date"], "smoke": report["smoke"],
               "seconds": report["seconds"], "rows": [dict(zip(("check", "value", "target", "status"), r)) for r in rows]}
    return summary, header + "\n\n" + table + "\n"


def _environment() -> dict[str, str]:
    import jax

    from benchmarks.common import versions

    dev = jax.devices()[0]
    return {"device": f"{jax.device_count()} x {dev.device_kind} ({dev.platform})",
            "versions": ", ".join(f"{k} {v}" for k, v in versions().items())}


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    # The PyTorch peer shares this process's GPU (and the tests' process theirs): no preallocation.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    # The loop stage times its run's train steps in this process: sharing run.py's compilation
    # cache (its cache_dir/xla), each length bucket's program is read back, not compiled again.
    import jax

    jax.config.update("jax_compilation_cache_dir", str(_loop_cache_dir(args) / "xla"))
    env = {**os.environ, "PKD_JAX_ACCEL_SMOKE": "1" if args.smoke else "0", "HF_HUB_OFFLINE": "1"}
    report: dict[str, Any] = {"smoke": args.smoke, "command": "python -m benchmarks.accel_check "
                              + " ".join(argv if argv is not None else sys.argv[1:]),
                              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    runners = {"correctness": run_correctness, "bench": lambda args, env: run_bench(args), "loop": run_loop}
    report["stage_seconds"] = {}
    for stage in STAGES:  # correctness first: a child process, before this one holds the device
        if stage in args.stages:
            t0 = time.perf_counter()
            report[stage] = runners[stage](args, env)
            report["stage_seconds"][stage] = time.perf_counter() - t0
            _log(f"{stage}: {report['stage_seconds'][stage]:.0f} s")
    report.update(_environment(), seconds=time.perf_counter() - start)
    report["ok"] = all(report[k]["ok"] for k in ("correctness", "loop") if k in report)
    summary, markdown = summarize(report)
    (args.out / "accel_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (args.out / "accel_check.md").write_text(markdown)
    print(json.dumps({"accel_check": summary}, default=str))
    print(markdown)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
