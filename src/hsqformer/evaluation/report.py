"""Markdown tables in the style of the paper's Table 2 (percent, mean ± std over folds).

Input is the ``metrics.json`` structure that ``hsqformer cv`` writes: per-cohort
fold summaries (``summary``), the pooled out-of-fold validation
(``pooled_validation``) and the fold ensemble on each test cohort (``ensemble``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hsqformer.evaluation.metrics import BINARY_METRICS, MULTICLASS_METRICS

LABELS = {
    "accuracy": "Accuracy",
    "precision": "Precision",
    "recall": "Recall",
    "specificity": "Specificity",
    "f1": "F1",
    "auc": "AUC",
    "accuracy_all_classes": "Accuracy (all classes)",
    "auc_macro_ovr": "Macro AUC (OvR)",
}


def percent(value: float | None) -> str:
    """A fraction as a percentage with two decimals; ``n/a`` when undefined."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.2f}"


def mean_std(summary: Mapping[str, Any], n_folds: int | None = None) -> str:
    """``mean±std`` in percent, as in Table 2, noting folds where the metric was undefined."""
    std = summary.get("std")
    if std is None or (isinstance(std, float) and math.isnan(std)):
        text = percent(summary.get("mean"))
    else:
        text = f"{percent(summary.get('mean'))}±{percent(std)}"
    defined = summary.get("n_folds")
    if n_folds is not None and defined is not None and 0 < defined < n_folds:
        text += f" ({defined} of {n_folds} folds)"
    return text


def metric_names(metrics: Mapping[str, Any]) -> list[str]:
    """The metric columns of a run: the binary ones, plus the multi-class ones for more than two classes."""
    return [*BINARY_METRICS, *(MULTICLASS_METRICS if len(metrics["classes"]) > 2 else ())]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(first: list[str], names: list[str]) -> list[str]:
    return [_row([*first, *(LABELS[n] for n in names)]), _row(["---"] * (len(first) + len(names)))]


def run_table(metrics: Mapping[str, Any]) -> str:
    """The results of one cross-validation run as a markdown section."""
    names = metric_names(metrics)
    k = metrics["n_folds"]
    lines = [
        f"# Cross-validation results: {metrics['model']}",
        "",
        f"{k}-fold patient-level cross-validation; positive class '{metrics['positive_class']}' "
        f"(classes: {', '.join(metrics['classes'])}); threshold {metrics['threshold']} on its probability. "
        "Values in %: mean±std (sample standard deviation) over folds of each fold's best-AUC model; "
        "'pooled' is all out-of-fold validation predictions together; 'ensemble' is the mean "
        "probability of the fold models.",
        "",
        *_header(["Cohort", "Evaluation", "Images"], names),
    ]
    for cohort, summary in metrics["summary"].items():
        n_images = metrics["cohorts"][cohort]["n_images"]
        lines.append(_row([cohort, f"{k} folds", str(n_images), *(mean_std(summary[n], k) for n in names)]))
        if cohort == "validation" and "pooled_validation" in metrics:
            pooled = metrics["pooled_validation"]
            lines.append(_row([cohort, "pooled", str(n_images), *(percent(pooled.get(n)) for n in names)]))
        if cohort in metrics.get("ensemble", {}):
            ensemble = metrics["ensemble"][cohort]
            lines.append(_row([cohort, "ensemble", str(n_images), *(percent(ensemble.get(n)) for n in names)]))
    return "\n".join(lines) + "\n"


def comparison_tables(runs: Mapping[str, Mapping[str, Any]], floors: Mapping[str, float] | None = None) -> str:
    """One Table-2-style markdown table per cohort comparing several runs (rows) made on the same folds.

    ``floors`` optionally adds reference AUC rows (e.g. the audit's shortcut floor) under the runs.
    """
    first = next(iter(runs.values()))
    names = metric_names(first)
    cohorts = list(first["summary"])
    lines: list[str] = []
    for cohort in cohorts:
        lines += [f"### {cohort}", "", *_header(["Model", "Evaluation"], names)]
        for label, metrics in runs.items():
            summary = metrics["summary"].get(cohort)
            if summary is None:
                continue
            k = metrics["n_folds"]
            lines.append(_row([label, f"{k} folds", *(mean_std(summary[n], k) for n in names)]))
            if cohort in metrics.get("ensemble", {}):
                ensemble = metrics["ensemble"][cohort]
                lines.append(_row([label, "ensemble", *(percent(ensemble.get(n)) for n in names)]))
        if cohort == "validation":
            for label, auc in (floors or {}).items():
                cells = ["" if n != "auc" else percent(auc) for n in names]
                lines.append(_row([label, "reference", *cells]))
        lines.append("")
    return "\n".join(lines)


def fold_table(
    runs: Mapping[str, Mapping[str, Any]],
    metric: str = "auc",
    reference: tuple[str, Sequence[float]] | None = None,
) -> str:
    """One validation metric fold by fold for runs made on the same folds, as a markdown table.

    With a ``reference`` (a label and its per-fold values, e.g. the audit's shortcut floor on the same
    folds) a last column counts the folds in which each run beats it: a mean above the reference can
    hide folds below it.
    """
    k = next(iter(runs.values()))["n_folds"]
    head = ["Model", *(f"fold {i}" for i in range(k)), "mean"]
    if reference is not None:
        head.append(f"folds above {reference[0]}")
    lines = [_row(head), _row(["---"] * len(head))]
    for label, metrics in runs.items():
        folds = sorted(metrics["folds"], key=lambda fold: fold["fold"])
        values = [fold["cohorts"]["validation"].get(metric, math.nan) for fold in folds]
        cells = [label, *(percent(v) for v in values), percent(float(np.nanmean(values)))]
        if reference is not None:
            cells.append(f"{sum(v > r for v, r in zip(values, reference[1], strict=True))} of {k}")
        lines.append(_row(cells))
    if reference is not None:
        values = list(reference[1])
        lines.append(_row([reference[0], *(percent(v) for v in values), percent(float(np.mean(values))), ""]))
    return "\n".join(lines) + "\n"
