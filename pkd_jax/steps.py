"""The train state, the pure fine-tune / distillation steps, and their compilation over a mesh.

Steps are pure functions `(state, [teacher_params,] batch) -> (state, metrics)`; `compile_step`
jits them once with explicit shardings and the state donated. Only the student is
differentiated: the teacher's forward pass (online mode) runs inside the same program under
`stop_gradient`, or its outputs arrive in the batch (cached mode: `teacher_logits` [B, C] and
`teacher_features` [B, M, H], the patient features of the M mapped layers). Losses come from
`losses.py`, the model from `bert.py`; this module wires them and knows nothing of data files,
loops or logs.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pkd_jax import bert, data, losses, partitioning, timing

log = logging.getLogger(__name__)

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

# What a training step reads from a batch: the model inputs, the labels and, cached, the teacher's.
TRAIN_INPUTS = (*data.MODEL_INPUTS, "labels", "teacher_logits", "teacher_features")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: Any  # the student's parameters, a nested dict of arrays (float32 master copy)
    opt_state: Any
    rng: jax.Array  # raw uint32 key; step s uses fold_in(rng, s), so resuming replays dropout exactly
    hparams: dict[str, jax.Array]  # alpha, beta, temperature: float32 scalars (one per student under vmap)
    # Learned map of the student's [CLS] vectors to the teacher's hidden size ({"kernel", "bias"}),
    # trained with the student; None when both sizes agree.
    projection: Any = None

    def trainable(self):
        """What the optimizer updates: the params, plus the projection when there is one."""
        return self.params if self.projection is None else (self.params, self.projection)


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int,
                       alpha: float = 0.0, beta: float = 0.0, temperature: float = 1.0,
                       projection_to: int | None = None):
    """(graphdef, state) for a student model; the graphdef is static, the state a pytree.

    projection_to: the teacher's hidden size, when it differs from the student's.
    """
    graphdef, params = nnx.split(model, nnx.Param)
    # Plain arrays, not nnx variables (nnx.merge takes either): each variable is a Python pytree
    # node, and flattening the state into a step call and building it again from the outputs cost
    # 2.0 ms of host time a call for a 6-layer student against 0.3 ms (docs/benchmarks.md).
    params = nnx.to_pure_dict(params)
    hparams = {k: jnp.float32(v) for k, v in (("alpha", alpha), ("beta", beta), ("temperature", temperature))}
    projection = None
    if projection_to is not None:
        hidden = model.config.hidden_size
        init = jax.random.normal(jax.random.PRNGKey(seed), (hidden, projection_to)) * model.config.initializer_range
        projection = {"kernel": init, "bias": jnp.zeros(projection_to)}
    state = TrainState(step=jnp.int32(0), params=params, opt_state=None, rng=jax.random.PRNGKey(seed),
                       hparams=hparams, projection=projection)
    return graphdef, state.replace(opt_state=tx.init(state.trainable()))


def as_variables(state):
    """`state` in the layout train states had before 2026-12-01 (their checkpoints' layout): every
    parameter, and every Adam moment of one, an nnx.Param (found by the parameters' top-level keys
    in its path); None for a state without a `params` dict."""
    params = getattr(state, "params", None)
    if not isinstance(params, dict):
        return None

    def wrap(path, x):
        keys = {k.key for k in path if isinstance(k, jax.tree_util.DictKey)}
        if path[0] == jax.tree_util.GetAttrKey("params") or (
                path[0] == jax.tree_util.GetAttrKey("opt_state") and keys & set(params)):
            return nnx.Param(x)
        return x

    return jax.tree_util.tree_map_with_path(wrap, state)


def as_arrays(state):
    """`state` with every nnx variable replaced by its array: today's layout."""
    return jax.tree.map(lambda v: v[...], state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _apply_gradients(state: TrainState, tx, loss_fn) -> tuple[TrainState, jax.Array, Any]:
    """One optimizer update; `loss_fn(params, projection)` -> (loss, aux)."""
    def loss_of(trainable):
        return loss_fn(*(trainable if state.projection is not None else (trainable, None)))

    (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(state.trainable())
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable())
    new = optax.apply_updates(state.trainable(), updates)
    params, projection = new if state.projection is not None else (new, None)
    state = state.replace(step=state.step + 1, params=params, projection=projection, opt_state=opt_state)
    return state, loss, (aux, optax.tree.norm(grads))


def _accuracy(logits, labels):
    return jnp.mean(jnp.argmax(logits, -1) == labels)


def make_finetune_step(graphdef, tx: optax.GradientTransformation, *, regression: bool = False):
    """Plain fine-tuning (teacher, or the FT-baseline student): cross-entropy or MSE."""

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params, _):
            logits = bert.apply(graphdef, params, batch, dropout_key=rng).logits
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
                      teacher_graphdef=None, teacher_dropout: bool = False, normalize: bool = True,
                      mode: str = "compat", regression: bool = False, distance="mse", features: str = "cls",
                      hidden_weight: float = 0.0, attention_weight: float = 0.0):
    """The PKD step: (1-α)·CE + α·KD(T) + β·patient, α/β/T read from `state.hparams`, plus the
    optional intermediate terms `hidden_weight`·hidden_mse and `attention_weight`·attention_kl.

    layer_map: 1-indexed teacher layers matched to student layers 1..k-1 (`losses.layer_map`);
    every intermediate term compares those pairs. features: "cls" or "mean" (`bert.FEATURES`).
    teacher_graphdef given: online mode, `step(state, teacher_params, batch)` runs the teacher
    (with its own dropout when `teacher_dropout`: a differently perturbed view every step).
    None: cached mode, `step(state, None, batch)` reads `teacher_logits` / `teacher_features`.
    The intermediate terms read per-token teacher states, never cached: they need the teacher
    online, and are computed only when their weight is non-zero (static).
    """
    k_minus_1 = len(layer_map)
    teacher_index = np.asarray(layer_map, np.int32) - 1  # features[l-1] is after layer l
    extras = {"hidden": hidden_weight > 0, "attentions": attention_weight > 0}
    if features not in bert.FEATURES:
        raise ValueError(f"patient features {features!r}: expected one of {bert.FEATURES}")
    if any(extras.values()) and teacher_graphdef is None:
        raise ValueError("hidden_mse and attention_kl compare per-token teacher states, which are not "
                         "cached: distil with the teacher online (teacher_mode=online)")

    def forward(g, params, batch, rng):
        return bert.apply(g, params, batch, dropout_key=rng, output_hidden_states=extras["hidden"],
                          output_attentions=extras["attentions"])

    def teacher_outputs(teacher_params, batch, rng):
        if teacher_graphdef is None:
            return batch["teacher_logits"], jnp.swapaxes(batch["teacher_features"], 0, 1), {}
        out = forward(teacher_graphdef, teacher_params, batch, rng if teacher_dropout else None)
        mapped = {"hidden": out.hidden_states[np.asarray(layer_map)] if extras["hidden"] else None,
                  "attentions": out.attentions[teacher_index] if extras["attentions"] else None}
        return jax.lax.stop_gradient((out.logits, out.features(features)[teacher_index], mapped))

    def step(state: TrainState, teacher_params, batch: Batch) -> tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(state.rng, state.step)  # as in fine-tuning: α=β=0 is the FT step
        t_logits, t_features, t_mapped = teacher_outputs(teacher_params, batch, jax.random.fold_in(rng, 1))
        hp = state.hparams

        def project(x, projection):
            return x if projection is None else x @ projection["kernel"] + projection["bias"]

        def loss_fn(params, projection):
            out = forward(graphdef, params, batch, rng)
            s_features = project(out.features(features)[:k_minus_1], projection)
            loss, terms = losses.pkd_loss(
                out.logits, t_logits, batch["labels"], s_features, t_features,
                alpha=hp["alpha"], beta=hp["beta"], temperature=hp["temperature"],
                normalize=normalize, mode=mode, regression=regression, distance=distance)
            mask = batch["attention_mask"]
            if extras["hidden"]:  # hidden_states[l] is after layer l
                terms["hidden_mse"] = losses.hidden_mse(project(out.hidden_states[1:k_minus_1 + 1], projection),
                                                        t_mapped["hidden"], mask)
                loss = loss + hidden_weight * terms["hidden_mse"]
            if extras["attentions"]:
                terms["attention_kl"] = losses.attention_kl(out.attentions[:k_minus_1], t_mapped["attentions"], mask)
                loss = loss + attention_weight * terms["attention_kl"]
            return loss, (terms, out.logits)

        state, loss, ((terms, logits), grad_norm) = _apply_gradients(state, tx, loss_fn)
        metrics = {"loss": loss, **terms, "grad_norm": grad_norm}
        if not regression:
            metrics["accuracy"] = _accuracy(logits, batch["labels"])
            metrics["agreement"] = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(t_logits, -1))
        return state, metrics

    return step


