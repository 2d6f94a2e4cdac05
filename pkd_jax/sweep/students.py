"""Stacked students: G train states along a leading axis, their placement, one vmapped step, and
one vmapped evaluation."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from pkd_jax import data, evaluate, partitioning, steps
from pkd_jax.sweep.plan import Point


def student_shardings(state, mesh, *, shard_students: bool = False, fsdp: bool = False):
    """Shardings of a stacked state: the student axis over all devices, or a single run's layout."""
    if shard_students:
        return jax.tree.map(lambda _: NamedSharding(mesh, P(partitioning.BATCH_AXES)), state)
    return partitioning.state_sharding(state, mesh, fsdp)


def stack_students(state: steps.TrainState, points: Sequence[Point], mesh, *,
                   shard_students: bool = False, fsdp: bool = False) -> steps.TrainState:
    """G copies of one student's initial state (same seed), each with its point's α, β, T and peak
    learning rate; built on the devices, each holding only its own shard."""
    hparams = {k: np.array([p.hparams[k] for p in points], np.float32) for k in ("alpha", "beta", "temperature")}
    lrs = np.array([p.learning_rate for p in points], np.float32)

    def build(state, hparams, lrs):
        stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (len(points), *jnp.shape(x))), state)
        opt = stacked.opt_state
        opt = opt._replace(hyperparams={**opt.hyperparams, "learning_rate": lrs})
        return stacked.replace(hparams=hparams, opt_state=opt)

    shardings = student_shardings(jax.eval_shape(build, state, hparams, lrs), mesh,
                                  shard_students=shard_students, fsdp=fsdp)
    return jax.jit(build, out_shardings=shardings)(state, hparams, lrs)


def compile_students_step(step: Callable, state, mesh, *, shard_students: bool = False,
                          fsdp: bool = False) -> Callable:
    """jit `vmap(step)` once: `(stacked state, teacher params, batch) -> (state, metrics [G])`;
    the teacher params and the batch are shared, the state donated."""
    shardings = student_shardings(state, mesh, shard_students=shard_students, fsdp=fsdp)
    return jax.jit(jax.vmap(step, in_axes=(0, None, None)), donate_argnums=0,
                   out_shardings=(shardings, partitioning.replicated(mesh)))


def make_students_logits_fn(graphdef) -> Callable:
    """Jitted `(stacked params, batch) -> logits [B, G·C]`: every student in one forward pass, in
    the [B, ·] layout that `evaluate.predict` gathers."""
    forward = jax.vmap(steps.make_logits_fn(graphdef))

    def logits_fn(params, batch):
        g = jax.tree.leaves(params)[0].shape[0]
        # The batch gets the student axis too: then every operand of cuDNN attention carries it,
        # which its batching rule needs before jax 0.11.1 (jax-ml/jax#38495: unbatched sequence
        # lengths crash it). A broadcast, not a copy.
        batch = jax.tree.map(lambda x: jnp.broadcast_to(x, (g, *x.shape)), batch)
        logits = forward(params, batch)  # [G, B, C]
        return jnp.swapaxes(logits, 0, 1).reshape(logits.shape[1], -1)

    return jax.jit(logits_fn)


def evaluate_students(logits_fn, params, tok: data.Tokenized, task: str, mesh, batch_size: int,
                      students: int) -> list[dict[str, float]]:
    """Dev metrics (with "score", the main one) of each of the first `students` students."""
    num_labels = data.get_task(task).num_labels
    logits = evaluate.predict(logits_fn, params, tok, mesh, batch_size).reshape(len(tok), -1, num_labels)
    return [evaluate.scores(task, logits[:, g], tok.labels) for g in range(students)]


def replicate_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """The whole batch on every device (shard_students: each device trains its own students)."""
    sharding = partitioning.replicated(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
