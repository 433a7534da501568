"""``hsqformer compare`` on run folders with known answers, bad input, and a real smoke run against the floor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from hsqformer.evaluation import statistics as st
from hsqformer.data.audit import run_audit
from hsqformer.evaluation.compare import compare_runs, load_run
from run_fixtures import synthetic_study
from shared_data import DATA, requires_shared_data
from test_cli_cv import SMOKE, run_cli, snapshot

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("study")
    return synthetic_study(
        root, {"strong": 2.0, "same": 2.0, "weak": 0.6}, n=500, test_sizes={"external": 300}, shared=0.5, seed=0
    )


@pytest.fixture(scope="module")
def report_dir(study, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compare") / "report"
    code, err = run_cli("compare", *study, "--out", out, "--resamples", 300)
    assert code == 0, err
    return out


def test_report_files_and_figures(report_dir):
    names = {p.name for p in report_dir.iterdir()}
    assert {"report.md", "report.json", "per_image.csv", "fold_auc.png"} <= names
    for cohort in ("validation", "external"):
        for kind in ("roc", "confusion", "calibration"):
            png = report_dir / f"{kind}_{cohort}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    text = (report_dir / "report.md").read_text()
    assert "![ROC validation](roc_validation.png)" in text and "Paired tests against strong" in text
    assert "At threshold 0.5 (the paper's)" in text and "Youden's J" in text


def test_report_numbers_follow_from_the_per_image_scores(report_dir):
    report = json.loads((report_dir / "report.json").read_text())
    table = pd.read_csv(report_dir / "per_image.csv")
    for cohort, part in report["cohorts"].items():
        rows = table[table["cohort"] == cohort]
        truth = (rows["label"] == "malignant").to_numpy()
        scores = np.stack([rows[f"score_{m}"].to_numpy() for m in ("strong", "same", "weak")])
        dl = st.delong(truth, scores)
        for i, model in enumerate(("strong", "same", "weak")):
            assert part["models"][model]["auc"] == pytest.approx(roc_auc_score(truth, scores[i]))
            threshold = report["operating_point"]["thresholds"][model]
            decided = rows[f"positive_{model}"].to_numpy()
            np.testing.assert_array_equal(decided, scores[i] >= threshold)
            point = part["models"][model]["at_operating_point"]
            assert point["threshold"] == threshold  # chosen on validation, unchanged on every cohort
            assert point["sensitivity"]["value"] == pytest.approx(decided[truth].mean())
            low, high = point["sensitivity"]["ci"]
            assert low <= point["sensitivity"]["value"] <= high
        assert part["paired"]["weak"]["delong_p"] == pytest.approx(dl.test(2, 0)[1])


def test_a_clearly_weaker_model_is_significant_and_an_equal_one_is_not(report_dir):
    report = json.loads((report_dir / "report.json").read_text())
    for part in report["cohorts"].values():
        assert part["paired"]["weak"]["delong_significant"] is True
        assert part["paired"]["weak"]["auc_difference"] < -0.15
        assert part["paired"]["same"]["delong_p_holm"] > 0.05 or abs(part["paired"]["same"]["auc_difference"]) < 0.05
    holm = report["cohorts"]["validation"]["paired"]
    raw = [holm[m]["delong_p"] for m in ("same", "weak")]
    assert [holm[m]["delong_p_holm"] for m in ("same", "weak")] == pytest.approx(st.holm(raw))


def test_target_sensitivity_and_reference(study, tmp_path):
    out = tmp_path / "screen"
    code, err = run_cli(
        "compare", *study, "--out", out, "--target-sensitivity", "0.9", "--reference", study[2], "--resamples", 200
    )
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["reference"] == "weak" and set(report["cohorts"]["validation"]["paired"]) == {"strong", "same"}
    for model in ("strong", "same", "weak"):
        point = report["cohorts"]["validation"]["models"][model]["at_operating_point"]
        assert point["sensitivity"]["value"] >= 0.9


def test_in_memory_api(study):
    runs = [load_run(p) for p in study]
    report = compare_runs(runs, n_resamples=200)
    assert report["reference"] == "strong" and report["cohorts"]["external"]["n_images"] == 300


def _copy(study: list[Path], tmp_path: Path) -> list[Path]:
    copies = []
    for path in study:
        copies.append(Path(shutil.copytree(path, tmp_path / path.name)))
    return copies


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("folds", "the validation folds differ"),
        ("cohort", "cohorts differ (in one run only: external)"),
        ("unfinished", "is unfinished (no metrics.json)"),
        ("no_predictions", "has no predictions.csv"),
        ("not_a_run", "is not an hsqformer cv run folder"),
        ("nan", "missing probabilities in cohort 'validation'"),
    ],
)
def test_bad_runs_fail_in_one_line_and_write_nothing(study, tmp_path, damage, message):
    runs = _copy(study, tmp_path)
    target = runs[1]
    predictions = target / "predictions.csv"
    if damage == "folds":
        table = pd.read_csv(predictions)  # renumber the folds (k -> k+1): same scores, other splits
        k_folds = int(table["fold"].max()) + 1
        table["fold"] = (table["fold"] + 1) % k_folds
        table = table.rename(columns={f"prob_fold{k}": f"prob_fold{(k + 1) % k_folds}" for k in range(k_folds)})
        table.to_csv(predictions, index=False)
    elif damage == "cohort":
        table = pd.read_csv(predictions)
        table[table["cohort"] == "validation"].to_csv(predictions, index=False)
    elif damage == "unfinished":
        (target / "metrics.json").unlink()
    elif damage == "no_predictions":
        predictions.unlink()
    elif damage == "not_a_run":
        (target / "run.json").unlink()
    elif damage == "nan":
        table = pd.read_csv(predictions)
        table.loc[0, "prob_fold0"] = np.nan
        table.loc[0, "fold"] = 0
        table.to_csv(predictions, index=False)
    out = tmp_path / "out"
    code, err = run_cli("compare", *runs, "--out", out)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert str(target) in err or damage in ("folds", "cohort")
    assert not out.exists()


def test_an_existing_report_is_kept_without_overwrite(study, report_dir, tmp_path):
    before = snapshot(report_dir)
    code, err = run_cli("compare", *study, "--out", report_dir)
    assert code == 2 and "already exists; pass --overwrite" in err
    assert snapshot(report_dir) == before
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    code, err = run_cli("compare", *study, "--out", foreign, "--overwrite")
    assert code == 2 and "does not hold a compare report" in err
    assert (foreign / "notes.txt").read_text() == "keep me"


@requires_shared_data
def test_a_real_run_against_the_shortcut_floor(tmp_path):
    """A smoke run on liver-sysu images and the audit's shortcut floor on its folds, paired on the same images."""
    frame = pd.read_csv(DATA / "liver-sysu" / "manifest.csv", dtype=str, keep_default_na=False)
    frame["path"] = [str(DATA / "liver-sysu" / p) for p in frame["path"]]
    manifest = tmp_path / "liver.csv"
    frame.to_csv(manifest, index=False)
    run = tmp_path / "smoke"
    code, err = run_cli("cv", "--config", SMOKE, "--data", manifest, "--out", run, "--set", "data.max_images=60")
    assert code == 0, err[-2000:]
    out = tmp_path / "report"
    code, err = run_cli("compare", run, "--floor", "--out", out, "--resamples", 200)
    assert code == 0, err[-2000:]
    report = json.loads((out / "report.json").read_text())
    val = report["cohorts"]["validation"]
    assert set(val["models"]) == {"smoke", "shortcut floor"} and val["n_images"] == 60
    floor = report["runs"][1]
    # the floor is the audit's shortcut forest on the run's own folds: the audit of the same images agrees
    splits = pd.read_csv(run / "splits.csv", dtype=str, keep_default_na=False)
    audit = run_audit([splits.drop(columns="fold")], n_folds=2, seed=0, progress=False)
    assert floor["fold_aucs"] == pytest.approx(audit.shortcut_auc.fold_aucs)
    assert 0 <= val["paired"]["shortcut floor"]["delong_p"] <= 1


