"""``hsqformer tune``: search spaces checked before training, trials on the training folds, pruning, resuming.

Trials train the micro recipe of test_sweep.py (a few seconds each) on the embedded sample.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest
import torch
import yaml

from hsqformer.sweep.tune import STUDY_NAME, ReportAUC, load_study, read_space
from hsqformer.training.config import load_config
from shared_data import SAMPLE
from test_cli_cv import run_cli
from test_sweep import MICRO, one_torch_thread, write_yaml

SPACE = {
    "params": {
        "optimizer.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
        "mixup": {"choices": {"off": {"augment.mixup": 0.0, "augment.cutmix": 0.0},
                              "on": {"augment.mixup": 0.8, "augment.cutmix": 1.0}}},
    },
    "startup_trials": 2,
    "pruning": False,  # a retried trial must finish whatever its fold AUCs (pruning is tested on its own)
}


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_yaml(tmp_path_factory.mktemp("config") / "micro.yaml", MICRO)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "no parameters to search"),
        ({"optimizer.lr": {"low": 1.0e-3, "high": 1.0e-3}}, "has no range: low 0.001 is not below high 0.001"),
        ({"optimizer.lr": {"low": 1.0e-3}}, "has no range; give low and high, or choices"),
        ({"model.kwargs.attn_order": {"choices": ["serial"]}}, "has no range: give at least two choices"),
        ({"optimizer.lrr": {"low": 1.0e-4, "high": 1.0e-3}}, "unknown config key 'optimizer.lrr'"),
        ({"trainer.epochs": {"low": 1.5, "high": 3}}, "config key 'trainer.epochs': expected an integer, got 1.5"),
        ({"optimizer.lr": {"low": 0, "high": 1.0e-3, "log": True}}, "a log range needs low > 0"),
        ({"optimizer.lr": {"lo": 1.0e-4, "high": 1.0e-3}}, "unknown field 'lo'"),
        ({"mixup": {"choices": {True: {"augment.mixup": 0.8}, False: {"augment.mixup": 0.0}}}}, "must be a string"),
        ({"cv.n_folds": {"low": 2, "high": 5}}, "'cv.n_folds' cannot vary"),
        ({"model.kwargs.num_experts": {"low": 0, "high": 2}}, "'model.kwargs.num_experts' = 0: model 'hsqformer_small'"),
    ],
)
def test_bad_spaces_fail_in_one_line_before_anything_is_written(micro: Path, tmp_path: Path, params: dict,
                                                                message: str) -> None:
    out = tmp_path / "search"
    space = write_yaml(tmp_path / "space.yaml", {"params": params})
    code, err = run_cli("tune", "--config", micro, "--space", space, "--trials", "2", "--data", SAMPLE, "--out", out)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error: ") and message in err.strip().splitlines()[-1], err[-2000:]
    assert not out.exists()


def test_space_kinds_and_optional_model_arguments(micro: Path, tmp_path: Path) -> None:
    space = {"params": {
        "trainer.epochs": {"low": 2, "high": 6, "step": 2},
        "model.kwargs.stage_depths": {"choices": [[0, 0, 0, 1], [0, 0, 1, 1]]},
        "model.kwargs.drop_path_rate": {"low": 0.0, "high": 0.3, "optional": True},
    }}
    path = write_yaml(tmp_path / "space.yaml", space)
    read = read_space(path, load_config(micro))
    assert [(p.name, p.kind) for p in read.params] == [
        ("trainer.epochs", "int"), ("model.kwargs.stage_depths", "choice"), ("model.kwargs.drop_path_rate", "float")]
    assert read.params[1].choices == {"0:0:0:1": {"model.kwargs.stage_depths": [0, 0, 0, 1]},
                                      "0:0:1:1": {"model.kwargs.stage_depths": [0, 0, 1, 1]}}
    # a model without stochastic depth (DenseNet) skips the optional parameter instead of failing
    densenet = load_config(micro, ["model.name=densenet121", "model.kwargs={}"])
    lr_and_drop_path = {"optimizer.lr": {"low": 1.0e-4, "high": 1.0e-3},
                        "model.kwargs.drop_path_rate": space["params"]["model.kwargs.drop_path_rate"]}
    read = read_space(write_yaml(tmp_path / "s2.yaml", {"params": lr_and_drop_path}), densenet)
    assert [p.name for p in read.params] == ["optimizer.lr"] and read.skipped == ["model.kwargs.drop_path_rate"]


def test_validation_auc_reaches_the_pruner_per_epoch() -> None:
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    good = study.ask()
    for step, auc in enumerate([0.8, 0.9, 0.85, 0.9]):
        good.report(auc, step)
    study.tell(good, 0.9)

    def epoch(callback: ReportAUC, number: int, auc: float) -> None:
        trainer = SimpleNamespace(sanity_checking=False, current_epoch=number, callback_metrics={"val_auc": torch.tensor(auc)})
        callback.on_validation_end(trainer, None)

    trial = study.ask()
    second_fold = ReportAUC(trial, fold=1, epochs=2)
    epoch(second_fold, 0, 0.95)
    epoch(second_fold, 1, 0.70)  # worse than its epoch 0: the fold's best (0.95) is what counts
    assert study.trials[trial.number].intermediate_values == pytest.approx({2: 0.95, 3: 0.95})
    weak = ReportAUC(study.ask(), fold=0, epochs=2)
    with pytest.raises(optuna.TrialPruned, match="fold 0, epoch 0: best validation AUC 0.600"):
        epoch(weak, 0, 0.6)


def test_a_restarted_search_draws_settings_unlike_earlier_starts(tmp_path: Path) -> None:
    """Each start seeds the sampler from the trials so far; nearby seeds must not give nearby draws.

    With ``seed + trials so far`` as the seed, the starts after 0 and 3 trials drew (0.549, 0.715) and
    (0.551, 0.708): NumPy's legacy generator from seeds 0 and 3. On liver-sysu that repeated a trial.
    """
    search = SimpleNamespace(storage=f"sqlite:///{tmp_path / 'study.db'}", seed=0, startup_trials=lambda: 10,
                             space=SimpleNamespace(pruning=False), base=SimpleNamespace(trainer=SimpleNamespace(epochs=2)))
    draws = []
    for _ in range(8):  # each start: one trial, then interrupted
        study = load_study(search)
        trial = study.ask()
        draws.append((trial.suggest_float("a", 0.0, 1.0), trial.suggest_float("b", 0.0, 1.0)))
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    nearest = min(max(abs(a - c), abs(b - d)) for i, (a, b) in enumerate(draws) for c, d in draws[:i])
    assert nearest > 0.01, draws  # independent draws: a pair this close by chance about 1 time in 100


def _trials(out: Path) -> pd.DataFrame:
    with sqlite3.connect(out / "study.db") as db:
        return pd.read_sql("SELECT number, state FROM trials ORDER BY number", db)


def test_search_runs_resumes_an_interrupted_trial_and_extends(micro: Path, tmp_path: Path) -> None:
    space, out = write_yaml(tmp_path / "space.yaml", SPACE), tmp_path / "search"
    args = ["tune", "--config", micro, "--space", space, "--data", SAMPLE, "--out", out]
    code, err = run_cli(*args, "--trials", "2")
    assert code == 0, err[-3000:]
    assert _trials(out)["state"].tolist() == ["COMPLETE", "COMPLETE"]
    table = pd.read_csv(out / "trials.csv")
    best = table.loc[table["mean_fold_auc"].idxmax()]
    recipe = load_config(out / "best.yaml")
    assert recipe.optimizer.lr == pytest.approx(best["optimizer.lr"])
    assert recipe.augment.mixup == best["augment.mixup"] and recipe.model.kwargs["num_queries"] == 8
    for trial in (out / "trials").iterdir():  # fold weights dropped, predictions kept
        assert not list(trial.glob("fold_*/model.safetensors")) and (trial / "predictions.csv").is_file()
    assert "Best: trial" in (out / "report.md").read_text(encoding="utf-8")

    # trial 2 as if the search was killed during its second fold: left RUNNING, its fold 0 done
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{out / 'study.db'}")
    study.enqueue_trial(study.trials[0].params)
    stopped = study.ask()
    stopped.suggest_float("optimizer.lr", 1.0e-4, 1.0e-2, log=True)
    stopped.suggest_categorical("mixup", ["off", "on"])
    shutil.copytree(out / "trials" / "trial_0000", out / "trials" / "trial_0002")
    (out / "trials" / "trial_0002" / "metrics.json").unlink()
    (out / "trials" / "trial_0002" / "fold_1" / "done.json").unlink()

    code, err = run_cli(*args, "--trials", "3")
    assert code == 0, err[-3000:]
    assert "trial 2 was interrupted: run again with the same settings, resuming their cv runs" in err
    assert "2 of 3 trials finished earlier; 1 to run" in err
    assert "fold 0: done earlier, skipped" in err
    assert _trials(out)["state"].tolist() == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
    retry = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{out / 'study.db'}").trials[3]
    assert retry.params == study.trials[0].params and retry.user_attrs["retry_of"] == 2
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["trial_0000", "trial_0001", "trial_0003"]
    assert json.loads((out / "trials" / "trial_0003" / "metrics.json").read_text())["n_folds"] == 2

    code, err = run_cli(*args, "--trials", "3", "--seed", "1")
    assert code == 2 and "holds a search with another --seed" in err.strip().splitlines()[-1]
    assert yaml.safe_load((out / "tune.json").read_text())["seed"] == 0


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"optimizer.lr": {"low": 2.0e-4, "high": 1.0e-2, "log": True}},
         "'optimizer.lr': the base config's value 0.0001 is outside the range [0.0002, 0.01]"),
        ({"mixup": {"choices": {"off": {"augment.mixup": 0.0, "augment.cutmix": 0.0},
                                "half": {"augment.mixup": 0.4, "augment.cutmix": 1.0}}}},
         "the base config's augment.cutmix = 1, augment.mixup = 0.8 is none of the choices (off, half)"),
        ({"optimizer.lr": {"low": 5.0e-5, "high": 1.0e-3, "step": 1.0e-4}},
         "'optimizer.lr': the base config's value 0.0001 is not on the range's steps of 0.0001 from "),
        ({"model.kwargs.mlp_ratio": {"low": 1.0, "high": 4.0}},
         "the base config does not set 'model.kwargs.mlp_ratio'; set it (in the config or with --set)"),
    ],
)
def test_start_from_base_needs_a_space_that_can_draw_the_base(micro: Path, tmp_path: Path, params: dict,
                                                              message: str) -> None:
    out = tmp_path / "search"
    space = write_yaml(tmp_path / "space.yaml", {"params": params})
    code, err = run_cli("tune", "--config", micro, "--space", space, "--trials", "2", "--data", SAMPLE, "--out", out,
                        "--start-from-base")
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: --start-from-base, space ") and message in last, err[-2000:]
    assert not out.exists()


def test_start_from_base_runs_the_base_recipe_first(micro: Path, tmp_path: Path) -> None:
    space, out = write_yaml(tmp_path / "space.yaml", SPACE), tmp_path / "search"
    args = ["tune", "--config", micro, "--space", space, "--data", SAMPLE, "--out", out, "--trials", "2"]
    code, err = run_cli(*args, "--start-from-base")
    assert code == 0, err[-3000:]
    assert "trial 0 is the base config's own settings (--start-from-base)" in err
    base = load_config(micro)
    first = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{out / 'study.db'}").trials[0]
    assert first.params == {"optimizer.lr": pytest.approx(base.optimizer.lr), "mixup": "on"}  # micro: smoke's mixup
    assert first.user_attrs["settings"] == {"optimizer.lr": pytest.approx(base.optimizer.lr),
                                            "augment.mixup": 0.8, "augment.cutmix": 1.0}
    table = pd.read_csv(out / "trials.csv")
    assert table["base"].tolist() == [True, False]
    assert table.loc[1, "optimizer.lr"] != pytest.approx(base.optimizer.lr)  # the second trial is drawn
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| 0 (base config) | complete |" in report and "Trial 0 is the base config's own settings" in report

    code, err = run_cli(*args)
    assert code == 2 and "holds a search with another --start-from-base" in err.strip().splitlines()[-1]
    code, err = run_cli(*args, "--start-from-base")
    assert code == 0 and "2 of 2 trials finished earlier; 0 to run" in err, err[-2000:]
    assert len(optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{out / 'study.db'}").trials) == 2
