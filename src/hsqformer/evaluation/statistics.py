"""Confidence intervals and paired tests for diagnostic accuracy.

- ROC AUC: DeLong et al. (1988) variance and covariance of correlated AUCs, in
  the O(n log n) midrank formulation of Sun & Xu (2014), giving CIs and the
  paired test of two scores on the same cases.
- Proportions (sensitivity, specificity, PPV, NPV, accuracy, F1): a seeded
  percentile bootstrap that resamples *patients*, so that several images of one
  patient move together; the resamples are multinomial patient counts, so one
  set serves every model (paired) and a resample's totals are one matrix product.
  Any other statistic: scipy.stats.bootstrap over patient indices.
- Paired proportions: McNemar's exact test on the discordant pairs.
- Single proportions: Wilson's score interval.
- Several comparisons: Holm's step-down adjustment.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
COUNT_METRICS = ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1")
METRIC_LABELS = {
    "accuracy": "Accuracy",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "ppv": "PPV",
    "npv": "NPV",
    "f1": "F1",
}


@dataclass(frozen=True)
class DeLong:
    """AUCs of k scores on the same cases and the covariance matrix of their estimates."""

    aucs: np.ndarray  # (k,)
    covariance: np.ndarray  # (k, k)

    def ci(self, index: int = 0, confidence: float = CONFIDENCE) -> tuple[float, float]:
        """Normal-theory interval of AUC ``index``, clipped to [0, 1]."""
        z = stats.norm.ppf(0.5 + confidence / 2)
        se = math.sqrt(max(float(self.covariance[index, index]), 0.0))
        auc = float(self.aucs[index])
        return float(max(0.0, auc - z * se)), float(min(1.0, auc + z * se))

    def test(self, a: int, b: int) -> tuple[float, float]:
        """Paired test of AUC ``a`` = AUC ``b``: the z statistic and its two-sided p-value."""
        c = self.covariance
        variance = float(c[a, a] + c[b, b] - 2 * c[a, b])
        difference = float(self.aucs[a] - self.aucs[b])
        if variance <= 1e-15:
            return (0.0, 1.0) if abs(difference) < 1e-12 else (math.copysign(math.inf, difference), 0.0)
        z = difference / math.sqrt(variance)
        return z, float(2 * stats.norm.sf(abs(z)))


def delong(truth: np.ndarray, scores: np.ndarray) -> DeLong:
    """DeLong's AUCs and covariance for scores (k, n) or (n,) against boolean truth (n,).

    Ties count one half, as in the Mann-Whitney statistic. Needs at least one
    positive and one negative case; with a single case of a class the
    covariance is undefined (NaN).
    """
    truth = np.asarray(truth, dtype=bool)
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if scores.shape[1] != truth.shape[0]:
        raise ValueError(f"scores have {scores.shape[1]} cases, truth has {truth.shape[0]}")
    positives, negatives = scores[:, truth], scores[:, ~truth]
    m, n = positives.shape[1], negatives.shape[1]
    if m == 0 or n == 0:
        raise ValueError("the AUC needs at least one positive and one negative case")
    rank_pos = stats.rankdata(positives, axis=1)
    rank_neg = stats.rankdata(negatives, axis=1)
    rank_all = stats.rankdata(np.concatenate([positives, negatives], axis=1), axis=1)
    aucs = (rank_all[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    # structural components (placement values): for each positive, the fraction of negatives it beats;
    # for each negative, the fraction of positives that beat it
    v_pos = (rank_all[:, :m] - rank_pos) / n
    v_neg = 1.0 - (rank_all[:, m:] - rank_neg) / m
    k = scores.shape[0]
    if m < 2 or n < 2:
        return DeLong(aucs, np.full((k, k), np.nan))
    cov_pos = np.atleast_2d(np.cov(v_pos))
    cov_neg = np.atleast_2d(np.cov(v_neg))
    return DeLong(aucs, cov_pos / m + cov_neg / n)


def stratified_delong(truth: np.ndarray, scores: np.ndarray, strata: np.ndarray) -> DeLong:
    """The mean over strata (e.g. cross-validation folds) of each score's within-stratum AUC, with the
    covariance of those means: the statistic of the paper's Table 2 (mean over folds) made testable.

    Strata hold disjoint cases, so their DeLong estimates are independent and the covariance of the
    equally weighted mean is the sum of the within-stratum covariances over S². Scores meet only
    within a stratum, so fold models whose scores sit on different scales are not penalised, as they
    are by the AUC of pooled out-of-fold predictions. Every stratum needs two cases of each class.
    """
    truth = np.asarray(truth, dtype=bool)
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    strata = np.asarray(strata)
    if strata.shape != truth.shape:
        raise ValueError(f"strata have {strata.shape[0]} cases, truth has {truth.shape[0]}")
    parts = []
    for stratum in np.unique(strata):
        inside = strata == stratum
        positives = int(truth[inside].sum())
        if positives < 2 or inside.sum() - positives < 2:
            raise ValueError(f"stratum {stratum} needs at least two cases of each class")
        parts.append(delong(truth[inside], scores[:, inside]))
    aucs = np.mean([part.aucs for part in parts], axis=0)
    covariance = np.sum([part.covariance for part in parts], axis=0) / len(parts) ** 2
    return DeLong(aucs, covariance)


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[int, int, float]:
    """McNemar's exact test of paired outcomes: cases only A got right, only B got right, two-sided p."""
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    discordant = only_a + only_b
    p = 1.0 if discordant == 0 else float(stats.binomtest(only_a, discordant, 0.5).pvalue)
    return only_a, only_b, min(p, 1.0)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN entries stay NaN and are not counted)."""
    p = np.asarray(pvalues, dtype=np.float64)
    adjusted = np.full_like(p, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, (len(order) - rank) * p[i])
        adjusted[i] = min(1.0, running)
    return adjusted.tolist()


def wilson(successes: int, trials: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson's score interval of a proportion; (nan, nan) for zero trials."""
    if trials == 0:
        return math.nan, math.nan
    ci = stats.binomtest(int(successes), int(trials)).proportion_ci(confidence, method="wilson")
    return float(ci.low), float(ci.high)


