"""BERT in Flax NNX, laid out with HuggingFace's parameter names.

The module tree mirrors `transformers.BertForSequenceClassification`
(`bert.embeddings.word_embeddings`, `bert.encoder.layer[i].attention.self.query`, ...,
`bert.pooler.dense`, `classifier`), so `checkpoints.py` maps names one to one: a Linear's
`weight` is our `kernel` transposed, a LayerNorm's `weight` is our `scale`.

Precision: parameters are stored in `param_dtype` (float32) and matmuls run in `dtype`
(e.g. bfloat16); LayerNorm statistics, attention softmax, the pooler, the classifier and the
returned `cls` vectors are float32 whatever `dtype` is. Only matmul kernels are cast to `dtype`:
biases, LayerNorm parameters and embedding rows enter the computation in float32, so that their
gradients, sums over every token of the batch, are accumulated in float32 (in bfloat16 a sum of
32k terms loses most of its digits) while the matmuls still run in `dtype`.

Calls are functional: dropout draws from `dropout_key=` (a PRNG key), so the same module can be
merged from a params pytree inside a jitted, vmapped step (`apply`).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pkd_jax.bert_config import ACTIVATIONS, BertConfig
from pkd_jax.dropout import dropout

__all__ = ["FEATURES", "BertConfig", "BertForSequenceClassification", "BertOutput", "apply", "attention_inputs", "masked_mean",
           "param_count"]


FEATURES = ("cls", "mean")  # the [CLS] vector of a layer, or its mean over the real tokens


class BertOutput(NamedTuple):
    logits: jax.Array  # [B, num_labels] float32
    pooled: jax.Array  # [B, H] float32
    cls: jax.Array  # [L, B, H] float32: the [CLS] vector after encoder layers 1..L
    hidden_states: jax.Array | None = None  # [L+1, B, S, H] (embeddings first), on request
    # [L−1, B, H] float32: the mean over the non-padding tokens after layers 1..L−1 (mean-pooled
    # features; the top layer, which feeds the classifier, is never a patient target)
    mean: jax.Array | None = None
    # [L−1, B, heads, S, S] float32: the attention probabilities of layers 1..L−1 (before
    # dropout), on request
    attentions: jax.Array | None = None

    def features(self, kind: str) -> jax.Array:
        """The per-layer patient features `kind` (FEATURES: "cls" or "mean"); [l−1] is after layer l."""
        if kind not in FEATURES:
            raise ValueError(f"patient features {kind!r}: expected one of {FEATURES}")
        return self.cls if kind == "cls" else self.mean


def _split(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    return [None] * n if key is None else list(jax.random.split(key, n))


def _cast_matmul_operands(arrays, dtype=None, inexact=True):
    """`promote_dtype` of a Linear: inputs and kernel to `dtype`, the bias left in float32."""
    inputs, kernel, bias = arrays
    return jnp.asarray(inputs, dtype), jnp.asarray(kernel, dtype), bias


def _no_cast(arrays, dtype=None, inexact=True):
    """`promote_dtype` of Embed and LayerNorm: tables, scale and bias stay in `param_dtype`."""
    return arrays


class _Linear(nnx.Linear):
    """nnx.Linear adding its float32 bias to the `dtype` product in float32, then back to `dtype`.

    flax adds a `dtype` copy of the bias, whose gradient is then a `dtype` sum over the batch.
    """

    def __call__(self, inputs, out_sharding=None):
        y = super().__call__(inputs, out_sharding)
        return y if self.dtype is None else y.astype(self.dtype)


class _Factory:
    """Builds layers with the config's dtypes and BERT's N(0, initializer_range) init."""

    def __init__(self, config: BertConfig, dtype, param_dtype, rngs: nnx.Rngs):
        self.c, self.dtype, self.param_dtype, self.rngs = config, dtype, param_dtype, rngs
        self.init = nnx.initializers.normal(config.initializer_range)

    def linear(self, n_in: int, n_out: int, dtype=None) -> nnx.Linear:
        return _Linear(
            n_in, n_out, dtype=dtype or self.dtype, param_dtype=self.param_dtype,
            kernel_init=self.init, promote_dtype=_cast_matmul_operands, rngs=self.rngs,
        )

    def layer_norm(self) -> nnx.LayerNorm:
        # use_fast_variance=False: E[(x-mean)^2] like torch, not E[x^2]-mean^2. Statistics and
        # the affine part run in float32 (flax's), the output is rounded to `dtype` once.
        return nnx.LayerNorm(
            self.c.hidden_size, epsilon=self.c.layer_norm_eps, dtype=self.dtype,
            param_dtype=self.param_dtype, use_fast_variance=False, promote_dtype=_no_cast,
            rngs=self.rngs,
        )

    def embed(self, n: int) -> nnx.Embed:
        # Gathers float32 rows: the backward scatter-add into the table then runs in float32.
        return nnx.Embed(
            n, self.c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=self.init, promote_dtype=_no_cast, rngs=self.rngs,
        )


class BertEmbeddings(nnx.Module):
    def __init__(self, f: _Factory):
        c = f.c
        self.word_embeddings = f.embed(c.vocab_size)
        self.position_embeddings = f.embed(c.max_position_embeddings)
        self.token_type_embeddings = f.embed(c.type_vocab_size)
        self.LayerNorm = f.layer_norm()
        self.dropout_rate = c.hidden_dropout_prob

    def __call__(self, input_ids, token_type_ids, deterministic, key):
        positions = jnp.arange(input_ids.shape[-1])[None, :]
        # Summed in float32; the LayerNorm rounds its output to `dtype`.
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(token_type_ids)
        )
        return dropout(self.LayerNorm(x), self.dropout_rate, None if deterministic else key)


class BertSelfAttention(nnx.Module):
    def __init__(self, f: _Factory):
        c = f.c
        self.num_heads = c.num_attention_heads
        self.head_dim = c.hidden_size // c.num_attention_heads
        self.dropout_rate = c.attention_probs_dropout_prob
        self.impl = c.attention_impl
        self.query = f.linear(c.hidden_size, c.hidden_size)
        self.key = f.linear(c.hidden_size, c.hidden_size)
        self.value = f.linear(c.hidden_size, c.hidden_size)

    def __call__(self, x, mask, lengths, deterministic, key, cls_only=False, want_probs=False):
        """(out [B, S, H], probabilities [B, heads, S, S] float32 or None); cls_only: the [CLS]
        query alone attends (over every key), out is [B, 1, H]. want_probs: the masked path,
        which has the probabilities (cuDNN's fused kernel never forms them)."""
        b = x.shape[0]
        heads = lambda t: t.reshape(b, t.shape[1], self.num_heads, self.head_dim)  # noqa: E731
        q = heads(self.query(x[:, :1] if cls_only else x))
        k, v = heads(self.key(x)), heads(self.value(x))
        probs = None
        if (not cls_only and not want_probs and (deterministic or self.dropout_rate == 0)
                and self._use_cudnn(x.dtype)):
            # cuDNN's padding mask takes sequence lengths (right padding, as tokenizers pad).
            out = jax.nn.dot_product_attention(
                q, k, v, key_value_seq_lengths=lengths, implementation="cudnn"
            )
        else:  # off GPU; with dropout on the probabilities (cuDNN's has none); the [CLS]-only layer
            out, probs = self._attention(q, k, v, mask, None if deterministic else key)
        return out.reshape(b, q.shape[1], -1), probs if want_probs else None

    def _use_cudnn(self, dtype) -> bool:
        if self.impl != "auto":
            return self.impl == "cudnn"
        return jax.default_backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16)

    def _attention(self, q, k, v, mask, rng):
        # Heads-major [B, heads, S, d]: XLA:CPU runs the batched products about 2.5x faster in this
        # layout than in jax.nn.dot_product_attention's [B, S, heads, d] (docs/benchmarks.md).
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
        logits = jnp.where(mask, logits / jnp.sqrt(self.head_dim), jnp.finfo(jnp.float32).min)
        # Softmax in float32, then dropout on probabilities already in the compute dtype: in bf16 the
        # [B, heads, S, S] tensor the mask multiplies (and the backward reads) is half the bytes.
        probs = jax.nn.softmax(logits, axis=-1)
        dropped = dropout(probs.astype(v.dtype), self.dropout_rate, rng)
        return jnp.einsum("bhqk,bhkd->bhqd", dropped, v).transpose(0, 2, 1, 3), probs


