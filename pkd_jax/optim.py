"""BERT's AdamW from optax pieces: clipping, Adam, decoupled weight decay, warm-up + linear decay.

One update, with ``g`` the gradient clipped to global norm ``max_grad_norm``::

    m ← b1·m + (1 − b1)·g          v ← b2·v + (1 − b2)·g²
    u = m̂ / (√v̂ + eps) + wd·mask·θ    (m̂, v̂ bias-corrected; mask: "kernel" and "embedding" leaves)
    θ ← θ − lr_peak · s(step) · u

``s`` is the unit schedule of :func:`lr_schedule` (0 → 1 over ``warmup_steps``, then 1 → 0 at
``total_steps``); ``step`` counts the updates already applied, so the first update uses s(0).

The peak learning rate and the weight decay live in the optimizer state, in
``opt_state.hyperparams["learning_rate"]`` and ``opt_state.hyperparams["weight_decay"]``
(``optax.inject_hyperparams``), not in a closure. A vmapped sweep gives each student its own
peak learning rate by stacking values there::

    opt_state = jax.vmap(tx.init)(stacked_params)              # hyperparams become [S] arrays
    opt_state.hyperparams["learning_rate"] = jnp.array([1e-5, 2e-5, 5e-5])
    updates, opt_state = jax.vmap(tx.update)(grads, opt_state, stacked_params)

The learning rate actually applied at a step is ``hyperparams["learning_rate"] · s(step)``,
i.e. ``lr_schedule(peak, total_steps, warmup_steps)(step)`` for logging.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

DECAYED_LEAVES = ("kernel", "embedding")


def lr_schedule(learning_rate: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to ``learning_rate`` over ``warmup_steps``, then linear decay to 0
    at ``total_steps``: ``lr(n) = peak · min(n / warmup, (total − n) / (total − warmup))``, ≥ 0."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1, got {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"warmup_steps must lie in [0, total_steps) = [0, {total_steps}), got {warmup_steps}"
        )
    decay = optax.linear_schedule(learning_rate, 0.0, total_steps - warmup_steps)
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, decay], boundaries=[warmup_steps])


def _leaf_name(path: tuple) -> str | None:
    """Name of the parameter at ``path``: the last dict key, skipping nnx Variables' ``.value``."""
    for entry in reversed(path):
        if isinstance(entry, jax.tree_util.DictKey):
            return str(entry.key)
        if isinstance(entry, jax.tree_util.GetAttrKey) and entry.name != "value":
            return entry.name
    return None


def decay_mask(params: optax.Params) -> optax.Params:
    """Same-structure tree of bools: True for weight matrices and embeddings (leaves named
    "kernel" or "embedding"), False for biases and LayerNorm scales.

    Works on plain nested dicts and on flax ``nnx.State`` (whose paths end in ``.value``).
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _leaf_name(path) in DECAYED_LEAVES, params
    )


def make_optimizer(
    *,
    learning_rate: float,
    total_steps: int,
    warmup_steps: int,
    weight_decay: float = 0.01,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    max_grad_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """BERT AdamW (see the module docstring); ``max_grad_norm=None`` disables clipping.

    ``learning_rate`` is the peak; it and ``weight_decay`` are stored (float32) in
    ``opt_state.hyperparams`` and may be changed there, per student under vmap.
    """
    unit_schedule = lr_schedule(1.0, total_steps, warmup_steps)
    clip = optax.identity() if max_grad_norm is None else optax.clip_by_global_norm(max_grad_norm)

    def bert_adamw(learning_rate, weight_decay) -> optax.GradientTransformation:
        return optax.chain(
            clip,
            optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
            optax.add_decayed_weights(weight_decay, mask=decay_mask),
            optax.scale_by_schedule(unit_schedule),
            optax.scale_by_learning_rate(learning_rate),
        )

    # float32 hyperparams keep the learning rate exact even for bf16 params.
    return optax.inject_hyperparams(bert_adamw, hyperparam_dtype=jnp.float32)(
        learning_rate=learning_rate, weight_decay=weight_decay
    )
