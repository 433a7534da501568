"""``hsqformer readers``: the paper's Table 3 from its own numbers, the MRMC test on simulated studies, bad input.

Table 3 of the paper (six radiologists on the high-risk test cohort of Table 1:
2884 images, 706 benign and 2178 malignant, 1454 patients) gives each reader's
accuracy, precision, recall, F1 and "AUC". Recall and precision fix the
confusion counts (TP = recall x 2178, FP = TP / precision - TP); reads built
with those counts must give back the paper's numbers. Where the paper's numbers
disagree with each other, no reads can reproduce all of them; ``PAPER_DISAGREES``
lists those cells with the value the counts give (see README, "Reader study").
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from hsqformer.evaluation import statistics as st
from hsqformer.evaluation.compare import load_run
from hsqformer.evaluation.readers import load_reads, or_mrmc, specificity_threshold
from run_fixtures import write_run
from shared_data import DATA, requires_shared_data
from test_cli_cv import run_cli, snapshot

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "reads_example.csv"

# Table 1, high-risk cohort
HR_BENIGN, HR_MALIGNANT, HR_PATIENTS = 706, 2178, 1454
# Table 3: reader -> (group, accuracy, precision, recall, F1, "AUC"), in %
PAPER = {
    "senior 1": ("senior", 75.04, 94.72, 70.89, 81.09, 79.4),
    "senior 2": ("senior", 82.77, 90.94, 85.72, 88.25, 79.7),
    "senior 3": ("senior", 80.41, 89.63, 83.75, 86.59, 76.9),
    "junior 1": ("junior", 79.61, 86.64, 86.32, 86.48, 72.6),
    "junior 2": ("junior", 77.22, 82.97, 87.88, 85.35, 66.1),
    "junior 3": ("junior", 78.66, 86.8, 84.81, 85.79, 72.0),
}
# Table 3's group rows: mean ± SD over the group's readers
PAPER_GROUPS = {
    "senior": ((79.41, 3.96), (91.76, 2.64), (80.12, 8.05), (85.31, 3.75), (78.67, 1.54)),
    "junior": ((78.5, 1.2), (85.47, 2.17), (86.34, 1.54), (85.87, 0.57), (70.23, 3.59)),
    "all readers": ((78.95, 2.67), (88.62, 4.07), (83.23, 6.2), (85.59, 2.42), (74.45, 5.24)),
}
COLUMNS = ("accuracy", "ppv", "sensitivity", "f1", "balanced_accuracy")
# Cells where the paper's numbers contradict each other: what the counts implied by recall and precision give.
PAPER_DISAGREES = {
    # TP = 1544 and FP = 86 are forced by recall 70.89 and precision 94.72: accuracy 2164/2884 = 75.03, not 75.04
    ("senior 1", "accuracy"): 75.03,
    # TP = 1914 forced by recall 87.88; no FP gives precision 82.97 (393 -> 82.96, 392 -> 83.00); F1 85.35 matches 393
    ("junior 2", "ppv"): 82.96,
    # recall 84.81 is not k/2178 for any k (1847 -> 84.80, 1848 -> 84.85)
    ("junior 3", "sensitivity"): 84.80,
    # accuracy 78.66 is not k/2884 for any k (2268 -> 78.64, 2269 -> 78.68); TP 1847, FP 281 give 78.78
    ("junior 3", "accuracy"): 78.78,
    # "AUC" 72.0 is not the balanced accuracy of any counts with these recall and precision: 72.50
    ("junior 3", "balanced_accuracy"): 72.50,
}


def paper_counts(recall: float, precision: float) -> tuple[int, int]:
    """(TP, FP) from Table 3's recall and precision on the high-risk cohort."""
    tp = round(recall / 100 * HR_MALIGNANT)
    fp = round(tp * 100 / precision - tp)
    return tp, fp


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _validation(rng: np.random.Generator, n: int = 300, n_folds: int = 5):
    truth = rng.random(n) < 0.5
    images = [f"/data/train/{'malignant' if t else 'benign'}/T_{i}.png" for i, t in enumerate(truth)]
    labels = ["malignant" if t else "benign" for t in truth]
    patients = [f"t{i // 2}" for i in range(n)]
    folds = rng.permutation(np.arange(n) % n_folds)
    scores = _sigmoid(1.7 * truth + rng.normal(size=n) - 0.8)
    return images, labels, patients, folds, scores