class BertAddNorm(nnx.Module):
    """HF's BertSelfOutput / BertOutput: LayerNorm(dropout(dense(x)) + residual)."""

    def __init__(self, f: _Factory, n_in: int):
        self.dense = f.linear(n_in, f.c.hidden_size)
        self.LayerNorm = f.layer_norm()
        self.dropout_rate = f.c.hidden_dropout_prob

    def __call__(self, x, residual, deterministic, key):
        x = dropout(self.dense(x), self.dropout_rate, None if deterministic else key)
        return self.LayerNorm(x + residual)


class BertAttention(nnx.Module):
    def __init__(self, f: _Factory):
        self.self = BertSelfAttention(f)
        self.output = BertAddNorm(f, f.c.hidden_size)


class BertIntermediate(nnx.Module):
    def __init__(self, f: _Factory):
        self.dense = f.linear(f.c.hidden_size, f.c.intermediate_size)
        self.act = ACTIVATIONS[f.c.hidden_act]

    def __call__(self, x):
        return self.act(self.dense(x))


class BertLayer(nnx.Module):
    def __init__(self, f: _Factory):
        self.attention = BertAttention(f)
        self.intermediate = BertIntermediate(f)
        self.output = BertAddNorm(f, f.c.intermediate_size)

    def __call__(self, x, mask, lengths, deterministic, key, cls_only=False, want_probs=False):
        r_attn, r_attn_out, r_out = _split(key, 3)
        a, probs = self.attention.self(x, mask, lengths, deterministic, r_attn, cls_only, want_probs)
        x = self.attention.output(a, x[:, :1] if cls_only else x, deterministic, r_attn_out)
        return self.output(self.intermediate(x), x, deterministic, r_out), probs