def make_logits_fn(graphdef) -> Callable[[Any, Batch], jax.Array]:
    """`(params, batch) -> float32 logits`: the deterministic forward pass of evaluation."""
    def logits_fn(params, batch):
        return bert.apply(graphdef, params, batch).logits

    return logits_fn


def compile_step(step: Callable, state, mesh, *, fsdp: bool = False) -> Callable:
    """jit a step once: state sharded per `fsdp` and donated, metrics replicated."""
    shardings = partitioning.state_sharding(state, mesh, fsdp)
    return jax.jit(step, donate_argnums=0, out_shardings=(shardings, partitioning.replicated(mesh)))


class Precompiled:
    """A jitted function compiled ahead of time for every batch shape it will be called with.

    Batches are padded to a few length buckets, so a step has a few shapes; compiling them all
    before the loop (`compile_all`) keeps compilation out of the loop and out of its timings. A
    call with a shape not compiled yet compiles it, with a warning. The batch is the last
    argument; the other arguments keep their shapes.
    """

    def __init__(self, jitted: Callable, name: str = "step"):
        self.jitted, self.name = jitted, name
        self.compiled: dict[tuple, Any] = {}

    @staticmethod
    def _key(batch) -> tuple:
        return tuple(sorted((k, tuple(v.shape)) for k, v in batch.items()))

    def has(self, batch) -> bool:
        """Whether a batch of this shape (host or device arrays) is compiled already."""
        return self._key(batch) in self.compiled

    def __call__(self, *args):
        key = self._key(args[-1])
        if key not in self.compiled:
            log.warning("%s: compiling for a batch shape not compiled before the loop: %s", self.name,
                        dict(key))
            compile_all([(self, args)])
        return self.compiled[key](*args)


def compile_all(calls: Iterable[tuple[Precompiled, tuple]], threads: int | None = None) -> int:
    """Compile each `(function, example args)` whose batch shape is new, side by side
    (`timing.compile_ahead_all`: a run's length buckets and evaluation shapes on a thread pool; on a
    GPU each program's compilation takes seconds to tens of seconds, mostly on the host); returns
    how many programs were compiled."""
    pending, seen = [], set()
    for fn, args in calls:
        key = fn._key(args[-1])
        if key not in fn.compiled and (id(fn), key) not in seen:
            seen.add((id(fn), key))
            pending.append((fn, key, args))
    programs = timing.compile_ahead_all([(fn.jitted, args) for fn, _, args in pending], threads)
    for (fn, key, _), (program, _) in zip(pending, programs):
        fn.compiled[key] = program
    return len(pending)