def confusion_counts(truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Per case: one-hot (tp, fp, tn, fn) as an (n, 4) array."""
    t = np.asarray(truth, dtype=bool)
    p = np.asarray(predicted, dtype=bool)
    return np.stack([p & t, p & ~t, ~p & ~t, ~p & t], axis=1).astype(np.float64)


def count_metrics(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, sensitivity, specificity, PPV, NPV and F1 from (..., 4) tp/fp/tn/fn totals."""
    tp, fp, tn, fn = (counts[..., i] for i in range(4))
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "accuracy": (tp + tn) / (tp + fp + tn + fn),
            "sensitivity": tp / (tp + fn),
            "specificity": tn / (tn + fp),
            "ppv": tp / (tp + fp),
            "npv": tn / (tn + fn),
            "f1": 2 * tp / (2 * tp + fp + fn),
        }


def patient_groups(patients: Sequence[str]) -> np.ndarray:
    """A group index per case: cases of one patient share it; a case without an id is its own patient."""
    index: dict[str, int] = {}
    groups = np.empty(len(patients), dtype=np.int64)
    for i, patient in enumerate(patients):
        key = str(patient) if patient not in (None, "") and not _isnan(patient) else f"\0case{i}"
        groups[i] = index.setdefault(key, len(index))
    return groups


def resample_weights(n_groups: int, n_resamples: int = 2000, seed: int = 0) -> np.ndarray:
    """How often each patient is drawn in each bootstrap resample: an (n_resamples, n_groups) array.

    Drawing n patients with replacement is a multinomial count per patient; totals of a
    resample are then one matrix product, and the same resamples serve every model (paired).
    """
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_resamples).astype(np.float32)