class BertEncoder(nnx.Module):
    def __init__(self, f: _Factory):
        self.layer = nnx.List([BertLayer(f) for _ in range(f.c.num_hidden_layers)])
        self.remat = f.c.remat

    def __call__(self, x, mask, lengths, deterministic, key, cls_only_top=False, attentions=False):
        """(the output of every layer, [B, S, H] each, the top one [B, 1, H] if cls_only_top;
        with `attentions`, the probabilities of the layers below the top, else None).

        Only the [CLS] row of the top layer reaches the pooler and nothing reads its other
        rows, so a classifier skips them: the top layer's query projection, attention output
        and feed-forward run on one row, its keys and values on all. That saves 83 % of the top
        layer's FLOPs at BERT's shapes (28 % of a 3-layer student's encoder).
        """
        outputs, probs = [], []
        n = len(self.layer)
        for i, (layer, r) in enumerate(zip(self.layer, _split(key, n))):
            cls_only, want = cls_only_top and i == n - 1, attentions and i < n - 1
            if self.remat:
                x, p = nnx.remat(lambda m, *a: m(*a), static_argnums=(4, 6, 7))(
                    layer, x, mask, lengths, deterministic, r, cls_only, want
                )
            else:
                x, p = layer(x, mask, lengths, deterministic, r, cls_only, want)
            outputs.append(x)
            probs.append(p)
        if not attentions:
            return outputs, None
        b, s = mask.shape[0], mask.shape[-1]
        heads = self.layer[0].attention.self.num_heads
        return outputs, jnp.stack(probs[:-1]) if n > 1 else jnp.zeros((0, b, heads, s, s), jnp.float32)


class BertPooler(nnx.Module):
    def __init__(self, f: _Factory):
        self.dense = f.linear(f.c.hidden_size, f.c.hidden_size, dtype=jnp.float32)

    def __call__(self, first_token):
        return jnp.tanh(self.dense(first_token.astype(jnp.float32)))


class BertModel(nnx.Module):
    def __init__(self, f: _Factory):
        self.embeddings = BertEmbeddings(f)
        self.encoder = BertEncoder(f)
        self.pooler = BertPooler(f)


