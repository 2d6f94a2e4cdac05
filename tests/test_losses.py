"""Tests for pkd_jax.losses against independent numpy references and the original PyTorch formulas."""

import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

from pkd_jax import losses

B, C, M, H = 8, 3, 5, 16


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def batch(rng):
    """Random logits, labels and [CLS] stacks, float32 numpy."""
    return {
        "s_logits": rng.normal(size=(B, C)).astype(np.float32) * 2,
        "t_logits": rng.normal(size=(B, C)).astype(np.float32) * 3,
        "labels": rng.integers(0, C, size=B).astype(np.int32),
        "s_cls": rng.normal(size=(M, B, H)).astype(np.float32),
        "t_cls": rng.normal(size=(M, B, H)).astype(np.float32) * 4,
    }


@pytest.fixture
def isolated_registry(monkeypatch):
    """Registrations made in a test do not leak into others."""
    monkeypatch.setattr(losses, "_DISTANCES", dict(losses._DISTANCES))


# ----------------------------------------------------------------------------- numpy references


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    z = x - x.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_distillation(s, t, T, mode):
    log_ps, log_pt = np_log_softmax(s / T), np_log_softmax(t / T)
    p_t = np.exp(log_pt)
    kl = np.where(p_t > 0, p_t * (log_pt - log_ps), 0.0)
    per_example = kl.mean(-1) if mode == "compat" else kl.sum(-1)
    return T * T * per_example.mean()


def np_normalize(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_patient(s, t, normalize, mode):
    if normalize:
        s, t = np_normalize(s), np_normalize(t)
    sq = (np.asarray(s, np.float64) - t) ** 2
    if mode == "compat":
        return sq.mean()
    return np.mean([sum(np.sum(sq[l, b]) for l in range(sq.shape[0])) for b in range(sq.shape[1])])


def np_cross_entropy(logits, labels):
    return -np_log_softmax(logits)[np.arange(len(labels)), labels].mean()


# ----------------------------------------------------------------------------- PyTorch transcription
# The formulas of the authors' code (intersun/PKD-for-BERT-Model-Compression, src/utils_pkd.py).


def torch_distillation(s, t, T):
    with warnings.catch_warnings():  # KLDivLoss warns that "mean" is not the batch mean
        warnings.simplefilter("ignore")
        return (
            torch.nn.KLDivLoss(reduction="mean")(
                F.log_softmax(torch.from_numpy(s) / T, dim=1), F.softmax(torch.from_numpy(t) / T, dim=1)
            )
            * T
            * T
        ).item()


def torch_patient(s, t, normalize):
    s, t = torch.from_numpy(s), torch.from_numpy(t)
    if normalize:
        s, t = F.normalize(s, p=2, dim=2), F.normalize(t, p=2, dim=2)
    return F.mse_loss(t.float(), s.float()).item()


# ----------------------------------------------------------------------------- layer maps


@pytest.mark.parametrize(
    "n, k, strategy, expected",
    [
        (12, 6, "skip", (2, 4, 6, 8, 10)),
        (12, 3, "skip", (4, 8)),
        (6, 3, "skip", (2, 4)),
        (24, 6, "skip", (4, 8, 12, 16, 20)),
        (12, 6, "last", (7, 8, 9, 10, 11)),
        (12, 3, "last", (10, 11)),
        (6, 3, "last", (4, 5)),
        (12, 1, "skip", ()),
        (12, 1, "last", ()),
        (12, 1, [], ()),
        (12, 4, [3, 6, 9], (3, 6, 9)),
        (12, 3, (1, 11), (1, 11)),
        (12, 5, [2, 5, 7, 10], (2, 5, 7, 10)),
    ],
)
def test_layer_map(n, k, strategy, expected):
    assert losses.layer_map(n, k, strategy) == expected


@pytest.mark.parametrize(
    "n, k, strategy, message",
    [
        (12, 12, "skip", "shallower than the teacher"),
        (6, 12, "last", "shallower than the teacher"),
        (12, 0, "skip", "at least 1 layer"),
        (12, -2, "last", "at least 1 layer"),
        (12, 5, "skip", "multiple of the student depth"),
        (24, 5, "skip", "multiple of the student depth"),
        (12, 6, "middle", "unknown layer-map strategy"),
        (12, 3, [4], "needs 2 teacher layers"),
        (12, 3, [2, 4, 6], "needs 2 teacher layers"),
        (12, 3, [0, 4], "out of range"),
        (12, 3, [4, 12], "out of range"),
        (12, 3, [8, 4], "strictly increasing"),
        (12, 3, [4, 4], "strictly increasing"),
        (12, 3, [4.0, 8], "must be ints"),
        (12, 3, [True, 8], "must be ints"),
        (12, 3, 7, "sequence of ints"),
        (12.0, 3, "skip", "teacher_layers must be an int"),
        (12, "3", "skip", "student_layers must be an int"),
    ],
)
def test_layer_map_errors(n, k, strategy, message):
    with pytest.raises(ValueError, match=message):
        losses.layer_map(n, k, strategy)


def test_layer_map_skip_suggests_alternatives():
    with pytest.raises(ValueError, match="strategy='last' or pass an explicit list of 4"):
        losses.layer_map(12, 5, "skip")


# ----------------------------------------------------------------------------- distillation loss


@pytest.mark.parametrize("mode", ["compat", "paper"])
@pytest.mark.parametrize("T", [1.0, 2.0, 10.0])
def test_distillation_matches_numpy(batch, mode, T):
    got = losses.distillation_loss(batch["s_logits"], batch["t_logits"], T, mode=mode)
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(got, np_distillation(batch["s_logits"], batch["t_logits"], T, mode), rtol=1e-5)


@pytest.mark.parametrize("T", [1.0, 5.0, 20.0])
def test_distillation_compat_matches_torch(batch, T):
    got = losses.distillation_loss(batch["s_logits"], batch["t_logits"], T)
    want = torch_distillation(batch["s_logits"], batch["t_logits"], T)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_distillation_paper_is_num_classes_times_compat(batch):
    compat = losses.distillation_loss(batch["s_logits"], batch["t_logits"], 3.0, mode="compat")
    paper = losses.distillation_loss(batch["s_logits"], batch["t_logits"], 3.0, mode="paper")
    np.testing.assert_allclose(paper, C * compat, rtol=1e-6)


def test_distillation_zero_when_student_equals_teacher(batch):
    assert abs(float(losses.distillation_loss(batch["t_logits"], batch["t_logits"], 2.0))) < 1e-7


@pytest.mark.parametrize("mode", ["compat", "paper"])
def test_distillation_one_hot_teacher_is_finite(mode):
    """p_t = 0 exactly: underflowed softmax and −inf teacher logits both give 0·log 0 = 0."""
    s = jnp.array([[0.3, -1.2, 2.0], [1.0, 0.0, -1.0]])
    underflow = jnp.array([[0.0, -1e5, -1e5], [-1e5, 0.0, -1e5]])
    masked = jnp.array([[0.0, -jnp.inf, -jnp.inf], [-jnp.inf, 0.0, -jnp.inf]])
    log_ps = np_log_softmax(np.asarray(s))
    expected = -np.array([log_ps[0, 0], log_ps[1, 1]]) / (C if mode == "compat" else 1)
    for t in (underflow, masked):
        loss_and_grads = jax.value_and_grad(losses.distillation_loss, argnums=(0, 1))
        value, (gs, gt) = loss_and_grads(s, t, 1.0, mode)
        np.testing.assert_allclose(value, expected.mean(), rtol=1e-6)
        assert np.isfinite(gs).all() and np.isfinite(gt).all()


# ----------------------------------------------------------------------------- patient loss


@pytest.mark.parametrize("mode", ["compat", "paper"])
@pytest.mark.parametrize("normalize", [True, False])
def test_patient_matches_numpy(batch, mode, normalize):
    got = losses.patient_loss(batch["s_cls"], batch["t_cls"], normalize=normalize, mode=mode)
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(got, np_patient(batch["s_cls"], batch["t_cls"], normalize, mode), rtol=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
def test_patient_compat_matches_torch(batch, normalize):
    got = losses.patient_loss(batch["s_cls"], batch["t_cls"], normalize=normalize)
    want = torch_patient(batch["s_cls"], batch["t_cls"], normalize)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(5, 8, 16), (2, 3, 768), (1, 4, 7)])
