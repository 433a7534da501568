"""The comparison's statistics against independent numbers: published examples, textbook formulas, simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from hsqformer.evaluation import statistics as st

# Hanley & McNeil (1982), Radiology 143:29-36, Table 1: CT ratings 1 (definitely normal) .. 5 (definitely
# abnormal) of 58 normal and 51 abnormal patients; the paper reports AUC 0.893 and SE 0.0326.
HM_NORMAL = [33, 6, 6, 11, 2]
HM_ABNORMAL = [3, 2, 2, 11, 33]


def hanley_mcneil() -> tuple[np.ndarray, np.ndarray]:
    ratings = np.arange(1, 6, dtype=float)
    scores = np.r_[np.repeat(ratings, HM_NORMAL), np.repeat(ratings, HM_ABNORMAL)]
    truth = np.r_[np.zeros(sum(HM_NORMAL), bool), np.ones(sum(HM_ABNORMAL), bool)]
    return truth, scores


def slow_delong(truth: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong et al. (1988) written from the paper: placement values by comparing every pair (O(m n))."""
    pos, neg = scores[:, truth], scores[:, ~truth]
    m, n = pos.shape[1], neg.shape[1]
    psi = (pos[:, :, None] > neg[:, None, :]) + 0.5 * (pos[:, :, None] == neg[:, None, :])
    v10 = psi.mean(axis=2)  # per positive
    v01 = psi.mean(axis=1)  # per negative
    aucs = psi.mean(axis=(1, 2))
    s10 = (v10 - aucs[:, None]) @ (v10 - aucs[:, None]).T / (m - 1)
    s01 = (v01 - aucs[:, None]) @ (v01 - aucs[:, None]).T / (n - 1)
    return aucs, s10 / m + s01 / n


def test_hanley_mcneil_published_example():
    truth, scores = hanley_mcneil()
    result = st.delong(truth, scores)
    auc = float(result.aucs[0])
    assert round(auc, 3) == 0.893
    # Hanley & McNeil's own SE formula (their Eq. 1 with Q1 = A/(2-A), Q2 = 2A^2/(1+A)) gives the published 0.0326 ...
    m, n = sum(HM_ABNORMAL), sum(HM_NORMAL)
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    hm_se = math.sqrt((auc * (1 - auc) + (m - 1) * (q1 - auc**2) + (n - 1) * (q2 - auc**2)) / (m * n))
    assert hm_se == pytest.approx(0.0326, abs=5e-4)
    # ... and DeLong's nonparametric SE, which assumes no exponential model, lies close to it
    delong_se = math.sqrt(result.covariance[0, 0])
    assert delong_se == pytest.approx(hm_se, rel=0.1)
    assert delong_se == pytest.approx(slow_delong(truth, scores[None])[1][0, 0] ** 0.5, rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_fast_delong_equals_the_pairwise_definition(seed):
    rng = np.random.default_rng(seed)
    n = 150
    truth = rng.random(n) < 0.35
    base = rng.normal(size=n) + truth
    scores = np.stack([base + rng.normal(scale=s, size=n) for s in (0.3, 1.0, 2.0)])
    scores[1] = np.round(scores[1], 1)  # ties count one half
    fast = st.delong(truth, scores)
    aucs, cov = slow_delong(truth, scores)
    np.testing.assert_allclose(fast.aucs, aucs, rtol=1e-12)
    np.testing.assert_allclose(fast.covariance, cov, rtol=1e-10, atol=1e-15)
    for i in range(3):
        assert fast.aucs[i] == pytest.approx(roc_auc_score(truth, scores[i]))
    z, p = fast.test(0, 2)
    z_slow = (aucs[0] - aucs[2]) / math.sqrt(cov[0, 0] + cov[2, 2] - 2 * cov[0, 2])
    assert z == pytest.approx(z_slow) and p == pytest.approx(2 * stats.norm.sf(abs(z_slow)))


def test_delong_test_of_a_score_with_itself_and_undefined_cases():
    truth, scores = hanley_mcneil()
    both = st.delong(truth, np.stack([scores, scores]))
    assert both.test(0, 1) == (0.0, 1.0)
    with pytest.raises(ValueError, match="positive and one negative"):
        st.delong(np.ones(5, bool), np.arange(5.0))


def _binormal(rng: np.random.Generator, n_pos: int, n_neg: int, separation: float) -> tuple[np.ndarray, np.ndarray]:
    truth = np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)]
    return truth, rng.normal(size=n_pos + n_neg) + separation * truth


