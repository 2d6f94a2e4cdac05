"""Multi-host layout: batches land where the mesh says whatever its device order, and the SLURM
recipe of the README matches what `jax.distributed.initialize()` detects from SLURM's variables."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax._src import clusters

from pkd_jax import partitioning

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "multihost_worker.py"


# --------------------------------------------------------------------------------------------
# shard_batch / to_host
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fsdp", [1, 2])
def test_shard_batch_puts_each_row_where_the_mesh_says(fsdp):
    devices = jax.devices()
    mesh = partitioning.make_mesh(fsdp, devices=devices[::2] + devices[1::2])  # not id order
    x = np.arange(32 * 3, dtype=np.int32).reshape(32, 3)
    arr = partitioning.shard_batch({"x": x}, mesh)["x"]
    for shard in arr.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), x[shard.index])
    np.testing.assert_array_equal(partitioning.to_host(arr), x)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(glue_dir, cache_dir, processes: int, devices_each: int, *extra) -> list[dict]:
    """The worker's JSON line from each process (2 x 4 or 1 x 8 CPU devices)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices_each)}
    args = [sys.executable, str(WORKER), f"--glue_dir={glue_dir}", f"--cache_dir={cache_dir}", *extra]
    if processes > 1:
        args += [f"--coordinator_address=127.0.0.1:{_free_port()}", f"--num_processes={processes}"]
    procs = [subprocess.Popen(args + ([f"--process_id={i}"] if processes > 1 else []), cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(processes)]
    try:  # a failed process leaves its peer waiting in a collective: never wait forever
        outputs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out in outputs]


def _teacher_rows(result: dict) -> tuple[np.ndarray, np.ndarray]:
    folder = Path(result["cache"])
    return np.load(folder / "logits.npy"), np.load(folder / "features.npy")


def test_interleaved_mesh_two_processes_match_one(glue_dir, tmp_path):
    """Processes alternate along the batch axis (p0d0, p1d0, p0d1, ...): each process owns rows
    0-3, 8-11, ... of a 32-row batch, not one block. Dev metrics, logits and the teacher cache
    (both map device outputs back to examples by the host's `index`) equal one process's."""
    (one,) = _run_workers(glue_dir, tmp_path / "one", 1, 8)
    two = _run_workers(glue_dir, tmp_path / "two", 2, 4, "--interleave")
    assert [r["owners"] for r in two] == [[0, 1] * 4] * 2
    reference = np.asarray(one["logits"])
    for result in two:  # every process reports the same, whole result
        assert result["metrics"] == one["metrics"]
        np.testing.assert_allclose(np.asarray(result["logits"]), reference, rtol=0, atol=1e-5)
    (logits, cls), (ref_logits, ref_cls) = _teacher_rows(two[0]), _teacher_rows(one)
    assert Path(two[0]["cache"]).name == Path(one["cache"]).name  # same fingerprint
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-5)
    np.testing.assert_allclose(cls, ref_cls, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ref_logits, reference, rtol=0, atol=1e-5)  # the same forward


# --------------------------------------------------------------------------------------------
# SLURM: what JAX detects, and the README's recipes
# --------------------------------------------------------------------------------------------

JOB_ID, NODELIST, FIRST_NODE = 4242, "gpu[017-018]", "gpu017"
SLURM_PORT = JOB_ID % 2**12 + 65535 - 2**12 + 1  # SlurmCluster.get_coordinator_address