def test_patient_paper_is_hidden_times_layers_compat(rng, shape):
    s, t = rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)
    compat = losses.patient_loss(s, t, mode="compat")
    paper = losses.patient_loss(s, t, mode="paper")
    np.testing.assert_allclose(paper / compat, shape[0] * shape[2], rtol=1e-5)


def test_patient_no_mapped_layers_is_zero():
    empty = jnp.zeros((0, B, H))
    for mode in ("compat", "paper"):
        value = losses.patient_loss(empty, empty, mode=mode)
        assert value.dtype == jnp.float32 and float(value) == 0.0


def test_patient_zero_vectors_match_torch_and_have_finite_grads(batch):
    s = batch["s_cls"].copy()
    s[0, 0] = 0.0
    s[0, 1] *= 1e-14  # norm below eps: divided by eps, not by its norm
    t = batch["t_cls"].copy()
    t[1, 2] = 0.0
    np.testing.assert_allclose(losses.patient_loss(s, t), torch_patient(s, t, True), rtol=1e-6, atol=1e-6)
    zeros = jnp.zeros((M, B, H))
    for a, b in ((s, t), (zeros, zeros), (zeros, t)):
        grads = jax.grad(losses.patient_loss, argnums=(0, 1))(jnp.asarray(a), jnp.asarray(b))
        assert all(np.isfinite(g).all() for g in grads)


def test_patient_shape_errors():
    with pytest.raises(ValueError, match=r"\[M, B, H\]"):
        losses.patient_loss(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match=r"\[M, B, H\]"):
        losses.patient_loss(jnp.zeros((3, 4)), jnp.zeros((3, 4)))


def test_unknown_mode_raises(batch):
    with pytest.raises(ValueError, match="unknown loss mode 'bert'"):
        losses.distillation_loss(batch["s_logits"], batch["t_logits"], 1.0, mode="bert")
    with pytest.raises(ValueError, match="unknown loss mode"):
        losses.patient_loss(batch["s_cls"], batch["t_cls"], mode="Compat")


# ----------------------------------------------------------------------------- pkd_loss


def call_pkd(batch, **kwargs):
    return losses.pkd_loss(
        batch["s_logits"], batch["t_logits"], batch["labels"], batch["s_cls"], batch["t_cls"], **kwargs
    )