def test_mean_fold_auc_is_compared_within_folds(report_dir, study, tmp_path):
    report = json.loads((report_dir / "report.json").read_text())
    stratified = report["cohorts"]["validation"]["fold_stratified"]
    assert "fold_stratified" not in report["cohorts"]["external"]  # a test cohort is scored by the ensemble
    assert stratified["n_folds"] == 5
    for run in report["runs"]:  # Table 2's mean over folds, from metrics.json's fold AUCs
        assert stratified["models"][run["name"]]["auc"] == pytest.approx(np.mean(run["fold_aucs"]))
    assert stratified["paired"]["weak"]["delong_significant"] is True
    assert set(stratified["paired"]) == {"same", "weak"}
    text = (report_dir / "report.md").read_text()
    assert "mean of the fold AUCs (within-fold DeLong)" in text and "| weak |" in text

    # a fold with a single positive: the stratified part says why it is missing, the rest of the report stands
    runs = [load_run(p) for p in study]
    val = runs[0].cohorts["validation"]
    positives = [i for i, label in enumerate(val.labels) if label == "malignant"]
    for run in runs:
        folds = run.cohorts["validation"].folds.copy()
        folds[[i for i in positives if folds[i] == 4][1:]] = 3
        run.cohorts["validation"].folds = folds
    part = compare_runs(runs, n_resamples=100)["cohorts"]["validation"]
    assert part["fold_stratified"] == {"skipped": "stratum 4 needs at least two cases of each class"}
    assert part["paired"]["weak"]["delong_significant"] is True