def test_delong_ci_covers_the_true_auc_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    separation = 1.2
    true_auc = stats.norm.cdf(separation / math.sqrt(2))
    draws = 600
    covered = 0
    for _ in range(draws):
        truth, scores = _binormal(rng, 60, 90, separation)
        low, high = st.delong(truth, scores).ci()
        covered += low <= true_auc <= high
    assert 0.92 <= covered / draws <= 0.975


def test_delong_test_holds_its_size_under_the_null():
    """Two correlated scores of equal true AUC: the test rejects about 5 % of the time."""
    rng = np.random.default_rng(2)
    rejections, draws = 0, 600
    for _ in range(draws):
        truth = rng.random(200) < 0.4
        common = rng.normal(size=200)
        a = 0.7 * common + 0.71 * rng.normal(size=200) + truth
        b = 0.7 * common + 0.71 * rng.normal(size=200) + truth
        rejections += st.delong(truth, np.stack([a, b])).test(0, 1)[1] < 0.05
    assert 0.025 <= rejections / draws <= 0.08


def test_patient_bootstrap_ci_of_the_auc_covers_the_truth():
    """Two images per patient with a shared patient effect: resampling patients keeps the coverage near 95 %."""
    rng = np.random.default_rng(3)
    separation = 1.0
    true_auc = stats.norm.cdf(separation / math.sqrt(2))
    draws, covered = 150, 0
    for _ in range(draws):
        patients = 60
        truth_p = rng.random(patients) < 0.5
        effect = rng.normal(scale=math.sqrt(0.5), size=patients)
        truth = np.repeat(truth_p, 2)
        scores = np.repeat(effect, 2) + rng.normal(scale=math.sqrt(0.5), size=2 * patients) + separation * truth
        groups = np.repeat(np.arange(patients), 2)

        def auc(rows: np.ndarray) -> float:
            t = truth[rows]
            if t.all() or not t.any():
                return math.nan
            ranks = stats.rankdata(scores[rows])
            m = t.sum()
            return (ranks[t].sum() - m * (m + 1) / 2) / (m * (len(t) - m))

        low, high = st.patient_bootstrap(auc, groups, n_resamples=400, seed=int(rng.integers(1 << 30)))
        covered += low <= true_auc <= high
    assert 0.88 <= covered / draws <= 0.99


def test_bootstrap_of_sensitivity_covers_the_truth_and_is_seeded():
    rng = np.random.default_rng(4)
    draws, covered = 300, 0
    for _ in range(draws):
        truth = rng.random(200) < 0.5
        predicted = np.where(truth, rng.random(200) < 0.8, rng.random(200) < 0.3)
        groups = np.arange(200)
        low, high = st.bootstrap_count_metrics(truth, predicted, groups, n_resamples=500, seed=0)["sensitivity"]
        covered += low <= 0.8 <= high
    assert 0.91 <= covered / draws <= 0.98
    again = [st.bootstrap_count_metrics(truth, predicted, groups, n_resamples=500, seed=7) for _ in range(2)]
    assert again[0] == again[1]


def test_bootstrap_resamples_patients_not_images():
    """A patient with many identical images moves as one: the CI is as wide as with one image per patient."""
    truth = np.r_[np.ones(20, bool), np.zeros(20, bool)]
    predicted = np.r_[np.ones(14, bool), np.zeros(6, bool), np.zeros(15, bool), np.ones(5, bool)]
    one_each = st.bootstrap_count_metrics(truth, predicted, np.arange(40), n_resamples=2000, seed=0)
    tenfold = st.bootstrap_count_metrics(
        np.repeat(truth, 10), np.repeat(predicted, 10), np.repeat(np.arange(40), 10), n_resamples=2000, seed=0
    )
    for name in ("sensitivity", "specificity", "accuracy"):
        assert tenfold[name] == pytest.approx(one_each[name], abs=1e-12)
    per_image = st.bootstrap_count_metrics(
        np.repeat(truth, 10), np.repeat(predicted, 10), np.arange(400), n_resamples=2000, seed=0
    )
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(per_image["sensitivity"]) < 0.5 * width(tenfold["sensitivity"])


def test_count_metrics_by_hand():
    values = st.count_metrics(np.array([30.0, 10.0, 50.0, 10.0]))  # tp fp tn fn
    assert values["accuracy"] == pytest.approx(0.8)
    assert values["sensitivity"] == pytest.approx(0.75)
    assert values["specificity"] == pytest.approx(50 / 60)
    assert values["ppv"] == pytest.approx(0.75)
    assert values["npv"] == pytest.approx(50 / 60)
    assert values["f1"] == pytest.approx(0.75)


