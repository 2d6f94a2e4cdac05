"""Tests of pkd_jax.metrics against scikit-learn and scipy, plus the degenerate cases."""

import warnings

import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from pkd_jax import metrics


@pytest.fixture(autouse=True)
def warnings_are_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@pytest.mark.parametrize("seed", range(5))
def test_classification_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 500))
    labels, preds = rng.integers(0, 2, n), rng.integers(0, 2, n)
    agree = rng.random(n) < rng.random()  # partly correlated, by a random amount
    preds[agree] = labels[agree]
    for task in ("sst2", "qnli", "rte", "wnli"):
        assert metrics.compute(task, preds, labels) == {"accuracy": pytest.approx(accuracy_score(labels, preds))}
    for task in ("mrpc", "qqp"):
        assert metrics.compute(task, preds, labels) == {
            "accuracy": pytest.approx(accuracy_score(labels, preds)),
            "f1": pytest.approx(f1_score(labels, preds, zero_division=0))}
    assert metrics.compute("cola", preds, labels) == {
        "matthews_correlation": pytest.approx(matthews_corrcoef(labels, preds))}
    labels3, preds3 = rng.integers(0, 3, n), rng.integers(0, 3, n)
    assert metrics.compute("mnli", preds3, labels3)["accuracy"] == pytest.approx(
        accuracy_score(labels3, preds3))
    assert metrics.matthews_correlation(preds3, labels3, 3) == pytest.approx(
        matthews_corrcoef(labels3, preds3))


@pytest.mark.parametrize("seed", range(5))
def test_correlated_predictions_match_sklearn_and_scipy(seed):
    rng = np.random.default_rng(100 + seed)
    labels = rng.integers(0, 2, 300)
    preds = np.where(rng.random(300) < 0.8, labels, 1 - labels)  # a decent classifier
    mcc = metrics.compute("cola", preds, labels)["matthews_correlation"]
    assert mcc == pytest.approx(matthews_corrcoef(labels, preds)) and mcc > 0.4
    scores = np.round(rng.uniform(0, 5, 300), 1)  # rounding makes ties for spearman
    guess = (scores + rng.normal(0, 1, 300)).astype(np.float32)
    result = metrics.compute("stsb", guess, scores)
    assert list(result) == ["pearson", "spearmanr"]
    assert result["pearson"] == pytest.approx(scipy.stats.pearsonr(guess, scores)[0], abs=1e-6)
    assert result["spearmanr"] == pytest.approx(scipy.stats.spearmanr(guess, scores)[0], abs=1e-6)
    assert all(type(v) is float for v in result.values())


def test_degenerate_inputs_give_zero_not_nan():
    ones, zeros = np.ones(10, int), np.zeros(10, int)
    assert metrics.compute("mrpc", zeros, zeros) == {"accuracy": 1.0, "f1": 0.0}
    assert f1_score(zeros, zeros, zero_division=0) == 0.0  # the same convention as sklearn
    assert metrics.compute("mrpc", zeros, ones) == {"accuracy": 0.0, "f1": 0.0}
    assert metrics.compute("qqp", ones, ones) == {"accuracy": 1.0, "f1": 1.0}
    for preds, labels in ((ones, ones), (zeros, ones), (ones, np.arange(10) % 2)):
        assert metrics.compute("cola", preds, labels) == {"matthews_correlation": 0.0}
    constant = np.full(10, 2.5)
    assert metrics.compute("stsb", constant, np.linspace(0, 5, 10)) == {"pearson": 0.0, "spearmanr": 0.0}
    assert metrics.compute("stsb", np.linspace(0, 5, 10), constant) == {"pearson": 0.0, "spearmanr": 0.0}
    assert metrics.compute("stsb", [1.0], [2.0]) == {"pearson": 0.0, "spearmanr": 0.0}
    assert metrics.compute("stsb", [1.0, 2.0], [4.0, 3.0]) == {"pearson": -1.0, "spearmanr": -1.0}
    assert metrics.compute("sst2", [1], [1]) == {"accuracy": 1.0}


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="-1"):
        metrics.compute("rte", [0, 1], [0, -1])
    with pytest.raises(ValueError, match="-1"):
        metrics.compute("stsb", [0.5, 1.0], [-1.0, -1.0])
    with pytest.raises(ValueError, match="no examples"):
        metrics.compute("sst2", [], [])
    with pytest.raises(ValueError, match="equal length"):
        metrics.compute("sst2", [0, 1], [0])
    with pytest.raises(ValueError, match="class ids in 0..1"):
        metrics.compute("sst2", [2, 1], [0, 1])
    with pytest.raises(ValueError, match="finite"):
        metrics.compute("stsb", [np.nan, 1.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="valid tasks"):
        metrics.compute("squad", [0], [0])


def test_main_metric_and_score():
    assert {t: metrics.main_metric(t) for t in ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli",
                                                 "qnli", "rte", "wnli")} == {
        "cola": "matthews_correlation", "sst2": "accuracy", "mrpc": "f1", "qqp": "f1",
        "stsb": "pearson_spearmanr_mean", "mnli": "accuracy", "qnli": "accuracy",
        "rte": "accuracy", "wnli": "accuracy"}
    assert metrics.main_score("stsb", {"pearson": 0.8, "spearmanr": 0.6}) == pytest.approx(0.7)
    assert metrics.main_score("mrpc", {"accuracy": 0.8, "f1": 0.9}) == 0.9
    assert metrics.main_score("rte", metrics.compute("rte", [0, 1, 1], [0, 1, 0])) == pytest.approx(2 / 3)


def test_predictions_from_logits():
    logits = np.array([[0.1, 2.0], [3.0, -1.0], [0.0, 0.5]], np.float32)
    preds = metrics.predictions_from_logits("rte", logits)
    assert preds.dtype == np.int32 and preds.tolist() == [1, 0, 1]
    mnli = metrics.predictions_from_logits("mnli", np.array([[0.0, 1.0, 2.0], [5.0, 1.0, 2.0]]))
    assert mnli.tolist() == [2, 0]
    stsb = metrics.predictions_from_logits("stsb", np.array([[3.25], [-0.5]]))
    assert stsb.dtype == np.float32 and stsb.tolist() == [3.25, -0.5]
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        metrics.predictions_from_logits("rte", np.zeros((3, 3)))
