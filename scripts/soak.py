r"""Soak test: a long CPU run with periodic evaluation and checkpoints; is memory flat, throughput steady?

  python scripts/soak.py --glue-dir ../shared/glue --steps 2000 --out docs/soak

Starts `run.py` (MiniLM's first 2 layers fine-tuned on RTE, batch 16, length 64, evaluation every
250 steps, a checkpoint every 200) and samples the process's resident memory (VmRSS) every
second. Writes OUT.json (summary and samples) and OUT.png (memory over time, throughput over
steps). Flat means: the memory after the first evaluation and checkpoint (when every program is
compiled and every buffer allocated) grows by less than 5 % to the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from matplotlib.figure import Figure

REPO = Path(__file__).resolve().parents[1]


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run(glue_dir: str, steps: int, workdir: Path) -> tuple[list[tuple[float, float]], float]:
    cmd = [sys.executable, "run.py",
           f"--config=configs/finetune.py:task=rte,model=minilm-l6,layers=2,glue_dir={glue_dir}",
           f"--workdir={workdir}", "--config.batch_size=16", "--config.max_seq_length=64",
           f"--config.max_steps={steps}", "--config.eval_every_steps=250", "--config.checkpoint_every_steps=200",
           "--config.log_every_steps=50", "--config.progress=False", "--config.predict_test=False"]
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples = []
    while proc.poll() is None:
        mib = rss_mib(proc.pid)
        if mib is not None:
            samples.append((time.time() - start, mib))
        time.sleep(1.0)
    if proc.returncode:
        sys.exit(f"run.py failed:\n{proc.stderr.read()[-3000:]}")
    return samples, time.time() - start


def summarise(samples, wall: float, workdir: Path, steps: int) -> dict:
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [l for l in lines if l["split"] == "train"]
    dev_steps = [l["step"] for l in lines if l["split"] == "dev"]
    settled = [mib for t, mib in samples if t > wall * 0.2]  # past start-up, compiles, first eval
    throughput = [l["examples_per_s"] for l in train if l["step"] > steps // 10]  # past compiles
    half = len(throughput) // 2
    return {
        "steps": steps, "wall_s": round(wall, 1), "evaluations": dev_steps,
        "rss_mib": {"peak": max(m for _, m in samples), "after_warmup": settled[0], "end": settled[-1],
                    "growth_after_warmup_pct": round(100 * (settled[-1] - settled[0]) / settled[0], 2)},
        "examples_per_s": {"first_half_median": statistics.median(throughput[:half]),
                           "second_half_median": statistics.median(throughput[half:])},
        "samples": samples, "train": [(l["step"], l["examples_per_s"]) for l in train],
    }


def plot(summary: dict, out: Path) -> None:
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    t, mib = zip(*summary["samples"])
    ax1.plot(t, mib, color="#1f77b4")
    ax1.set(title="Resident memory of run.py", xlabel="seconds", ylabel="VmRSS (MiB)")
    ax1.set_ylim(0, max(mib) * 1.15)
    steps, ex = zip(*summary["train"])
    ax2.plot(steps, ex, marker=".", color="#d62728")
    for s in summary["evaluations"]:
        ax2.axvline(s, color="grey", lw=0.5, ls=":")
    ax2.set(title="Training throughput (dotted: evaluations)", xlabel="step", ylabel="examples/s")
    ax2.set_ylim(0, max(ex) * 1.15)
    fig.suptitle(f"Soak: {summary['steps']} steps on CPU, evaluation every 250, checkpoint every 200")
    fig.savefig(out.with_suffix(".png"), dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glue-dir", default=str(REPO.parent / "shared" / "glue"))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", default="docs/soak")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        samples, wall = run(args.glue_dir, args.steps, Path(tmp) / "soak")
        summary = summarise(samples, wall, Path(tmp) / "soak", args.steps)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, out)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("samples", "train")}, indent=1))


if __name__ == "__main__":
    main()
