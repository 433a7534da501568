"""Finished ``hsqformer cv`` run folders with chosen scores, written in the format the engine writes.

They let the comparison be tested (and benchmarked) on cases whose answer is known, without training.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score


def write_run(
    out: Path,
    *,
    images: list[str],
    labels: list[str],
    patients: list[str],
    folds: np.ndarray,
    validation_scores: np.ndarray,
    tests: Mapping[str, tuple[list[str], list[str], list[str], np.ndarray]] | None = None,
    classes: tuple[str, str] = ("benign", "malignant"),
    model: str = "synthetic",
) -> Path:
    """A run folder: ``validation_scores`` are out-of-fold positive-class probabilities; each test
    cohort is (images, labels, patients, per-fold probabilities of shape (folds, n))."""
    tests = dict(tests or {})
    n_folds = int(folds.max()) + 1
    positive = classes[1]
    out.mkdir(parents=True)
    rows = pd.DataFrame(
        {"cohort": "validation", "image": images, "patient_id": patients, "label": labels, "fold": folds}
    )
    for k in range(n_folds):
        rows[f"prob_fold{k}"] = np.where(folds == k, validation_scores, np.nan)
    rows["prob_ensemble"] = np.nan
    tables = [rows]
    for name, (t_images, t_labels, t_patients, per_fold) in tests.items():
        table = pd.DataFrame({"cohort": name, "image": t_images, "patient_id": t_patients, "label": t_labels})
        table["fold"] = pd.NA
        for k in range(n_folds):
            table[f"prob_fold{k}"] = per_fold[k]
        table["prob_ensemble"] = per_fold.mean(axis=0)
        tables.append(table)
    pd.concat(tables, ignore_index=True).to_csv(out / "predictions.csv", index=False)
    pd.DataFrame({"path": images, "label": labels, "patient_id": patients, "center": "", "fold": folds}).to_csv(
        out / "splits.csv", index=False
    )
    truth = np.array([label == positive for label in labels])
    fold_metrics = [
        {"fold": k, "cohorts": {"validation": {"auc": float(roc_auc_score(truth[folds == k], validation_scores[folds == k]))}}}
        for k in range(n_folds)
    ]
    (out / "metrics.json").write_text(
        json.dumps({"model": model, "classes": list(classes), "n_folds": n_folds, "folds": fold_metrics})
    )
    (out / "run.json").write_text(
        json.dumps(
            {"format": "hsqformer-cv-run/1", "classes": list(classes), "positive_class": positive,
             "data": "synthetic", "tests": {name: "synthetic" for name in tests}}
        )
    )
    for k in range(n_folds):
        (out / f"fold_{k}").mkdir()
        (out / f"fold_{k}" / "done.json").write_text(json.dumps({"fold": k}))
    return out


def binormal_scores(truth: np.ndarray, separation: float, rng: np.random.Generator) -> np.ndarray:
    """Probabilities whose logits are N(0, 1) for negatives and N(separation, 1) for positives
    (true AUC = Phi(separation / sqrt(2)))."""
    logits = rng.normal(size=len(truth)) + separation * truth
    return 1 / (1 + np.exp(-logits))


def synthetic_study(
    root: Path,
    separations: Mapping[str, float],
    *,
    n: int = 400,
    n_folds: int = 5,
    test_sizes: Mapping[str, int] | None = None,
    shared: float = 0.0,
    seed: int = 0,
) -> list[Path]:
    """One run folder per model, on the same images and folds; ``shared`` correlates the models' noise."""
    rng = np.random.default_rng(seed)
    test_sizes = dict(test_sizes or {})

    def cohort(prefix: str, size: int) -> tuple[list[str], list[str], list[str], np.ndarray, np.ndarray]:
        truth = rng.random(size) < 0.4
        images = [f"/data/{prefix}/{i}.png" for i in range(size)]
        labels = ["malignant" if t else "benign" for t in truth]
        patients = [f"{prefix}{i}" for i in range(size)]
        common = rng.normal(size=size)
        return images, labels, patients, truth, common

    val = cohort("val", n)
    folds = rng.permutation(np.arange(n) % n_folds)
    test_data = {name: cohort(name, size) for name, size in test_sizes.items()}
    paths = []
    for model, separation in separations.items():

        def score(truth: np.ndarray, common: np.ndarray) -> np.ndarray:
            noise = np.sqrt(shared) * common + np.sqrt(1 - shared) * rng.normal(size=len(truth))
            return 1 / (1 + np.exp(-(noise + separation * truth)))

        tests = {
            name: (images, labels, patients, np.stack([score(truth, common) for _ in range(n_folds)]))
            for name, (images, labels, patients, truth, common) in test_data.items()
        }
        paths.append(
            write_run(
                root / model, images=val[0], labels=val[1], patients=val[2], folds=folds,
                validation_scores=score(val[3], val[4]), tests=tests, model=model,
            )
        )
    return paths
