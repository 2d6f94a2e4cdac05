"""Multi-process, the way TPU pods and multi-GPU nodes run: 2 processes x 2 CPU devices on localhost
(jax.distributed + CPU collectives) train the same steps to the same loss as 1 process x 4 devices,
save a checkpoint, and resume from it. Only process 0 writes: one metric log without repeated
lines, one TensorBoard stream, one export, equal to the single process's.

On CPU each process compiles every program itself: JAX hashes a per-process topology into the
cache key and only process 0 writes the compilation cache. So these runs use one batch shape."""

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parents[1]


def _args(glue_dir, workdir, config=None):
    """run.py on `config` (default: a fine-tuning run) with the schedule of these tests."""
    config = config or f"configs/finetune.py:task=rte,model=minilm-l6,layers=2,glue_dir={glue_dir},runlocal"
    return [sys.executable, "run.py", f"--config={config}",
            f"--workdir={workdir}", "--config.progress=False", "--config.predict_test=False",
            "--config.max_steps=6", "--config.checkpoint_every_steps=3", "--config.eval_every_steps=6",
            "--config.log_every_steps=1", "--config.bucket=False"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(glue_dir, workdir, processes: int, devices_each: int, config=None, extra_args=()) -> list[str]:
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices_each), "JAX_PLATFORMS": "cpu"}
    extra = []
    if processes > 1:
        port = _free_port()
        extra = [f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                 f"--config.distributed.num_processes={processes}"]
    procs = [subprocess.Popen(_args(glue_dir, workdir, config) + [*extra_args, *extra]
                              + ([f"--config.distributed.process_id={i}"] if extra else []),
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(processes)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


def _train_losses(workdir: Path) -> dict[int, float]:
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {l["step"]: l["loss"] for l in lines if l["split"] == "train"}


def _logged(workdir: Path) -> list[tuple[int, str]]:
    """(step, split) of each metrics.jsonl line; a line written twice (two writers) shows up twice."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)), [l for l, n in Counter(lines).items() if n > 1]
    return [(json.loads(l)["step"], json.loads(l)["split"]) for l in lines]


def _scalars(workdir: Path) -> list[list[tuple[str, int]]]:
    """(tag, step) of every scalar, per TensorBoard event file in the order written (one file per
    invocation of the run; TFRecord framing: length, its CRC, the Event proto, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    out = []
    for f in sorted((f for f in (workdir / "tensorboard").rglob("*") if f.is_file()), key=lambda f: f.name):
        data, pos, scalars = f.read_bytes(), 0, []
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + n])
            scalars += [(v.tag, event.step) for v in event.summary.value]
            pos += 12 + n + 4
        assert len(scalars) == len(set(scalars)), f.name
        out.append(scalars)
    return out


# Exported weights, 2 processes x 2 devices vs 1 x 4 after 6 steps: the largest difference measured
# (2 x 4 vs 1 x 8) is 6.0e-8 (one float32 ulp near 1; the gradient all-reduce sums in another order). 1e-6 leaves room
# for another machine's order and is 20x below what one Adam step moves a weight here (~2e-5).
EXPORT_ATOL = 1e-6


def _same_writes(workdir: Path, single: Path, outputs: list[str], resumed_from: int = 0) -> None:
    """Process 0 alone wrote the log, the TensorBoard events and the export, like 1 process."""
    assert _logged(workdir) == _logged(single)
    (reference,) = _scalars(single)
    files = _scalars(workdir)
    assert len(files) == (2 if resumed_from else 1)  # one event file per invocation: one writer
    assert sorted(files[-1]) == sorted(x for x in reference if x[1] > resumed_from)
    assert outputs[0].count("step 6 dev:") == 1 and "step 6 dev:" not in outputs[1]
    a, b = load_file(workdir / "model" / "model.safetensors"), load_file(single / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=EXPORT_ATOL, err_msg=k)
    assert json.loads((workdir / "model" / "config.json").read_text()) == json.loads(
        (single / "model" / "config.json").read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory, glue_dir):
    workdir = tmp_path_factory.mktemp("one_process")
    _launch(glue_dir, workdir, processes=1, devices_each=4)
    return workdir


def test_two_processes_match_one_and_resume(single, glue_dir, tmp_path):
    outputs = _launch(glue_dir, tmp_path, processes=2, devices_each=2)
    assert "process 1 of 2" in outputs[1] and "'data': 4" in outputs[0]
    reference = _train_losses(single)
    losses = _train_losses(tmp_path)
    assert sorted(losses) == sorted(reference) == list(range(1, 7))
    np.testing.assert_allclose([losses[s] for s in range(1, 7)], [reference[s] for s in range(1, 7)], rtol=1e-5)
    dev = json.loads((tmp_path / "results.json").read_text())["last"]["metrics"]
    assert dev == json.loads((single / "results.json").read_text())["last"]["metrics"]
    _same_writes(tmp_path, single, outputs)

    # Resume across processes: drop the final checkpoint and results, run again from step 3.
    shutil.rmtree(tmp_path / "checkpoints" / "6")
    (tmp_path / "results.json").unlink()
    outputs = _launch(glue_dir, tmp_path, processes=2, devices_each=2)
    assert "resumed from step 3" in outputs[0]
    resumed = _train_losses(tmp_path)
    np.testing.assert_allclose([resumed[s] for s in range(1, 7)], [reference[s] for s in range(1, 7)], rtol=1e-5)
    _same_writes(tmp_path, single, outputs, resumed_from=3)


def test_a_multi_task_student_on_two_processes_matches_one(glue_dir, sst2_teacher_dir, stsb_teacher_dir, tmp_path):
    """configs/multitask.py (SST-2 and STS-B, each task's teacher outputs cached) on 2 processes x 2
    devices: the same tasks, losses and dev metrics as this process's 4 devices, and process 0 alone
    writes the log and exports every task."""
    from configs import multitask as multitask_config
    from pkd_jax import multitask

    arg = (f"tasks=sst2+stsb,teachers={sst2_teacher_dir}+{stsb_teacher_dir},model=minilm-l6,layers=2,"
           f"glue_dir={glue_dir},runlocal")
    fields = {"progress": False, "predict_test": False, "max_steps": 6, "checkpoint_every_steps": 3,
              "eval_every_steps": 6, "log_every_steps": 1, "train_examples": 64, "eval_examples": 32,
              "max_seq_length": 32, "batch_size": 8, "seed": 1,  # seed 1: both tasks within 6 steps
              "bucket": False}  # one batch shape per task: fewer programs to compile
    one, two = tmp_path / "one", tmp_path / "two"
    config = multitask_config.get_config(arg)
    for key, value in fields.items():
        config[key] = value
    multitask.train_multitask(config, one)
    outputs = _launch(glue_dir, two, processes=2, devices_each=2, config=f"configs/multitask.py:{arg}",
                      extra_args=[f"--config.{k}={v}" for k, v in fields.items()])
    lines = {w: [json.loads(l) for l in (w / "metrics.jsonl").read_text().splitlines()] for w in (one, two)}
    train = {w: [(l["step"], l["task"], l["loss"]) for l in ls if l["split"] == "train" and "task" in l]
             for w, ls in lines.items()}
    assert [x[:2] for x in train[two]] == [x[:2] for x in train[one]] and len(train[one]) == 6
    assert {x[1] for x in train[one]} == {"sst2", "stsb"}
    np.testing.assert_allclose([x[2] for x in train[two]], [x[2] for x in train[one]], rtol=1e-5)
    results = {w: json.loads((w / "results.json").read_text()) for w in (one, two)}
    for task in ("sst2", "stsb"):
        assert results[two]["per_task"][task]["metrics"] == pytest.approx(results[one]["per_task"][task]["metrics"],
                                                                         abs=1e-5)
        a, b = (load_file(w / "model" / task / "model.safetensors") for w in (two, one))
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=0, atol=EXPORT_ATOL, err_msg=f"{task}: {k}")
    assert "mean score" in outputs[0] and "mean score" not in outputs[1]  # one process reports
    text = (two / "metrics.jsonl").read_text().splitlines()
    assert len(set(text)) == len(text) == len(lines[one])  # one writer: no line twice, none missing
