"""Jitted steps on 8 fake CPU devices: sharding-invariance, FSDP, no recompiles, cached == online."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pkd_jax import bert, checkpoints, losses, optim, partitioning, steps

LAYER_MAP = losses.layer_map(6, 3, "skip")  # (2, 4)


@pytest.fixture(scope="module")
def batch(tokenizer):
    rng = np.random.default_rng(0)
    words = "good bad film plot actor slow funny dull great awful".split()
    a = [" ".join(rng.choice(words, rng.integers(2, 12))) for _ in range(16)]
    b = [" ".join(rng.choice(words, rng.integers(1, 8))) for _ in range(16)]
    enc = tokenizer(a, b, padding="max_length", max_length=32, return_tensors="np")
    out = {k: enc[k].astype(np.int32) for k in ("input_ids", "token_type_ids", "attention_mask")}
    out["labels"] = rng.integers(0, 2, 16).astype(np.int32)
    return out


@pytest.fixture(scope="module")
def teacher(minilm_dir):
    return nnx.split(checkpoints.load_pretrained(minilm_dir, num_labels=2, seed=1), nnx.Param)


def _student(minilm_dir, alpha=0.5, beta=100.0, temperature=5.0):
    tx = optim.make_optimizer(learning_rate=1e-4, total_steps=100, warmup_steps=2)
    model = checkpoints.load_pretrained(minilm_dir, num_labels=2, num_layers=3)
    graphdef, state = steps.create_train_state(model, tx, seed=0, alpha=alpha, beta=beta, temperature=temperature)
    return tx, graphdef, state


def _distill(minilm_dir, teacher, batch, mesh, *, fsdp=False, num_steps=2, **hp):
    tx, graphdef, state = _student(minilm_dir, **hp)
    step = steps.make_distill_step(graphdef, tx, layer_map=LAYER_MAP, teacher_graphdef=teacher[0])
    fn = steps.compile_step(step, state, mesh, fsdp=fsdp)
    state, teacher_params = partitioning.place_state(state, mesh, fsdp), partitioning.place_state(teacher[1], mesh, fsdp)
    history = []
    for _ in range(num_steps):
        state, metrics = fn(state, teacher_params, partitioning.shard_batch(batch, mesh))
        history.append(jax.device_get(metrics))
    return jax.device_get(state), history


def _assert_same(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def test_eight_devices_match_one(minilm_dir, teacher, batch):
    """Data parallelism changes only the summation order: loss and params agree to 1e-5."""
    assert len(jax.devices()) == 8
    one, h1 = _distill(minilm_dir, teacher, batch, partitioning.make_mesh(devices=jax.devices()[:1]))
    eight, h8 = _distill(minilm_dir, teacher, batch, partitioning.make_mesh())
    for m1, m8 in zip(h1, h8):
        for key in ("loss", "ce", "ds", "pt", "grad_norm"):
            np.testing.assert_allclose(m1[key], m8[key], rtol=1e-5, err_msg=key)
    _assert_same(one.params, eight.params, atol=1e-5)
    assert int(eight.step) == 2


def test_fsdp_shards_params_and_matches_replicated(minilm_dir, teacher, batch):
    mesh = partitioning.make_mesh(fsdp=4)
    tx, graphdef, state = _student(minilm_dir)
    placed = partitioning.place_state(state, mesh, fsdp=True)
    kernel = placed.params["bert"]["encoder"]["layer"][0]["intermediate"]["dense"]["kernel"][...]
    assert kernel.sharding.shard_shape(kernel.shape) == (384, 1536 // 4)
    fsdp, _ = _distill(minilm_dir, teacher, batch, mesh, fsdp=True)
    replicated, _ = _distill(minilm_dir, teacher, batch, partitioning.make_mesh())
    _assert_same(fsdp.params, replicated.params, atol=1e-5)


def test_step_compiles_once(minilm_dir, teacher, batch):
    mesh = partitioning.make_mesh()
    tx, graphdef, state = _student(minilm_dir)
    traces = []
    inner = steps.make_distill_step(graphdef, tx, layer_map=LAYER_MAP, teacher_graphdef=teacher[0])

    def counted(*args):
        traces.append(1)  # runs only while tracing
        return inner(*args)

    fn = steps.compile_step(counted, state, mesh)
    state, teacher_params = partitioning.place_state(state, mesh), partitioning.place_state(teacher[1], mesh)
    for _ in range(3):
        state, _ = fn(state, teacher_params, partitioning.shard_batch(batch, mesh))
    assert len(traces) == 1


def test_cached_teacher_outputs_equal_online(minilm_dir, teacher, batch):
    """Cached mode reads the same teacher logits / mapped [CLS] vectors from the batch."""
    mesh = partitioning.make_mesh()
    out = bert.apply(teacher[0], teacher[1], {k: jnp.asarray(v) for k, v in batch.items()})
    cached = dict(batch, teacher_logits=np.asarray(out.logits),
                  teacher_features=np.asarray(out.cls[np.array(LAYER_MAP) - 1]).transpose(1, 0, 2))
    tx, graphdef, state = _student(minilm_dir)
    online_fn = steps.compile_step(
        steps.make_distill_step(graphdef, tx, layer_map=LAYER_MAP, teacher_graphdef=teacher[0]), state, mesh)
    cached_fn = steps.compile_step(steps.make_distill_step(graphdef, tx, layer_map=LAYER_MAP), state, mesh)
    s_online, m_online = online_fn(partitioning.place_state(state, mesh), partitioning.place_state(teacher[1], mesh),
                                   partitioning.shard_batch(batch, mesh))
    state = _student(minilm_dir)[2]  # the first call donated the placed copy of the state
    s_cached, m_cached = cached_fn(partitioning.place_state(state, mesh), None, partitioning.shard_batch(cached, mesh))
    for key in ("loss", "ce", "ds", "pt"):
        np.testing.assert_allclose(m_online[key], m_cached[key], rtol=1e-4, atol=1e-7, err_msg=key)
    _assert_same(s_online.params, s_cached.params, atol=1e-6)


def test_alpha_beta_zero_is_fine_tuning(minilm_dir, teacher, batch):
    mesh = partitioning.make_mesh()
    distilled, hd = _distill(minilm_dir, teacher, batch, mesh, alpha=0.0, beta=0.0)
    tx, graphdef, state = _student(minilm_dir)
    fn = steps.compile_step(steps.make_finetune_step(graphdef, tx), state, mesh)
    state = partitioning.place_state(state, mesh)
    for m in hd:
        state, metrics = fn(state, partitioning.shard_batch(batch, mesh))
        np.testing.assert_allclose(metrics["loss"], m["loss"], rtol=1e-6)
    _assert_same(jax.device_get(state).params, distilled.params, atol=1e-6)


def test_hparams_drive_the_loss(minilm_dir, teacher, batch):
    """α, β, T live in the state: the same compiled step serves every grid point."""
    mesh = partitioning.make_mesh()
    _, (m,) = _distill(minilm_dir, teacher, batch, mesh, num_steps=1, alpha=0.3, beta=7.0, temperature=2.0)
    np.testing.assert_allclose(m["loss"], 0.7 * m["ce"] + 0.3 * m["ds"] + 7.0 * m["pt"], rtol=1e-5)
    assert m["pt"] > 0 and m["ds"] > 0


def test_batch_size_must_divide_over_devices():
    with pytest.raises(ValueError, match="multiple of the 8 devices"):
        partitioning.check_batch_size(12, partitioning.make_mesh())
    with pytest.raises(ValueError, match="fsdp=3"):
        partitioning.make_mesh(fsdp=3)


def test_moved_step_factories_keep_working_with_a_warning():
    from pkd_jax import train

    with pytest.warns(DeprecationWarning, match=r"pkd_jax\.steps\.make_distill_step"):
        assert train.make_distill_step is steps.make_distill_step
    with pytest.raises(AttributeError):
        train.no_such_name  # noqa: B018
