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
README_SNIPPET = textwrap.dedent(
    '''
    import jax.numpy as jnp
    from pkd_jax import losses

    @losses.register_distance("cosine")
    def cosine(student_cls, teacher_cls):
        """Mean 1 − cos(ŝ, t̂) over layers × batch; inputs [M, B, H], already unit-length."""
        return jnp.mean(1.0 - jnp.sum(student_cls * teacher_cls, axis=-1))

    loss, terms = losses.pkd_loss(s_logits, t_logits, labels, s_cls, t_cls,
                                  alpha=0.5, beta=10.0, temperature=5.0, distance="cosine")
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
    assert "cosine" in losses._DISTANCES


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
    message = r"unknown patient distance 'cosine'; registered: \['l2', 'mse'\]"
    with pytest.raises(ValueError, match=message):
        losses.get_distance("cosine")
    with pytest.raises(TypeError, match="must be a name"):
        losses.get_distance(3)
