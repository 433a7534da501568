"""Patient-level K-fold cross-validation: the fold loop behind ``hsqformer cv``.

Everything that can be wrong with the inputs (config, data, test cohorts, model
name and kwargs, the run folder) is checked before the run folder is touched.
Each fold then trains with Lightning, exports its best-validation-AUC weights as
safetensors, evaluates them on its validation fold and on every test cohort, and
marks itself done; a resumed run skips done folds and continues an interrupted
one from its last Lightning checkpoint. Lightning's ``.ckpt`` files are only
read to resume a run, with torch's ``weights_only`` loader (tensors and plain
data, no arbitrary objects), and are deleted when their fold is done. Only process rank 0 writes files, so the same command runs
under ``torchrun`` for multi-GPU DDP.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hsqformer.data import (
    UltrasoundDataset,
    check_images,
    check_no_leakage,
    class_names,
    folds_table,
    load_dataset,
    patient_folds,
    save_folds,
)
from hsqformer.data.dataset import worker_context
from hsqformer.data.manifest import row_origins
from hsqformer.errors import HSQformerError
from hsqformer.evaluation.metrics import classification_metrics, summarize
from hsqformer.evaluation.report import run_table
from hsqformer.hardware import machine_label, resolve_precision
from hsqformer.training.config import Config, config_from_dict, config_to_dict, first_difference, mixup_enabled
from hsqformer.files import write_csv, write_json, write_text, write_yaml
from hsqformer.training.run_folder import (
    CONFIG_FILE,
    DONE_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    RUN_FILE,
    RUN_FORMAT,
    SPLITS_FILE,
    TABLE_FILE,
    VERSIONS_FILE,
    check_only_ours,
    check_run_dir,
    fold_path,
    package_versions,
    read_run,
    resume_request,
    unfinished_folds,
)

VALIDATION = "validation"
_COHORT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class CVInputs:
    """The checked inputs of a run: config, data, classes, test cohorts and folds."""

    cfg: Config
    data_source: str
    frame: pd.DataFrame
    classes: list[str]
    positive_index: int
    test_sources: dict[str, str]
    tests: dict[str, pd.DataFrame]
    folds: list[tuple[np.ndarray, np.ndarray]]


def parse_tests(items: list[str]) -> dict[str, str]:
    """``NAME=DATA`` command-line items as an ordered mapping, checking names."""
    tests: dict[str, str] = {}
    for item in items:
        name, sep, source = item.partition("=")
        if not sep or not source:
            raise HSQformerError(f"--test '{item}': expected NAME=DATA, e.g. single-center=data/test")
        if not _COHORT_NAME.match(name) or name == VALIDATION:
            raise HSQformerError(
                f"--test '{item}': cohort name must be letters, digits, '_', '-' or '.' and not '{VALIDATION}'"
            )
        if name in tests:
            raise HSQformerError(f"--test: cohort name '{name}' given twice")
        tests[name] = source
    return tests


def prepare_inputs(cfg: Config, data: str | Path, tests: Mapping[str, str | Path]) -> CVInputs:
    """Load and check the data, the test cohorts and the folds; build the model once to check its settings."""
    from hsqformer.training.modeling import build_model

    frame = load_dataset(data, cfg.data.classes, verify_images=False)
    classes = class_names(frame, cfg.data.classes)
    if len(classes) < 2:
        raise HSQformerError(f"{data}: needs at least two classes, found {', '.join(classes)}")
    frame = _subset(frame, cfg.data.max_images, cfg.cv.seed)
    positive_index = _positive_index(cfg, classes)
    test_frames = {name: load_dataset(source, classes, verify_images=False) for name, source in tests.items()}
    if cfg.data.verify_images:  # decode every image used, test cohorts included, before anything is written
        for part in (frame, *test_frames.values()):
            check_images(part)
    folds = patient_folds(frame, cfg.cv.n_folds, cfg.cv.seed)
    check_no_leakage(frame, folds)
    build_model(cfg, len(classes))
    return CVInputs(
        cfg=cfg,
        data_source=str(Path(data).resolve()),
        frame=frame,
        classes=classes,
        positive_index=positive_index,
        test_sources={name: str(Path(source).resolve()) for name, source in tests.items()},
        tests=test_frames,
        folds=folds,
    )


def run_cv(
    cfg: Config,
    data: str | Path,
    tests: Mapping[str, str | Path],
    out: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    command: str | None = None,
    fold_callbacks: Callable[[int], Sequence[Any]] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the cross-validation and write the run folder; returns the metrics.

    ``fold_callbacks(k)`` gives extra Lightning callbacks for fold ``k`` (``hsqformer tune`` reports each
    epoch's validation AUC to Optuna through one and stops a trial that its pruner stops).
    """
    started = time.perf_counter()
    out = Path(out)
    if _is_rank_zero():  # other torchrun processes may start after rank 0 has created the folder
        check_run_dir(out, overwrite=overwrite, resume=resume)
    inputs = prepare_inputs(cfg, data, tests)
    precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    _say(f"precision {precision.precision} ({precision.reason})")
    if resume:
        _check_same_run(out, inputs)
    elif _is_rank_zero():
        if out.exists():
            if any(out.iterdir()):
                check_only_ours(out)  # again: files may have appeared while the images were checked
            shutil.rmtree(out)  # check_run_dir allowed this: an empty folder or a run folder with --overwrite
        _start_run_dir(out, inputs, command)
    _barrier()
    for k, (train_rows, val_rows) in enumerate(inputs.folds):
        fold_dir = fold_path(out, k)
        if resume and (fold_dir / DONE_FILE).is_file():
            _say(f"fold {k}: done earlier, skipped")
            continue
        fold_started = time.perf_counter()
        try:
            extra = fold_callbacks(k) if fold_callbacks is not None else ()
            info = train_fold(k, inputs, fold_dir, train_rows, val_rows, precision.precision, extra)
            if _is_rank_zero():
                _evaluate_fold(k, inputs, fold_dir, val_rows)
        except HSQformerError as err:  # e.g. an image spoilt after the check: earlier folds stay done
            if "--resume" in str(err) or "run the same command again" in str(err):
                raise
            raise HSQformerError(
                f"{err}; folds before fold {k} are kept: fix that, then continue with: "
                f"hsqformer cv --out {shlex.quote(str(out))} --resume"
            ) from None
        if _is_rank_zero():
            info["wall_seconds"] = round(time.perf_counter() - fold_started, 1)
            info["machine"] = machine_label(inputs.cfg.trainer.accelerator)
            write_json(fold_dir / DONE_FILE, info)
            shutil.rmtree(fold_dir / "lightning", ignore_errors=True)
        _barrier()
    if not _is_rank_zero():
        return {}
    metrics = aggregate(out, inputs)
    metrics["wall_seconds_this_invocation"] = round(time.perf_counter() - started, 1)
    write_json(out / METRICS_FILE, metrics)
    table = run_table(metrics)
    write_text(out / TABLE_FILE, table)
    if _is_rank_zero():
        print(table, file=sys.stderr, flush=True)
    _say(f"done: {out / TABLE_FILE} (compare runs with: hsqformer compare {out} OTHER_RUN... --out REPORT_DIR)")
    return metrics