def _test_cohort(rng: np.random.Generator, truth: np.ndarray, prefix: str, n_patients: int, n_folds: int = 5):
    n = len(truth)
    images = [f"/data/{prefix}/{'malignant' if t else 'benign'}/{prefix.upper()}_{i:05d}.png"
              for i, t in enumerate(truth)]
    labels = ["malignant" if t else "benign" for t in truth]
    patients = [f"{prefix}-p{i % n_patients}" for i in range(n)]
    latent = 1.7 * truth + rng.normal(size=n) - 0.8
    per_fold = np.stack([_sigmoid(latent + 0.3 * rng.normal(size=n)) for _ in range(n_folds)])
    return images, labels, patients, per_fold


def _run(root: Path, cohorts: dict[str, np.ndarray], n_patients: dict[str, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    images, labels, patients, folds, scores = _validation(rng)
    tests = {name: _test_cohort(rng, truth, name, n_patients[name]) for name, truth in cohorts.items()}
    return write_run(root, images=images, labels=labels, patients=patients, folds=folds, validation_scores=scores,
                     tests=tests)


def _write_reads(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


# --------------------------------------------------------------------------- Table 3 from the paper's numbers


@pytest.fixture(scope="module")
def paper_study(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("paper")
    rng = np.random.default_rng(3)
    truth = rng.permutation(np.r_[np.zeros(HR_BENIGN, bool), np.ones(HR_MALIGNANT, bool)])
    run = _run(root / "run", {"high-risk": truth}, {"high-risk": HR_PATIENTS})
    images = load_run(run).cohorts["high-risk"].images
    positives, negatives = np.flatnonzero(truth), np.flatnonzero(~truth)
    rows = []
    for k, (reader, (group, _acc, precision, recall, _f1, _auc)) in enumerate(PAPER.items()):
        tp, fp = paper_counts(recall, precision)
        called = np.zeros(len(truth), bool)
        called[rng.permutation(positives)[:tp]] = True
        called[rng.permutation(negatives)[:fp]] = True
        for i in rng.permutation(len(truth)):  # any order; keys by full path, relative path or file name
            key = (images[i], images[i].split("/high-risk/")[1], images[i].rsplit("/")[-1])[k % 3]
            rows.append({"reader": reader, "group": group, "image": key,
                         "call": "malignant" if called[i] else "benign"})
    reads = _write_reads(root / "reads.csv", rows)
    out = root / "report"
    code, err = run_cli("readers", "--reads", reads, "--run", run, "--cohort", "high-risk", "--out", out,
                        "--resamples", 300)
    assert code == 0, err
    return {"run": run, "reads": reads, "out": out, "report": json.loads((out / "report.json").read_text())}


def test_paper_counts_follow_from_recall_and_precision():
    assert paper_counts(70.89, 94.72) == (1544, 86)
    assert paper_counts(84.81, 86.8) == (1847, 281)


def test_table3_is_reproduced_from_the_papers_own_numbers(paper_study):
    report = paper_study["report"]
    assert report["cohort"]["n_images"] == HR_BENIGN + HR_MALIGNANT
    assert report["cohort"]["n_positive"] == HR_MALIGNANT and report["cohort"]["n_patients"] == HR_PATIENTS
    readers = {r["reader"]: r for r in report["readers"]}
    assert list(readers) == list(PAPER)
    disagreements = {}
    for reader, (group, *paper_values) in PAPER.items():
        mine = readers[reader]
        assert mine["group"] == group and mine["n_images"] == HR_BENIGN + HR_MALIGNANT
        for metric, paper in zip(COLUMNS, paper_values, strict=True):
            value = 100 * mine["metrics"][metric]["value"]
            digits = 1 if metric == "balanced_accuracy" else 2  # the paper gives its "AUC" to one decimal
            if (reader, metric) in PAPER_DISAGREES:
                assert round(value, 2) == pytest.approx(PAPER_DISAGREES[reader, metric], abs=1e-9)
                disagreements[reader, metric] = (paper, round(value, 2))
            else:
                assert round(value, digits) == pytest.approx(paper, abs=1e-9), (reader, metric, value, paper)
    assert set(disagreements) == set(PAPER_DISAGREES)
    # the paper's "AUC" is the balanced accuracy of the reads: equal to the Mann-Whitney AUC of the binary calls
    table = pd.read_csv(paper_study["out"] / "reads.csv")
    for reader, part in table.groupby("reader"):
        auc = st.delong((part["label"] == "malignant").to_numpy(), (part["call"] == "malignant").to_numpy()).aucs[0]
        assert auc == pytest.approx(readers[reader]["metrics"]["balanced_accuracy"]["value"])


def test_table3_group_rows_are_mean_and_sd_over_readers(paper_study):
    report = paper_study["report"]
    groups = {g["group"]: g for g in report["groups"]}
    readers = report["readers"]
    for name, paper in PAPER_GROUPS.items():
        members = [r for r in readers if name == "all readers" or r["group"] == name]
        for metric, (paper_mean, paper_sd) in zip(COLUMNS, paper, strict=True):
            values = np.array([r["metrics"][metric]["value"] for r in members])
            row = groups[name]["metrics"][metric]
            assert row["mean"] == pytest.approx(values.mean()) and row["sd"] == pytest.approx(values.std(ddof=1))
            low, high = row["ci"]
            assert low < row["mean"] < high
            # the paper's averages are over its per-reader values; junior 3's inconsistent cells move them slightly
            tolerance = 0.2 if metric == "balanced_accuracy" else 0.05
            assert 100 * row["mean"] == pytest.approx(paper_mean, abs=tolerance), (name, metric)
            assert 100 * row["sd"] == pytest.approx(paper_sd, abs=2.5 * tolerance), (name, metric)


def test_table3_in_the_markdown_report(paper_study):
    text = (paper_study["out"] / "report.md").read_text()
    assert "| senior 1 | senior | 2884 | 75.03 | 94.72 | 70.89 | 81.09 | 79.35 | — |" in text
    assert "| junior 3 | junior | 2884 | 78.78 | 86.80 | 84.80 | 85.79 | 72.50 | — |" in text
    # 91.77: the mean of the unrounded precisions; the paper's 91.76 averages the rounded ones
    assert "| senior average |  | 3 readers | 79.40 ± 3.96 | 91.77 ± 2.64 | 80.12 ± 8.05 | 85.31 ± 3.75 |" in text
    assert '"AUC" = balanced accuracy' in text and "balanced accuracy" in text
    assert "![model ROC and readers](readers_roc.png)" in text
    png = paper_study["out"] / "readers_roc.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # binary readers only: no score MRMC, but the calls MRMC (balanced accuracy) is done on all six
    mrmc = paper_study["report"]["mrmc"]
    assert "skipped" in mrmc["scores"] and mrmc["calls"]["n_readers"] == 6


def test_model_vs_each_reader_on_the_same_images(paper_study):
    report = paper_study["report"]
    table = pd.read_csv(paper_study["out"] / "reads.csv")
    threshold = report["operating_point"]["threshold"]
    run = load_run(paper_study["run"])
    val = run.cohorts["validation"]
    assert threshold == pytest.approx(st.youden_threshold(np.array(val.labels) == "malignant", val.scores))
    comparisons = {c["reader"]: c for c in report["comparisons"]}
    raw = []
    for reader, part in table.groupby("reader", sort=False):
        truth = (part["label"] == "malignant").to_numpy()
        called = (part["call"] == "malignant").to_numpy()
        model = part["model_score"].to_numpy() >= threshold
        c = comparisons[reader]
        only_model, only_reader, p = st.mcnemar(model[truth], called[truth])
        test = c["operating_point"]["sensitivity_test"]
        assert (test["model_only_correct"], test["reader_only_correct"]) == (only_model, only_reader)
        assert test["p"] == pytest.approx(p)
        raw.append(p)
        # at the reader's own sensitivity the model is at least as sensitive, and as specific as it can be there
        at = c["at_reader_sensitivity"]
        assert at["model_sensitivity"] >= c["reader_sensitivity"] - 1e-12
        at = c["at_reader_specificity"]
        assert at["model_specificity"] >= c["reader_specificity"] - 1e-12
    holm = st.holm(raw)
    assert [comparisons[r]["operating_point"]["sensitivity_test"]["p_holm"] for r in PAPER] == pytest.approx(holm)


# --------------------------------------------------------------------------- MRMC: Obuchowski-Rockette with DeLong


def roe_metz_study(rng, n_readers, n_negative, n_positive, mu, mu_model, var_r, var_c, var_rc, var_mc):
    """One simulated study (Roe & Metz 1997): reader j's latent score of case k is
    mu * truth_k + R_j[truth_k] + C_k + RC_jk, with reader effects drawn separately for the two truth
    states (so readers differ in AUC); the model's is mu_model * truth_k + C_k + MC_k (same case effects)."""
    truth = np.r_[np.zeros(n_negative, bool), np.ones(n_positive, bool)]
    n = len(truth)
    case = rng.normal(0, math.sqrt(var_c), n)
    reader_pos = rng.normal(0, math.sqrt(var_r), (n_readers, 1))
    reader_neg = rng.normal(0, math.sqrt(var_r), (n_readers, 1))
    reader_by_case = rng.normal(0, math.sqrt(var_rc), (n_readers, n))
    readers = mu * truth + np.where(truth, reader_pos, reader_neg) + case + reader_by_case
    model = mu_model * truth + case + rng.normal(0, math.sqrt(var_mc), n)
    return truth, readers, model


def simulate(n_studies, *, delta=0.0, seed=0, n_readers=5, n_negative=50, n_positive=50, mu=1.0,
             var_r=0.03, var_c=0.3, var_rc=0.2, var_mc=0.2):
    """OR results of simulated studies where the model's true AUC is the readers' population mean + delta.

    Defaults: iMRMC's Roe-Metz "HH" components (reader 0.03, case 0.3, reader x case 0.2), mu = 1."""
    rng = np.random.default_rng(seed)
    true_readers = stats.norm.cdf(mu / math.sqrt(2 * (var_c + var_rc) + 2 * var_r))
    mu_model = stats.norm.ppf(true_readers + delta) * math.sqrt(2 * (var_c + var_mc))
    results = [or_mrmc(*roe_metz_study(rng, n_readers, n_negative, n_positive, mu, mu_model, var_r, var_c, var_rc,
                                       var_mc)) for _ in range(n_studies)]
    return true_readers, results


def test_mrmc_type_one_error_and_bias_on_roe_metz_studies():
    true_auc, results = simulate(2000, seed=0)
    p = np.array([r["p"] for r in results])
    rejected = float(np.mean(p < 0.05))
    assert 0.03 <= rejected <= 0.07, rejected  # 2000 studies: standard error 0.5 %; this seed gives 4.8 %
    differences = np.array([r["difference"] for r in results])
    assert abs(differences.mean()) < 0.005  # unbiased: the true difference is 0
    mean_readers = np.array([r["mean_reader_auc"] for r in results])
    assert abs(mean_readers.mean() - true_auc) < 0.005
    models = np.array([r["model_auc"] for r in results])
    assert abs(models.mean() - true_auc) < 0.005
    covered = np.mean([r["difference_ci"][0] <= 0 <= r["difference_ci"][1] for r in results])
    assert covered == pytest.approx(1 - rejected)


def test_mrmc_detects_a_better_model():
    true_auc, results = simulate(300, delta=0.10, seed=1)
    assert np.mean([r["p"] < 0.05 for r in results]) > 0.6
    assert np.mean([r["difference"] for r in results]) == pytest.approx(-0.10, abs=0.01)


def _jackknife_covariance(truth: np.ndarray, scores: np.ndarray) -> np.ndarray:
    n = len(truth)
    leave_out = np.array([st.delong(np.delete(truth, k), np.delete(scores, k, axis=1)).aucs for k in range(n)])
    centred = leave_out - leave_out.mean(axis=0)
    return (n - 1) / n * centred.T @ centred


def test_mrmc_agrees_with_the_jackknife_or_analysis_of_rjafroc():
    """RJafroc's StCadVsRad (1T-RRRC) takes Var and Cov2 from the jackknife; ours from DeLong. On 120 cases the
    two covariance estimates, and so the tests, nearly agree."""
    rng = np.random.default_rng(5)
    truth, readers, model = roe_metz_study(rng, 4, 60, 60, 1.0, 1.1, 0.03, 0.3, 0.2, 0.2)
    ours = or_mrmc(truth, readers, model)
    cov = _jackknife_covariance(truth, np.vstack([model, readers]))
    j = readers.shape[0]
    a = np.hstack([-np.ones((j, 1)), np.eye(j)])
    cov_d = a @ cov @ a.T
    cov2 = cov_d[~np.eye(j, dtype=bool)].mean()
    aucs = np.array(ours["reader_aucs"])
    msr = aucs.var(ddof=1)
    den = msr + max(j * cov2, 0)
    t = (aucs.mean() - ours["model_auc"]) / math.sqrt(den / j)
    ddf = den**2 / (msr**2 / (j - 1))
    p = 2 * stats.t.sf(abs(t), ddf)
    assert ours["variance_components"]["cov2"] == pytest.approx(cov2, rel=0.1)
    assert ours["t"] == pytest.approx(t, rel=0.05) and ours["p"] == pytest.approx(p, abs=0.02)


def test_specificity_threshold_and_binary_auc():
    truth = np.array([0, 0, 0, 0, 1, 1, 1], bool)
    scores = np.array([0.1, 0.2, 0.2, 0.6, 0.3, 0.7, 0.9])
    threshold = specificity_threshold(truth, scores, 0.75)
    predicted = scores >= threshold
    assert np.mean(~predicted[~truth]) >= 0.75 and predicted[truth].all()
    assert specificity_threshold(truth, scores, 1.0) > 0.6
    calls = np.array([0, 1, 0, 0, 1, 1, 0], bool)
    assert st.delong(truth, calls.astype(float)).aucs[0] == pytest.approx((2 / 3 + 3 / 4) / 2)


# --------------------------------------------------------------------------- a small study: matching, scores, errors


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(11)
    truth = rng.random(80) < 0.6
    run = _run(root / "run", {"high-risk": truth}, {"high-risk": 50}, seed=1)
    cohort = load_run(run).cohorts["high-risk"]
    return {"root": root, "run": run, "cohort": cohort, "truth": truth}


def _scored_reads(small: dict, n_readers: int = 4, skip_reader: int | None = None, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    truth, images = small["truth"], small["cohort"].images
    rows = []
    for r in range(n_readers):
        latent = (1.6 - 0.2 * r) * truth + rng.normal(size=len(truth))
        score = np.clip(np.round(1.1 * latent + 2.3), 1, 5)
        for i in range(len(truth)):
            if r == skip_reader and i % 2:
                continue
            rows.append({"reader": f"r{r}", "group": "senior" if r < 2 else "junior", "image": images[i],
                         "call": "malignant" if score[i] >= 3 else "benign", "score": int(score[i])})
    return rows


def test_scores_give_reader_aucs_and_the_mrmc_comparison(small, tmp_path, capsys):
    reads = _write_reads(tmp_path / "reads.csv", _scored_reads(small, skip_reader=3))
    out = tmp_path / "out"
    code, err = run_cli("readers", "--reads", reads, "--run", small["run"], "--cohort", "high-risk", "--out", out,
                        "--resamples", 200)
    assert code == 0, err
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("reader") and "MRMC, readers' mean score AUC vs model AUC" in printed
    report = json.loads((out / "report.json").read_text())
    assert (out / "readers_scores_roc.png").is_file() and (out / "readers_roc.png").is_file()
    readers = {r["reader"]: r for r in report["readers"]}
    assert readers["r3"]["n_images"] == 40 and readers["r0"]["n_images"] == 80  # r3 read every other image
    comparisons = {c["reader"]: c for c in report["comparisons"]}
    assert comparisons["r3"]["n_images"] == 40
    # MRMC on the 40 images that all four read, and it is what or_mrmc gives on them
    mrmc = report["mrmc"]["scores"]
    assert mrmc["n_cases"] == 40 and mrmc["n_readers"] == 4
    table = pd.read_csv(out / "reads.csv")
    common = sorted(set.intersection(*(set(p["image"]) for _, p in table.groupby("reader"))))
    wide = table[table["image"].isin(common)].pivot(index="image", columns="reader", values="score").loc[common]
    first = table[table["reader"] == "r0"].set_index("image").loc[common]
    direct = or_mrmc((first["label"] == "malignant").to_numpy(), wide[["r0", "r1", "r2", "r3"]].to_numpy().T,
                     first["model_score"].to_numpy())
    assert mrmc["p"] == pytest.approx(direct["p"]) and mrmc["difference"] == pytest.approx(direct["difference"])
    for name, reader in readers.items():
        part = table[table["reader"] == name]
        auc = st.delong((part["label"] == "malignant").to_numpy(), part["score"].to_numpy()).aucs[0]
        assert reader["roc_auc"]["value"] == pytest.approx(auc)
        assert comparisons[name]["auc"]["reader"] == pytest.approx(auc)
    text = (out / "report.md").read_text()
    assert "Readers' score AUCs vs the model's AUC" in text and "Hillis" in text and "Obuchowski" in text


def test_images_match_by_path_relative_path_file_name_or_patient(small, tmp_path):
    cohort = small["cohort"]
    patient = cohort.patients[0]
    of_patient = [i for i, p in enumerate(cohort.patients) if p == patient]
    assert len(of_patient) >= 2
    others = [i for i in range(len(cohort.images)) if cohort.patients[i] != patient][:6]
    keys = [cohort.images[others[0]], cohort.images[others[1]].split("/high-risk/")[1],
            "./" + cohort.images[others[2]].split("/high-risk/")[1], cohort.images[others[3]].rsplit("/")[-1], patient]
    rows = [{"reader": "a", "group": "g", "image": k, "call": "benign"} for k in keys]
    study = load_reads(_write_reads(tmp_path / "reads.csv", rows), load_run(small["run"]), "high-risk")
    assert study.matched_by == {"path": 1, "relative path": 2, "file name": 1, "patient id": 1}
    assert sorted(study.readers[0].index.tolist()) == sorted(others[:4] + of_patient)


def test_the_validation_cohort_uses_out_of_fold_scores(small, tmp_path):
    run = load_run(small["run"])
    val = run.cohorts["validation"]
    rows = [{"reader": r, "group": "g", "image": image, "call": label}
            for r in ("a", "b") for image, label in zip(val.images[:100], val.labels[:100], strict=True)]
    out = tmp_path / "out"
    code, err = run_cli("readers", "--reads", _write_reads(tmp_path / "reads.csv", rows), "--run", small["run"],
                        "--cohort", "validation", "--out", out, "--resamples", 200, "--target-sensitivity", 0.9)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["operating_point"]["same_data"] and report["operating_point"]["rule"] == "sensitivity >= 0.9"
    assert "out-of-fold" in report["cohort"]["model_scores"]
    table = pd.read_csv(out / "reads.csv")
    np.testing.assert_allclose(table[table["reader"] == "a"]["model_score"], val.scores[:100])
    assert report["readers"][0]["metrics"]["accuracy"]["value"] == 1.0  # the reads are the labels
    assert "skipped" in report["mrmc"]["calls"]  # two readers only
    assert "needs at least 3 readers" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("unknown", "2 read(s) in"),
        ("duplicate", "duplicate read: reader 'r0' reads image /data/high-risk/"),
        ("call", "call 'cyst' in row 3 of"),
        ("column", "has no column 'group' (expected columns reader,group,image,call[,score]; "
                   "found reader,image,call,score)"),
        ("cohort", "has no cohort 'external'; it has validation, high-risk"),
        ("group", "reader 'r0' has group 'senior' in row 1 but 'junior' in row 4 of"),
        ("score", "score 'high' in row 2 of"),
        ("partial_score", "reader 'r0' gives a score in row 1 but none in row 2 of"),
        ("empty", "empty 'image' in row 2 of"),
        ("ambiguous", "matches 2 images of cohort 'high-risk'"),
        ("no_file", "reads file not found"),
        ("same_out", "is the run folder"),
    ],
)
def test_bad_input_fails_in_one_line_and_writes_nothing(small, tmp_path, damage, message):
    rows = _scored_reads(small, n_readers=2)
    run, cohort = small["run"], "high-risk"
    if damage == "unknown":
        rows[2]["image"], rows[5]["image"] = "nope.png", "/elsewhere/x.png"
    elif damage == "duplicate":
        rows[3]["image"] = rows[0]["image"].rsplit("/")[-1]  # the same image as row 1, by its file name
    elif damage == "call":
        rows[2]["call"] = "cyst"
    elif damage == "column":
        rows = [{k: v for k, v in row.items() if k != "group"} for row in rows]
    elif damage == "cohort":
        cohort = "external"
    elif damage == "group":
        rows[3]["group"] = "junior"
    elif damage == "score":
        rows[1]["score"] = "high"
    elif damage == "partial_score":
        rows[1]["score"] = ""
    elif damage == "empty":
        rows[1]["image"] = ""
    elif damage == "ambiguous":
        run = small["root"] / "dup_run"
        if not run.exists():
            table = pd.read_csv(small["run"] / "predictions.csv")
            import shutil

            shutil.copytree(small["run"], run)
            hr = table.index[table["cohort"] == "high-risk"]
            table.loc[hr[0], "image"] = "/data/high-risk/benign/dup.png"
            table.loc[hr[1], "image"] = "/data/high-risk/malignant/dup.png"
            table.to_csv(run / "predictions.csv", index=False)
        rows[4]["image"] = "dup.png"
    reads = _write_reads(tmp_path / "reads.csv", rows) if damage != "no_file" else tmp_path / "missing.csv"
    out = run if damage == "same_out" else tmp_path / "out"
    before = snapshot(run)
    code, err = run_cli("readers", "--reads", reads, "--run", run, "--cohort", cohort, "--out", out)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    if damage == "unknown":
        assert "the first: 'nope.png' (row 3 of" in err
    if damage == "duplicate":
        assert "in row 1 and again in row 4 of" in err
    assert damage == "same_out" or not out.exists()
    assert snapshot(run) == before


def test_an_existing_out_is_replaced_only_with_overwrite_and_only_if_it_is_a_readers_report(small, tmp_path):
    reads = _write_reads(tmp_path / "reads.csv", _scored_reads(small, n_readers=2))
    out = tmp_path / "out"
    args = ["readers", "--reads", reads, "--run", small["run"], "--cohort", "high-risk", "--resamples", 100]
    assert run_cli(*args, "--out", out)[0] == 0
    before = snapshot(out)
    code, err = run_cli(*args, "--out", out)
    assert code == 2 and "already exists; pass --overwrite" in err and snapshot(out) == before
    code, err = run_cli(*args, "--out", out, "--overwrite")
    assert code == 0, err
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "report.json").write_text(json.dumps({"format": "hsqformer-compare/1"}))
    code, err = run_cli(*args, "--out", foreign, "--overwrite")
    assert code == 2 and "does not hold a readers report" in err
    assert (foreign / "report.json").is_file()


# --------------------------------------------------------------------------- the README's worked example


@requires_shared_data
def test_the_shipped_example_reads_match_the_smoke_run(tmp_path):
    """examples/reads_example.csv names the 40 images of the README's smoke run (configs/smoke.yaml) by their path
    relative to liver-sysu; here a synthetic run with those images stands in for the trained one."""
    from hsqformer.data.manifest import load_dataset
    from hsqformer.training.config import load_config
    from hsqformer.training.engine import _subset

    cfg = load_config(REPO / "configs" / "smoke.yaml")
    frame = _subset(load_dataset(DATA / "liver-sysu", verify_images=False), cfg.data.max_images, cfg.cv.seed)
    rng = np.random.default_rng(0)
    truth = (frame["label"] == "malignant").to_numpy()
    folds = np.arange(len(frame)) % cfg.cv.n_folds
    run = write_run(tmp_path / "smoke", images=frame["path"].tolist(), labels=frame["label"].tolist(),
                    patients=frame["patient_id"].tolist(), folds=folds,
                    validation_scores=_sigmoid(1.5 * truth + rng.normal(size=len(truth))))
    out = tmp_path / "readers"
    code, err = run_cli("readers", "--reads", EXAMPLE, "--run", run, "--cohort", "validation", "--out", out,
                        "--resamples", 200)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["reads"]["matched_by"] == {"relative path": 150}
    assert [r["n_images"] for r in report["readers"]] == [40, 40, 40, 30]
    assert report["mrmc"]["scores"]["n_readers"] == 3 and report["mrmc"]["calls"]["n_cases"] == 30
