"""``hsqformer cv`` and ``hsqformer predict`` end to end on real ultrasound images (configs/smoke.yaml).

The smoke run trains HSQformer-S with tiny backbones on 40 liver-sysu images,
2 folds, 1 epoch, and is checked against the files it writes: leak-free splits,
predictions that reproduce the metrics, the ensemble, the report. Also: bad
input fails in one line without touching anything, and an interrupted run
resumes where it stopped. The liver-sysu and busi runs need ../shared/data (skipped on a clone
without it); the checks of bad input run on the embedded sample.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from hsqformer.cli import main
from hsqformer.data import check_no_leakage
from hsqformer.training.config import config_to_dict, load_config
from shared_data import DATA, SAMPLE, requires_shared_data

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"


def run_cli(*args: object) -> tuple[int, str]:
    """Run the ``hsqformer`` entry point in this process; returns (exit status, stderr)."""
    err = io.StringIO()
    argv = sys.argv
    sys.argv = ["hsqformer", *map(str, args)]
    try:
        with contextlib.redirect_stderr(err):
            main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    finally:
        sys.argv = argv
    return code, err.getvalue()


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _manifest(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def liver(tmp_path_factory) -> dict[str, Path]:
    """liver-sysu split into a training manifest and a held-out cohort of 16 other patients."""
    folder = tmp_path_factory.mktemp("liver")
    frame = pd.read_csv(DATA / "liver-sysu" / "manifest.csv", dtype=str, keep_default_na=False)
    frame["path"] = [str(DATA / "liver-sysu" / p) for p in frame["path"]]
    held_out = frame.groupby("label", group_keys=False).tail(8)
    return {
        "train": _manifest(frame.drop(held_out.index), folder / "train.csv"),
        "test": _manifest(held_out, folder / "test.csv"),
        "test_paths": held_out["path"].tolist(),
    }


@pytest.fixture(scope="module")
def smoke_run(liver, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "smoke"
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        code, err = run_cli(
            "cv", "--config", SMOKE, "--data", liver["train"], "--test", f"held-out={liver['test']}", "--out", out
        )
    assert code == 0, err[-3000:]
    (out.parent / "cv_stderr.txt").write_text(err)
    (out.parent / "cv_stdout.txt").write_text(shown.getvalue())
    return out


@requires_shared_data
def test_cv_ends_with_its_results_table_and_no_accelerator_noise(smoke_run):
    err = (smoke_run.parent / "cv_stderr.txt").read_text()
    assert (smoke_run / "table.md").read_text().strip() in err
    assert "done: " in last_line(err) and "hsqformer compare" in last_line(err)
    assert "precision " in err and "GPU available" not in err and "TPU available" not in err


@requires_shared_data
def test_the_progress_bar_keeps_to_one_line_of_80_columns(smoke_run):
    shown = (smoke_run.parent / "cv_stdout.txt").read_text()
    lines = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", line).rstrip() for line in shown.splitlines()]
    bars = [line for line in lines if line.strip()]
    assert bars and all(line.startswith("Epoch ") for line in bars), bars  # no metrics wrapped onto lines of their own
    assert all(len(line) <= 80 and "val_auc: " in line for line in bars), bars


@requires_shared_data
def test_predict_writes_predictions_csv_by_default_and_summarises(smoke_run, liver, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli("predict", "--run", smoke_run, *liver["test_paths"])
    assert code == 0, err[-2000:]
    table = pd.read_csv(tmp_path / "predictions.csv")
    assert len(table) == len(liver["test_paths"])
    counts = table["predicted_class"].value_counts()
    summary = next(line for line in err.splitlines() if line.startswith("predicted (ensemble arg-max): "))
    for name, n in counts.items():
        assert f"{name} {n}" in summary


@requires_shared_data
def test_smoke_run_writes_every_output(smoke_run):
    names = {str(p.relative_to(smoke_run)) for p in smoke_run.rglob("*") if p.is_file()}
    for name in ["run.json", "config.yaml", "versions.json", "splits.csv", "metrics.json", "table.md",
                 "predictions.csv"]:
        assert name in names
    for k in (0, 1):
        for name in ["model.safetensors", "model.json", "done.json", "predictions.csv", "metrics.json",
                     "logs/version_0/metrics.csv"]:
            assert f"fold_{k}/{name}" in names
    assert not [n for n in names if n.endswith((".ckpt", ".tmp", ".pt", ".pth"))]
    versions = json.loads((smoke_run / "versions.json").read_text())
    assert {"torch", "timm", "lightning", "hsqformer"} <= set(versions["packages"]) and versions["python"]
    saved = yaml.safe_load((smoke_run / "config.yaml").read_text())
    assert saved == config_to_dict(load_config(SMOKE))
    log = pd.read_csv(smoke_run / "fold_0" / "logs" / "version_0" / "metrics.csv")
    assert {"train_loss_step", "train_aux_loss_step", "val_auc", "val_loss"} <= set(log.columns)


@requires_shared_data
def test_smoke_splits_are_patient_level_and_stratified(smoke_run, liver):
    splits = pd.read_csv(smoke_run / "splits.csv", dtype=str, keep_default_na=False)
    assert len(splits) == 40 and sorted(splits["fold"].unique()) == ["0", "1"]
    assert set(splits["path"]).isdisjoint(liver["test_paths"])
    folds = [
        (np.flatnonzero(splits["fold"] != str(k)), np.flatnonzero(splits["fold"] == str(k))) for k in (0, 1)
    ]
    check_no_leakage(splits, folds)
    counts = pd.crosstab(splits["fold"], splits["label"])
    assert (counts >= 5).all().all()  # both classes in both folds (stratified)


@requires_shared_data
def test_smoke_metrics_are_reproduced_from_the_predictions(smoke_run):
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    preds = pd.read_csv(smoke_run / "predictions.csv")
    splits = pd.read_csv(smoke_run / "splits.csv")
    val = preds[preds["cohort"] == "validation"]
    assert len(val) == 40
    assert dict(zip(val["image"], val["fold"])) == dict(zip(splits["path"], splits["fold"]))
    for k in (0, 1):
        part = val[val["fold"] == k]
        assert part[f"prob_fold{1 - k}"].isna().all()  # a fold model never predicts its own training images
        auc = roc_auc_score(part["label"] == "malignant", part[f"prob_fold{k}"])
        assert metrics["folds"][k]["cohorts"]["validation"]["auc"] == pytest.approx(auc, abs=1e-6)
    fold_aucs = [f["cohorts"]["validation"]["auc"] for f in metrics["folds"]]
    assert metrics["summary"]["validation"]["auc"]["mean"] == pytest.approx(np.mean(fold_aucs))
    assert metrics["summary"]["validation"]["auc"]["std"] == pytest.approx(np.std(fold_aucs, ddof=1))

    test = preds[preds["cohort"] == "held-out"]
    assert len(test) == 16
    assert np.allclose(test["prob_ensemble"], test[["prob_fold0", "prob_fold1"]].mean(axis=1))
    ensemble = metrics["ensemble"]["held-out"]
    truth = test["label"] == "malignant"
    assert ensemble["auc"] == pytest.approx(roc_auc_score(truth, test["prob_ensemble"]), abs=1e-6)
    predicted = test["prob_ensemble"] >= 0.5
    assert ensemble["recall"] == pytest.approx((predicted & truth).sum() / truth.sum())
    assert ensemble["specificity"] == pytest.approx((~predicted & ~truth).sum() / (~truth).sum())

    table = (smoke_run / "table.md").read_text()
    assert "| validation | 2 folds | 40 |" in table and "| held-out | ensemble | 16 |" in table
    best = json.loads((smoke_run / "fold_0" / "done.json").read_text())
    assert best["best_epoch"] == 0 and best["resumed_from_epoch"] is None


@requires_shared_data
def test_predict_reproduces_the_run_ensemble(smoke_run, liver, tmp_path):
    out = tmp_path / "preds.csv"
    code, err = run_cli("predict", "--run", smoke_run, *liver["test_paths"], "--out", out)
    assert code == 0, err[-2000:]
    predicted = pd.read_csv(out)
    run = pd.read_csv(smoke_run / "predictions.csv")
    run = run[run["cohort"] == "held-out"].set_index("image")
    assert list(predicted["image"]) == liver["test_paths"]
    assert np.allclose(predicted["prob_ensemble"], run.loc[predicted["image"], "prob_ensemble"], atol=1e-5)
    assert np.allclose(predicted[["prob_ensemble_benign", "prob_ensemble_malignant"]].sum(axis=1), 1, atol=1e-5)
    assert set(predicted["predicted_class"]) <= {"benign", "malignant"}

    before = snapshot(tmp_path)
    code, err = run_cli("predict", "--run", smoke_run, liver["test_paths"][0], "--out", out)
    assert code == 2 and last_line(err).startswith("error: ") and "--overwrite" in last_line(err)
    assert snapshot(tmp_path) == before


@requires_shared_data
def test_an_existing_run_folder_is_never_touched(smoke_run, liver, tmp_path):
    before = snapshot(smoke_run)
    code, err = run_cli("cv", "--config", SMOKE, "--data", liver["train"], "--out", smoke_run)
    assert code == 2
    assert last_line(err) == (
        f"error: run folder {smoke_run} already exists; pass --overwrite to replace it or --resume to continue it"
    )
    assert snapshot(smoke_run) == before

    other = tmp_path / "not-a-run"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    code, err = run_cli("cv", "--config", SMOKE, "--data", liver["train"], "--out", other, "--overwrite")
    assert code == 2 and "not an hsqformer cv run folder" in last_line(err)
    assert (other / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "trainer.epoch=2"], "error: unknown config key 'trainer.epoch' (from --set); did you mean"),
        (["--set", "augment.img_size=big"], "error: config key 'augment.img_size' (from --set): expected an integer"),
        (["--set", "model.name=no_such_net"], "error: model.name: unknown timm model 'no_such_net'"),
        (["--set", "data.positive_class=cyst"], "error: data.positive_class 'cyst' is not a class (benign, malignant)"),
        (["--test", "validation=x"], "error: --test 'validation=x': cohort name"),
    ],
)
@pytest.mark.filterwarnings("ignore:.*no patient_id")  # the embedded sample has none
def test_bad_settings_fail_in_one_line_before_anything_is_written(args, message, tmp_path):
    out = tmp_path / "run"
    code, err = run_cli("cv", "--config", SMOKE, "--data", SAMPLE, "--out", out, *args)
    assert code == 2
    assert last_line(err).startswith(message), err[-1500:]
    assert not out.exists()


def test_bad_data_fails_in_one_line(tmp_path):
    code, err = run_cli("cv", "--config", SMOKE, "--data", tmp_path / "missing", "--out", tmp_path / "run")
    assert code == 2 and last_line(err).startswith("error: dataset not found:")
    assert not (tmp_path / "run").exists()


@requires_shared_data
def test_a_killed_run_resumes_from_its_last_checkpoint(liver, tmp_path):
    out = tmp_path / "run"
    args = ["cv", "--config", SMOKE, "--data", liver["train"], "--out", out, "--set", "trainer.epochs=2"]
    log = tmp_path / "first.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-c", "from hsqformer.cli import main; main()", *map(str, args)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        last = out / "fold_0" / "lightning" / "last.ckpt"
        deadline = time.monotonic() + 300
        while not last.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)  # as a crash or a lost machine would, mid-way through epoch 2
        process.wait()
    assert last.exists(), log.read_text()[-3000:]
    assert not (out / "fold_0" / "done.json").exists() and not (out / "metrics.json").exists()

    code, err = run_cli("cv", "--resume", "--out", out, "--set", "trainer.epochs=3")
    assert code == 2 and "config key 'trainer.epochs' differs" in last_line(err)

    code, err = run_cli("cv", "--resume", "--out", out)
    assert code == 0, err[-3000:]
    assert f"fold 0: resuming from {last}" in err
    fold0 = json.loads((out / "fold_0" / "done.json").read_text())
    fold1 = json.loads((out / "fold_1" / "done.json").read_text())
    assert fold0["resumed_from_epoch"] == 1 and fold1["resumed_from_epoch"] is None
    assert not list(out.rglob("*.ckpt"))
    first_log = pd.read_csv(out / "fold_0" / "logs" / "version_0" / "metrics.csv")
    resumed_log = pd.read_csv(out / "fold_0" / "logs" / "version_1" / "metrics.csv")
    assert set(first_log["epoch"]) == {0} and set(resumed_log["epoch"]) == {1}  # epoch 0 was not trained again
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["folds"]) == 2 and len(pd.read_csv(out / "predictions.csv")) == 40

    code, err = run_cli("cv", "--resume", "--out", out)
    assert code == 0 and "fold 0: done earlier, skipped" in err and "fold 1: done earlier, skipped" in err


@requires_shared_data
def test_three_classes_without_patient_ids(tmp_path):
    """busi: three classes, one positive for the binary metrics, and a warning for image-level splits."""
    frame = pd.read_csv(DATA / "busi" / "manifest.csv", dtype=str, keep_default_na=False)
    frame["path"] = [str(DATA / "busi" / p) for p in frame["path"]]
    held_out = frame.groupby("label", group_keys=False).tail(2)
    train = _manifest(frame.drop(held_out.index), tmp_path / "train.csv")
    test = _manifest(held_out, tmp_path / "test.csv")
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="image-level"):
        code, err = run_cli(
            "cv", "--config", SMOKE, "--data", train, "--test", f"held-out={test}", "--out", out,
            "--set", "data.max_images=30", "--set", "data.positive_class=malignant",
        )
    assert code == 0, err[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["classes"] == ["benign", "malignant", "normal"] and metrics["positive_class"] == "malignant"
    assert {"auc", "auc_macro_ovr", "accuracy_all_classes"} <= set(metrics["summary"]["validation"])
    preds = pd.read_csv(out / "predictions.csv")
    test_rows = preds[preds["cohort"] == "held-out"]
    classes = ["prob_ensemble_benign", "prob_ensemble_malignant", "prob_ensemble_normal"]
    assert np.allclose(test_rows[classes].sum(axis=1), 1, atol=1e-5)
    assert np.allclose(test_rows["prob_ensemble"], test_rows["prob_ensemble_malignant"])
    assert "Macro AUC (OvR)" in (out / "table.md").read_text()


def test_the_paper_configs_start_from_imagenet_and_say_what_to_do_offline(tmp_path, monkeypatch):
    """configs/paper*.yaml fine-tune ImageNet backbones (timm hub names) as the paper does; with neither hub
    nor cached copy, `cv` stops before writing anything, in one line naming the local-file alternative."""
    for name in ("paper.yaml", "paper_small.yaml", "paper_large.yaml"):
        kwargs = load_config(REPO / "configs" / name).model.kwargs
        assert kwargs["pretrained_backbones"] is True
        assert [b.split(".")[1] for b in kwargs["backbones"]] == ["fb_in1k", "ms_in1k"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("hsqformer.models.backbones._hub_cached", lambda name: False)  # a machine without a cache
    out = tmp_path / "run"
    code, err = run_cli("cv", "--config", REPO / "configs" / "paper_small.yaml", "--data", SAMPLE, "--out", out)
    assert code == 2
    line = last_line(err)
    assert line.startswith("error: no offline ImageNet weights for 'convnext_tiny.fb_in1k'"), err[-1500:]
    assert "model.kwargs.pretrained_backbones: [FILE, FILE]" in line
    assert not out.exists()


@requires_shared_data
def test_evaluate_scores_the_same_fold_models_on_whole_frames_for_a_paired_comparison(smoke_run, tmp_path):
    from hsqformer.evaluation.compare import compare_runs, load_run

    before = snapshot(smoke_run)
    whole = tmp_path / "squash"
    code, err = run_cli("evaluate", smoke_run, "--out", whole, "--set", "augment.crop_mode=squash")
    assert code == 0, err[-3000:]
    assert "hsqformer compare" in last_line(err)
    assert snapshot(smoke_run) == before  # the original run is only read
    for k in range(2):
        fold, source = whole / f"fold_{k}", smoke_run / f"fold_{k}"
        assert (fold / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
        meta, original = (json.loads((d / "model.json").read_text()) for d in (fold, source))
        assert meta["preprocess"] == {**original["preprocess"], "crop_mode": "squash"}
    assert yaml.safe_load((whole / "config.yaml").read_text())["augment"]["crop_mode"] == "squash"
    centre, squashed = load_run(smoke_run), load_run(whole)
    assert set(centre.cohorts) == set(squashed.cohorts) == {"validation", "held-out"}
    for cohort in centre.cohorts:  # same images in the same order; liver frames are wider than tall, so scores move
        assert centre.cohorts[cohort].images == squashed.cohorts[cohort].images
        assert not np.array_equal(centre.cohorts[cohort].scores, squashed.cohorts[cohort].scores)
    compare_runs([centre, squashed], n_resamples=100)  # the two runs pair image by image

    assert run_cli("evaluate", smoke_run, "--out", whole, "--set", "augment.crop_mode=border")[0] == 2  # no overwrite
    code, err = run_cli("evaluate", smoke_run, "--out", tmp_path / "x", "--set", "trainer.epochs=3")
    assert code == 2 and "'trainer.epochs=3' is not an evaluation setting" in last_line(err)
    assert not (tmp_path / "x").exists()
