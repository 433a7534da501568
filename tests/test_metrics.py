"""Table-2 metrics and their markdown report, checked against hand counts and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from hsqformer.evaluation.metrics import binary_metrics, classification_metrics, summarize
from hsqformer.evaluation.report import comparison_tables, fold_table, mean_std, run_table


def test_binary_metrics_match_hand_counts():
    truth = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], dtype=bool)
    prob = np.array([0.9, 0.8, 0.5, 0.2, 0.7, 0.4, 0.3, 0.1, 0.05, 0.49])
    m = binary_metrics(truth, prob)
    # predicted positive at p >= 0.5: tp = 3 (0.9, 0.8, 0.5), fn = 1, fp = 1 (0.7), tn = 5
    assert m["accuracy"] == pytest.approx(8 / 10)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(5 / 6)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert m["auc"] == pytest.approx(roc_auc_score(truth, prob))
    assert (m["n"], m["n_positive"]) == (10, 4)


def test_binary_metrics_agree_with_sklearn_on_random_data():
    rng = np.random.default_rng(3)
    truth = rng.random(200) < 0.4
    prob = np.clip(truth * 0.3 + rng.random(200) * 0.7, 0, 1)
    pred = prob >= 0.5
    m = binary_metrics(truth, prob)
    assert m["accuracy"] == pytest.approx(accuracy_score(truth, pred))
    assert m["precision"] == pytest.approx(precision_score(truth, pred))
    assert m["recall"] == pytest.approx(recall_score(truth, pred))
    assert m["specificity"] == pytest.approx(recall_score(~truth, ~pred))
    assert m["f1"] == pytest.approx(f1_score(truth, pred))


def test_undefined_metrics_are_nan_not_errors():
    m = binary_metrics(np.array([True, True]), np.array([0.2, 0.3]))
    assert math.isnan(m["auc"]) and math.isnan(m["precision"]) and math.isnan(m["specificity"])
    assert m["recall"] == 0.0


def test_multiclass_takes_one_class_as_positive_and_adds_macro_auc():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 20)
    logits = rng.normal(size=(60, 3)) + np.eye(3)[labels] * 1.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    m = classification_metrics(labels, probs, positive_index=1)
    assert m["auc"] == pytest.approx(roc_auc_score(labels == 1, probs[:, 1]))
    assert m["auc_macro_ovr"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    assert m["accuracy_all_classes"] == pytest.approx(np.mean(probs.argmax(1) == labels))
    assert m["n_positive"] == 20
    binary = classification_metrics(labels[:40], probs[:40, :2] / probs[:40, :2].sum(1, keepdims=True), 1)
    assert "auc_macro_ovr" not in binary


def test_summarize_uses_sample_std_and_skips_nan_folds():
    folds = [{"auc": 0.8, "f1": 0.5, "n": 10}, {"auc": 0.9, "f1": math.nan, "n": 10}, {"auc": 0.7, "f1": 0.7, "n": 9}]
    s = summarize(folds)
    assert s["auc"]["mean"] == pytest.approx(0.8)
    assert s["auc"]["std"] == pytest.approx(np.std([0.8, 0.9, 0.7], ddof=1))
    assert s["f1"] == {"mean": pytest.approx(0.6), "std": pytest.approx(np.std([0.5, 0.7], ddof=1)), "n_folds": 2}
    assert "n" not in s


def _run_metrics(model: str, auc: float) -> dict:
    fold = {"accuracy": 0.8, "precision": 0.7, "recall": 0.9, "specificity": 0.6, "f1": 0.78, "auc": auc}
    return {
        "model": model,
        "classes": ["benign", "malignant"],
        "positive_class": "malignant",
        "threshold": 0.5,
        "n_folds": 2,
        "cohorts": {"validation": {"n_images": 40}, "single-center": {"n_images": 20}},
        "summary": {"validation": summarize([fold, fold]), "single-center": summarize([fold, {**fold, "auc": 0.5}])},
        "pooled_validation": fold,
        "ensemble": {"single-center": fold},
    }


def test_run_table_has_a_row_per_cohort_and_evaluation():
    table = run_table(_run_metrics("resnet10t", 0.75))
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0].split(" | ")[3:] == ["Accuracy", "Precision", "Recall", "Specificity", "F1", "AUC |"]
    assert [r.split(" | ")[:2] for r in rows[2:]] == [
        ["| validation", "2 folds"],
        ["| validation", "pooled"],
        ["| single-center", "2 folds"],
        ["| single-center", "ensemble"],
    ]
    assert "| 75.00±0.00 |" in rows[2] and "62.50±17.68" in rows[4]


def test_comparison_tables_list_every_run_and_the_floor():
    text = comparison_tables(
        {"A": _run_metrics("a", 0.75), "B": _run_metrics("b", 0.85)}, floors={"shortcut floor": 0.8}
    )
    assert "### validation" in text and "### single-center" in text
    assert "| A | 2 folds |" in text and "| B | 2 folds |" in text and "| B | ensemble |" in text
    assert "| shortcut floor | reference |" in text and "80.00" in text


def test_fold_table_counts_the_folds_above_the_reference():
    def run(aucs: list[float]) -> dict:
        folds = [{"fold": k, "cohorts": {"validation": {"auc": a}}} for k, a in enumerate(aucs)]
        return {"n_folds": len(aucs), "folds": folds[::-1]}

    text = fold_table({"A": run([0.9, 0.7, 0.8]), "B": run([0.6, 0.6, 0.6])}, reference=("floor", [0.75, 0.75, 0.85]))
    rows = text.splitlines()
    assert rows[0] == "| Model | fold 0 | fold 1 | fold 2 | mean | folds above floor |"
    assert rows[2] == "| A | 90.00 | 70.00 | 80.00 | 80.00 | 1 of 3 |"
    assert rows[3] == "| B | 60.00 | 60.00 | 60.00 | 60.00 | 0 of 3 |"
    assert rows[4] == "| floor | 75.00 | 75.00 | 85.00 | 78.33 |  |"


def test_mean_std_formats_percent_and_missing():
    assert mean_std({"mean": 0.8383, "std": 0.0096}) == "83.83±0.96"
    assert mean_std({"mean": math.nan, "std": math.nan}) == "n/a"


def test_mean_std_says_when_a_metric_was_undefined_in_some_folds():
    assert mean_std({"mean": 0.7, "std": math.nan, "n_folds": 1}, n_folds=2) == "70.00 (1 of 2 folds)"
    assert mean_std({"mean": 0.7, "std": 0.1, "n_folds": 2}, n_folds=2) == "70.00±10.00"