def test_alpha_beta_zero_is_plain_cross_entropy(batch):
    loss, terms = call_pkd(batch, alpha=0.0, beta=0.0, temperature=4.0)
    optax_ce = optax.softmax_cross_entropy_with_integer_labels(batch["s_logits"], batch["labels"]).mean()
    np.testing.assert_allclose(loss, optax_ce, rtol=1e-6)
    np.testing.assert_allclose(loss, np_cross_entropy(batch["s_logits"], batch["labels"]), rtol=1e-6)
    np.testing.assert_allclose(terms["ce"], loss, rtol=1e-7)
    assert float(terms["pt"]) > 0  # still computed (and logged) with beta = 0


@pytest.mark.parametrize("mode", ["compat", "paper"])
@pytest.mark.parametrize("normalize", [True, False])
def test_pkd_total_matches_numpy(batch, mode, normalize):
    alpha, beta, T = 0.7, 100.0, 5.0
    loss, terms = call_pkd(batch, alpha=alpha, beta=beta, temperature=T, normalize=normalize, mode=mode)
    ce = np_cross_entropy(batch["s_logits"], batch["labels"])
    ds = np_distillation(batch["s_logits"], batch["t_logits"], T, mode)
    pt = np_patient(batch["s_cls"], batch["t_cls"], normalize, mode)
    np.testing.assert_allclose([terms["ce"], terms["ds"], terms["pt"]], [ce, ds, pt], rtol=1e-5)
    np.testing.assert_allclose(loss, (1 - alpha) * ce + alpha * ds + beta * pt, rtol=1e-5)
    assert all(v.dtype == jnp.float32 and v.shape == () for v in (loss, *terms.values()))


@pytest.mark.parametrize("logit_shape", ["[B,1]", "[B]"])
def test_regression(batch, rng, logit_shape):
    s = rng.normal(size=(B, 1)).astype(np.float32)
    t = rng.normal(size=(B, 1)).astype(np.float32)
    y = rng.uniform(0, 5, size=B).astype(np.float32)
    if logit_shape == "[B]":
        s, t = s[:, 0], t[:, 0]
    alpha, beta = 0.4, 10.0
    for T in (1.0, 7.0):  # T is unused
        loss, terms = losses.pkd_loss(
            s, t, y, batch["s_cls"], batch["t_cls"], alpha=alpha, beta=beta, temperature=T, regression=True
        )
        ce = np.mean((s.reshape(-1).astype(np.float64) - y) ** 2)
        ds = np.mean((s.reshape(-1).astype(np.float64) - t.reshape(-1)) ** 2)
        pt = np_patient(batch["s_cls"], batch["t_cls"], True, "compat")
        np.testing.assert_allclose([terms["ce"], terms["ds"]], [ce, ds], rtol=1e-5)
        np.testing.assert_allclose(loss, (1 - alpha) * ce + alpha * ds + beta * pt, rtol=1e-5)


def test_regression_rejects_multi_output(batch):
    with pytest.raises(ValueError, match=r"\[B, 1\] or \[B\]"):
        losses.pkd_loss(
            batch["s_logits"], batch["t_logits"], batch["labels"].astype(np.float32),
            batch["s_cls"], batch["t_cls"], alpha=0.5, beta=0.0, temperature=1.0, regression=True,
        )


def test_classification_rejects_float_labels(batch):
    with pytest.raises(TypeError, match="must be integers"):
        losses.pkd_loss(
            batch["s_logits"], batch["t_logits"], batch["labels"].astype(np.float32),
            batch["s_cls"], batch["t_cls"], alpha=0.5, beta=0.0, temperature=1.0,
        )


@pytest.mark.parametrize("mode", ["compat", "paper"])
def test_pkd_gradients_finite_with_one_hot_teacher_and_zero_vectors(batch, mode):
    t_logits = jnp.where(jax.nn.one_hot(batch["labels"], C) > 0, 0.0, -jnp.inf)
    s_cls = jnp.asarray(batch["s_cls"]).at[0].set(0.0)
    t_cls = jnp.zeros_like(s_cls)

    def f(s_logits, s_cls):
        return losses.pkd_loss(
            s_logits, t_logits, batch["labels"], s_cls, t_cls, alpha=0.5, beta=100.0, temperature=2.0, mode=mode
        )[0]

    value, grads = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(batch["s_logits"]), s_cls)
    assert np.isfinite(value)
    assert all(np.isfinite(g).all() for g in grads)
    assert np.abs(grads[0]).sum() > 0


@pytest.mark.parametrize("regression", [False, True])
def test_bf16_inputs_give_float32_outputs(batch, regression):
    kwargs = dict(alpha=0.5, beta=10.0, temperature=3.0, regression=regression)
    s_logits, t_logits, labels = batch["s_logits"], batch["t_logits"], batch["labels"]
    if regression:
        s_logits, t_logits, labels = s_logits[:, :1], t_logits[:, :1], labels.astype(np.float32)
    args = (s_logits, t_logits, labels, batch["s_cls"], batch["t_cls"])
    bf16 = [jnp.asarray(a, jnp.bfloat16) if a.dtype == np.float32 else jnp.asarray(a) for a in args]
    loss16, terms16 = losses.pkd_loss(*bf16, **kwargs)
    # The same bf16-rounded values, given as float32, must give the same float32 result.
    upcast = [a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in bf16]
    loss32, _ = losses.pkd_loss(*upcast, **kwargs)
    assert loss16.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in terms16.values())
    np.testing.assert_allclose(loss16, loss32, rtol=1e-6)
    # ...and stay close to the unrounded float32 inputs.
    np.testing.assert_allclose(loss16, losses.pkd_loss(*args, **kwargs)[0], rtol=2e-2)


