"""The GPU/TPU paths: `pytest -m accelerator` on the device (`make accel-check` runs it there).

Tests marked `accelerator` skip on a CPU, unless PKD_JAX_ACCEL_SMOKE=1 (the check's `--smoke`
dry run), which runs them here with small shapes so the check is known to work before any
accelerator time is spent on it. The unmarked tests at the end check, on every machine, the
accelerator-only branches that a CPU can exercise.

bfloat16 bound (test_bf16_matches_transformers_on_device). Reference: transformers' PyTorch BERT
in float32 on the same device. Yardstick: the same PyTorch model under torch.autocast(bfloat16).
Our model keeps its residual stream and LayerNorm outputs in bfloat16 (as Flax and MaxText mixed
precision do); autocast keeps them in float32, so our error is larger. Measured on a CPU
(2026-11-30, random BERT-base, 12 layers, 8 padded pairs of 128 tokens): relative L2 error of
the logits 2.2e-2 against autocast's 1.0e-2, of the [CLS] vectors 9.2e-3 against 3.9e-3, of the
gradients 1.9x autocast's (median over parameters), 2.5x at most. Bound: 4x autocast's error plus
bfloat16's unit roundoff 2^-8, i.e. about twice the measured worst case; a wrong mask, scale or
cast gives errors of order 1. Without torch on the device (TPU): against our own float32 model
at the highest matmul precision, bound 5e-2 (twice the largest measured error).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pkd_jax import bert, checkpoints, losses, optim, partitioning, steps, sweep

SMOKE = os.environ.get("PKD_JAX_ACCEL_SMOKE") == "1"
ON_DEVICE = jax.default_backend() in ("gpu", "tpu")
on_device = pytest.mark.skipif(not (ON_DEVICE or SMOKE), reason="needs a GPU or TPU "
                               "(PKD_JAX_ACCEL_SMOKE=1 runs it on a CPU with small shapes)")
BF16_FLOOR = 2.0**-8


def _config(layers=None):
    if ON_DEVICE and not SMOKE:  # BERT-base, random weights
        return bert.BertConfig(num_hidden_layers=layers or 12)
    return bert.BertConfig(hidden_size=128, num_hidden_layers=layers or 2, num_attention_heads=4,
                           intermediate_size=512, max_position_embeddings=128)


def _batch(config, b=8, s=None, seed=0):
    """b pairs, right-padded to s tokens, two segments, the first row full, the last all padding."""
    s = s or (128 if ON_DEVICE and not SMOKE else 32)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(s // 4, s + 1, b)
    lengths[0], lengths[-1] = s, 0
    pos = np.arange(s)
    real = pos < lengths[:, None]
    return {"input_ids": np.where(real, rng.integers(1000, config.vocab_size, (b, s)), 0).astype(np.int32),
            "token_type_ids": (real & (pos >= lengths[:, None] // 2)).astype(np.int32),
            "attention_mask": real.astype(np.int32),
            "labels": rng.integers(0, 2, b).astype(np.int32)}


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _ours(config, params32, batch, dtype):
    """Logits, [CLS] vectors and the cross-entropy gradients (HF names and layouts) of our model."""
    graphdef, _ = nnx.split(bert.BertForSequenceClassification(config, dtype=dtype, rngs=nnx.Rngs(0)), nnx.Param)
    real = batch["attention_mask"].sum(1) > 0
    inputs = {k: jnp.asarray(v[real]) for k, v in batch.items()}

    def loss(p):
        out = bert.apply(graphdef, p, inputs)
        return losses.cross_entropy(out.logits, inputs["labels"]), out

    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params32)
    named = {checkpoints.hf_name(path): np.asarray(checkpoints._to_hf_array(path, v[...]))
             for path, v in nnx.to_flat_state(grads)}
    return np.asarray(out.logits), np.asarray(out.cls), named


def _torch_device():
    try:
        import torch
    except ImportError:
        return None
    if jax.default_backend() == "gpu":
        return torch.device("cuda") if torch.cuda.is_available() else None
    return torch.device("cpu") if jax.default_backend() == "cpu" else None


def _torch(config, model32, batch, device, bf16):
    import torch
    import transformers

    hf = transformers.BertForSequenceClassification(transformers.BertConfig(**config.to_hf_dict()))
    hf.load_state_dict({k: torch.from_numpy(v) for k, v in checkpoints.state_dict(model32).items()}, strict=False)
    hf = hf.to(device).eval()
    real = batch["attention_mask"].sum(1) > 0
    inputs = {k: torch.from_numpy(batch[k][real]).long().to(device)
              for k in ("input_ids", "token_type_ids", "attention_mask")}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = hf(**inputs, output_hidden_states=True)
    loss = torch.nn.functional.cross_entropy(out.logits.float(), torch.from_numpy(batch["labels"][real]).long().to(device))
    loss.backward()
    cls = np.stack([h[:, 0].float().detach().cpu().numpy() for h in out.hidden_states[1:]])
    grads = {k: p.grad.float().cpu().numpy() for k, p in hf.named_parameters()}
    return out.logits.float().detach().cpu().numpy(), cls, grads


@pytest.mark.accelerator
@on_device
def test_bf16_matches_transformers_on_device():
    config = _config()
    model32 = bert.BertForSequenceClassification(config, rngs=nnx.Rngs(0))
    params32 = nnx.state(model32, nnx.Param)
    batch = _batch(config)
    ours = _ours(config, params32, batch, jnp.bfloat16)
    device = _torch_device()
    if device is None:  # TPU: our float32 model at the highest precision is the reference
        with jax.default_matmul_precision("highest"):
            reference = _ours(config, params32, batch, jnp.float32)
        bounds = [5e-2] * 3
    else:
        reference = _torch(config, model32, batch, device, bf16=False)
        autocast = _torch(config, model32, batch, device, bf16=True)
        bounds = [4 * _rel(a, r) + BF16_FLOOR for a, r in zip(autocast[:2], reference[:2])]
        bounds.append({k: 4 * _rel(autocast[2][k], reference[2][k]) + BF16_FLOOR for k in reference[2]})
    assert _rel(ours[0], reference[0]) <= bounds[0], ("logits", _rel(ours[0], reference[0]), bounds[0])
    assert _rel(ours[1], reference[1]) <= bounds[1], ("cls", _rel(ours[1], reference[1]), bounds[1])
    worse = {k: (_rel(g, reference[2][k]), bounds[2][k] if isinstance(bounds[2], dict) else bounds[2])
             for k, g in ours[2].items()}
    assert not {k: v for k, v in worse.items() if v[0] > v[1]}, worse


@pytest.mark.accelerator
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_attention_equals_the_masked_xla_path():
    """The same bf16 model, cuDNN flash attention against the masked path, padding and an
    all-padding filler row included; bound: two bf16 summation orders, 2^-6 relative."""
    config = _config()
    batch = {k: jnp.asarray(v) for k, v in _batch(config).items()}
    outs = []
    for impl in ("cudnn", "xla"):
        model = bert.BertForSequenceClassification(
            bert.BertConfig(**{**config.__dict__, "attention_impl": impl}), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        outs.append(model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]))
    for field in ("logits", "cls"):
        a, b = np.asarray(getattr(outs[0], field)), np.asarray(getattr(outs[1], field))
        assert np.isfinite(a).all() and _rel(a, b) < 2.0**-6, (field, _rel(a, b))


class _Compiles:
    """Counts XLA compilations of jitted functions named `name` while active (jax_log_compiles)."""

    def __init__(self, name: str = "step"):
        import logging

        self.logger, self.prefix, self.count = logging.getLogger("jax._src.interpreters.pxla"), f"Compiling jit({name})", 0
        outer = self

        class Handler(logging.Handler):
            def emit(self, record):
                outer.count += record.getMessage().startswith(outer.prefix)

        self.handler = Handler()

    def __enter__(self):
        self.logger.addHandler(self.handler)
        jax.config.update("jax_log_compiles", True)
        return self

    def __exit__(self, *exc):
        jax.config.update("jax_log_compiles", False)
        self.logger.removeHandler(self.handler)


def _student_and_teacher(mesh):
    # 4 teacher layers (BERT-base width on a device): what these tests check does not depend on
    # depth, and every layer adds compilation time to the check's 8 minutes (12 -> 6 took 114 s
    # of the H200 run's 187 s of tests).
    config = _config(layers=4)
    k = config.num_hidden_layers // 2
    tx = optim.make_optimizer(learning_rate=1e-4, total_steps=100, warmup_steps=2)
    student = bert.BertForSequenceClassification(bert.BertConfig(**{**config.__dict__, "num_hidden_layers": k}),
                                                 dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    graphdef, state = steps.create_train_state(student, tx, seed=0, alpha=0.5, beta=100.0, temperature=5.0)
    teacher = nnx.split(bert.BertForSequenceClassification(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(1)), nnx.Param)
    layer_map = losses.layer_map(config.num_hidden_layers, k, "skip")
    return config, tx, graphdef, state, teacher, layer_map


@pytest.mark.accelerator
@on_device
@pytest.mark.parametrize("mode", ["online", "cached"])
def test_distill_step_compiles_once_and_runs_without_host_transfers(mode):
    """After the first call, the jitted step neither recompiles nor moves data between host and
    device (jax.transfer_guard("disallow")): the accelerator never waits for Python."""
    mesh = partitioning.make_mesh()
    config, tx, graphdef, state, (t_graphdef, t_params), layer_map = _student_and_teacher(mesh)
    batch = _batch(config, b=16)
    batch["attention_mask"][-1, :4] = 1  # a training batch has no filler rows
    if mode == "cached":
        rng = np.random.default_rng(1)
        batch["teacher_logits"] = rng.normal(size=(16, 2)).astype(np.float32)
        batch["teacher_features"] = rng.normal(size=(16, len(layer_map), config.hidden_size)).astype(np.float16)
    step = steps.make_distill_step(graphdef, tx, layer_map=layer_map,
                                   teacher_graphdef=t_graphdef if mode == "online" else None)
    state = partitioning.place_state(state, mesh)
    jitted = steps.compile_step(step, state, mesh)
    teacher_params = partitioning.place_state(t_params, mesh) if mode == "online" else None
    on_mesh = partitioning.shard_batch(batch, mesh)
    state, first = jitted(state, teacher_params, on_mesh)
    losses_seen = [first["loss"]]
    with _Compiles() as compiles, jax.transfer_guard("disallow"):
        for _ in range(3):
            state, m = jitted(state, teacher_params, on_mesh)
            losses_seen.append(m["loss"])
    assert compiles.count == 0
    assert np.isfinite(jax.device_get(losses_seen)).all()


@pytest.mark.accelerator
@on_device
def test_vmapped_sweep_chunk_trains_and_evaluates_on_device():
    """G students in one vmapped step (cached teacher outputs), then their vmapped evaluation
    (cuDNN attention under vmap on a GPU) against each student's own; bound 2^-6 relative."""
    mesh = partitioning.make_mesh()
    config, tx, graphdef, base, _, layer_map = _student_and_teacher(mesh)
    g = 2 if SMOKE or not ON_DEVICE else 8
    points = [sweep.Point(i, 0, 1e-4 * (i + 1), 5.0 + i, 0.2 + 0.1 * i, 10.0 * (i + 1)) for i in range(g)]
    stacked = sweep.stack_students(base, points, mesh)
    step = sweep.compile_students_step(steps.make_distill_step(graphdef, tx, layer_map=layer_map), stacked, mesh)
    batch = _batch(config, b=16)
    batch["attention_mask"][-1, :4] = 1
    rng = np.random.default_rng(1)
    batch["teacher_logits"] = rng.normal(size=(16, 2)).astype(np.float32)
    batch["teacher_features"] = rng.normal(size=(16, len(layer_map), config.hidden_size)).astype(np.float16)
    for _ in range(2):
        stacked, m = step(stacked, None, partitioning.shard_batch(batch, mesh))
    assert np.isfinite(jax.device_get(m["loss"])).all() and m["loss"].shape == (g,)
    inputs = partitioning.shard_batch({k: _batch(config)[k] for k in ("input_ids", "token_type_ids", "attention_mask")},
                                      mesh)
    together = np.asarray(sweep.make_students_logits_fn(graphdef)(stacked.params, inputs)).reshape(8, g, -1)
    alone = jax.jit(steps.make_logits_fn(graphdef))
    for j in range(g):
        own = np.asarray(alone(jax.tree.map(lambda x: x[j], stacked.params), inputs))
        assert _rel(together[:-1, j], own[:-1]) < 2.0**-6, j  # the filler row is never read