def bootstrap_count_metrics(
    truth: np.ndarray,
    predicted: np.ndarray,
    groups: np.ndarray,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
    weights: np.ndarray | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CIs of the count metrics, resampling patients (``groups``) with replacement.

    ``weights`` (from ``resample_weights``) reuses resamples across calls; otherwise they are drawn
    from ``n_resamples`` and ``seed``.
    """
    per_case = confusion_counts(truth, predicted)
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    if n_groups < 2:
        return {name: (math.nan, math.nan) for name in COUNT_METRICS}
    per_patient = np.zeros((n_groups, 4))
    np.add.at(per_patient, groups, per_case)
    if weights is None:
        weights = resample_weights(n_groups, n_resamples, seed)
    totals = weights @ per_patient.astype(np.float32)
    values = count_metrics(totals.astype(np.float64))
    tail = 100 * (1 - confidence) / 2
    result = {}
    for name in COUNT_METRICS:
        finite = values[name][np.isfinite(values[name])]
        if len(finite) == 0:
            result[name] = (math.nan, math.nan)
        else:
            low, high = np.percentile(finite, [tail, 100 - tail])
            result[name] = (float(low), float(high))
    return result


def patient_bootstrap(
    statistic: Callable[[np.ndarray], float],
    groups: np.ndarray,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``statistic(case_indices)``, resampling patients with replacement."""
    n_groups = int(groups.max()) + 1
    members = [np.flatnonzero(groups == g) for g in range(n_groups)]

    def on_patients(sample: np.ndarray) -> float:
        return statistic(np.concatenate([members[g] for g in sample.astype(np.int64)]))

    if n_groups < 2:
        return math.nan, math.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        result = stats.bootstrap(
            (np.arange(n_groups),),
            on_patients,
            n_resamples=n_resamples,
            confidence_level=confidence,
            method="percentile",
            vectorized=False,
            rng=np.random.default_rng(seed),
        )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def youden_threshold(truth: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold (predict positive when score >= it) that maximises sensitivity + specificity - 1."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(np.asarray(truth, dtype=bool), scores)
    finite = np.isfinite(thresholds)
    j = (tpr - fpr)[finite]
    return float(thresholds[finite][int(np.argmax(j))])


def sensitivity_threshold(truth: np.ndarray, scores: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity reaches ``target`` (so specificity is as high as it can be)."""
    truth = np.asarray(truth, dtype=bool)
    positives = np.sort(np.asarray(scores, dtype=np.float64)[truth])[::-1]
    if len(positives) == 0:
        raise ValueError("no positive cases to reach a sensitivity with")
    needed = max(1, math.ceil(target * len(positives) - 1e-9))
    return float(positives[needed - 1])


def calibration(truth: np.ndarray, scores: np.ndarray, bins: int = 10) -> dict[str, object]:
    """Reliability diagram data (equal-width bins) and the expected calibration error."""
    truth = np.asarray(truth, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    which = np.clip((scores * bins).astype(np.int64), 0, bins - 1)
    count = np.bincount(which, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_score = np.bincount(which, weights=scores, minlength=bins) / count
        observed = np.bincount(which, weights=truth, minlength=bins) / count
    used = count > 0
    ece = float(np.sum(count[used] * np.abs(observed[used] - mean_score[used])) / max(len(scores), 1))
    return {
        "bins": bins,
        "count": count.astype(int).tolist(),
        "mean_score": [float(v) for v in mean_score],
        "observed": [float(v) for v in observed],
        "ece": ece,
    }


def _isnan(value: object) -> bool:
    return isinstance(value, float) and math.isnan(value)


def format_ci(value: float, ci: tuple[float, float], scale: float = 100.0, digits: int = 1) -> str:
    """``value [low, high]`` (in percent by default); ``n/a`` when undefined."""
    if value is None or _isnan(value):
        return "n/a"
    if any(v is None or _isnan(v) for v in ci):
        return f"{scale * value:.{digits}f}"
    return f"{scale * value:.{digits}f} [{scale * ci[0]:.{digits}f}, {scale * ci[1]:.{digits}f}]"


def format_p(p: float) -> str:
    """A p-value as reviewers read it: three decimals, or ``<0.001``."""
    if p is None or _isnan(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"

