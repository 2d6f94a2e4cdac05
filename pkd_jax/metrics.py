"""GLUE metrics in numpy: accuracy, F1 of the positive class, Matthews correlation, Pearson and
Spearman correlation; plus the single score used for model selection.

Degenerate inputs give 0.0, never NaN or a warning: F1 with no true and no predicted
positives, MCC when a row or column of the confusion matrix is empty (one class only or
constant predictions), and a correlation where either side is constant. Unlabeled rows
(label -1) and empty inputs raise a ValueError: they cannot be scored.
"""

from __future__ import annotations

import numpy as np

from pkd_jax import data


def _check(task: str, predictions: np.ndarray, labels: np.ndarray) -> data.TaskSpec:
    spec = data.get_task(task)
    if predictions.ndim != 1 or predictions.shape != labels.shape:
        raise ValueError(f"{task}: predictions {predictions.shape} and labels {labels.shape} "
                         "must be 1-D arrays of equal length")
    if len(labels) == 0:
        raise ValueError(f"{task}: no examples to score")
    if np.any(labels == -1):
        raise ValueError(f"{task}: labels contain -1 (unlabeled rows, e.g. a test split) "
                         f"at positions {np.flatnonzero(labels == -1)[:5].tolist()}...")
    if spec.is_regression:
        if not (np.all(np.isfinite(predictions)) and np.all(np.isfinite(labels))):
            raise ValueError(f"{task}: predictions and labels must be finite")
    else:
        for name, values in (("predictions", predictions), ("labels", labels)):
            if not np.all(np.isin(values, np.arange(spec.num_labels))):
                raise ValueError(f"{task}: {name} must be class ids in 0..{spec.num_labels - 1}")
    return spec


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predictions == labels))


def f1_positive(predictions: np.ndarray, labels: np.ndarray) -> float:
    """F1 of class 1; 0.0 when there are no true and no predicted positives."""
    tp = np.sum((predictions == 1) & (labels == 1))
    wrong = np.sum(predictions != labels)  # false positives + false negatives (binary)
    return float(2 * tp / (2 * tp + wrong)) if tp + wrong else 0.0


def matthews_correlation(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Multi-class MCC (Gorodkin's R_K, as scikit-learn); 0.0 where undefined."""
    confusion = np.zeros((num_classes, num_classes), np.float64)
    np.add.at(confusion, (labels.astype(np.int64), predictions.astype(np.int64)), 1.0)
    true_k, pred_k = confusion.sum(axis=1), confusion.sum(axis=0)
    correct, total = np.trace(confusion), confusion.sum()
    cov_tp = correct * total - pred_k @ true_k
    cov_pp = total**2 - pred_k @ pred_k
    cov_tt = total**2 - true_k @ true_k
    return float(cov_tp / np.sqrt(cov_pp * cov_tt)) if cov_pp * cov_tt > 0 else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r in float64; 0.0 when either side is constant."""
    dx = np.asarray(x, np.float64) - np.mean(x, dtype=np.float64)
    dy = np.asarray(y, np.float64) - np.mean(y, dtype=np.float64)
    denom = np.sqrt(np.sum(dx * dx) * np.sum(dy * dy))
    return float(np.clip(np.sum(dx * dy) / denom, -1.0, 1.0)) if denom > 0 else 0.0


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: Pearson's r of average ranks (ties share a rank)."""
    from scipy.stats import rankdata  # here: importing scipy.stats costs every run.py 1.2 s

    return pearson(rankdata(x), rankdata(y))


def compute(task: str, predictions, labels) -> dict[str, float]:
    """GLUE dev metrics of ``task`` as plain floats, keyed by ``data.get_task(task).metric_names``.

    ``predictions`` are class ids (scores for stsb), e.g. from ``predictions_from_logits``.
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    spec = _check(task, predictions, labels)
    if spec.is_regression:
        return {"pearson": pearson(predictions, labels), "spearmanr": spearman(predictions, labels)}
    results = {
        "accuracy": lambda: accuracy(predictions, labels),
        "f1": lambda: f1_positive(predictions, labels),
        "matthews_correlation": lambda: matthews_correlation(predictions, labels, spec.num_labels),
    }
    return {name: results[name]() for name in spec.metric_names}


_MAIN_METRIC = {"mrpc": "f1", "qqp": "f1", "cola": "matthews_correlation",
                "stsb": "pearson_spearmanr_mean"}


def main_metric(task: str) -> str:
    """Name of the model-selection score: f1 (mrpc, qqp), matthews_correlation (cola),
    pearson_spearmanr_mean (stsb), accuracy elsewhere."""
    data.get_task(task)  # validates the name
    return _MAIN_METRIC.get(task, "accuracy")


def main_score(task: str, metrics: dict[str, float]) -> float:
    """The model-selection score from ``compute``'s output (higher is better)."""
    name = main_metric(task)
    if name == "pearson_spearmanr_mean":
        return (metrics["pearson"] + metrics["spearmanr"]) / 2
    return metrics[name]


def predictions_from_logits(task: str, logits) -> np.ndarray:
    """Class ids (argmax, int32) or, for regression, the single output (float32); logits [N, C]."""
    spec = data.get_task(task)
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] != spec.num_labels:
        raise ValueError(f"{task}: logits must be [N, {spec.num_labels}], got {logits.shape}")
    if spec.is_regression:
        return logits[:, 0].astype(np.float32)
    return np.argmax(logits, axis=-1).astype(np.int32)