def _slurm_env(monkeypatch, *, nodes: int, tasks_per_node: int, node: int, local: int, gpus: int,
               gpus_visible: int | None = None, local_device_ids: str | None = None) -> dict:
    """The variables srun sets for one task (and nothing that selects another cluster type)."""
    for key in list(os.environ):
        if key.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "JAX_LOCAL_DEVICE_IDS")) or key in (
                "KUBERNETES_SERVICE_HOST", "CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
            monkeypatch.delenv(key)
    env = {"SLURM_JOB_ID": str(JOB_ID), "SLURM_STEP_NODELIST": NODELIST,
           "SLURM_NTASKS": str(nodes * tasks_per_node), "SLURM_STEP_NUM_NODES": str(nodes),
           "SLURM_PROCID": str(node * tasks_per_node + local), "SLURM_LOCALID": str(local),
           "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(gpus if gpus_visible is None else gpus_visible)))}
    if local_device_ids is not None:
        env["JAX_LOCAL_DEVICE_IDS"] = local_device_ids
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def _detect() -> tuple:
    """What `jax.distributed.initialize()` would use (jax/_src/distributed.py, State.initialize):
    JAX_LOCAL_DEVICE_IDS first, then the cluster's detection of whatever is still unset."""
    ids = os.environ.get("JAX_LOCAL_DEVICE_IDS")
    ids = list(map(int, ids.split(","))) if ids else None
    return clusters.ClusterEnv.auto_detect_unset_distributed_params(None, None, None, ids, None, 300)


def _readme_srun_recipes() -> list[tuple[str, dict[str, str]]]:
    """(JAX_LOCAL_DEVICE_IDS or "", flags) of each srun command in the README's Scaling out."""
    section = (REPO / "README.md").read_text().split("## Scaling out")[1].split("\n## ")[0]
    recipes = []
    for command in re.findall(r"^((?:\S+=\S+ )?srun .*?)\n(?:\n|```)", section, flags=re.S | re.M):
        ids = re.match(r"JAX_LOCAL_DEVICE_IDS=(\S+) ", command)
        recipes.append((ids.group(1) if ids else "", dict(re.findall(r"--([\w.-]+)=(\S+)", command))))
    return recipes


def test_readme_slurm_recipes_drive_every_gpu_once(monkeypatch):
    recipes = _readme_srun_recipes()
    assert len(recipes) == 2 and not any("gpus-per-task" in flags for _, flags in recipes)
    for ids, flags in recipes:
        nodes, per_node, gpus = (int(flags[k]) for k in ("nodes", "ntasks-per-node", "gpus-per-node"))
        assert flags["config.distributed.initialize"] == "True"
        driven = {}
        for node in range(nodes):
            for local in range(per_node):
                env = _slurm_env(monkeypatch, nodes=nodes, tasks_per_node=per_node, node=node,
                                 local=local, gpus=gpus, local_device_ids=ids or None)
                assert partitioning._slurm_gpu_problem(env) is None
                address, count, pid, devices = _detect()
                assert (address, count) == (f"{FIRST_NODE}:{SLURM_PORT}", nodes * per_node)
                driven[pid] = [(node, d) for d in devices]
        assert sorted(driven) == list(range(nodes * per_node))  # dense process ids
        gpus_driven = [g for devices in driven.values() for g in devices]
        assert sorted(gpus_driven) == [(n, g) for n in range(nodes) for g in range(gpus)]  # each once
        assert len(gpus_driven) % int(flags["config.mesh.fsdp"]) == 0


def test_one_task_per_node_drives_gpu_0_alone(monkeypatch):
    """The old recipe (srun --ntasks-per-node=1, nothing else): 2 GPUs of 16, and fsdp=8 fails."""
    env = _slurm_env(monkeypatch, nodes=2, tasks_per_node=1, node=1, local=0, gpus=8)
    assert _detect() == (f"{FIRST_NODE}:{SLURM_PORT}", 2, 1, [0])
    assert "--ntasks-per-node=8" in partitioning._slurm_gpu_problem(env)


def test_gpus_bound_per_task_would_ask_for_a_gpu_the_task_cannot_see(monkeypatch):
    """--gpus-per-task=1 shows task 5 one GPU (index 0); JAX would restrict it to index 5."""
    env = _slurm_env(monkeypatch, nodes=2, tasks_per_node=8, node=0, local=5, gpus=8, gpus_visible=1)
    assert _detect()[3] == [5]
    assert "--gpus-per-task" in partitioning._slurm_gpu_problem(env)


_INIT = """import jax
from jax._src import xla_bridge
from pkd_jax import partitioning
partitioning.initialize_distributed(initialize=True)
print(jax.process_count(), jax.process_index(), xla_bridge.CUDA_VISIBLE_DEVICES.value)"""


@pytest.mark.parametrize("ids, visible", [(None, "3"), ("0,1,2,3,4,5,6,7", "0,1,2,3,4,5,6,7")])
def test_initialize_distributed_under_slurm(monkeypatch, ids, visible):
    """The real call on CPU, one task: SLURM's variables are found, and the task is limited to
    the GPU of its SLURM_LOCALID (3), with a warning, unless JAX_LOCAL_DEVICE_IDS names more."""
    _slurm_env(monkeypatch, nodes=1, tasks_per_node=1, node=0, local=3, gpus=8, local_device_ids=ids)
    monkeypatch.setenv("SLURM_PROCID", "0")  # the only task, on its node's fourth GPU
    monkeypatch.setenv("SLURM_STEP_NODELIST", "localhost")
    monkeypatch.setenv("JAX_COORDINATOR_PORT", str(_free_port()))
    proc = subprocess.run([sys.executable, "-c", _INIT], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["1", "0", visible]
    assert ("SLURM: 1 task(s) drive one GPU each" in proc.stderr) == (ids is None)  # the warning