def classifier_head(config: BertConfig, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Linear:
    """The task head on the pooled vector, in float32 (its keys: the stream's next two)."""
    return _Factory(config, dtype, param_dtype, rngs).linear(config.hidden_size, config.num_labels, dtype=jnp.float32)


class BertForSequenceClassification(nnx.Module):
    """BERT encoder + pooler + a linear head (num_labels=1: regression)."""

    def __init__(
        self,
        config: BertConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = dtype
        f = _Factory(config, dtype, param_dtype, rngs)
        self.bert = BertModel(f)
        rate = config.classifier_dropout
        self.dropout_rate = config.hidden_dropout_prob if rate is None else rate
        self.classifier = classifier_head(config, dtype, param_dtype, rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        token_type_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        deterministic: bool = True,
        *,
        dropout_key: jax.Array | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        rngs: jax.Array | None = None,
    ) -> BertOutput:
        """Forward pass. `dropout_key`: a PRNG key for dropout, required when not deterministic.

        `rngs` is the deprecated name of `dropout_key` (it is a raw key, not an `nnx.Rngs`).
        """
        if rngs is not None:
            warnings.warn("BertForSequenceClassification(..., rngs=key) is deprecated: pass "
                          "dropout_key=key", DeprecationWarning, stacklevel=2)
            dropout_key = rngs if dropout_key is None else dropout_key
        if not deterministic and dropout_key is None:
            raise ValueError("deterministic=False needs a dropout key: pass dropout_key=jax.random.key(...)")
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        mask, lengths = attention_inputs(attention_mask)
        r_emb, r_enc, r_head = _split(dropout_key, 3)
        bert = self.bert
        x0 = bert.embeddings(input_ids, token_type_ids, deterministic, r_emb)
        # Without hidden_states only the top layer's [CLS] row is needed (BertEncoder).
        layers, attentions = bert.encoder(x0, mask, lengths, deterministic, r_enc, not output_hidden_states,
                                          output_attentions)
        cls = jnp.stack([h[:, 0] for h in layers]).astype(jnp.float32)
        pooled = bert.pooler(layers[-1][:, 0])
        logits = self.classifier(dropout(pooled, self.dropout_rate, None if deterministic else r_head))
        hidden = jnp.stack([x0, *layers]) if output_hidden_states else None
        below = jnp.stack(layers[:-1]) if len(layers) > 1 else jnp.zeros((0, *x0.shape), x0.dtype)
        return BertOutput(logits=logits, pooled=pooled, cls=cls, hidden_states=hidden,
                          mean=masked_mean(below, attention_mask), attentions=attentions)


def masked_mean(layers: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Layer outputs [M, B, S, H] -> [M, B, H] float32: each row's mean over its non-padding
    tokens (padding excluded exactly; an all-padding filler row gives 0)."""
    real = attention_mask.astype(jnp.float32)[None, :, :, None]
    total = jnp.sum(layers.astype(jnp.float32) * real, axis=2)
    return total / jnp.maximum(jnp.sum(real, axis=2), 1.0)


def attention_inputs(attention_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mask [B, 1, 1, S] for the masked path, key lengths [B] for cuDNN), describing the same keys.

    cuDNN's padding mask takes sequence lengths (tokenizers pad on the right) and needs at least
    one key, so an all-padding row (filler in a last eval batch, never read) attends to its first
    key on both paths.
    """
    real = attention_mask.astype(bool)
    empty = ~real.any(-1, keepdims=True)
    mask = real | (empty & (jnp.arange(real.shape[-1]) == 0))
    lengths = jnp.maximum(attention_mask.sum(-1), 1).astype(jnp.int32)
    return mask[:, None, None, :], lengths


def apply(graphdef: nnx.GraphDef, params: nnx.State, inputs, *, dropout_key=None,
          output_hidden_states: bool = False, output_attentions: bool = False) -> BertOutput:
    """The model `nnx.merge(graphdef, params)` on a batch's model inputs, as a pure function.

    `inputs`: a mapping with input_ids, token_type_ids and attention_mask (other keys ignored).
    Dropout is on exactly when `dropout_key` is given.
    """
    model = nnx.merge(graphdef, params)
    return model(inputs["input_ids"], inputs["token_type_ids"], inputs["attention_mask"],
                 deterministic=dropout_key is None, dropout_key=dropout_key,
                 output_hidden_states=output_hidden_states, output_attentions=output_attentions)


def param_count(model: nnx.Module, *, embeddings: bool = True) -> int:
    """Number of parameters; embeddings=False leaves out the embedding tables (as the paper)."""
    params = nnx.state(model, nnx.Param)
    total = 0
    for path, leaf in nnx.to_flat_state(params):
        if embeddings or "embeddings" not in path:
            total += leaf[...].size
    return total