def test_jit_matches_eager(batch):
    kwargs = dict(normalize=True, mode="paper")
    eager = call_pkd(batch, alpha=0.3, beta=0.02, temperature=4.0, **kwargs)
    jitted = jax.jit(lambda a, b, T: call_pkd(batch, alpha=a, beta=b, temperature=T, **kwargs))
    jitted = jitted(0.3, 0.02, 4.0)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), eager, jitted)


@pytest.mark.parametrize("mode", ["compat", "paper"])
def test_vmap_over_alpha_beta_temperature(batch, mode):
    alphas = jnp.array([0.0, 0.2, 0.5, 0.7, 0.9])
    betas = jnp.array([0.0, 10.0, 100.0, 500.0, 1000.0])
    temps = jnp.array([1.0, 5.0, 10.0, 20.0, 2.0])

    def one(a, b, T):
        return call_pkd(batch, alpha=a, beta=b, temperature=T, mode=mode)

    loss, terms = jax.jit(jax.vmap(one))(alphas, betas, temps)
    assert loss.shape == (5,)
    for i in range(5):
        a, b, T = float(alphas[i]), float(betas[i]), float(temps[i])
        want, want_terms = call_pkd(batch, alpha=a, beta=b, temperature=T, mode=mode)
        np.testing.assert_allclose(loss[i], want, rtol=1e-6)
        for name in ("ce", "ds", "pt"):
            np.testing.assert_allclose(terms[name][i], want_terms[name], rtol=1e-6)


# ----------------------------------------------------------------------------- distance registry

# The README's example, verbatim: a user registers a cosine patient distance and selects it.
# "cosine" is now a built-in, so the example registers "unit_cosine" (the README must match).
README_SNIPPET = textwrap.dedent(
    '''
    import jax.numpy as jnp
    from pkd_jax import losses

    @losses.register_distance("unit_cosine")
    def cosine(student_cls, teacher_cls):
        """Mean 1 − cos(ŝ, t̂) over layers × batch; inputs [M, B, H], already unit-length."""
        return jnp.mean(1.0 - jnp.sum(student_cls * teacher_cls, axis=-1))

    loss, terms = losses.pkd_loss(s_logits, t_logits, labels, s_cls, t_cls,
                                  alpha=0.5, beta=10.0, temperature=5.0, distance="unit_cosine")
    '''
)


def test_readme_cosine_snippet(batch, isolated_registry):
    namespace = {k: jnp.asarray(v) for k, v in batch.items()}
    exec(README_SNIPPET, namespace)
    s, t = np_normalize(batch["s_cls"]), np_normalize(batch["t_cls"])
    want_pt = np.mean(1.0 - np.sum(s * t, axis=-1))
    np.testing.assert_allclose(namespace["terms"]["pt"], want_pt, rtol=1e-5)
    ce = np_cross_entropy(batch["s_logits"], batch["labels"])
    ds = np_distillation(batch["s_logits"], batch["t_logits"], 5.0, "compat")
    np.testing.assert_allclose(namespace["loss"], 0.5 * ce + 0.5 * ds + 10.0 * want_pt, rtol=1e-5)
    assert "unit_cosine" in losses._DISTANCES
    # On unit vectors the README's distance is the built-in "cosine".
    builtin = losses.patient_loss(batch["s_cls"], batch["t_cls"], distance="cosine")
    np.testing.assert_allclose(namespace["terms"]["pt"], builtin, rtol=1e-5)


def test_registered_name_and_callable(batch, isolated_registry):
    def l1(s, t):
        return jnp.abs(s - t).mean()

    losses.register_distance("l1", l1)
    want = np.abs(np_normalize(batch["s_cls"]) - np_normalize(batch["t_cls"])).mean()
    for distance in ("l1", l1):
        _, terms = call_pkd(batch, alpha=0.5, beta=1.0, temperature=2.0, distance=distance)
        np.testing.assert_allclose(terms["pt"], want, rtol=1e-5)
    unnormalized = losses.patient_loss(batch["s_cls"], batch["t_cls"], normalize=False, distance="l1")
    np.testing.assert_allclose(unnormalized, np.abs(batch["s_cls"] - batch["t_cls"]).mean(), rtol=1e-5)


def test_mode_aware_distance_receives_mode(batch, isolated_registry):
    @losses.register_distance("sum_or_mean")
    def sum_or_mean(s, t, *, mode):
        return jnp.sum(s - t) if mode == "paper" else jnp.mean(s - t)

    s, t = batch["s_cls"], batch["t_cls"]
    diff = np.asarray(s, np.float64) - t
    paper = losses.patient_loss(s, t, normalize=False, mode="paper", distance="sum_or_mean")
    compat = losses.patient_loss(s, t, normalize=False, distance="sum_or_mean")
    np.testing.assert_allclose(paper, diff.sum(), rtol=1e-4)
    np.testing.assert_allclose(compat, diff.mean(), rtol=1e-4, atol=1e-6)


def test_builtin_mse_by_name_is_default(batch):
    for mode in ("compat", "paper"):
        by_name = losses.patient_loss(batch["s_cls"], batch["t_cls"], mode=mode, distance="mse")
        default = losses.patient_loss(batch["s_cls"], batch["t_cls"], mode=mode)
        np.testing.assert_allclose(by_name, default, rtol=0)


