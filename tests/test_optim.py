"""Tests for pkd_jax.optim against a hand-written numpy AdamW."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pkd_jax import optim

B1, B2, EPS, WD = 0.9, 0.999, 1e-6, 0.01


class Tiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(11, 4, rngs=rngs)
        self.dense = nnx.Linear(4, 3, rngs=rngs)
        self.norm = nnx.LayerNorm(3, rngs=rngs)


def random_params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    shapes = {
        "embed": {"embedding": (11, 4)},
        "layer": {"dense": {"kernel": (4, 3), "bias": (3,)}, "LayerNorm": {"scale": (3,), "bias": (3,)}},
    }
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s), jnp.float32),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def random_grads(params, seed: int, norm: float) -> dict:
    """Gradients of the params' structure with global norm `norm`."""
    rng = np.random.default_rng(seed)
    g = jax.tree.map(lambda p: rng.normal(size=p.shape), params)
    scale = norm / np.sqrt(sum(np.sum(x**2) for x in jax.tree.leaves(g)))
    return jax.tree.map(lambda x: jnp.asarray(x * scale, jnp.float32), g)


# ----------------------------------------------------------------------------- decay mask


def test_decay_mask_nnx_state():
    state = nnx.state(Tiny(nnx.Rngs(0)), nnx.Param)
    mask = optim.decay_mask(state)
    assert jax.tree.structure(mask) == jax.tree.structure(state)
    assert nnx.to_pure_dict(mask) == {
        "embed": {"embedding": True},
        "dense": {"kernel": True, "bias": False},
        "norm": {"scale": False, "bias": False},
    }


def test_decay_mask_pure_dict():
    pure = nnx.to_pure_dict(nnx.state(Tiny(nnx.Rngs(0)), nnx.Param))
    assert optim.decay_mask(pure) == {
        "embed": {"embedding": True},
        "dense": {"kernel": True, "bias": False},
        "norm": {"scale": False, "bias": False},
    }
    assert optim.decay_mask({"layers": [{"kernel": 1, "bias": 2}], "LayerNorm": {"scale": 3}}) == {
        "layers": [{"kernel": True, "bias": False}],
        "LayerNorm": {"scale": False},
    }


def test_optimizer_on_nnx_state_skips_decay_on_bias_and_scale():
    """Zero gradients leave only weight decay: kernels and embeddings move, the rest do not."""
    state = nnx.state(Tiny(nnx.Rngs(0)), nnx.Param)
    tx = optim.make_optimizer(learning_rate=0.1, total_steps=10, warmup_steps=0)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, state), tx.init(state), state)
    expected = jax.tree.map(lambda p, m: -0.1 * WD * p * m, state, optim.decay_mask(state))
    jax.tree.map(lambda u, e: np.testing.assert_allclose(u, e, rtol=1e-6, atol=1e-12), updates, expected)


# ----------------------------------------------------------------------------- schedule


def test_lr_schedule_values():
    schedule = optim.lr_schedule(2e-5, total_steps=1000, warmup_steps=100)
    for step, want in [(0, 0.0), (50, 1e-5), (100, 2e-5), (550, 1e-5), (1000, 0.0), (1200, 0.0)]:
        np.testing.assert_allclose(schedule(step), want, rtol=1e-6, atol=1e-12)


