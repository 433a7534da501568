"""Classification metrics of the paper's Table 2, for any number of classes.

Binary metrics take one class as positive and all others as negative: accuracy,
precision, recall (sensitivity), specificity and F1 at a threshold on the
positive-class probability (0.5 by default), and the threshold-free ROC AUC.
With more than two classes, the all-class accuracy (arg-max) and the macro
one-vs-rest AUC are added. Values are fractions in [0, 1]; NaN marks a metric
that is undefined for the data (e.g. AUC on a cohort with one class).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

BINARY_METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "auc")
MULTICLASS_METRICS = ("accuracy_all_classes", "auc_macro_ovr")


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def binary_metrics(positive: np.ndarray, probability: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Metrics of positive-class probabilities against boolean truth; predicted positive when p >= threshold."""
    truth = np.asarray(positive, dtype=bool)
    prob = np.asarray(probability, dtype=np.float64)
    if truth.shape != prob.shape or truth.ndim != 1:
        raise ValueError(f"truth and probabilities must be 1-D of one length, got {truth.shape} and {prob.shape}")
    predicted = prob >= threshold
    tp = float(np.sum(predicted & truth))
    tn = float(np.sum(~predicted & ~truth))
    fp = float(np.sum(predicted & ~truth))
    fn = float(np.sum(~predicted & truth))
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    auc = float(roc_auc_score(truth, prob)) if 0 < truth.sum() < len(truth) else math.nan
    return {
        "accuracy": _ratio(tp + tn, len(truth)),
        "precision": precision,
        "recall": recall,
        "specificity": _ratio(tn, tn + fp),
        "f1": f1,
        "auc": auc,
        "n": int(len(truth)),
        "n_positive": int(truth.sum()),
    }


def classification_metrics(
    labels: np.ndarray, probabilities: np.ndarray, positive_index: int, threshold: float = 0.5
) -> dict[str, float]:
    """Binary metrics for class ``positive_index`` and, with more than two classes, the multi-class ones.

    ``labels`` are class indices (N,), ``probabilities`` are class probabilities (N, C).
    """
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"probabilities must be (N, C) with N = {labels.shape[0]}, got {probs.shape}")
    n_classes = probs.shape[1]
    result = binary_metrics(labels == positive_index, probs[:, positive_index], threshold)
    if n_classes > 2:
        result["accuracy_all_classes"] = float(np.mean(probs.argmax(axis=1) == labels)) if len(labels) else math.nan
        present = np.unique(labels)
        if len(present) == n_classes:
            normalised = probs / probs.sum(axis=1, keepdims=True)
            result["auc_macro_ovr"] = float(
                roc_auc_score(labels, normalised, multi_class="ovr", average="macro", labels=list(range(n_classes)))
            )
        else:
            result["auc_macro_ovr"] = math.nan
    return result


def summarize(per_fold: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation (n - 1) over folds of every metric that all folds have.

    Undefined (NaN) fold values are left out of that metric's mean; ``n_folds`` counts the rest.
    """
    keys = [key for key in per_fold[0] if key not in ("n", "n_positive") and all(key in m for m in per_fold)]
    summary = {}
    for key in keys:
        values = np.array([m[key] for m in per_fold], dtype=np.float64)
        values = values[~np.isnan(values)]
        summary[key] = {
            "mean": float(values.mean()) if len(values) else math.nan,
            "std": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
            "n_folds": int(len(values)),
        }
    return summary