def _async_save_then_donated_step(tmp_path):
    """Save a device-resident state asynchronously, run a step that donates (frees) that state's
    buffers at once, then wait, restore, and compare with a host copy taken before the save:
    orbax must have copied the arrays before returning, or the restore would read freed memory."""
    mesh = partitioning.make_mesh()
    config, tx, graphdef, state, _, layer_map = _student_and_teacher(mesh)
    state = partitioning.place_state(state, mesh)
    step = steps.compile_step(steps.make_distill_step(graphdef, tx, layer_map=layer_map), state, mesh)
    batch = _batch(config, b=16)
    batch["attention_mask"][-1, :4] = 1
    batch["teacher_logits"] = np.zeros((16, 2), np.float32)
    batch["teacher_features"] = np.ones((16, len(layer_map), config.hidden_size), np.float16)
    batch = partitioning.shard_batch(batch, mesh)
    state, _ = step(state, None, batch)
    host = jax.device_get(state)
    ckpt = checkpoints.TrainCheckpointer(tmp_path / "checkpoints")
    try:
        ckpt.save(1, state, {"note": "before the donated step"})
        later, _ = step(state, None, batch)  # donates `state` while the save may be in flight
        ckpt.wait()
        restored_step, restored, meta = ckpt.restore_latest(later)
    finally:
        ckpt.close()
    assert restored_step == 1 and meta == {"note": "before the donated step"}
    for a, b in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(host), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(jax.device_get(later.step)) == 2


