"""Multi-process, the way TPU pods and multi-GPU nodes run: 2 processes x 4 CPU devices on localhost
(jax.distributed + CPU collectives) train the same steps to the same loss as 1 process x 8 devices,
save a checkpoint, and resume from it."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _args(glue_dir, workdir):
    return [sys.executable, "run.py",
            f"--config=configs/finetune.py:task=rte,model=minilm-l6,layers=2,glue_dir={glue_dir},runlocal",
            f"--workdir={workdir}", "--config.progress=False", "--config.predict_test=False",
            "--config.max_steps=6", "--config.checkpoint_every_steps=3", "--config.eval_every_steps=6",
            "--config.log_every_steps=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(glue_dir, workdir, processes: int, devices_each: int) -> list[str]:
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices_each), "JAX_PLATFORMS": "cpu"}
    extra = []
    if processes > 1:
        port = _free_port()
        extra = [f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                 f"--config.distributed.num_processes={processes}"]
    procs = [subprocess.Popen(_args(glue_dir, workdir) + extra + ([f"--config.distributed.process_id={i}"] if extra else []),
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(processes)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


def _train_losses(workdir: Path) -> dict[int, float]:
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {l["step"]: l["loss"] for l in lines if l["split"] == "train"}


@pytest.fixture(scope="module")
def single(tmp_path_factory, glue_dir):
    workdir = tmp_path_factory.mktemp("one_process")
    _launch(glue_dir, workdir, processes=1, devices_each=8)
    return workdir


def test_two_processes_match_one_and_resume(single, glue_dir, tmp_path):
    outputs = _launch(glue_dir, tmp_path, processes=2, devices_each=4)
    assert "process 1 of 2" in outputs[1] and "'data': 8" in outputs[0]
    reference = _train_losses(single)
    losses = _train_losses(tmp_path)
    assert sorted(losses) == sorted(reference) == list(range(1, 7))
    np.testing.assert_allclose([losses[s] for s in range(1, 7)], [reference[s] for s in range(1, 7)], rtol=1e-5)
    dev = json.loads((tmp_path / "results.json").read_text())["last"]["metrics"]
    assert dev == json.loads((single / "results.json").read_text())["last"]["metrics"]
    assert not (tmp_path / "tensorboard").exists() or len(list((tmp_path / "tensorboard").iterdir())) == 1

    # Resume across processes: drop the final checkpoint and results, run again from step 3.
    shutil.rmtree(tmp_path / "checkpoints" / "6")
    (tmp_path / "results.json").unlink()
    outputs = _launch(glue_dir, tmp_path, processes=2, devices_each=4)
    assert "resumed from step 3" in outputs[0]
    resumed = _train_losses(tmp_path)
    np.testing.assert_allclose([resumed[s] for s in range(1, 7)], [reference[s] for s in range(1, 7)], rtol=1e-5)
