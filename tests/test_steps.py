"""Jitted steps on 4 fake CPU devices: sharding-invariance, FSDP, no recompiles, cached == online."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pkd_jax import bert, checkpoints, losses, optim, partitioning, steps

LAYER_MAP = losses.layer_map(6, 3, "skip")  # (2, 4)
LEARNING_RATE = 1e-3  # no warm-up: each of the 3 Adam updates moves a weight by up to ~1e-3
# Runs that differ only in summation order (1 vs 4 devices, FSDP vs replicated, cached vs online
# teacher outputs), 3 updates on 3 different batches, measured on CPU (XLA, 8 fake devices; 4 stay within the bounds):
# loss, ce, pt, grad_norm relative differences <= 2.6e-7 (rtol 1e-6); ds, a KL at T=5 between
# near-equal distributions (~1e-4..2e-3) that cancels T²·log p (float32 ulp ~6e-8 · 25), absolute
# <= 9.3e-8 (atol 3e-7); params after the last step <= 6.9e-7 (FSDP; 1 vs 8: 2.7e-7, cached:
# 1.6e-7), bound 2e-6. They moved by up to 2.97e-3 (> 1000 x the bound); feeding batches 2 and 3
# in swapped order changes the loss by 1.8e-3 relative and the params by 3.2e-3.
METRIC_RTOL = 1e-6
DS_ATOL = 3e-7
PARAMS_ATOL = 2e-6


@pytest.fixture(scope="module")
def batches(tokenizer):
    """Three different batches of 16 sentence pairs (32 tokens: padding, two segments)."""
    rng = np.random.default_rng(0)
    words = "good bad film plot actor slow funny dull great awful".split()
    a = [" ".join(rng.choice(words, rng.integers(2, 12))) for _ in range(48)]
    b = [" ".join(rng.choice(words, rng.integers(1, 8))) for _ in range(48)]
    enc = tokenizer(a, b, padding="max_length", max_length=32, return_tensors="np")
    out = {k: enc[k].astype(np.int32) for k in ("input_ids", "token_type_ids", "attention_mask")}
    out["labels"] = rng.integers(0, 2, 48).astype(np.int32)
    return [{k: v[i * 16:(i + 1) * 16] for k, v in out.items()} for i in range(3)]


@pytest.fixture(scope="module")
def batch(batches):
    return batches[0]


@pytest.fixture(scope="module")
def teacher(minilm_dir):
    return nnx.split(checkpoints.load_pretrained(minilm_dir, num_labels=2, seed=1), nnx.Param)


def _student(minilm_dir, alpha=0.5, beta=100.0, temperature=5.0):
    tx = optim.make_optimizer(learning_rate=LEARNING_RATE, total_steps=100, warmup_steps=0)
    model = checkpoints.load_pretrained(minilm_dir, num_labels=2, num_layers=3)
    graphdef, state = steps.create_train_state(model, tx, seed=0, alpha=alpha, beta=beta, temperature=temperature)
    return tx, graphdef, state


def _distill(minilm_dir, teacher, batches, mesh, *, fsdp=False, **hp):
    """One distillation step per batch; (final host state, metrics of each step)."""
    tx, graphdef, state = _student(minilm_dir, **hp)
    step = steps.make_distill_step(graphdef, tx, layer_map=LAYER_MAP, teacher_graphdef=teacher[0])
    fn = steps.compile_step(step, state, mesh, fsdp=fsdp)
    state, teacher_params = partitioning.place_state(state, mesh, fsdp), partitioning.place_state(teacher[1], mesh, fsdp)
    history = []
    for batch in batches:
        state, metrics = fn(state, teacher_params, partitioning.shard_batch(batch, mesh))
        history.append(jax.device_get(metrics))
    return jax.device_get(state), history


@pytest.fixture(scope="module")
def replicated(minilm_dir, teacher, batches):
    """The reference run: 3 updates, one per batch, data-parallel over the 4 devices."""
    return _distill(minilm_dir, teacher, batches, partitioning.make_mesh())


def _max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _assert_same(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def _assert_same_run(run, reference):
    """Same losses and gradient norms at every step and the same params after the last one."""
    (state, history), (ref_state, ref_history) = run, reference
    assert int(state.step) == int(ref_state.step) == len(history) == len(ref_history) == 3
    for i, (m, ref) in enumerate(zip(history, ref_history, strict=True)):
        for key in ("loss", "ce", "ds", "pt", "grad_norm"):
            np.testing.assert_allclose(m[key], ref[key], rtol=METRIC_RTOL, atol=DS_ATOL if key == "ds" else 0,
                                       err_msg=f"{key} at step {i}")
    _assert_same(state.params, ref_state.params, atol=PARAMS_ATOL)


@pytest.fixture(scope="module")
def initial_params(minilm_dir):
    return jax.tree.map(np.asarray, _student(minilm_dir)[2].params)


def _assert_trained(initial_params, run):
    """The 3 updates really moved the params: by ~3 x the learning rate, far beyond PARAMS_ATOL."""
    moved = _max_diff(run[0].params, initial_params)
    assert 2 * LEARNING_RATE < moved < 4 * LEARNING_RATE, moved
    losses_seen = [float(m["loss"]) for m in run[1]]
    assert len(set(losses_seen)) == 3, losses_seen  # three different batches


def test_four_devices_match_one(minilm_dir, teacher, batches, replicated, initial_params):
    """Data parallelism changes only the summation order (tolerances measured: see the top)."""
    assert len(jax.devices()) == 4
    _assert_trained(initial_params, replicated)
    one = _distill(minilm_dir, teacher, batches, partitioning.make_mesh(devices=jax.devices()[:1]))
    _assert_same_run(one, replicated)


def test_fsdp_shards_params_and_matches_replicated(minilm_dir, teacher, batches, replicated, initial_params):
    mesh = partitioning.make_mesh(fsdp=4)
    tx, graphdef, state = _student(minilm_dir)
    placed = partitioning.place_state(state, mesh, fsdp=True)
    kernel = placed.params["bert"]["encoder"]["layer"][0]["intermediate"]["dense"]["kernel"][...]
    assert kernel.sharding.shard_shape(kernel.shape) == (384, 1536 // 4)
    _assert_trained(initial_params, replicated)
    _assert_same_run(_distill(minilm_dir, teacher, batches, mesh, fsdp=True), replicated)


def test_step_compiles_once(minilm_dir, teacher, batches):
    mesh = partitioning.make_mesh()
    tx, graphdef, state = _student(minilm_dir)
    traces = []
    inner = steps.make_distill_step(graphdef, tx, layer_map=LAYER_MAP, teacher_graphdef=teacher[0])

    def step(*args):  # named as the inner step, so its program is the `replicated` run's, cached
        traces.append(1)  # runs only while tracing
        return inner(*args)

    fn = steps.compile_step(step, state, mesh)
    state, teacher_params = partitioning.place_state(state, mesh), partitioning.place_state(teacher[1], mesh)
    for batch in batches:
        state, _ = fn(state, teacher_params, partitioning.shard_batch(batch, mesh))
    assert len(traces) == 1


def test_compile_all_compiles_each_new_shape_once_on_a_thread_pool(monkeypatch):
    """A run's bucket shapes and evaluation shapes compile together: each new (function, batch
    shape) once, in the pool's threads (XLA releases the GIL there); a later call compiles none,
    and the compiled programs compute what the jitted functions do."""
    threads, compile_ = [], jax.stages.Lowered.compile

    def recorded(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return compile_(self, *args, **kwargs)

    monkeypatch.setattr(jax.stages.Lowered, "compile", recorded)
    step = steps.Precompiled(jax.jit(lambda w, b: (b["x"] * w).sum()), "step")
    logits = steps.Precompiled(jax.jit(lambda w, b: b["x"].mean(axis=1) + w), "evaluation")
    batches = [{"x": np.full((2, n), n, np.float32)} for n in (3, 5, 3, 7)]
    calls = [(step, (2.0, b)) for b in batches] + [(logits, (1.0, batches[0]))] * 2
    assert steps.compile_all(calls) == 4 and len(step.compiled) == 3 and len(logits.compiled) == 1
    assert len(threads) == 4 and all(t.startswith("compile") for t in threads)
    assert steps.compile_all(calls) == 0 and len(threads) == 4
    assert float(step(2.0, batches[1])) == 2.0 * 5 * 10 and float(step(2.0, batches[3])) == 2.0 * 7 * 14
    np.testing.assert_array_equal(logits(1.0, batches[0]), [4.0, 4.0])


def test_cached_teacher_outputs_equal_online(minilm_dir, teacher, batches, replicated, initial_params):
    """Cached mode reads the same teacher logits / mapped [CLS] vectors from the batch."""
    mesh = partitioning.make_mesh()
    every = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}  # one teacher pass for all
    out = bert.apply(teacher[0], teacher[1], {k: jnp.asarray(v) for k, v in every.items()})
    logits, features = np.asarray(out.logits), np.asarray(out.cls[np.array(LAYER_MAP) - 1]).transpose(1, 0, 2)
    rows = np.cumsum([0] + [len(b["labels"]) for b in batches])
    cached = [dict(b, teacher_logits=logits[i:j], teacher_features=features[i:j])
              for b, i, j in zip(batches, rows[:-1], rows[1:])]
    tx, graphdef, state = _student(minilm_dir)
    cached_fn = steps.compile_step(steps.make_distill_step(graphdef, tx, layer_map=LAYER_MAP), state, mesh)
    state, history = partitioning.place_state(state, mesh), []
    for batch in cached:
        state, metrics = cached_fn(state, None, partitioning.shard_batch(batch, mesh))
        history.append(jax.device_get(metrics))
    _assert_trained(initial_params, replicated)
    _assert_same_run((jax.device_get(state), history), replicated)


def test_projection_gets_gradients_trains_and_is_checkpointed(minilm_dir, batches, tmp_path):
    """A 384-wide MiniLM student under a 96-wide teacher: the learned map of its [CLS] vectors to
    96 (`projection_to`) gets a gradient in every entry, moves with the params over 3 updates (its
    bias, not weight-decayed, by the gradient alone) and comes back from an orbax checkpoint, with
    its Adam moments, bit for bit. Measured at the first update: gradient norms 10.0 (kernel) and 1.23
    (bias) of 10.2 in all (β = 100: the patient term dominates); both moved by 2.97e-3 in 3 updates."""
    config = bert.BertConfig(hidden_size=96, num_hidden_layers=1, num_attention_heads=4, intermediate_size=192)
    t_graphdef, t_params = nnx.split(bert.BertForSequenceClassification(config, rngs=nnx.Rngs(1)), nnx.Param)
    tx = optim.make_optimizer(learning_rate=LEARNING_RATE, total_steps=100, warmup_steps=0)
    student = checkpoints.load_pretrained(minilm_dir, num_labels=2, num_layers=2)
    graphdef, state = steps.create_train_state(student, tx, seed=0, alpha=0.5, beta=100.0, temperature=5.0,
                                               projection_to=96)
    initial = jax.tree.map(np.array, state)  # a host copy: placing and stepping donate the state
    assert initial.projection["kernel"].shape == (384, 96) and initial.projection["bias"].shape == (96,)
    mesh = partitioning.make_mesh(devices=jax.devices()[:1])
    fn = steps.compile_step(steps.make_distill_step(graphdef, tx, layer_map=(1,), teacher_graphdef=t_graphdef),
                            state, mesh)
    state, t_params = partitioning.place_state(state, mesh), partitioning.place_state(t_params, mesh)
    for i, batch in enumerate(batches):
        state, metrics = fn(state, t_params, partitioning.shard_batch(batch, mesh))
        if i == 0:  # Adam's first moment after one update: (1 - b1) x the gradient clipped to norm 1
            _, grad = jax.tree.map(lambda mu: np.asarray(mu) / 0.1 * max(1.0, float(metrics["grad_norm"])),
                                   optax.tree.get(jax.device_get(state.opt_state), "mu"))
            for name, g in grad.items():
                assert np.count_nonzero(g) == g.size, name
            share = np.sqrt(sum(np.sum(g**2) for g in grad.values())) / float(metrics["grad_norm"])
            assert share > 0.5, share
    saved = jax.device_get(state)
    for name in ("kernel", "bias"):
        moved = float(np.max(np.abs(saved.projection[name] - initial.projection[name])))
        assert 2 * LEARNING_RATE < moved < 4 * LEARNING_RATE, (name, moved)

    ckpt = checkpoints.TrainCheckpointer(tmp_path / "checkpoints")
    ckpt.save(3, state, {"step": 3})
    ckpt.wait()
    restored, _ = ckpt.restore(3, initial)
    ckpt.close()
    assert int(restored.step) == 3
    _assert_same(restored, saved, atol=0)
    np.testing.assert_array_equal(restored.projection["kernel"], saved.projection["kernel"])
    np.testing.assert_array_equal(restored.projection["bias"], saved.projection["bias"])


def test_a_checkpoint_of_the_nnx_variable_layout_restores_into_plain_arrays(minilm_dir, tmp_path):
    """Train states saved before 2026-12-01 held parameters and Adam moments as nnx variables (paths
    ending in .value); such a checkpoint, written here the old way (with a projection), restores
    every value into today's layout of plain arrays."""
    tx = optim.make_optimizer(learning_rate=LEARNING_RATE, total_steps=100, warmup_steps=0)
    model = checkpoints.load_pretrained(minilm_dir, num_labels=2, num_layers=3)
    _, variables = nnx.split(model, nnx.Param)
    assert isinstance(jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nnx.Variable))[0], nnx.Param)
    rng = np.random.default_rng(0)
    projection = {"kernel": rng.normal(size=(384, 512)).astype(np.float32), "bias": np.ones(512, np.float32)}
    old = steps.TrainState(step=jnp.int32(7), params=variables, opt_state=tx.init((variables, projection)),
                           rng=jax.random.PRNGKey(3), hparams={"alpha": jnp.float32(0.5)}, projection=projection)
    old = jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(x.dtype)  # moments not all zeros
                       if x.dtype == np.float32 and x.ndim else x, old)
    ckpt = checkpoints.TrainCheckpointer(tmp_path / "checkpoints")
    ckpt.save(7, old, {"step": 7})
    ckpt.wait()
    _, target = steps.create_train_state(model, tx, seed=0, alpha=0.5, projection_to=512)
    target = target.replace(hparams={"alpha": target.hparams["alpha"]})
    assert not any(isinstance(x, nnx.Variable) for x in
                   jax.tree.leaves(target, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    restored, meta = ckpt.restore(7, target)
    ckpt.close()
    assert meta == {"step": 7} and jax.tree.structure(restored) == jax.tree.structure(target)
    for new, before in zip(jax.tree.leaves(restored), jax.tree.leaves(old), strict=True):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(before))


def test_alpha_beta_zero_is_fine_tuning(minilm_dir, teacher, batches, initial_params):
    """α = β = 0 is the fine-tuning step; measured bitwise equal over 3 updates (bound 1e-7)."""
    mesh = partitioning.make_mesh()
    distilled, hd = _distill(minilm_dir, teacher, batches, mesh, alpha=0.0, beta=0.0)
    tx, graphdef, state = _student(minilm_dir)
    fn = steps.compile_step(steps.make_finetune_step(graphdef, tx), state, mesh)
    state = partitioning.place_state(state, mesh)
    for batch, m in zip(batches, hd, strict=True):
        state, metrics = fn(state, partitioning.shard_batch(batch, mesh))
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(metrics[key], m[key], rtol=1e-7, err_msg=key)
    _assert_same(jax.device_get(state).params, distilled.params, atol=1e-7)
    _assert_trained(initial_params, (distilled, hd))


def test_hparams_drive_the_loss(minilm_dir, teacher, batch):
    """α, β, T live in the state: the same compiled step serves every grid point."""
    mesh = partitioning.make_mesh()
    _, (m,) = _distill(minilm_dir, teacher, [batch], mesh, alpha=0.3, beta=7.0, temperature=2.0)
    np.testing.assert_allclose(m["loss"], 0.7 * m["ce"] + 0.3 * m["ds"] + 7.0 * m["pt"], rtol=1e-5)
    assert m["pt"] > 0 and m["ds"] > 0


def test_batch_size_must_divide_over_devices():
    with pytest.raises(ValueError, match="multiple of the 4 devices"):
        partitioning.check_batch_size(6, partitioning.make_mesh())
    with pytest.raises(ValueError, match="fsdp=3"):
        partitioning.make_mesh(fsdp=3)


def test_moved_step_factories_keep_working_with_a_warning():
    from pkd_jax import train

    with pytest.warns(DeprecationWarning, match=r"pkd_jax\.steps\.make_distill_step"):
        assert train.make_distill_step is steps.make_distill_step
    with pytest.raises(AttributeError):
        train.no_such_name  # noqa: B018