def test_async_checkpoint_then_donated_step(tmp_path):
    _async_save_then_donated_step(tmp_path)


@pytest.mark.accelerator
@on_device
def test_async_checkpoint_then_donated_step_on_device(tmp_path):
    _async_save_then_donated_step(tmp_path)


# --------------------------------------------------------------------------------------------
# Accelerator-only branches, checked on every machine
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend, dtype_name, expected", [
    ("gpu", "bfloat16", True), ("gpu", "float32", False), ("tpu", "bfloat16", False), ("cpu", "bfloat16", False),
])
def test_device_dependent_choices_with_the_backend_mocked(backend, dtype_name, expected, monkeypatch):
    """dtype=auto computes in bfloat16 on GPU and TPU; attention goes through cuDNN on a GPU in
    half precision only, unless the config names an implementation."""
    from pkd_jax import checks

    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert checks.compute_dtype("auto") == (jnp.float32 if backend == "cpu" else jnp.bfloat16)
    assert checks.compute_dtype("float32") == jnp.float32
    dtype = jnp.dtype(dtype_name)
    layer = bert.BertForSequenceClassification(_config(), rngs=nnx.Rngs(0)).bert.encoder.layer[0].attention.self
    assert layer._use_cudnn(dtype) is expected
    for impl, forced in (("xla", False), ("cudnn", True)):
        layer.impl = impl
        assert layer._use_cudnn(dtype) is forced


