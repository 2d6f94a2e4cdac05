"""Patient Knowledge Distillation losses (Sun et al., 2019), as pure jit/grad/vmap-able functions.

Total loss for one batch::

    L = (1 − α)·ce + α·ds + β·pt

``ce`` is the mean hard-label cross-entropy (mean squared error to the label with
``regression=True``), ``ds`` the soft-target distillation loss and ``pt`` the patient loss
between the normalised [CLS] vectors of the student's layers 1..k−1 and the teacher layers
chosen by :func:`layer_map`.

Two scalings, picked by the static ``mode`` argument:

* ``mode="compat"`` (default) — the authors' released PyTorch code, under which the paper's
  α, β and T grids were tuned::

      ds = T² · mean over batch×classes of p_t·(log p_t − log p_s)   # nn.KLDivLoss(reduction="mean")
      pt = mean over layers×batch×hidden of (ŝ − t̂)²                 # F.mse_loss(F.normalize(s), ...)

* ``mode="paper"`` — the paper's equations taken literally::

      ds = T² · mean_b KL(softmax(t/T) ‖ softmax(s/T))               # summed over classes
      pt = mean_b Σ_l ‖ŝ_l − t̂_l‖²                                   # summed over hidden and layers

with ``p = softmax(logits/T)`` and ``x̂ = x / max(‖x‖₂, 1e-12)`` when ``normalize``.

Translating β between the modes: the paper-mode patient term is exactly H·M times the compat
one (H hidden size, M = k−1 mapped layers), so ``β_paper = β_compat / (H·M)``. The paper's
β = 100, tuned under compat scaling, for a 6-layer BERT-base student (H = 768, M = 5) is
β ≈ 100 / 3840 ≈ 0.026 in paper scaling; β = 100 in paper scaling swamps the other terms
(3-layer MRPC students collapse to the majority class). Likewise ``ds`` differs by the number
of classes C: ``ds_paper = C · ds_compat``.

Patient distances (``distance=``) on the [M, B, H] stacks: ``"mse"`` (default, as above);
``"cosine"``, ``mean_{l,b} (1 − cos(s, t))``, which on unit vectors is H/2 times compat mse
(‖ŝ − t̂‖² = 2(1 − cos): ``β_cosine = 2·β_compat / H``); ``"cka"``, ``mean_l (1 − CKA)`` with
linear CKA over the batch (Kornblith et al., 2019), for teachers whose [CLS] vector carries no
information; student and teacher widths may differ. Both ignore ``mode``. Register others with
:func:`register_distance`, or name them as ``"package.module:function"``.

Intermediate terms for an online teacher over the real tokens (m = attention mask [B, S]):
:func:`hidden_mse` ``= Σ m_bs·(s − t)² / (M·H·Σ m_bs)`` on hidden states [M, B, S, H]
(TinyBERT, Jiao et al., 2020, eq. 7) and :func:`attention_kl` ``= Σ m_bq·KL(A^T ‖ A^S) /
(M·A·Σ m_bq)`` on attention rows [M, B, A, S, S] (MiniLM, Wang et al., 2020, L_AT).

Everything is computed in float32 whatever the input dtype. ``alpha``, ``beta`` and
``temperature`` may be traced scalars (a sweep vmaps over them); ``mode``, ``normalize``,
``regression`` and ``distance`` are static Python values.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import numbers
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
Scalar = float | jax.Array  # may be a traced value (vmapped sweeps over α, β, T)
DistanceFn = Callable[..., Array]

MODES = ("compat", "paper")
STRATEGIES = ("skip", "last")
_NORM_EPS = 1e-12  # torch.nn.functional.normalize's default eps
_PROB_FLOOR = 1e-12  # attention_kl floors student probabilities inside the log only


# ----------------------------------------------------------------------------- layer maps


def layer_map(
    teacher_layers: int, student_layers: int, strategy: str | Sequence[int]
) -> tuple[int, ...]:
    """1-indexed teacher layers whose [CLS] vectors student layers 1..k−1 learn from.

    The student's top layer k is not mapped: its output feeds the classifier, which the
    distillation term already covers.

    * ``"skip"`` (PKD-Skip): every N/k-th layer below the top, ``(i·N/k for i in 1..k−1)``;
      12→6: (2, 4, 6, 8, 10), 12→3: (4, 8), 24→6: (4, 8, 12, 16, 20). Needs N divisible by k.
    * ``"last"`` (PKD-Last): the k−1 layers just below the top, ``(N−k+1, ..., N−1)``;
      12→6: (7, 8, 9, 10, 11), 12→3: (10, 11).
    * an explicit sequence of k−1 strictly increasing ints in 1..N−1.

    k = 1 maps nothing (no patient term). Raises ValueError for impossible maps.
    """
    n, k = _check_depths(teacher_layers, student_layers)
    if isinstance(strategy, str):
        if strategy == "skip":
            if n % k:
                raise ValueError(
                    f"strategy 'skip' needs the teacher depth to be a multiple of the student "
                    f"depth, got {n} teacher layers for {k} student layers; use strategy='last' "
                    f"or pass an explicit list of {k - 1} teacher layers"
                )
            return tuple(i * (n // k) for i in range(1, k))
        if strategy == "last":
            return tuple(range(n - k + 1, n))
        raise ValueError(
            f"unknown layer-map strategy {strategy!r}; expected one of {STRATEGIES} "
            f"or an explicit list of teacher layers"
        )
    return _check_explicit_map(strategy, n, k)


def _check_depths(teacher_layers: int, student_layers: int) -> tuple[int, int]:
    for name, value in (("teacher_layers", teacher_layers), ("student_layers", student_layers)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be an int, got {value!r}")
    n, k = int(teacher_layers), int(student_layers)
    if k < 1:
        raise ValueError(f"the student needs at least 1 layer, got student_layers={k}")
    if k >= n:
        raise ValueError(
            f"the student must be shallower than the teacher, got {k} student layers "
            f"for {n} teacher layers"
        )
    return n, k


def _check_explicit_map(layers: Sequence[int], n: int, k: int) -> tuple[int, ...]:
    if not isinstance(layers, Sequence):
        raise ValueError(f"layer map must be 'skip', 'last' or a sequence of ints, got {layers!r}")
    if len(layers) != k - 1:
        raise ValueError(
            f"an explicit layer map for a {k}-layer student needs {k - 1} teacher layers "
            f"(one per student layer 1..{k - 1}), got {len(layers)}: {list(layers)}"
        )
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise ValueError(f"teacher layers must be ints, got {layer!r} in {list(layers)}")
        if not 1 <= layer <= n - 1:
            raise ValueError(
                f"teacher layer {layer} is out of range: mapped layers must lie in 1..{n - 1} "
                f"(1-indexed; the top layer {n} feeds the classifier)"
            )
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"teacher layers must be strictly increasing, got {list(layers)}")
    return tuple(int(layer) for layer in layers)


# ----------------------------------------------------------------------------- loss terms


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown loss mode {mode!r}; expected one of {MODES}")


def _f32(x: ArrayLike) -> Array:
    return jnp.asarray(x, jnp.float32)


def distillation_loss(
    student_logits: Array, teacher_logits: Array, temperature: Scalar, mode: str = "compat"
) -> Array:
    """Soft-target loss between ``p_t = softmax(t/T)`` and ``p_s = softmax(s/T)``, logits [B, C].

    compat: ``T² · mean_{b,c} p_t·(log p_t − log p_s)`` (torch ``KLDivLoss(reduction="mean")``);
    paper:  ``T² · mean_b Σ_c p_t·(log p_t − log p_s)``, i.e. C times compat.
    Terms with p_t = 0 count as 0 (0·log 0 = 0), also for −inf teacher logits.
    """
    _check_mode(mode)
    t = _f32(temperature)
    log_ps = jax.nn.log_softmax(_f32(student_logits) / t, axis=-1)
    log_pt = jax.nn.log_softmax(_f32(teacher_logits) / t, axis=-1)
    p_t = jnp.exp(log_pt)
    # Double `where`: the inner one keeps log_pt finite so neither the value nor the gradient
    # of the discarded branch can become 0·inf = NaN.
    nonzero = p_t > 0
    safe_log_pt = jnp.where(nonzero, log_pt, 0.0)
    kl = jnp.where(nonzero, p_t * (safe_log_pt - log_ps), 0.0)
    per_example = kl.mean(axis=-1) if mode == "compat" else kl.sum(axis=-1)
    return t * t * per_example.mean()


def l2_normalize(x: Array, axis: int = -1) -> Array:
    """``x / max(‖x‖₂, 1e-12)`` along ``axis``, like torch ``F.normalize``; finite gradient at 0."""
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    # sqrt(max(‖x‖², eps²)) == max(‖x‖, eps); clamping before the sqrt keeps gradients finite at 0.
    return x / jnp.sqrt(jnp.maximum(sq, _NORM_EPS**2))


def mse_distance(student_cls: Array, teacher_cls: Array, *, mode: str = "compat") -> Array:
    """Built-in patient distance on [M, B, H] vectors.

    compat: ``mean_{l,b,h} (s − t)²`` (torch ``F.mse_loss``); paper: ``mean_b Σ_l ‖s_l − t_l‖²``.
    """
    _check_mode(mode)
    sq = jnp.square(student_cls - teacher_cls)
    return sq.mean() if mode == "compat" else sq.sum() / sq.shape[1]


def cosine_distance(student_cls: Array, teacher_cls: Array) -> Array:
    """Patient distance ``mean_{l,b} (1 − cos(s, t))`` on [M, B, H]; ``mode`` plays no part.

    cos = ⟨ŝ, t̂⟩ with :func:`l2_normalize`'s eps: a zero vector has cos 0 (distance 1) and finite
    gradients. Normalising again is a no-op on unit vectors, so ``normalize`` does not matter.
    """
    s, t = l2_normalize(_f32(student_cls)), l2_normalize(_f32(teacher_cls))
    return jnp.mean(1.0 - jnp.sum(s * t, axis=-1))


def _centred(x: Array) -> tuple[Array, Array]:
    """x [M, B, H] centred over the batch and scaled to max |x| = 1; and whether it is nonzero."""
    # Minus row 0 first: equal rows (a batch of 1, zero vectors) centre to exact 0; a mean may not.
    x = x - x[:, :1]
    x = x - x.mean(axis=1, keepdims=True)
    scale = jnp.max(jnp.abs(x), axis=(1, 2), keepdims=True)
    # CKA is scale-invariant, so the scale's gradient term is exactly 0 (stop_gradient is exact);
    # entries ≤ 1 keep the Grams' sums of squares far from float32 overflow and underflow.
    return x / jax.lax.stop_gradient(jnp.where(scale > 0, scale, 1.0)), scale[:, 0, 0] > 0


def cka_distance(student_cls: Array, teacher_cls: Array) -> Array:
    """Patient distance ``mean_l (1 − CKA(X_l, Y_l))``, X [M, B, Hs], Y [M, B, Ht], any Hs, Ht.

    Linear CKA (Kornblith et al., 2019): ``‖YᵀX‖²_F / (‖XᵀX‖_F·‖YᵀY‖_F)``, X and Y centred over
    the batch; invariant to isotropic scaling and orthogonal transforms. Undefined when a side's
    centred features vanish (a batch of 1, all rows equal): that layer's distance is 1 with zero
    gradient. Identical inputs give 0 up to rounding (~1e-7, either sign). ``mode`` plays no part.
    """
    (x, x_ok), (y, y_ok) = _centred(_f32(student_cls)), _centred(_f32(teacher_cls))
    # Kernel form, ‖YᵀX‖²_F = ⟨XXᵀ, YYᵀ⟩_F and ‖XᵀX‖_F = ‖XXᵀ‖_F: B²·(Hs + Ht) multiply-adds against
    # B·(Hs² + Hs·Ht + Ht²), 36× fewer at B = 32, H = 768, and B² floats held, not H² (B < H).
    gram_s, gram_t = jnp.einsum("mbh,mch->mbc", x, x), jnp.einsum("mbh,mch->mbc", y, y)
    ok = x_ok & y_ok
    # ‖K‖ ≥ max diag K ≥ 1 when ok; the inner `where` keeps sqrt's gradient finite when not.
    norms_sq = jnp.sum(gram_s**2, axis=(1, 2)) * jnp.sum(gram_t**2, axis=(1, 2))
    hsic = jnp.sum(gram_s * gram_t, axis=(1, 2))
    return jnp.mean(1.0 - jnp.where(ok, hsic / jnp.sqrt(jnp.where(ok, norms_sq, 1.0)), 0.0))


cka_distance.widths_may_differ = True  # read by patient_loss: no projection needed


def patient_loss(
    student_cls: Array,
    teacher_cls: Array,
    normalize: bool = True,
    mode: str = "compat",
    distance: str | DistanceFn = "mse",
) -> Array:
    """Patient loss between student and teacher [CLS] vectors of the M mapped layers, [M, B, H].

    With ``normalize`` each vector is first divided by its L2 norm over H. The default
    ``distance="mse"`` gives compat ``mean_{l,b,h} (ŝ − t̂)²`` or paper ``mean_b Σ_l ‖ŝ_l − t̂_l‖²``
    (exactly H·M times compat); other distances come from :func:`get_distance`. Student and
    teacher widths must match unless the distance has ``widths_may_differ = True`` (``"cka"``).
    M = 0 (a 1-layer student) returns 0.
    """
    _check_mode(mode)
    s, t = _f32(student_cls), _f32(teacher_cls)
    fn = _resolve(distance)
    if s.ndim != 3 or t.ndim != 3 or s.shape[:2] != t.shape[:2]:
        raise ValueError(f"student_cls and teacher_cls must both be [M, B, H] with the same M and "
                         f"B, got {s.shape} and {t.shape}")
    if s.shape[2] != t.shape[2] and not accepts_any_width(fn):
        name = distance if isinstance(distance, str) else getattr(fn, "__name__", repr(fn))
        raise ValueError(
            f"distance {name!r} compares [M, B, H] vectors of equal width, got student width "
            f"{s.shape[2]} and teacher width {t.shape[2]}; project the student's vectors to the "
            f"teacher's width (a learned linear map), or use distance='cka' (any widths)")
    if s.shape[0] == 0:
        return jnp.zeros((), jnp.float32)
    if normalize:
        s, t = l2_normalize(s), l2_normalize(t)
    return _f32(get_distance(fn, mode=mode)(s, t))


def cross_entropy(logits: Array, labels: Array) -> Array:
    """Mean hard-label cross-entropy ``mean_b −log softmax(z_b)[y_b]``; z [B, C], int labels y [B]."""
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"classification labels must be integers, got dtype {labels.dtype}")
    log_p = jax.nn.log_softmax(_f32(logits), axis=-1)
    return -jnp.take_along_axis(log_p, labels[:, None], axis=-1).mean()


def _regression_output(logits: Array) -> Array:
    x = _f32(logits)
    if x.ndim == 2 and x.shape[1] == 1:
        return x[:, 0]
    if x.ndim != 1:
        raise ValueError(f"regression logits must be [B, 1] or [B], got shape {x.shape}")
    return x


def pkd_loss(
    student_logits: Array,
    teacher_logits: Array,
    labels: Array,
    student_cls: Array,
    teacher_cls: Array,
    *,
    alpha: Scalar,
    beta: Scalar,
    temperature: Scalar,
    normalize: bool = True,
    mode: str = "compat",
    regression: bool = False,
    distance: str | DistanceFn = "mse",
) -> tuple[Array, dict[str, Array]]:
    """PKD objective ``(1 − α)·ce + α·ds + β·pt`` and its terms ``{"ce", "ds", "pt"}`` (float32).

    Classification: ``ce`` = :func:`cross_entropy`, ``ds`` = :func:`distillation_loss`.
    ``regression=True`` (STS-B; logits [B, 1] or [B]): ``ce = mean_b (s_b − y_b)²`` and
    ``ds = mean_b (s_b − t_b)²``; T is unused. ``pt`` = :func:`patient_loss` on [M, B, H]
    (computed even when β = 0, for logging). α, β and T may be traced scalars.
    """
    _check_mode(mode)
    if regression:
        student, teacher = _regression_output(student_logits), _regression_output(teacher_logits)
        ce = jnp.mean(jnp.square(student - _f32(labels)))
        ds = jnp.mean(jnp.square(student - teacher))
    else:
        ce = cross_entropy(student_logits, labels)
        ds = distillation_loss(student_logits, teacher_logits, temperature, mode=mode)
    pt = patient_loss(student_cls, teacher_cls, normalize=normalize, mode=mode, distance=distance)
    alpha, beta = _f32(alpha), _f32(beta)
    loss = (1.0 - alpha) * ce + alpha * ds + beta * pt
    return loss, {"ce": ce, "ds": ds, "pt": pt}


# ----------------------------------------------------------------------------- intermediate terms


def _real_tokens(attention_mask: ArrayLike, shape: tuple[int, ...]) -> Array:
    if (got := jnp.shape(attention_mask)) != shape:
        raise ValueError(f"attention_mask must be [B, S] = {shape}, got {got}")
    return jnp.asarray(attention_mask) != 0


def hidden_mse(student_hidden: Array, teacher_hidden: Array, attention_mask: ArrayLike) -> Array:
    """MSE of hidden states [M, B, S, H] over real tokens (TinyBERT, Jiao et al., 2020, eq. 7).

    ``Σ_{l,b,s,h} m_bs·(s − t)² / (M·H·Σ_{b,s} m_bs)``, m = attention_mask [B, S] ≠ 0: the mean over
    layers, real tokens and hidden units (TinyBERT sums layers; a mean is independent of M). Padding
    is never read (even NaN is harmless); no real token gives 0. Project a narrower student first.
    """
    s, t = _f32(student_hidden), _f32(teacher_hidden)
    if s.ndim != 4 or s.shape != t.shape:
        raise ValueError(f"student_hidden and teacher_hidden must both be [M, B, S, H], got "
                         f"{s.shape} and {t.shape}; project the student's to the teacher's width")
    real = _real_tokens(attention_mask, s.shape[1:3])
    # `where`, not a product with the mask: padding garbage reaches neither value nor gradient.
    diff = jnp.where(real[None, :, :, None], s - t, 0.0)
    count = jnp.sum(real, dtype=jnp.float32) * (s.shape[0] * s.shape[3])
    return jnp.sum(jnp.square(diff)) / jnp.maximum(count, 1.0)


def attention_kl(student_probs: Array, teacher_probs: Array, attention_mask: ArrayLike) -> Array:
    """KL(teacher ‖ student) of attention rows [M, B, A, S, S] (MiniLM, Wang et al., 2020, L_AT).

    ``Σ_{l,b,a,q} m_bq Σ_k p^T·(log p^T − log max(p^S, 1e-12)) / (M·A·Σ_{b,q} m_bq)``: summed over
    keys, averaged over layers, heads and the batch's real queries (each token weighs the same).
    0·log 0 = 0 (padding keys); the floor keeps an underflowed student p^S = 0 finite (≤ 27.7·p^T
    per key), gradient too. Padding query rows are never read; no real token gives 0.
    """
    s, t = _f32(student_probs), _f32(teacher_probs)
    if s.ndim == t.ndim == 5 and s.shape[2] != t.shape[2]:
        raise ValueError(
            f"attention_kl compares distributions head by head, so student and teacher need the "
            f"same number of heads, got {s.shape[2]} and {t.shape[2]}; give the student the "
            f"teacher's head count, or average both over heads (axis 2, keepdims) first")
    if s.ndim != 5 or s.shape != t.shape:
        raise ValueError(f"attention probabilities must both be [M, B, heads, S, S], got "
                         f"{s.shape} and {t.shape}")
    real = _real_tokens(attention_mask, (s.shape[1], s.shape[3]))
    row = real[None, :, None, :, None]
    t, s = jnp.where(row, t, 0.0), jnp.where(row, s, 1.0)  # padding rows: finite, KL 0
    # Double `where` as in distillation_loss: no 0·(−inf) in the value or the gradient.
    pos = t > 0
    kl = t * (jnp.log(jnp.where(pos, t, 1.0)) - jnp.log(jnp.maximum(s, _PROB_FLOOR)))
    count = jnp.sum(real, dtype=jnp.float32) * (s.shape[0] * s.shape[2])
    return jnp.sum(jnp.where(pos, kl, 0.0)) / jnp.maximum(count, 1.0)


# ----------------------------------------------------------------------------- distance registry

_DISTANCES: dict[str, DistanceFn] = {
    "mse": mse_distance, "cosine": cosine_distance, "cka": cka_distance}


def register_distance(
    name: str, fn: DistanceFn | None = None, *, overwrite: bool = False
) -> Callable[[DistanceFn], DistanceFn] | DistanceFn:
    """Register a patient distance ``fn(student_cls, teacher_cls) -> scalar`` under ``name``.

    Inputs are float32 [M, B, H], already L2-normalised when ``normalize=True``. A distance that
    also takes a keyword ``mode`` receives pkd_loss's mode; one with ``fn.widths_may_differ =
    True`` may get student [M, B, Hs] and teacher [M, B, Ht] (patient_loss rejects Hs ≠ Ht for
    others). Use as ``@register_distance("name")`` or ``register_distance("name", fn)``;
    re-registering a name, built-ins included, needs ``overwrite=True``.
    """

    def register(f: DistanceFn) -> DistanceFn:
        if not callable(f):
            raise TypeError(f"distance {name!r} must be callable, got {f!r}")
        if name in _DISTANCES and not overwrite:
            raise ValueError(
                f"distance {name!r} is already registered; pass overwrite=True to replace it"
            )
        _DISTANCES[name] = f
        return f

    return register if fn is None else register(fn)


def accepts_any_width(name_or_fn: str | DistanceFn) -> bool:
    """Whether a distance compares student and teacher vectors of different widths (``"cka"``)."""
    return bool(getattr(_resolve(name_or_fn), "widths_may_differ", False))


def get_distance(name_or_fn: str | DistanceFn, *, mode: str = "compat") -> DistanceFn:
    """Resolve a distance to ``fn(student_cls, teacher_cls) -> scalar``.

    Accepts a registered name, a callable, or an import string ``"package.module:function"``.
    ``mode`` is bound for distances that take a ``mode`` keyword (like the built-in ``"mse"``).
    """
    fn = _resolve(name_or_fn)
    if "mode" in inspect.signature(fn).parameters:
        return functools.partial(fn, mode=mode)
    return fn


def _resolve(name_or_fn: str | DistanceFn) -> DistanceFn:
    if callable(name_or_fn):
        return name_or_fn
    if not isinstance(name_or_fn, str):
        raise TypeError(
            f"distance must be a name, an import string or a callable, got {name_or_fn!r}"
        )
    if name_or_fn in _DISTANCES:
        return _DISTANCES[name_or_fn]
    if ":" in name_or_fn:
        module_name, _, attr = name_or_fn.partition(":")
        fn = getattr(importlib.import_module(module_name), attr, None)
        if not callable(fn):
            raise ValueError(f"{name_or_fn!r} does not name a callable in module {module_name!r}")
        return fn
    raise ValueError(
        f"unknown patient distance {name_or_fn!r}; registered: {sorted(_DISTANCES)} "
        f"(or give 'package.module:function', or register one with register_distance)"
    )
