"""Device mesh, shardings and multi-host helpers.

One mesh with two axes, `data` and `fsdp`. Batches are split over both; parameters and optimizer
state are replicated, or with FSDP sharded over `fsdp` along their largest divisible dimension
(XLA inserts the all-gathers and reduce-scatters). This is `jax.jit` + `NamedSharding`, what pjit
became; there is no pmap.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

BATCH_AXES = ("data", "fsdp")


def initialize_distributed(initialize: bool = False, coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None) -> None:
    """Join a multi-process run (TPU pod slice, multi-node GPUs, SLURM); call before touching devices.

    initialize=True: `jax.distributed.initialize()` detects its peers itself (Cloud TPU, SLURM,
    Open MPI). A coordinator address (argument or JAX_COORDINATOR_ADDRESS) with the process count
    and id configures it by hand. Nothing given: a single process. A second call does nothing.
    Under SLURM, JAX gives each process one GPU (see `_slurm_gpu_problem`); a layout that leaves
    GPUs idle or cannot start is logged before JAX starts.
    """
    configured = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not (initialize or configured) or jax.distributed.is_initialized():
        return
    if problem := _slurm_gpu_problem(os.environ):
        log.warning("SLURM: %s (README, Scaling out)", problem)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    log.info("process %d of %d, %d local devices of %d", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _slurm_gpu_problem(env: Mapping[str, str]) -> str | None:
    """Why this SLURM task's GPUs do not suit JAX's SLURM default, or None.

    In a SLURM step (the variables JAX's `SlurmCluster.is_env_present` reads), unless local
    device ids are given (JAX_LOCAL_DEVICE_IDS), `jax.distributed.initialize()` restricts each
    process to the GPU whose index among those it sees is its SLURM_LOCALID
    (`ClusterEnv.auto_detect_unset_distributed_params`, jax/_src/clusters/cluster.py). So every
    task must see all its node's GPUs, one task per GPU: per-task binding (--gpus-per-task)
    shows task i>0 one GPU and JAX fails; one task per node drives GPU 0 alone.
    """
    visible = env.get("CUDA_VISIBLE_DEVICES") or env.get("ROCR_VISIBLE_DEVICES")
    if not visible or "JAX_LOCAL_DEVICE_IDS" in env or not all(v in env for v in _SLURM_VARS):
        return None
    gpus, local_id, tasks = len(visible.split(",")), int(env["SLURM_LOCALID"]), int(env["SLURM_NTASKS"])
    nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    if local_id >= gpus:
        return (f"task {local_id} of its node sees {gpus} GPU(s) ({visible}), and JAX will drive "
                f"GPU {local_id}: let every task see all GPUs (--gpus-per-node, not --gpus-per-task)")
    if tasks < nodes * gpus:
        return (f"{tasks} task(s) drive one GPU each of {nodes} node(s) x {gpus} GPUs: run "
                f"--ntasks-per-node={gpus}, or set JAX_LOCAL_DEVICE_IDS={','.join(map(str, range(gpus)))}"
                " for one task per node")
    return None


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
    """All devices in a (data, fsdp) mesh; fsdp=1 is plain data parallelism."""
    devices = list(devices if devices is not None else jax.devices())
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"mesh.fsdp={fsdp} must divide the number of devices ({len(devices)})")
    return jax.make_mesh((len(devices) // fsdp, fsdp), ("data", "fsdp"),
                         axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _fsdp_spec(shape: tuple[int, ...], n: int) -> P:
    """Shard the largest dimension that `n` divides; small or indivisible arrays stay whole."""
    if n == 1 or not shape or np.prod(shape) < 2**14:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % n == 0:
            return P(*[None] * dim, "fsdp")
    return P()


def state_sharding(tree, mesh: Mesh, fsdp: bool = False):
    """NamedShardings for params / optimizer state (any pytree of arrays or shape structs)."""
    n = mesh.shape["fsdp"] if fsdp else 1
    return jax.tree.map(lambda x: NamedSharding(mesh, _fsdp_spec(np.shape(x), n)), tree)


def place_state(tree, mesh: Mesh, fsdp: bool = False):
    """Put params / a train state on the mesh: replicated, or FSDP-sharded (`state_sharding`)."""
    return jax.device_put(tree, state_sharding(tree, mesh, fsdp))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % n or batch_size % jax.process_count():
        raise ValueError(f"batch size {batch_size} must be a multiple of the {n} devices in the mesh")


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """A global host batch -> global jax.Arrays split over the mesh, rows in their host order.

    Every process holds the same global batch (the data order is a pure function of seed and
    step) and hands each of its devices exactly the rows that device owns in the sharding, so
    nothing crosses hosts. The rows a process owns need not be one block: a mesh may order its
    devices so processes alternate along the batch axis (TPU rings; `jax.make_mesh` reorders).
    Slicing a process-local share instead would permute the rows on device, and the outputs
    that `evaluate.predict` and `teacher_cache` map back by the host's `index` would land on the
    wrong examples.
    """
    sharding = batch_sharding(mesh)

    def on_devices(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return {k: on_devices(v) for k, v in batch.items()}


def to_host(x) -> np.ndarray:
    """A global jax.Array as one numpy array on this host (gathered from the other processes),
    in its logical order whatever the mesh's device order (`process_allgather` replicates it)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