def test_mcnemar_exact_textbook_value():
    # 10 pairs only A right, 2 only B right: two-sided exact p = 2 * P(X <= 2 | n=12, 1/2) = 0.0386
    a = np.r_[np.ones(10, bool), np.zeros(2, bool), np.ones(30, bool)]
    b = np.r_[np.zeros(10, bool), np.ones(2, bool), np.ones(30, bool)]
    only_a, only_b, p = st.mcnemar(a, b)
    assert (only_a, only_b) == (10, 2)
    assert p == pytest.approx(2 * 79 / 4096)
    assert st.mcnemar(a, a)[2] == 1.0


def test_holm_adjustment():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, max(2*0.03, .), max(1*0.04, 0.06)
    assert st.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert st.holm([0.5, float("nan"), 0.01]) == pytest.approx([0.5, float("nan"), 0.02], nan_ok=True)


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    # Newcombe (1998), Stat Med 17:857-872, Table I, Wilson score intervals
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_wilson_matches_newcombe(k, n, low, high):
    ci = st.wilson(k, n)
    assert ci[0] == pytest.approx(low, abs=1e-4) and ci[1] == pytest.approx(high, abs=1e-4)


def test_operating_points():
    truth = np.array([0, 0, 0, 0, 1, 1, 1, 1], bool)
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    # Youden: threshold 0.7 gives sens 0.75, spec 1.0 (J 0.75); 0.4 gives 1.0 / 0.75 (J 0.75): the first maximum
    threshold = st.youden_threshold(truth, scores)
    sens = (scores[truth] >= threshold).mean()
    spec = (scores[~truth] < threshold).mean()
    assert sens + spec - 1 == pytest.approx(0.75)
    assert st.sensitivity_threshold(truth, scores, 1.0) == 0.4
    assert st.sensitivity_threshold(truth, scores, 0.9) == 0.4
    assert st.sensitivity_threshold(truth, scores, 0.75) == 0.7


def test_calibration_error():
    truth = np.array([1, 0, 1, 1], float)
    scores = np.array([0.05, 0.05, 0.95, 0.95])
    cal = st.calibration(truth, scores)
    # bin 0: mean 0.05, observed 0.5; bin 9: mean 0.95, observed 1.0 -> ECE = (2*0.45 + 2*0.05) / 4
    assert cal["ece"] == pytest.approx(0.25)
    rng = np.random.default_rng(0)
    p = rng.random(20000)
    assert st.calibration(rng.random(20000) < p, p)["ece"] < 0.02


def test_stratified_delong_is_the_mean_of_independent_within_stratum_estimates():
    """Against the pairwise definition per stratum, combined by hand: mean AUC, variance sum / S²."""
    rng = np.random.default_rng(7)
    truth = rng.random(150) < 0.4
    scores = np.stack([rng.normal(size=150) + truth, rng.normal(size=150) + 0.5 * truth])
    strata = np.arange(150) % 3
    combined = st.stratified_delong(truth, scores, strata)
    parts = [slow_delong(truth[strata == s], scores[:, strata == s]) for s in range(3)]
    np.testing.assert_allclose(combined.aucs, np.mean([aucs for aucs, _ in parts], axis=0))
    np.testing.assert_allclose(combined.covariance, sum(cov for _, cov in parts) / 9)
    one = st.stratified_delong(truth, scores, np.zeros(150, int))
    plain = st.delong(truth, scores)
    np.testing.assert_allclose(one.aucs, plain.aucs)
    np.testing.assert_allclose(one.covariance, plain.covariance)
    one_positive = strata.copy()
    one_positive[np.flatnonzero(truth & (strata == 2))[1:]] = 0
    with pytest.raises(ValueError, match="stratum 2 needs at least two cases of each class"):
        st.stratified_delong(truth, scores, one_positive)


def test_stratified_test_ignores_fold_scales_that_bias_the_pooled_test():
    """Two models of equal discrimination; one model's five fold models shift their scores by a random
    offset each (differently calibrated folds). The pooled AUC test rejects far too often; the
    within-fold test keeps its size."""
    rng = np.random.default_rng(11)
    pooled, stratified, draws = 0, 0, 600
    for _ in range(draws):
        truth = rng.random(250) < 0.4
        folds = rng.permutation(np.arange(250) % 5)
        common = rng.normal(size=250)
        a = 0.7 * common + 0.71 * rng.normal(size=250) + truth
        b = 0.7 * common + 0.71 * rng.normal(size=250) + truth + rng.normal(scale=1.5, size=5)[folds]
        scores = np.stack([a, b])
        pooled += st.delong(truth, scores).test(0, 1)[1] < 0.05
        stratified += st.stratified_delong(truth, scores, folds).test(0, 1)[1] < 0.05
    assert pooled / draws > 0.3
    assert 0.025 <= stratified / draws <= 0.08