def test_benchmarks_leave_the_torch_peer_room_on_the_gpu(monkeypatch):
    """JAX preallocates 75 % of a GPU; the suites that time PyTorch in the same process turn that
    off before JAX starts (an explicit setting of the user wins)."""
    import benchmarks.__main__ as cli

    for suite, expected in (("train", "false"), ("torch", "false"), ("all", "false"), ("sweep", None)):
        monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
        monkeypatch.setattr(cli, "make_bench", lambda args: (_ for _ in ()).throw(SystemExit(0)))
        with pytest.raises(SystemExit):
            cli.main([suite])
        assert os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE") == expected, suite
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "true")
    with pytest.raises(SystemExit):
        cli.main(["train"])
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"


def test_cudnn_arguments_describe_the_masked_path():
    """What the model hands cuDNN (key_value_seq_lengths: real tokens, right padding, at least one
    key) gives, through jax.nn.dot_product_attention's XLA implementation, what its own masked
    path computes from the same attention_mask: full rows, padded rows and an all-padding filler row."""
    config = _config()
    attention = bert.BertForSequenceClassification(config, rngs=nnx.Rngs(0)).bert.encoder.layer[0].attention.self
    batch = _batch(config, b=4, s=24)
    assert batch["attention_mask"][-1].sum() == 0 and batch["attention_mask"][0].all()
    mask, lengths = bert.attention_inputs(jnp.asarray(batch["attention_mask"]))
    q, k, v = jax.random.normal(jax.random.key(0), (3, 4, 24, attention.num_heads, attention.head_dim))
    cudnn_args = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="xla")
    np.testing.assert_allclose(attention._attention(q, k, v, mask, None)[0], cudnn_args, atol=1e-6)
    np.testing.assert_allclose(cudnn_args[-1], jnp.broadcast_to(v[-1, :1], v[-1].shape), atol=1e-6)  # key 0 only
