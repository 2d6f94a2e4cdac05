"""The NNX BERT against transformers' PyTorch BERT on the real all-MiniLM-L6-v2 weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from pkd_jax import bert, checkpoints

PAIRS = (
    ["a gripping, beautifully acted film that stays with you long after", "dull.", "it's fine"],
    ["the plot sags in the middle", "a waste of two hours of my life, honestly", "ok"],
)


@pytest.fixture(scope="module")
def batch(tokenizer):
    """Three sentence pairs of different lengths: padding and two segments."""
    enc = tokenizer(*PAIRS, padding=True, return_tensors="np")
    assert enc["attention_mask"].min() == 0 and enc["token_type_ids"].max() == 1
    return {k: enc[k].astype(np.int32) for k in ("input_ids", "token_type_ids", "attention_mask")}


@pytest.fixture(scope="module")
def reference(minilm_dir, batch):
    hf = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
    with torch.no_grad():
        out = hf(**{k: torch.from_numpy(v).long() for k, v in batch.items()}, output_hidden_states=True)
    return np.stack([h.numpy() for h in out.hidden_states]), out.pooler_output.numpy()


def _run(model, batch, **kw):
    return model(*(jnp.asarray(batch[k]) for k in ("input_ids", "token_type_ids", "attention_mask")), **kw)


def test_float32_matches_transformers(minilm_dir, batch, reference):
    hidden_ref, pooled_ref = reference
    out = _run(checkpoints.load_pretrained(minilm_dir), batch, output_hidden_states=True)
    assert out.hidden_states.shape == hidden_ref.shape == (7, 3, batch["input_ids"].shape[1], 384)
    for layer in range(7):
        np.testing.assert_allclose(out.hidden_states[layer], hidden_ref[layer], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.pooled, pooled_ref, atol=1e-4, rtol=0)
    # cls[l] is the [CLS] vector after encoder layer l+1 (embeddings excluded).
    np.testing.assert_array_equal(out.cls, out.hidden_states[1:, :, 0])
    assert out.cls.dtype == out.logits.dtype == jnp.float32


def test_top_layer_on_the_cls_row_alone_matches_transformers(minilm_dir, batch, reference):
    """Without hidden_states the top layer computes only the [CLS] row: same cls, pooled, logits."""
    hidden_ref, pooled_ref = reference
    model = checkpoints.load_pretrained(minilm_dir)
    out, full = _run(model, batch), _run(model, batch, output_hidden_states=True)
    assert out.hidden_states is None
    np.testing.assert_allclose(out.cls, hidden_ref[1:, :, 0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.pooled, pooled_ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.logits, full.logits, atol=1e-5, rtol=0)
    # And so are the gradients.
    graphdef, params = nnx.split(model, nnx.Param)

    def grads(hidden):
        def loss(p):
            o = _run(nnx.merge(graphdef, p), batch, output_hidden_states=hidden)
            return o.logits.sum() + o.cls.sum()
        return jax.tree.leaves(jax.grad(loss)(params))

    for a, b in zip(grads(False), grads(True)):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_bfloat16_within_stated_bound(minilm_dir, batch, reference):
    """bf16 compute, f32 params: per-layer relative error < 3e-2 (measured ~0.4-1.2 %)."""
    hidden_ref, pooled_ref = reference
    out = _run(checkpoints.load_pretrained(minilm_dir, dtype=jnp.bfloat16), batch, output_hidden_states=True)
    assert out.hidden_states.dtype == jnp.bfloat16
    assert out.logits.dtype == out.pooled.dtype == out.cls.dtype == jnp.float32
    real = batch["attention_mask"].astype(bool)
    for layer in range(7):
        got = np.asarray(out.hidden_states[layer], np.float32)[real]
        want = hidden_ref[layer][real]
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 3e-2, layer
    np.testing.assert_allclose(out.pooled, pooled_ref, atol=1e-2, rtol=0)


def test_param_names_follow_huggingface(minilm_dir):
    model = checkpoints.load_pretrained(minilm_dir, num_layers=2)
    names = set(checkpoints.state_dict(model))
    assert "bert.encoder.layer.1.attention.self.query.weight" in names
    assert "bert.embeddings.LayerNorm.weight" in names
    assert "classifier.weight" in names and "bert.pooler.dense.bias" in names
    assert not any(".2." in n for n in names)
    assert model.bert.pooler.dense.kernel[...].dtype == jnp.float32


def test_dropout_needs_key_and_is_reproducible(minilm_dir, batch):
    model = checkpoints.load_pretrained(minilm_dir, num_layers=2)
    with pytest.raises(ValueError, match="dropout key"):
        _run(model, batch, deterministic=False)
    a = _run(model, batch, deterministic=False, dropout_key=jax.random.key(0)).logits
    b = _run(model, batch, deterministic=False, dropout_key=jax.random.key(0)).logits
    c = _run(model, batch, deterministic=False, dropout_key=jax.random.key(1)).logits
    d = _run(model, batch).logits
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, d)
    with pytest.warns(DeprecationWarning, match="dropout_key"):  # the old name, for one release
        old = _run(model, batch, deterministic=False, rngs=jax.random.key(0)).logits
    np.testing.assert_array_equal(old, a)
    graphdef, params = nnx.split(model, nnx.Param)
    np.testing.assert_array_equal(bert.apply(graphdef, params, batch, dropout_key=jax.random.key(0)).logits, a)
    np.testing.assert_array_equal(bert.apply(graphdef, params, batch).logits, d)


def test_attention_equals_jax_dot_product_attention(minilm_dir):
    """The heads-major attention the model runs off cuDNN computes what jax.nn's does, padding included."""
    model = checkpoints.load_pretrained(minilm_dir, num_layers=1)
    attention = model.bert.encoder.layer[0].attention.self
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 16, attention.num_heads, attention.head_dim))
    lengths = jnp.array([16, 9])
    mask = (jnp.arange(16) < lengths[:, None])[:, None, None, :]
    want = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    np.testing.assert_allclose(attention._attention(q, k, v, mask, None), want, atol=1e-5)


def test_remat_gives_the_same_gradients(minilm_dir, batch):
    def grads(remat):
        model = checkpoints.load_pretrained(minilm_dir, num_layers=2, remat=remat, seed=3)
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            logits = _run(nnx.merge(graphdef, p), batch, deterministic=False, dropout_key=jax.random.key(0)).logits
            return logits.sum()

        return jax.tree.leaves(jax.jit(jax.grad(loss))(params))

    plain, remat = grads(False), grads(True)
    assert len(plain) == len(remat) > 0
    for a, b in zip(plain, remat):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        bert.BertConfig(hidden_size=100, num_attention_heads=12)
    with pytest.raises(ValueError, match="hidden_act"):
        bert.BertConfig(hidden_act="mish")
    with pytest.raises(ValueError, match="position_embedding_type"):
        bert.BertConfig.from_hf({"position_embedding_type": "relative_key", "hidden_size": 96})


def test_param_count_matches_torch(minilm_dir):
    model = checkpoints.load_pretrained(minilm_dir, num_labels=2)
    hf = transformers.BertForSequenceClassification.from_pretrained(str(minilm_dir), num_labels=2)
    assert bert.param_count(model) == sum(p.numel() for p in hf.parameters())
    embeddings = sum(p.numel() for n, p in hf.named_parameters() if "embeddings" in n)
    assert bert.param_count(model, embeddings=False) == bert.param_count(model) - embeddings
