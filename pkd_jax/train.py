"""Train state, jitted fine-tune / distillation steps over a device mesh.

Steps are pure functions `(state, [teacher_params,] batch) -> (state, metrics)`; `compile_step`
jits them once with explicit shardings and the state donated. Only the student is
differentiated: the teacher's forward pass (online mode) runs inside the same program under
`stop_gradient`, or its outputs arrive in the batch (cached mode: `teacher_logits` [B, C] and
`teacher_cls` [B, M, H] for the M mapped layers).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pkd_jax import losses, partitioning

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

# ============================================================================================
# Train state
# ============================================================================================


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: Any  # the student's nnx.State of Params (float32 master copy)
    opt_state: Any
    rng: jax.Array  # raw uint32 key; step s uses fold_in(rng, s), so resuming replays dropout exactly
    hparams: dict[str, jax.Array]  # alpha, beta, temperature: float32 scalars (one per student under vmap)


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int,
                       alpha: float = 0.0, beta: float = 0.0, temperature: float = 1.0):
    """(graphdef, state) for a student model; the graphdef is static, the state a pytree."""
    graphdef, params = nnx.split(model, nnx.Param)
    hparams = {k: jnp.float32(v) for k, v in (("alpha", alpha), ("beta", beta), ("temperature", temperature))}
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(seed), hparams=hparams)
    return graphdef, state


# ============================================================================================
# Forward passes
# ============================================================================================


def forward(graphdef, params, batch: Batch, *, rng=None):
    """The model's BertOutput; dropout on when a key is given."""
    model = nnx.merge(graphdef, params)
    return model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                 deterministic=rng is None, rngs=rng)


def _apply_gradients(state: TrainState, tx, loss_fn) -> tuple[TrainState, jax.Array, Any]:
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new, loss, (aux, optax.tree.norm(grads))


def _accuracy(logits, labels):
    return jnp.mean(jnp.argmax(logits, -1) == labels)


# ============================================================================================
# Steps
# ============================================================================================


def make_finetune_step(graphdef, tx: optax.GradientTransformation, *, regression: bool = False):
    """Plain fine-tuning (teacher, or the FT-baseline student): cross-entropy or MSE."""

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            logits = forward(graphdef, params, batch, rng=rng).logits
            if regression:
                return jnp.mean(jnp.square(logits[:, 0] - batch["labels"])), logits
            return losses.cross_entropy(logits, batch["labels"]), logits

        state, loss, (logits, grad_norm) = _apply_gradients(state, tx, loss_fn)
        metrics = {"loss": loss, "grad_norm": grad_norm}
        if not regression:
            metrics["accuracy"] = _accuracy(logits, batch["labels"])
        return state, metrics

    return step


def make_distill_step(graphdef, tx: optax.GradientTransformation, *, layer_map: tuple[int, ...],
                      teacher_graphdef=None, normalize: bool = True, mode: str = "compat",
                      regression: bool = False, distance="mse"):
    """The PKD step: (1-α)·CE + α·KD(T) + β·patient, α/β/T read from `state.hparams`.

    layer_map: 1-indexed teacher layers matched to student layers 1..k-1 (`losses.layer_map`).
    teacher_graphdef given: online mode, `step(state, teacher_params, batch)` runs the teacher.
    None: cached mode, `step(state, None, batch)` reads `teacher_logits` / `teacher_cls`.
    """
    k_minus_1 = len(layer_map)
    teacher_index = np.asarray(layer_map, np.int32) - 1  # cls[l-1] is after layer l

    def teacher_outputs(teacher_params, batch):
        if teacher_graphdef is None:
            return batch["teacher_logits"], jnp.swapaxes(batch["teacher_cls"], 0, 1)
        out = forward(teacher_graphdef, teacher_params, batch)
        return jax.lax.stop_gradient(out.logits), jax.lax.stop_gradient(out.cls[teacher_index])

    def step(state: TrainState, teacher_params, batch: Batch) -> tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(state.rng, state.step)
        t_logits, t_cls = teacher_outputs(teacher_params, batch)
        hp = state.hparams

        def loss_fn(params):
            out = forward(graphdef, params, batch, rng=rng)
            loss, terms = losses.pkd_loss(
                out.logits, t_logits, batch["labels"], out.cls[:k_minus_1], t_cls,
                alpha=hp["alpha"], beta=hp["beta"], temperature=hp["temperature"],
                normalize=normalize, mode=mode, regression=regression, distance=distance)
            return loss, (terms, out.logits)

        state, loss, ((terms, logits), grad_norm) = _apply_gradients(state, tx, loss_fn)
        metrics = {"loss": loss, **terms, "grad_norm": grad_norm}
        if not regression:
            metrics["accuracy"] = _accuracy(logits, batch["labels"])
            metrics["agreement"] = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(t_logits, -1))
        return state, metrics

    return step


def make_eval_step(graphdef):
    """Deterministic forward pass -> float32 logits."""
    return lambda params, batch: forward(graphdef, params, batch).logits


# ============================================================================================
# Compilation over the mesh
# ============================================================================================


def state_sharding(state, mesh, fsdp: bool = False):
    return partitioning.state_sharding(state, mesh, fsdp)


def compile_step(step: Callable, state, mesh, *, fsdp: bool = False) -> Callable:
    """jit a step once: state sharded per `fsdp` and donated, metrics replicated."""
    shardings = state_sharding(state, mesh, fsdp)
    return jax.jit(step, donate_argnums=0, out_shardings=(shardings, partitioning.replicated(mesh)))


def place(tree, mesh, fsdp: bool = False):
    """Put a state / params pytree on the mesh (replicated, or FSDP-sharded)."""
    return jax.device_put(tree, partitioning.state_sharding(tree, mesh, fsdp))