def test_duplicate_registration_needs_overwrite(isolated_registry):
    with pytest.raises(ValueError, match="already registered"):
        losses.register_distance("mse", lambda s, t: jnp.zeros(()))
    losses.register_distance("mine", lambda s, t: jnp.zeros(()))
    losses.register_distance("mine", lambda s, t: jnp.ones(()), overwrite=True)
    assert float(losses.get_distance("mine")(None, None)) == 1.0


def test_import_string_resolution(batch, tmp_path, monkeypatch):
    (tmp_path / "pkd_user_distances.py").write_text(
        "import jax.numpy as jnp\n\n"
        "def max_abs(student_cls, teacher_cls):\n"
        "    return jnp.max(jnp.abs(student_cls - teacher_cls))\n"
        "NOT_A_FUNCTION = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    want = np.abs(np_normalize(batch["s_cls"]) - np_normalize(batch["t_cls"])).max()
    _, terms = call_pkd(batch, alpha=0.5, beta=1.0, temperature=2.0, distance="pkd_user_distances:max_abs")
    np.testing.assert_allclose(terms["pt"], want, rtol=1e-6)
    for bad in ("pkd_user_distances:missing", "pkd_user_distances:NOT_A_FUNCTION"):
        with pytest.raises(ValueError, match="does not name a callable"):
            losses.get_distance(bad)


def test_unknown_distance_lists_registered_names(isolated_registry):
    losses.register_distance("l2", lambda s, t: jnp.zeros(()))
    message = r"unknown patient distance 'cos'; registered: \['cka', 'cosine', 'l2', 'mse'\]"
    with pytest.raises(ValueError, match=message):
        losses.get_distance("cos")
    with pytest.raises(TypeError, match="must be a name"):
        losses.get_distance(3)


# ----------------------------------------------------------------------------- cosine and CKA distances
# References written from the definitions, in float64, sharing no code with pkd_jax.losses.


def np_cosine(s, t):
    """mean over layers × batch of 1 − ⟨s, t⟩ / (max(‖s‖, eps)·max(‖t‖, eps))."""
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    norm = lambda x: np.maximum(np.linalg.norm(x, axis=-1), 1e-12)  # noqa: E731
    return np.mean(1.0 - np.sum(s * t, axis=-1) / (norm(s) * norm(t)))


def np_linear_cka(x, y):
    """Kornblith et al. (2019), linear CKA with centred features: ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F)."""
    x = np.asarray(x, np.float64) - np.mean(x, axis=0, dtype=np.float64)
    y = np.asarray(y, np.float64) - np.mean(y, axis=0, dtype=np.float64)
    fro = lambda a: np.linalg.norm(a, "fro")  # noqa: E731
    return fro(y.T @ x) ** 2 / (fro(x.T @ x) * fro(y.T @ y))


def np_hsic_cka(x, y):
    """The same CKA from the paper's HSIC form: HSIC(K, L) = tr(K H L H) / (n − 1)², K = XXᵀ."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = len(x)
    centre = np.eye(n) - np.ones((n, n)) / n
    hsic = lambda k, l: np.trace(k @ centre @ l @ centre) / (n - 1) ** 2  # noqa: E731
    k, l = x @ x.T, y @ y.T
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def np_cka_distance(s, t):
    return np.mean([1.0 - np_linear_cka(s[i], t[i]) for i in range(len(s))])


def fd_grad(f, x, eps=1e-6):
    """Central finite differences of a float64 numpy function."""
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += eps
        down[i] -= eps
        grad[i] = (f(up) - f(down)) / (2 * eps)
    return grad


def assert_grad_close(got, want, rtol=2e-3):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


@pytest.fixture
def wide(rng):
    """Student [M, B, Hs] and teacher [M, B, Ht] features of different widths, offset means."""
    s = rng.normal(size=(3, 10, 12)).astype(np.float32) + 1.5
    t = (rng.normal(size=(3, 10, 20)) * 3 - 2).astype(np.float32)
    return s, t


def test_cka_references_agree(wide):
    s, t = wide
    for i in range(len(s)):
        np.testing.assert_allclose(np_linear_cka(s[i], t[i]), np_hsic_cka(s[i], t[i]), rtol=1e-10)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("mode", ["compat", "paper"])
def test_cosine_and_cka_match_numpy_and_ignore_mode(batch, wide, normalize, mode):
    s, t = batch["s_cls"].copy(), batch["t_cls"]
    s[1, 3] = 0.0  # a zero vector: cos 0, distance 1
    prep = np_normalize if normalize else (lambda x: x)
    got = losses.patient_loss(s, t, normalize=normalize, mode=mode, distance="cosine")
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(got, np_cosine(prep(s), prep(t)), rtol=1e-5)
    got = losses.patient_loss(*wide, normalize=normalize, mode=mode, distance="cka")
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(got, np_cka_distance(prep(wide[0]), prep(wide[1])), rtol=1e-5)


def test_cosine_is_half_width_times_compat_mse(batch):
    """On unit vectors ‖ŝ − t̂‖² = 2(1 − cos): the docstring's β_cosine = 2·β_compat / H."""
    cosine = losses.patient_loss(batch["s_cls"], batch["t_cls"], distance="cosine")
    mse = losses.patient_loss(batch["s_cls"], batch["t_cls"], distance="mse")
    np.testing.assert_allclose(cosine, H / 2 * mse, rtol=1e-5)


def test_cka_invariances(wide, rng):
    s, t = wide
    base = losses.cka_distance(s, t)
    q_s = np.linalg.qr(rng.normal(size=(12, 12)))[0]
    q_t = np.linalg.qr(rng.normal(size=(20, 20)))[0]
    for s2, t2 in [(s * 1e3, t), (s, t * 1e-3), (s @ q_s, t), (s, t @ q_t), (s @ q_s * 7, t @ q_t * 0.2),
                   (s + 5.0, t - rng.normal(size=20))]:  # scaling, orthogonal maps, translation
        np.testing.assert_allclose(losses.cka_distance(s2.astype(np.float32), t2.astype(np.float32)),
                                   base, rtol=1e-4, atol=1e-6)
    # Not invariant to a general linear map: the test can fail.
    skew = rng.normal(size=(12, 12)) * np.linspace(0.1, 3.0, 12)
    assert abs(float(losses.cka_distance((s @ skew).astype(np.float32), t)) - float(base)) > 1e-3


def test_cka_identical_inputs_give_zero(wide, rng):
    s = wide[0]
    assert abs(float(losses.cka_distance(s, s))) < 1e-6
    q = np.linalg.qr(rng.normal(size=(12, 12)))[0]
    assert abs(float(losses.cka_distance(s, (3.0 * s @ q).astype(np.float32)))) < 1e-5
    # ...while an unrelated teacher is far from 0.
    assert float(losses.cka_distance(s, wide[1])) > 0.1


def test_cka_undefined_layers_are_one_with_zero_gradient(wide):
    s, t = wide
    grad = jax.grad(losses.cka_distance, argnums=(0, 1))
    one = losses.cka_distance(s[:, :1], t[:, :1])  # a batch of 1: centred features vanish
    assert float(one) == 1.0
    assert all(np.all(np.asarray(g) == 0) for g in grad(s[:, :1], t[:, :1]))
    for degenerate in (np.zeros_like(s[0]), np.full_like(s[0], 0.1)):  # zero vectors, equal rows
        s2 = s.copy()
        s2[0] = degenerate
        want = (1.0 + sum(1.0 - np_linear_cka(s[i], t[i]) for i in (1, 2))) / 3
        np.testing.assert_allclose(losses.cka_distance(s2, t), want, rtol=1e-5)
        gs, gt = grad(s2, t)
        assert np.isfinite(gs).all() and np.isfinite(gt).all()
        assert np.all(np.asarray(gs[0]) == 0) and np.all(np.asarray(gt[0]) == 0)
        assert np.abs(gs[1:]).sum() > 0
    # One zero vector among others is an ordinary input.
    s3 = s.copy()
    s3[:, 4] = 0.0
    np.testing.assert_allclose(losses.cka_distance(s3, t), np_cka_distance(s3, t), rtol=1e-5)


def test_cosine_zero_vectors_value_and_finite_gradients(batch):
    zeros = np.zeros((M, B, H), np.float32)
    for s, t in ((zeros, batch["t_cls"]), (zeros, zeros)):
        np.testing.assert_allclose(losses.cosine_distance(s, t), 1.0, rtol=1e-7)
        grads = jax.grad(losses.patient_loss, argnums=(0, 1))(s, t, False, "compat", "cosine")
        assert all(np.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("distance", ["cosine", "cka"])
def test_distance_gradients_match_finite_differences(rng, distance, normalize):
    s = rng.normal(size=(2, 5, 4)).astype(np.float32)
    t = rng.normal(size=(2, 5, 4 if distance == "cosine" else 6)).astype(np.float32)
    prep = np_normalize if normalize else (lambda x: np.asarray(x, np.float64))
    ref = np_cosine if distance == "cosine" else np_cka_distance
    gs, gt = jax.grad(losses.patient_loss, argnums=(0, 1))(s, t, normalize, "compat", distance)
    assert_grad_close(gs, fd_grad(lambda x: ref(prep(x), prep(t)), s))
    assert_grad_close(gt, fd_grad(lambda y: ref(prep(s), prep(y)), t))


def test_width_mismatch(wide, isolated_registry):
    s, t = wide
    for distance in ("mse", "cosine"):
        message = rf"distance '{distance}' compares .* equal width, got student width 12 and teacher " \
                  r"width 20; project the student's vectors .* or use distance='cka'"
        with pytest.raises(ValueError, match=message):
            losses.patient_loss(s, t, distance=distance)

    def mean_gap(s, t):
        return jnp.abs(s.mean() - t.mean())

    with pytest.raises(ValueError, match="distance 'mean_gap' compares"):
        losses.patient_loss(s, t, distance=mean_gap)
    mean_gap.widths_may_differ = True  # the opt-in a user's distance can declare
    np.testing.assert_allclose(losses.patient_loss(s, t, normalize=False, distance=mean_gap),
                               abs(s.mean() - t.mean()), rtol=1e-5)
    assert losses.accepts_any_width("cka") and losses.accepts_any_width(mean_gap)
    assert not losses.accepts_any_width("mse") and not losses.accepts_any_width("cosine")
    with pytest.raises(ValueError, match=r"\[M, B, H\] with the same M and B"):
        losses.patient_loss(s, t[:, :9], distance="cka")
    with pytest.raises(ValueError, match=r"\[M, B, H\] with the same M and B"):
        losses.patient_loss(s[:2], t, distance="cka")


def test_pkd_loss_cka_with_different_widths(batch, rng):
    s_cls = rng.normal(size=(M, B, 12)).astype(np.float32)
    t_cls = rng.normal(size=(M, B, 32)).astype(np.float32)
    loss, terms = losses.pkd_loss(batch["s_logits"], batch["t_logits"], batch["labels"], s_cls, t_cls,
                                  alpha=0.5, beta=3.0, temperature=2.0, distance="cka")
    pt = np_cka_distance(np_normalize(s_cls), np_normalize(t_cls))
    ce = np_cross_entropy(batch["s_logits"], batch["labels"])
    ds = np_distillation(batch["s_logits"], batch["t_logits"], 2.0, "compat")
    np.testing.assert_allclose(terms["pt"], pt, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.5 * ce + 0.5 * ds + 3.0 * pt, rtol=1e-5)


def test_builtin_distances_registered(isolated_registry):
    assert losses.get_distance("cka") is losses.cka_distance
    assert losses.get_distance("cosine") is losses.cosine_distance
    for name in ("cosine", "cka"):  # a user's "cosine" (the README's old example) collides
        with pytest.raises(ValueError, match=f"distance '{name}' is already registered"):
            losses.register_distance(name, lambda s, t: jnp.zeros(()))
    losses.register_distance("cosine", lambda s, t: jnp.ones(()), overwrite=True)
    assert float(losses.get_distance("cosine")(None, None)) == 1.0


# ----------------------------------------------------------------------------- hidden_mse, attention_kl

LENGTHS = (6, 3, 1, 0)  # real tokens per example: S, shorter, a single one, all padding


def lengths_mask(lengths=LENGTHS, s=6):
    return (np.arange(s)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)


@pytest.fixture
def hidden(rng):
    """Hidden states [M=2, B=4, S=6, H=5]; padded positions hold NaN, inf and huge values."""
    mask = lengths_mask()
    s = rng.normal(size=(2, 4, 6, 5)).astype(np.float32)
    t = (rng.normal(size=(2, 4, 6, 5)) * 2 + 1).astype(np.float32)
    pad = mask[None, :, :, None] == 0
    return np.where(pad, np.nan, s).astype(np.float32), np.where(pad, np.inf, t).astype(np.float32), mask


def np_hidden_mse(s, t, mask):
    """TinyBERT eq. 7 over real tokens: mean over (layer, real token) of the per-token MSE over H."""
    per_token = [np.mean((np.float64(s[l, b, q]) - t[l, b, q]) ** 2)
                 for l in range(len(s)) for b, q in zip(*np.nonzero(mask))]
    return np.mean(per_token) if per_token else 0.0


def masked_softmax(logits, key_mask):
    """Attention rows over keys with padding keys at probability exactly 0 (as a -inf mask gives)."""
    z = np.where(key_mask, np.float64(logits), -np.inf)
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


@pytest.fixture
def attention(rng):
    """Attention probabilities [M=2, B=4, A=3, S=6, S=6]; padding rows hold NaN."""
    mask = lengths_mask()
    keys = mask[None, :, None, None, :] > 0
    with np.errstate(invalid="ignore"):  # all-padding example: 0/0 rows, never read
        t = masked_softmax(rng.normal(size=(2, 4, 3, 6, 6)) * 3, keys)
        s = masked_softmax(rng.normal(size=(2, 4, 3, 6, 6)), keys)
    rows = mask[None, :, None, :, None] > 0
    s, t = np.where(rows, s, np.nan), np.where(rows, t, np.nan)
    return s.astype(np.float32), t.astype(np.float32), mask


def np_attention_kl(s, t, mask, floor=1e-12):
    """MiniLM's L_AT: KL(A^T ‖ A^S) of each real query row (0·log 0 = 0), averaged over rows."""
    kls = []
    for l, b, a, q in np.ndindex(s.shape[:4]):
        if mask[b, q]:
            kls.append(sum(p * np.log(p / max(r, floor)) for p, r in zip(np.float64(t[l, b, a, q]), s[l, b, a, q])
                           if p > 0))
    return np.mean(kls) if kls else 0.0


def test_hidden_mse_matches_numpy_and_ignores_padding(hidden):
    s, t, mask = hidden
    got = losses.hidden_mse(s, t, mask)
    assert got.dtype == jnp.float32 and got.shape == () and np.isfinite(got)
    want = np_hidden_mse(s, t, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(losses.hidden_mse(s, t, mask.astype(bool)), want, rtol=1e-5)
    # Wrong normalisations differ beyond tolerance: the test can fail.
    real = mask[None, :, :, None] > 0
    sq = np.where(real, (np.float64(s) - t) ** 2, 0.0)
    for wrong in (sq.sum() / sq.size,  # padding counted
                  sq.sum() / (real.sum() * 5),  # layers summed (TinyBERT's Σ_l)
                  sq.sum() / (real.sum() * 2)):  # hidden units summed
        assert abs(wrong - want) > 1e-3 * want


def test_hidden_mse_gradients(hidden):
    s, t, mask = hidden
    gs, gt = jax.grad(losses.hidden_mse, argnums=(0, 1))(s, t, mask)
    pad = mask[None, :, :, None] == 0
    assert np.isfinite(gs).all() and np.isfinite(gt).all()
    assert np.all(np.asarray(gs)[np.broadcast_to(pad, s.shape)] == 0)
    real_s, real_t = np.where(pad, 0.0, s), np.where(pad, 0.0, t)
    assert_grad_close(gs, fd_grad(lambda x: np_hidden_mse(x, real_t, mask), real_s))
    assert_grad_close(gt, fd_grad(lambda y: np_hidden_mse(real_s, y, mask), real_t))


def test_hidden_mse_edge_cases(hidden):
    s, t, mask = hidden
    assert float(losses.hidden_mse(s, s, mask)) == 0.0  # identical (NaN padding never read)
    no_tokens = np.zeros_like(mask)
    value, grad = jax.value_and_grad(losses.hidden_mse)(s, t, no_tokens)
    assert float(value) == 0.0 and np.all(np.asarray(grad) == 0)
    with pytest.raises(ValueError, match="project the student's to the teacher's width"):
        losses.hidden_mse(s[..., :4], t, mask)
    with pytest.raises(ValueError, match=r"attention_mask must be \[B, S\]"):
        losses.hidden_mse(s, t, mask[:, :5])


def test_attention_kl_matches_numpy_and_ignores_padding(attention):
    s, t, mask = attention
    got = losses.attention_kl(s, t, mask)
    assert got.dtype == jnp.float32 and got.shape == () and np.isfinite(got)
    want = np_attention_kl(s, t, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Wrong normalisations or direction differ beyond tolerance: the test can fail.
    real = mask > 0
    per_example = np.mean([np_attention_kl(s[:, b:b + 1], t[:, b:b + 1], mask[b:b + 1])
                           for b in range(len(mask)) if real[b].any()])
    reverse = np_attention_kl(np.nan_to_num(t), np.nan_to_num(s), mask)
    for wrong in (per_example, want * 3, want * real.sum() / real.size, reverse):  # heads summed, padding
        assert abs(wrong - want) > 1e-3 * want


def test_attention_kl_gradients(attention):
    s, t, mask = attention
    gs = jax.grad(losses.attention_kl)(s, t, mask)
    assert np.isfinite(gs).all()
    rows = np.broadcast_to(mask[None, :, None, :, None] == 0, s.shape)
    assert np.all(np.asarray(gs)[rows] == 0)
    s0, t0 = np.nan_to_num(s, nan=0.5), np.nan_to_num(t)
    assert_grad_close(gs, fd_grad(lambda x: np_attention_kl(x, t0, mask), s0, eps=1e-7))


def test_attention_kl_zeros_and_underflow(attention):
    s, t, mask = attention
    np.testing.assert_allclose(losses.attention_kl(t, t, mask), 0.0, atol=1e-7)
    # The student gives a key the teacher attends to probability 0 (underflow): the floor
    # bounds the term, value and gradient stay finite.
    s2 = s.copy()
    s2[0, 0, 0, 0, :] = [1.0, 0, 0, 0, 0, 0]
    got, grad = jax.value_and_grad(losses.attention_kl)(s2, t, mask)
    assert np.isfinite(got) and np.isfinite(grad).all()
    np.testing.assert_allclose(got, np_attention_kl(s2, t, mask), rtol=1e-5)
    no_tokens = np.zeros_like(mask)
    value, grad = jax.value_and_grad(losses.attention_kl)(s, t, no_tokens)
    assert float(value) == 0.0 and np.all(np.asarray(grad) == 0)


def test_attention_kl_shape_errors(attention):
    s, t, mask = attention
    message = r"head by head, so student and teacher need the same number of heads, got 2 and 3"
    with pytest.raises(ValueError, match=message):
        losses.attention_kl(s[:, :, :2], t, mask)
    with pytest.raises(ValueError, match=r"\[M, B, heads, S, S\]"):
        losses.attention_kl(s[:1], t, mask)
    with pytest.raises(ValueError, match=r"attention_mask must be \[B, S\]"):
        losses.attention_kl(s, t, mask[:3])


# ----------------------------------------------------------------------------- new terms: jit, vmap, bf16


def test_new_terms_jit_and_vmap_over_students(wide, hidden, attention, rng):
    """The sweep vmaps a step over stacked students (leading axis) against one teacher."""
    students = 3
    cases = [
        (lambda s, t, _: losses.patient_loss(s, t, distance="cka"), wide, None),
        (lambda s, t, _: losses.patient_loss(s, t, distance="cosine"), (wide[0], wide[0][::-1]), None),
        (losses.hidden_mse, hidden[:2], hidden[2]),
        (losses.attention_kl, attention[:2], attention[2]),
    ]
    for fn, (s, t), mask in cases:
        s = np.nan_to_num(s, nan=0.3)
        # Distinct students; powers keep probabilities positive (scaling alone would leave CKA
        # and cosine unchanged).
        stacked = np.stack([s ** (1 + g) if fn is losses.attention_kl
                            else s + 0.5 * g * rng.normal(size=s.shape) for g in range(students)])
        stacked = stacked.astype(np.float32)
        got = jax.jit(jax.vmap(fn, in_axes=(0, None, None)))(stacked, t, mask)
        assert got.shape == (students,) and got.dtype == jnp.float32
        for g in range(students):
            np.testing.assert_allclose(got[g], fn(stacked[g], t, mask), rtol=1e-5)
        assert len(set(np.asarray(got).tolist())) == students  # each student its own value


def test_new_terms_bf16_inputs_give_float32(wide, hidden, attention):
    bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    values = [
        losses.patient_loss(bf16(wide[0]), bf16(wide[1]), distance="cka"),
        losses.patient_loss(bf16(wide[0]), bf16(wide[0] + 1), distance="cosine"),
        losses.hidden_mse(bf16(hidden[0]), bf16(hidden[1]), hidden[2]),
        losses.attention_kl(bf16(attention[0]), bf16(attention[1]), attention[2]),
    ]
    assert all(v.dtype == jnp.float32 and np.isfinite(v) for v in values)