def train_fold(
    k: int,
    inputs: CVInputs,
    fold_dir: Path,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    precision: str | None = None,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Train fold ``k`` (resuming from its last checkpoint when there is one); returns facts for done.json.

    ``precision`` is a resolved Lightning precision; None resolves ``trainer.precision`` here.
    ``callbacks`` are added to the trainer's own.
    """
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    from hsqformer.checkpoint import save_checkpoint
    from hsqformer.training.csv_log import DurableCSVLogger
    from hsqformer.training.modeling import build_model
    from hsqformer.training.module import ClassifierModule, CompactProgressBar, ExportBest, StartEpoch
    from hsqformer.training.transforms import eval_transform, preprocess_config, train_transform

    cfg = inputs.cfg
    precision = precision or resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator).precision
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_no_advertising)
    last = fold_dir / "lightning" / "last.ckpt"
    resume_from = last if last.is_file() else None
    _say(f"fold {k}: {'resuming from ' + str(resume_from) if resume_from else 'training'}")
    L.seed_everything(cfg.cv.seed + k, workers=True, verbose=False)
    model, model_kwargs = build_model(cfg, len(inputs.classes))
    preprocess = preprocess_config(cfg.augment, model)
    train_set = UltrasoundDataset(
        inputs.frame.iloc[train_rows], inputs.classes, train_transform(cfg.augment, preprocess)
    )
    val_set = UltrasoundDataset(inputs.frame.iloc[val_rows], inputs.classes, eval_transform(preprocess))
    workers = cfg.data.num_workers
    train_loader = DataLoader(
        train_set,
        batch_size=_train_batch_size(cfg, len(train_set)),
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        multiprocessing_context=worker_context(workers),
    )
    val_loader = DataLoader(
        val_set, batch_size=cfg.trainer.eval_batch_size, num_workers=workers, persistent_workers=workers > 0,
        multiprocessing_context=worker_context(workers),
    )
    meta = {
        "model_name": cfg.model.name,
        "num_classes": len(inputs.classes),
        "model_kwargs": model_kwargs,
        "classes": inputs.classes,
        "positive_class": inputs.classes[inputs.positive_index],
        "preprocess": preprocess,
        "fold": k,
    }

    def export(weights: Any, score: float, epoch: int) -> None:
        save_checkpoint(fold_dir, weights, {**meta, "val_auc": score, "epoch": epoch})

    exporter = ExportBest(export)
    start = StartEpoch()
    trainer = L.Trainer(
        max_epochs=cfg.trainer.epochs,
        precision=precision,
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        strategy=cfg.trainer.strategy,
        deterministic=cfg.trainer.deterministic,
        gradient_clip_val=cfg.optimizer.grad_clip,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        enable_progress_bar=cfg.trainer.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=fold_dir,
        logger=DurableCSVLogger(fold_dir, name="logs"),
        callbacks=[
            exporter,
            start,
            ModelCheckpoint(
                dirpath=fold_dir / "lightning",
                filename="last",
                monitor=None,
                save_top_k=1,
                enable_version_counter=False,
            ),
            *callbacks,
            *([CompactProgressBar()] if cfg.trainer.progress_bar else []),
        ],
    )
    module = ClassifierModule(model, cfg, len(inputs.classes), inputs.positive_index)
    if resume_from is not None:
        check_resume_checkpoint(resume_from, module.state_dict(), k)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
        trainer.fit(module, train_loader, val_loader, ckpt_path=resume_from, weights_only=True)
    if _is_rank_zero() and not (fold_dir / "model.json").is_file():
        raise HSQformerError(f"fold {k}: training ended without a validated model in {fold_dir}")
    return {
        "fold": k,
        "best_epoch": exporter.best_epoch,
        "val_auc": exporter.best_score,
        "resumed_from_epoch": start.epoch if resume_from else None,
        "epochs": cfg.trainer.epochs,
        "precision": precision,
    }


def check_resume_checkpoint(path: Path, expected: Mapping[str, Any], k: int) -> None:
    """Refuse, in one line, a ``last.ckpt`` that cannot resume fold ``k``: unreadable, cut short, holding
    objects beyond tensors and plain data, or a checkpoint of something else (``expected``: the
    module's state dict). torch's own message is not passed on: it suggests ``weights_only=False``,
    which would run whatever code the file holds."""
    import pickle

    import torch

    def refuse(why: str) -> HSQformerError:
        return HSQformerError(
            f"fold {k}: cannot resume from {path}: {why}; delete that file to restart fold {k} "
            "from its first epoch, then run the same command again"
        )

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "global" in str(err):  # torch names the class it refused to import
            raise refuse("unreadable checkpoint (it holds objects other than tensors and plain data)") from None
        raise refuse("unreadable checkpoint (damaged, cut short or not a PyTorch file)") from None
    except Exception as err:  # torch raises RuntimeError, EOFError, ValueError ... for damaged files
        raise refuse(f"unreadable checkpoint (damaged, cut short or not a PyTorch file: {type(err).__name__})") from None
    required = ("state_dict", "epoch", "global_step", "loops", "optimizer_states")
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in required):
        raise refuse("not a Lightning checkpoint of an hsqformer cv run")
    saved = checkpoint["state_dict"]
    if not isinstance(saved, Mapping) or set(saved) != set(expected):
        raise refuse("a checkpoint of another model (its weights have other names)")
    for name, tensor in expected.items():
        if tuple(getattr(saved[name], "shape", ())) != tuple(getattr(tensor, "shape", ())):
            raise refuse(f"a checkpoint of another model ('{name}' has another shape)")


_LIGHTNING_NOISE = ("litlogger", "GPU available:", "TPU available:", "HPU available:", "Loading `train_dataloader`")


def _no_advertising(record: logging.LogRecord) -> bool:
    """Logging filter that drops, from every fold's output, Lightning's tip to install its cloud logger
    and its accelerator lines (the precision line at start says what runs where)."""
    message = record.getMessage()
    return not any(noise in message for noise in _LIGHTNING_NOISE)


def _evaluate_fold(k: int, inputs: CVInputs, fold_dir: Path, val_rows: np.ndarray) -> None:
    """Predict the validation fold and each test cohort with the fold's exported model."""
    from hsqformer.checkpoint import load_checkpoint
    from hsqformer.training.inference import predict_probabilities
    from hsqformer.training.transforms import eval_transform

    model, meta = load_checkpoint(fold_dir)
    transform = eval_transform(meta["preprocess"])
    cohorts = {VALIDATION: inputs.frame.iloc[val_rows], **inputs.tests}
    tables, metrics = [], {}
    for name, part in cohorts.items():
        probs = predict_probabilities(
            [model],
            part["path"].tolist(),
            transform,
            batch_size=inputs.cfg.trainer.eval_batch_size,
            num_workers=inputs.cfg.data.num_workers,
            desc=f"fold {k} {name}",
            where=row_origins(part),
        )[0]
        table = _prediction_table(name, part, probs, inputs.classes)
        tables.append(table)
        metrics[name] = classification_metrics(_label_indices(part, inputs.classes), probs, inputs.positive_index)
    write_csv(fold_dir / PREDICTIONS_FILE, pd.concat(tables, ignore_index=True))
    write_json(fold_dir / METRICS_FILE, {"fold": k, "val_auc_at_export": meta.get("val_auc"), "cohorts": metrics})


def aggregate(out: Path, inputs: CVInputs) -> dict[str, Any]:
    """Combine the folds' predictions into predictions.csv and the metrics of the whole run."""
    classes, pos = inputs.classes, inputs.positive_index
    k_folds = len(inputs.folds)
    fold_tables = [_read_predictions(fold_path(out, k) / PREDICTIONS_FILE) for k in range(k_folds)]
    prob_cols = [f"prob_{c}" for c in classes]
    per_fold: list[dict[str, Any]] = []
    for k, table in enumerate(fold_tables):
        done = json.loads((fold_path(out, k) / DONE_FILE).read_text(encoding="utf-8"))
        cohorts = {}
        for name, part in table.groupby("cohort", sort=False):
            cohorts[name] = classification_metrics(
                _label_indices(part, classes), part[prob_cols].to_numpy(), pos
            )
        per_fold.append({"fold": k, "best_epoch": done.get("best_epoch"), "cohorts": cohorts})
    cohort_names = [VALIDATION, *inputs.tests]
    summary = {name: summarize([f["cohorts"][name] for f in per_fold]) for name in cohort_names}

    validation = pd.concat(
        [t[t["cohort"] == VALIDATION].assign(fold=k) for k, t in enumerate(fold_tables)], ignore_index=True
    )
    pooled = classification_metrics(_label_indices(validation, classes), validation[prob_cols].to_numpy(), pos)
    rows = [_validation_rows(validation, k_folds, classes[pos])]
    ensemble = {}
    for name in inputs.tests:
        parts = [t[t["cohort"] == name].reset_index(drop=True) for t in fold_tables]
        probs = np.stack([p[prob_cols].to_numpy() for p in parts])
        mean = probs.mean(axis=0)
        ensemble[name] = classification_metrics(_label_indices(parts[0], classes), mean, pos)
        rows.append(_test_rows(name, parts[0], probs, mean, classes, pos))
    write_csv(out / PREDICTIONS_FILE, pd.concat(rows, ignore_index=True))
    return {
        "model": inputs.cfg.model.name,
        "classes": classes,
        "positive_class": classes[pos],
        "threshold": 0.5,
        "n_folds": k_folds,
        "cohorts": {
            VALIDATION: {"n_images": len(inputs.frame), "source": inputs.data_source},
            **{
                name: {"n_images": len(inputs.tests[name]), "source": inputs.test_sources[name]}
                for name in inputs.tests
            },
        },
        "folds": per_fold,
        "summary": summary,
        "pooled_validation": pooled,
        "ensemble": ensemble,
    }


def _validation_rows(validation: pd.DataFrame, k_folds: int, positive: str) -> pd.DataFrame:
    table = pd.DataFrame(
        {
            "cohort": VALIDATION,
            "image": validation["path"],
            "patient_id": validation["patient_id"],
            "label": validation["label"],
            "fold": validation["fold"],
        }
    )
    for k in range(k_folds):
        table[f"prob_fold{k}"] = np.where(validation["fold"] == k, validation[f"prob_{positive}"], np.nan)
    table["prob_ensemble"] = np.nan
    return table


def _test_rows(
    name: str, part: pd.DataFrame, probs: np.ndarray, mean: np.ndarray, classes: list[str], pos: int
) -> pd.DataFrame:
    table = pd.DataFrame(
        {"cohort": name, "image": part["path"], "patient_id": part["patient_id"], "label": part["label"]}
    )
    table["fold"] = pd.NA
    for k in range(probs.shape[0]):
        table[f"prob_fold{k}"] = probs[k, :, pos]
    table["prob_ensemble"] = mean[:, pos]
    if len(classes) > 2:
        for i, name_i in enumerate(classes):
            table[f"prob_ensemble_{name_i}"] = mean[:, i]
    return table


def _prediction_table(cohort: str, part: pd.DataFrame, probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    table = part[["path", "patient_id", "label"]].reset_index(drop=True).copy()
    table.insert(0, "cohort", cohort)
    for i, name in enumerate(classes):
        table[f"prob_{name}"] = probs[:, i]
    return table


def _read_predictions(path: Path) -> pd.DataFrame:
    text_columns = {"cohort": str, "path": str, "patient_id": str, "label": str}
    return pd.read_csv(path, dtype=text_columns, keep_default_na=False, na_values={})


def _label_indices(part: pd.DataFrame, classes: list[str]) -> np.ndarray:
    index = {name: i for i, name in enumerate(classes)}
    return part["label"].map(index).to_numpy(dtype=np.int64)


def _subset(frame: pd.DataFrame, max_images: int | None, seed: int) -> pd.DataFrame:
    """A class-stratified, seeded subset of ``max_images`` rows, in the original order."""
    if max_images is None or max_images >= len(frame):
        return frame
    from sklearn.model_selection import train_test_split

    try:
        keep, _ = train_test_split(
            np.arange(len(frame)), train_size=max_images, stratify=frame["label"], random_state=seed
        )
    except ValueError as err:
        raise HSQformerError(f"data.max_images={max_images}: {err}") from None
    keep = np.sort(keep)
    subset = frame.iloc[keep].reset_index(drop=True)
    if "where" in frame.attrs:
        subset.attrs["where"] = [frame.attrs["where"][i] for i in keep]
    return subset


def _positive_index(cfg: Config, classes: list[str]) -> int:
    positive = cfg.data.positive_class
    if positive is None:
        if len(classes) == 2:
            return 1
        raise HSQformerError(
            f"data.positive_class must be set for {len(classes)} classes (one of {', '.join(classes)})"
        )
    if positive not in classes:
        raise HSQformerError(f"data.positive_class '{positive}' is not a class ({', '.join(classes)})")
    return classes.index(positive)


def _train_batch_size(cfg: Config, n_train: int) -> int:
    """The configured batch size, shrunk to fit a small training set (even when batches are mixed)."""
    size = min(cfg.trainer.batch_size, n_train)
    if mixup_enabled(cfg) and size % 2:
        size -= 1
    if size < 1 or (mixup_enabled(cfg) and size < 2):
        raise HSQformerError(f"a training fold has only {n_train} images: too few to train")
    return size


def _check_same_run(out: Path, inputs: CVInputs) -> None:
    """A resumed run must have the config, data, cohorts and splits it started with."""
    run = read_run(out)
    saved_cfg, saved_data, saved_tests = resume_request(out)
    diff = first_difference(config_to_dict(saved_cfg), config_to_dict(inputs.cfg))
    if diff:
        raise HSQformerError(f"--resume: config key '{diff}' differs from the run's {out / CONFIG_FILE}")
    if saved_data != inputs.data_source or saved_tests != inputs.test_sources:
        raise HSQformerError(f"--resume: data or test cohorts differ from those in {out / RUN_FILE}")
    if run.get("classes") != inputs.classes:
        raise HSQformerError(f"--resume: classes differ from those in {out / RUN_FILE}")
    _check_same_splits(out, inputs, "--resume")


def _check_same_splits(out: Path, inputs: CVInputs, what: str) -> None:
    """The data's folds must be those of the run in ``out``; its predictions then name the images alike."""
    saved = pd.read_csv(out / SPLITS_FILE, dtype={"path": str}, keep_default_na=False)
    now = folds_table(inputs.frame, inputs.folds)
    # run.json holds the resolved data path, splits.csv the paths as first given (maybe through a
    # symlink): compare the files themselves.
    same_files = [os.path.realpath(p) for p in saved["path"]] == [os.path.realpath(p) for p in now["path"]]
    if not same_files or saved["fold"].tolist() != now["fold"].tolist():
        raise HSQformerError(f"{what}: the data's folds differ from {out / SPLITS_FILE}")
    if all(os.path.isfile(p) for p in saved["path"]):
        inputs.frame["path"] = saved["path"].tolist()  # every fold's predictions name the images alike


#: The ``augment`` settings that change only how a trained model's inputs are prepared for evaluation.
EVALUATION_SETTINGS = ("crop_mode", "crop_pct", "interpolation")


def evaluate_again(
    run: str | Path, out: str | Path, overrides: Sequence[str], *, overwrite: bool = False, command: str | None = None
) -> dict[str, Any]:
    """Evaluate a finished run's fold models again with other evaluation preprocessing, into a new run folder.

    ``overrides`` (``KEY=VALUE``) may change only the ``augment`` keys of ``EVALUATION_SETTINGS``, e.g. ``augment.crop_mode=squash``
    to score whole frames instead of their centre. The new folder holds the same weights (hard links
    where the file system allows) and folds, so ``hsqformer compare`` pairs the two runs image by image.
    The best epoch of each fold stays the one chosen with the original preprocessing.
    """
    from hsqformer.checkpoint import META_NAME, WEIGHTS_NAME, read_meta

    run, out = Path(run), Path(out)
    allowed = [f"augment.{name}" for name in EVALUATION_SETTINGS]
    for item in overrides:
        if item.partition("=")[0].strip() not in allowed:
            raise HSQformerError(f"evaluate again: '{item}' is not an evaluation setting; only {', '.join(allowed)}")
    saved_cfg, data, tests = resume_request(run)
    cfg = config_from_dict(config_to_dict(saved_cfg), overrides=overrides)
    unfinished = unfinished_folds(run, saved_cfg.cv.n_folds)
    if unfinished:
        raise HSQformerError(f"run {run} is not finished ({', '.join(unfinished)} missing); resume it first")
    if out.resolve() == run.resolve():
        raise HSQformerError(f"evaluate again: --out {out} is the run itself; choose a new folder")
    check_run_dir(out, overwrite=overwrite, resume=False)
    inputs = prepare_inputs(cfg, data, tests)
    _check_same_splits(run, inputs, f"evaluate again {run}")
    if out.exists():
        shutil.rmtree(out)  # check_run_dir allowed this: an empty folder or a run folder with --overwrite
    _start_run_dir(out, inputs, command)
    for k, (_, val_rows) in enumerate(inputs.folds):
        source, fold_dir = fold_path(run, k), fold_path(out, k)
        fold_dir.mkdir()
        try:
            os.link(source / WEIGHTS_NAME, fold_dir / WEIGHTS_NAME)
        except OSError:
            shutil.copyfile(source / WEIGHTS_NAME, fold_dir / WEIGHTS_NAME)
        meta = read_meta(source)
        meta["preprocess"] = {**meta["preprocess"], **{name: getattr(cfg.augment, name) for name in EVALUATION_SETTINGS}}
        write_json(fold_dir / META_NAME, meta)
        _evaluate_fold(k, inputs, fold_dir, val_rows)
        done = json.loads((source / DONE_FILE).read_text(encoding="utf-8"))
        write_json(fold_dir / DONE_FILE, {**done, "evaluated_again_from": str(run.resolve())})
    metrics = aggregate(out, inputs)
    write_json(out / METRICS_FILE, metrics)
    write_text(out / TABLE_FILE, run_table(metrics))
    return metrics


def _start_run_dir(out: Path, inputs: CVInputs, command: str | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_folds(inputs.frame, inputs.folds, out / SPLITS_FILE)
    write_yaml(out / CONFIG_FILE, config_to_dict(inputs.cfg))
    write_json(out / VERSIONS_FILE, package_versions())
    write_json(
        out / RUN_FILE,
        {
            "format": RUN_FORMAT,
            "command": command,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "data": inputs.data_source,
            "tests": inputs.test_sources,
            "classes": inputs.classes,
            "positive_class": inputs.classes[inputs.positive_index],
            "n_images": len(inputs.frame),
        },
    )


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _say(message: str) -> None:
    if _is_rank_zero():
        print(f"[hsqformer cv] {message}", file=sys.stderr, flush=True)