def test_lr_schedule_without_warmup():
    schedule = optim.lr_schedule(1e-3, total_steps=10, warmup_steps=0)
    np.testing.assert_allclose([schedule(s) for s in (0, 5, 10)], [1e-3, 5e-4, 0.0], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("total, warmup", [(0, 0), (10, 10), (10, 11), (10, -1)])
def test_lr_schedule_errors(total, warmup):
    with pytest.raises(ValueError):
        optim.lr_schedule(1e-3, total_steps=total, warmup_steps=warmup)


# ----------------------------------------------------------------------------- updates vs numpy


def numpy_adamw(params, grads_seq, *, peak, total, warmup, max_grad_norm):
    """Reference BERT AdamW: clip, Adam with bias correction, decoupled decay on kernel/embedding."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [str(path[-1].key) for path, _ in flat]
    theta = [np.asarray(p, np.float64) for _, p in flat]
    m = [np.zeros_like(p) for p in theta]
    v = [np.zeros_like(p) for p in theta]
    for t, grads in enumerate(grads_seq, start=1):
        g = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
        norm = np.sqrt(sum(np.sum(x**2) for x in g))
        if max_grad_norm is not None and norm > max_grad_norm:
            g = [x * max_grad_norm / norm for x in g]
        step = t - 1  # updates already applied
        lr = peak * (step / warmup if step < warmup else max(0.0, (total - step) / (total - warmup)))
        for i, name in enumerate(names):
            m[i] = B1 * m[i] + (1 - B1) * g[i]
            v[i] = B2 * v[i] + (1 - B2) * g[i] ** 2
            u = (m[i] / (1 - B1**t)) / (np.sqrt(v[i] / (1 - B2**t)) + EPS)
            if name in ("kernel", "embedding"):
                u = u + WD * theta[i]
            theta[i] = theta[i] - lr * u
    return jax.tree_util.tree_unflatten(treedef, theta)


def run_optax(tx, params, grads_seq):
    state = tx.init(params)
    step = jax.jit(tx.update)
    for grads in grads_seq:
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_updates_match_numpy_adamw(max_grad_norm):
    params = random_params()
    # Norms above and below 1, so clipping acts on some steps only; warm-up and decay both covered.
    grads_seq = [random_grads(params, seed, norm) for seed, norm in enumerate([5.0, 0.3, 2.0, 0.8, 10.0])]
    kwargs = dict(peak=1e-2, total=6, warmup=2)
    tx = optim.make_optimizer(learning_rate=1e-2, total_steps=6, warmup_steps=2, max_grad_norm=max_grad_norm)
    got, _ = run_optax(tx, params, grads_seq)
    want = numpy_adamw(params, grads_seq, max_grad_norm=max_grad_norm, **kwargs)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), got, want)


def test_single_update_matches_numpy_adamw():
    params = random_params(1)
    grads = random_grads(params, 7, 3.0)
    tx = optim.make_optimizer(learning_rate=5e-2, total_steps=10, warmup_steps=0)
    got, _ = run_optax(tx, params, [grads])
    want = numpy_adamw(params, [grads], peak=5e-2, total=10, warmup=0, max_grad_norm=1.0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), got, want)
    assert not np.allclose(got["layer"]["dense"]["kernel"], params["layer"]["dense"]["kernel"])


@pytest.mark.parametrize("norm", [0.5, 4.0])
def test_clipping_acts_above_max_norm(norm):
    """Adam's first moment sees the clipped gradient: (1 − b1)·g·min(1, 1/‖g‖)."""
    params = random_params()
    grads = random_grads(params, 3, norm)
    for max_grad_norm, factor in [(1.0, min(1.0, 1.0 / norm)), (None, 1.0)]:
        tx = optim.make_optimizer(
            learning_rate=1e-3, total_steps=10, warmup_steps=1, max_grad_norm=max_grad_norm
        )
        _, state = tx.update(grads, tx.init(params), params)
        mu = optax.tree.get(state, "mu")
        want = jax.tree.map(lambda g: (1 - B1) * g * factor, grads)
        jax.tree.map(lambda m, w: np.testing.assert_allclose(m, w, rtol=1e-5), mu, want)


# ----------------------------------------------------------------------------- per-student learning rate


def test_peak_learning_rate_lives_in_state():
    params = random_params()
    grads = random_grads(params, 5, 2.0)
    tx = optim.make_optimizer(learning_rate=1e-3, total_steps=10, warmup_steps=0)
    base, _ = tx.update(grads, tx.init(params), params)
    state = tx.init(params)
    np.testing.assert_allclose(state.hyperparams["learning_rate"], 1e-3, rtol=1e-7)
    state.hyperparams["learning_rate"] = jnp.float32(3e-3)
    tripled, state = jax.jit(tx.update)(grads, state, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, 3 * b, rtol=1e-6), tripled, base)
    np.testing.assert_allclose(state.hyperparams["learning_rate"], 3e-3, rtol=1e-7)  # persists


def test_vmapped_students_with_their_own_learning_rates():
    lrs = [1e-3, 5e-3, 2e-2]
    students = [random_params(seed) for seed in range(3)]
    grads_seq = [
        [random_grads(p, 10 * s + i, norm) for i, norm in enumerate([3.0, 0.5, 1.5])]
        for s, p in enumerate(students)
    ]
    stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)  # noqa: E731

    tx = optim.make_optimizer(learning_rate=1.0, total_steps=5, warmup_steps=1)
    params = stack(students)
    state = jax.vmap(tx.init)(params)
    assert state.hyperparams["learning_rate"].shape == (3,)
    state.hyperparams["learning_rate"] = jnp.array(lrs, jnp.float32)
    step = jax.jit(jax.vmap(tx.update))
    for i in range(3):
        updates, state = step(stack([g[i] for g in grads_seq]), state, params)
        params = optax.apply_updates(params, updates)

    for s, lr in enumerate(lrs):
        alone = optim.make_optimizer(learning_rate=lr, total_steps=5, warmup_steps=1)
        want, _ = run_optax(alone, students[s], grads_seq[s])
        got = jax.tree.map(lambda x: x[s], params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), got, want)
        assert not np.allclose(got["embed"]["embedding"], students[s]["embed"]["embedding"])
