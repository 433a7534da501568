"""The comparison's figures (PNG, matplotlib): ROC curves with the reference's CI band, confusion
matrices at the operating point, reliability diagrams and the per-fold AUC strip plot (the paper's Fig. 9)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hsqformer.evaluation import statistics as st
from hsqformer.evaluation.compare import RunScores
from hsqformer.files import atomic_path

FPR_GRID = np.linspace(0.0, 1.0, 101)
BAND_RESAMPLES = 200


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path) -> Path:
    """Write ``fig`` as a PNG atomically and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight")
    pyplot().close(fig)
    return path


def _truth(run: RunScores, cohort: str) -> np.ndarray:
    return np.array([label == run.positive_class for label in run.cohorts[cohort].labels])


def roc_band(truth: np.ndarray, scores: np.ndarray, groups: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise 95 % band of the ROC curve's sensitivity on ``FPR_GRID`` (patient bootstrap)."""
    from sklearn.metrics import roc_curve

    curves = []
    for weights in st.resample_weights(int(groups.max()) + 1, BAND_RESAMPLES, seed):
        per_case = weights[groups]
        drawn = per_case > 0
        t = truth[drawn]
        if t.all() or not t.any():
            continue
        fpr, tpr, _ = roc_curve(t, scores[drawn], sample_weight=per_case[drawn])
        curves.append(np.interp(FPR_GRID, fpr, tpr))
    curves_array = np.array(curves)
    return np.percentile(curves_array, 2.5, axis=0), np.percentile(curves_array, 97.5, axis=0)


def roc_figure(runs: Sequence[RunScores], cohort: str, report: dict[str, Any], path: Path, seed: int = 0) -> Path:
    """ROC curves of all models on one cohort; the reference with its CI band and operating points marked."""
    from sklearn.metrics import roc_curve

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 5.2))
    ref_name = report["reference"]
    part = report["cohorts"][cohort]
    for run in runs:
        truth, scores = _truth(run, cohort), run.cohorts[cohort].scores
        fpr, tpr, _ = roc_curve(truth, scores)
        model = part["models"][run.name]
        lo, hi = model["auc_ci"]
        is_ref = run.name == ref_name
        (line,) = ax.plot(
            fpr, tpr, lw=2.2 if is_ref else 1.3,
            label=f"{run.name}: AUC {100 * model['auc']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]",
        )
        if is_ref:
            band_lo, band_hi = roc_band(truth, scores, st.patient_groups(run.cohorts[cohort].patients), seed)
            ax.fill_between(FPR_GRID, band_lo, band_hi, color=line.get_color(), alpha=0.15, lw=0)
        point = model["at_operating_point"]
        ax.plot(1 - point["specificity"]["value"], point["sensitivity"]["value"], "o", color=line.get_color(), ms=5)
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01), aspect="equal")
    ax.set_title(f"{cohort}: ROC ({part['n_images']} images; dots: operating points)", fontsize=10)
    ax.legend(loc="lower right", fontsize=7)
    return save_png(fig, path)


def confusion_figure(runs: Sequence[RunScores], cohort: str, report: dict[str, Any], path: Path) -> Path:
    """Confusion matrices of every model at its operating point on one cohort."""
    plt = pyplot()
    n = len(runs)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.7 * cols, 2.6 * rows), squeeze=False)
    positive = report["positive_class"]
    negative = "not " + positive if len(report["classes"]) > 2 else next(c for c in report["classes"] if c != positive)
    for ax, run in zip(axes.flat, runs):
        c = report["cohorts"][cohort]["models"][run.name]["at_operating_point"]["confusion"]
        matrix = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
        ax.imshow(matrix, cmap="Blues")
        for (i, j), value in np.ndenumerate(matrix):
            dark = value > matrix.max() / 2
            ax.text(j, i, str(value), ha="center", va="center", color="white" if dark else "black", fontsize=11)
        ax.set_xticks([0, 1], [negative, positive], fontsize=7)
        ax.set_yticks([0, 1], [negative, positive], fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        ax.set_title(run.name, fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"{cohort}: confusion matrices at the operating point", fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)


def calibration_figure(runs: Sequence[RunScores], cohort: str, report: dict[str, Any], path: Path) -> Path:
    """Reliability diagram (observed positive fraction against mean predicted probability) with each ECE."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 5.0))
    for run in runs:
        cal = report["cohorts"][cohort]["models"][run.name]["calibration"]
        used = np.array(cal["count"]) > 0
        ax.plot(
            np.array(cal["mean_score"])[used], np.array(cal["observed"])[used], "o-", ms=3,
            label=f"{run.name}: ECE {100 * cal['ece']:.1f}",
        )
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    ax.set(xlabel=f"mean predicted P({report['positive_class']})", ylabel="observed fraction positive",
           xlim=(0, 1), ylim=(0, 1), aspect="equal")
    ax.set_title(f"{cohort}: reliability (10 equal-width bins)", fontsize=10)
    ax.legend(loc="upper left", fontsize=7)
    return save_png(fig, path)


def fold_auc_figure(runs: Sequence[RunScores], path: Path) -> Path:
    """Strip plot of each model's validation AUC per fold (the paper's Fig. 9), folds joined by lines."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(runs), 4.0))
    aucs = np.array([run.fold_aucs for run in runs], dtype=np.float64)
    for k in range(aucs.shape[1]):
        ax.plot(range(len(runs)), 100 * aucs[:, k], "-", color="grey", alpha=0.3, lw=0.8)
    for i, run in enumerate(runs):
        ax.plot(np.full(aucs.shape[1], i), 100 * aucs[i], "o", ms=6)
        ax.plot([i - 0.25, i + 0.25], [100 * np.nanmean(aucs[i])] * 2, "k-", lw=2)
    ax.set_xticks(range(len(runs)), [run.name for run in runs], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("validation AUC per fold (%)")
    ax.set_title("AUC per fold (bar: mean; grey lines join one fold)", fontsize=10)
    return save_png(fig, path)
