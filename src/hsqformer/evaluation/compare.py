"""Paired comparison of finished ``hsqformer cv`` runs on the same images and folds.

Each run contributes, per cohort, one score per image: the out-of-fold
probability on the pooled validation folds, and the fold ensemble's probability
on each test cohort. Because every run scores the same images, models are
compared *paired*: DeLong's test for correlated AUCs, McNemar's test for
sensitivity and specificity at each model's operating point, Holm's correction
across the models compared with the reference. The operating point is chosen
on the out-of-fold validation predictions only (Youden's J, or a target
sensitivity) and applied unchanged to every test cohort.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hsqformer.errors import HSQformerError
from hsqformer.evaluation import statistics as st
from hsqformer.training.run_folder import METRICS_FILE, PREDICTIONS_FILE, read_run

VALIDATION = "validation"
PAPER_THRESHOLD = 0.5
REPORT_FORMAT = "hsqformer-compare/1"
ALPHA = 0.05


@dataclass
class CohortScores:
    """One model's scores on one cohort, in the cohort's image order."""

    images: list[str]
    patients: list[str]
    labels: list[str]
    scores: np.ndarray
    folds: np.ndarray | None = None  # validation only: the fold in which each image was validated


@dataclass
class RunScores:
    """What a comparison needs of one model: its scores per cohort and its per-fold validation AUCs."""

    name: str
    path: str
    model: str
    classes: list[str]
    positive_class: str
    cohorts: dict[str, CohortScores]
    fold_aucs: list[float] = field(default_factory=list)


def load_run(path: str | Path, name: str | None = None) -> RunScores:
    """Read a finished ``hsqformer cv`` run folder's predictions; one-line errors for anything missing."""
    path = Path(path)
    run = read_run(path)
    metrics_file = path / METRICS_FILE
    if not metrics_file.is_file():
        raise HSQformerError(f"run {path} is unfinished (no metrics.json); finish it with hsqformer cv --resume")
    try:
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise HSQformerError(f"run {path}: cannot read metrics.json ({err.__class__.__name__})") from None
    predictions = path / PREDICTIONS_FILE
    if not predictions.is_file():
        raise HSQformerError(f"run {path} has no predictions.csv")
    try:
        table = pd.read_csv(predictions, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise HSQformerError(f"run {path}: cannot read predictions.csv ({err.__class__.__name__})") from None
    n_folds = int(metrics.get("n_folds", 0))
    prob_columns = ["prob_ensemble", *(f"prob_fold{k}" for k in range(n_folds))]
    required = {"cohort", "image", "patient_id", "label", "fold", *prob_columns}
    missing = required - set(table.columns)
    if missing:
        raise HSQformerError(f"run {path}: predictions.csv lacks the columns {', '.join(sorted(missing))}")
    for column in (*prob_columns, "fold"):
        table[column] = pd.to_numeric(table[column], errors="coerce")
    cohorts: dict[str, CohortScores] = {}
    for cohort, part in table.groupby("cohort", sort=False):
        if cohort == VALIDATION:
            if part["fold"].isna().any() or not part["fold"].between(0, n_folds - 1).all():
                raise HSQformerError(f"run {path}: predictions.csv has validation rows without a valid fold")
            folds = part["fold"].astype(int).to_numpy()
            by_fold = part[[f"prob_fold{k}" for k in range(n_folds)]].to_numpy(dtype=np.float64)
            prob = by_fold[np.arange(len(part)), folds]
        else:
            folds = None
            prob = part["prob_ensemble"].to_numpy(dtype=np.float64)
        if np.isnan(prob).any():
            raise HSQformerError(f"run {path}: predictions.csv has missing probabilities in cohort '{cohort}'")
        cohorts[str(cohort)] = CohortScores(
            images=part["image"].tolist(),
            patients=part["patient_id"].tolist(),
            labels=part["label"].tolist(),
            scores=prob,
            folds=folds,
        )
    if VALIDATION not in cohorts:
        raise HSQformerError(f"run {path}: predictions.csv has no validation rows")
    fold_aucs = [
        float(f["cohorts"][VALIDATION]["auc"]) if f["cohorts"][VALIDATION].get("auc") is not None else math.nan
        for f in metrics.get("folds", [])
    ]
    if len(fold_aucs) != n_folds:
        raise HSQformerError(f"run {path}: metrics.json has {len(fold_aucs)} folds, expected {n_folds}")
    return RunScores(
        name=name or path.name,
        path=str(path),
        model=str(metrics.get("model", "?")),
        classes=list(run["classes"]),
        positive_class=str(run["positive_class"]),
        cohorts=cohorts,
        fold_aucs=fold_aucs,
    )


def check_comparable(runs: Sequence[RunScores]) -> None:
    """All runs must score the same images of the same cohorts, validated in the same folds."""
    if len(runs) < 1:
        raise HSQformerError("compare needs at least one run")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise HSQformerError(f"two runs share the name '{_first_duplicate(names)}'; give distinct --name values")
    first = runs[0]
    for other in runs[1:]:
        where = f"run {other.path} and run {first.path}"
        if other.classes != first.classes or other.positive_class != first.positive_class:
            raise HSQformerError(f"{where}: classes or positive class differ")
        if set(other.cohorts) != set(first.cohorts):
            only = sorted(set(other.cohorts) ^ set(first.cohorts))
            raise HSQformerError(f"{where}: cohorts differ (in one run only: {', '.join(only)})")
        for cohort, scores in first.cohorts.items():
            theirs = other.cohorts[cohort]
            if theirs.images != scores.images or theirs.labels != scores.labels:
                raise HSQformerError(f"{where}: the images or labels of cohort '{cohort}' differ")
            if scores.folds is not None and not np.array_equal(scores.folds, theirs.folds):
                raise HSQformerError(f"{where}: the validation folds differ (different splits)")


def operating_threshold(truth: np.ndarray, scores: np.ndarray, target_sensitivity: float | None) -> float:
    """The threshold chosen on out-of-fold validation scores: Youden's J, or the target sensitivity."""
    if target_sensitivity is None:
        return st.youden_threshold(truth, scores)
    return st.sensitivity_threshold(truth, scores, target_sensitivity)


def compare_runs(
    runs: Sequence[RunScores],
    *,
    reference: int = 0,
    target_sensitivity: float | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Per cohort and model: metrics with 95 % CIs at 0.5 and at the operating point; paired tests vs the reference."""
    check_comparable(runs)
    ref = runs[reference]
    thresholds = {}
    for run in runs:
        val = run.cohorts[VALIDATION]
        truth = np.array([label == run.positive_class for label in val.labels])
        thresholds[run.name] = operating_threshold(truth, val.scores, target_sensitivity)
    cohorts: dict[str, Any] = {}
    for cohort, base in ref.cohorts.items():
        truth = np.array([label == ref.positive_class for label in base.labels])
        groups = st.patient_groups(base.patients)
        if truth.all() or not truth.any():
            raise HSQformerError(f"cohort '{cohort}' has images of one class only; its AUC is undefined")
        scores = np.stack([run.cohorts[cohort].scores for run in runs])
        dl = st.delong(truth, scores)
        weights = st.resample_weights(int(groups.max()) + 1, n_resamples, seed)
        models = {}
        for i, run in enumerate(runs):
            models[run.name] = {
                "auc": float(dl.aucs[i]),
                "auc_ci": dl.ci(i),
                "at_0.5": _point_metrics(truth, scores[i], groups, PAPER_THRESHOLD, weights),
                "at_operating_point": _point_metrics(truth, scores[i], groups, thresholds[run.name], weights),
                "calibration": st.calibration(truth, scores[i]),
            }
        cohorts[cohort] = {
            "n_images": int(len(truth)),
            "n_positive": int(truth.sum()),
            "n_patients": int(groups.max()) + 1,
            "models": models,
            "paired": _paired_tests(runs, reference, truth, scores, dl, thresholds),
        }
        if base.folds is not None:
            cohorts[cohort]["fold_stratified"] = _fold_stratified(runs, reference, truth, scores, base.folds)
    rule = "Youden's J" if target_sensitivity is None else f"sensitivity >= {target_sensitivity:g}"
    return {
        "format": REPORT_FORMAT,
        "reference": ref.name,
        "classes": ref.classes,
        "positive_class": ref.positive_class,
        "operating_point": {
            "rule": rule,
            "chosen_on": "pooled out-of-fold validation predictions",
            "thresholds": thresholds,
        },
        "confidence": st.CONFIDENCE,
        "bootstrap": {
            "resamples": n_resamples, "seed": seed, "unit": "patient", "method": "percentile",
            "paired": "the same resamples for every model of a cohort",
        },
        "runs": [
            {"name": r.name, "path": r.path, "model": r.model, "fold_aucs": r.fold_aucs} for r in runs
        ],
        "cohorts": cohorts,
    }


def _point_metrics(
    truth: np.ndarray, scores: np.ndarray, groups: np.ndarray, threshold: float, weights: np.ndarray
) -> dict[str, Any]:
    predicted = scores >= threshold
    totals = st.confusion_counts(truth, predicted).sum(axis=0)
    values = st.count_metrics(totals)
    cis = st.bootstrap_count_metrics(truth, predicted, groups, weights=weights)
    tp, fp, tn, fn = (int(v) for v in totals)
    return {
        "threshold": float(threshold),
        "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
        **{name: {"value": float(values[name]), "ci": cis[name]} for name in st.COUNT_METRICS},
    }


def _paired_tests(
    runs: Sequence[RunScores],
    reference: int,
    truth: np.ndarray,
    scores: np.ndarray,
    dl: st.DeLong,
    thresholds: dict[str, float],
) -> dict[str, Any]:
    ref = runs[reference]
    ref_pred = scores[reference] >= thresholds[ref.name]
    rows = {}
    for i, run in enumerate(runs):
        if i == reference:
            continue
        pred = scores[i] >= thresholds[run.name]
        z, p_auc = dl.test(i, reference)
        sens = st.mcnemar(pred[truth], ref_pred[truth])
        spec = st.mcnemar(~pred[~truth], ~ref_pred[~truth])
        rows[run.name] = {
            "auc_difference": float(dl.aucs[i] - dl.aucs[reference]),
            "delong_z": z,
            "delong_p": p_auc,
            "sensitivity_discordant": [sens[0], sens[1]],
            "sensitivity_p": sens[2],
            "specificity_discordant": [spec[0], spec[1]],
            "specificity_p": spec[2],
        }
    _add_holm(rows, ("delong_p", "sensitivity_p", "specificity_p"))
    return rows


def _add_holm(rows: dict[str, dict[str, Any]], keys: Sequence[str]) -> None:
    """Holm-adjust each p-value column across the compared models: ``KEY_holm`` and ``NAME_significant``."""
    for key in keys:
        adjusted = st.holm([row[key] for row in rows.values()])
        for row, value in zip(rows.values(), adjusted, strict=True):
            row[f"{key}_holm"] = value
            row[f"{key.removesuffix('_p')}_significant"] = bool(value < ALPHA)


def _fold_stratified(
    runs: Sequence[RunScores], reference: int, truth: np.ndarray, scores: np.ndarray, folds: np.ndarray
) -> dict[str, Any]:
    """Each model's mean fold AUC with a CI, and the paired test of the means, from within-fold DeLong."""
    try:
        dl = st.stratified_delong(truth, scores, folds)
    except ValueError as err:
        return {"skipped": str(err)}
    names = [run.name for run in runs]
    paired = {}
    for i, name in enumerate(names):
        if i != reference:
            z, p = dl.test(i, reference)
            paired[name] = {"auc_difference": float(dl.aucs[i] - dl.aucs[reference]), "delong_z": z, "delong_p": p}
    _add_holm(paired, ("delong_p",))
    return {
        "n_folds": int(len(np.unique(folds))),
        "models": {name: {"auc": float(dl.aucs[i]), "auc_ci": dl.ci(i)} for i, name in enumerate(names)},
        "paired": paired,
    }


def _first_duplicate(names: Sequence[str]) -> str:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return ""


def per_image_table(runs: Sequence[RunScores], report: dict[str, Any]) -> pd.DataFrame:
    """Every image of every cohort with each model's score and its decision at that model's operating point."""
    thresholds = report["operating_point"]["thresholds"]
    ref = runs[0]
    tables = []
    for cohort, base in ref.cohorts.items():
        table = pd.DataFrame(
            {"cohort": cohort, "image": base.images, "patient_id": base.patients, "label": base.labels}
        )
        if base.folds is not None:
            table["fold"] = base.folds
        for run in runs:
            table[f"score_{run.name}"] = run.cohorts[cohort].scores
            table[f"positive_{run.name}"] = run.cohorts[cohort].scores >= thresholds[run.name]
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def shortcut_floor(reference: RunScores, seed: int = 0, name: str = "shortcut floor") -> RunScores:
    """The data audit's shortcut forest (image size and grey histogram) as one more model on the reference's folds.

    Trained fold by fold on the reference run's training folds, it scores the
    validation fold out of fold and each test cohort as a fold ensemble, exactly
    like a ``cv`` run, so that a model can be tested against it paired.
    """
    from hsqformer.data.audit import forest_probabilities, image_features

    val = reference.cohorts[VALIDATION]
    missing = [image for cohort in reference.cohorts.values() for image in cohort.images if not Path(image).is_file()]
    if missing:
        raise HSQformerError(
            f"--floor: image {missing[0]} of run {reference.path} not found ({len(missing)} missing); "
            "the floor needs the run's images"
        )
    index = {label: i for i, label in enumerate(reference.classes)}
    positive = index[reference.positive_class]
    y = np.array([index[label] for label in val.labels])
    x = image_features(val.images)
    tests = {c: image_features(s.images) for c, s in reference.cohorts.items() if c != VALIDATION}
    folds = np.asarray(val.folds)
    oof = np.zeros(len(y))
    fold_aucs = []
    test_sums = {c: np.zeros(len(f)) for c, f in tests.items()}
    n_folds = int(folds.max()) + 1
    for k in range(n_folds):
        held = folds == k
        outputs = forest_probabilities(x[~held], y[~held], [x[held], *tests.values()], seed, len(reference.classes))
        oof[held] = outputs[0][:, positive]
        truth = y[held] == positive
        fold_aucs.append(st.delong(truth, oof[held]).aucs[0].item() if 0 < truth.sum() < len(truth) else math.nan)
        for cohort, proba in zip(tests, outputs[1:], strict=True):
            test_sums[cohort] += proba[:, positive]
    cohorts = {VALIDATION: CohortScores(val.images, val.patients, val.labels, oof, val.folds)}
    for cohort, total in test_sums.items():
        source = reference.cohorts[cohort]
        cohorts[cohort] = CohortScores(source.images, source.patients, source.labels, total / n_folds)
    ordered = {c: cohorts[c] for c in reference.cohorts}
    return RunScores(
        name=name,
        path=f"{reference.path} (folds)",
        model="random forest on width, height and grey histogram",
        classes=reference.classes,
        positive_class=reference.positive_class,
        cohorts=ordered,
        fold_aucs=fold_aucs,
    )
