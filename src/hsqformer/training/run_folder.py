"""The ``hsqformer cv`` run folder: its file names, its record, and the checks before one is replaced.

A run folder holds, at the top, the run record (``run.json``: format, command, data, test
cohorts, classes), the resolved config, the folds (``splits.csv``), the package versions,
and once finished the pooled ``predictions.csv``, ``metrics.json`` and ``table.md``; one
``fold_K`` folder per fold holds that fold's weights (``model.safetensors`` +
``model.json``), predictions and metrics, ``done.json`` when the fold is finished, and while
it trains Lightning's CSV log and last checkpoint. Everything that reads or writes a run
(training, inference, compare, sweeps, the screening app) takes the names from here; this
module imports neither torch nor the engine, so light commands can read runs quickly.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from hsqformer.errors import HSQformerError
from hsqformer.files import read_format_json
from hsqformer.training.config import Config, config_from_dict

RUN_FORMAT = "hsqformer-cv-run/1"
RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
SPLITS_FILE = "splits.csv"
VERSIONS_FILE = "versions.json"
METRICS_FILE = "metrics.json"
TABLE_FILE = "table.md"
PREDICTIONS_FILE = "predictions.csv"
DONE_FILE = "done.json"

#: What a run folder holds (README "The run folder"); ``--overwrite`` deletes nothing else.
TOP_FILES = frozenset({RUN_FILE, CONFIG_FILE, SPLITS_FILE, VERSIONS_FILE, METRICS_FILE, TABLE_FILE, PREDICTIONS_FILE})
FOLD_FILES = frozenset({"model.safetensors", "model.json", DONE_FILE, PREDICTIONS_FILE, METRICS_FILE})
FOLD_DIRS = frozenset({"logs", "lightning"})  # Lightning's CSV log and last.ckpt
_FOLD_DIR = re.compile(r"^fold_[0-9]+$")


def fold_path(out: str | Path, k: int) -> Path:
    """The folder of fold ``k`` of the run in ``out``."""
    return Path(out) / f"fold_{k}"


def unfinished_folds(out: str | Path, n_folds: int) -> list[str]:
    """Names of the folds of ``out`` that are not marked done."""
    return [fold_path(out, k).name for k in range(n_folds) if not (fold_path(out, k) / DONE_FILE).is_file()]


def read_run(out: str | Path) -> dict[str, Any]:
    """The run record of ``out``; one line if ``out`` is not an hsqformer cv run folder."""
    out = Path(out)
    return read_format_json(out / RUN_FILE, RUN_FORMAT, f"{out} is not an hsqformer cv run folder (no {RUN_FILE})")


def read_saved_config(out: str | Path) -> Config:
    """The config a run was started with."""
    path = Path(out) / CONFIG_FILE
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise HSQformerError(f"cannot read {path}: {err}") from None
    return config_from_dict(raw, f" (in {path})")


def resume_request(out: str | Path) -> tuple[Config, str, dict[str, str]]:
    """The config, data and test cohorts a run folder was started with (for ``cv --resume``)."""
    run = read_run(out)
    return read_saved_config(out), run["data"], dict(run["tests"])


def check_run_dir(out: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse to touch an existing run folder unless asked, and anything that is not a run folder."""
    if resume and overwrite:
        raise HSQformerError("--resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise HSQformerError(f"--out {out} exists and is not a folder")
    is_run = (out / RUN_FILE).is_file()
    if resume:
        if not is_run:
            raise HSQformerError(f"--resume: {out} is not an hsqformer cv run folder (no {RUN_FILE})")
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise HSQformerError(
                f"run folder {out} already exists; pass --overwrite to replace it or --resume to continue it"
            )
        if not is_run:
            raise HSQformerError(f"--overwrite: {out} is not an hsqformer cv run folder (no {RUN_FILE}); not deleting it")
        check_only_ours(out)


def check_only_ours(out: Path) -> None:
    """Refuse (one line) unless ``out`` is one of our run folders and holds nothing else."""
    try:
        read_run(out)  # a run.json of another program (or an unreadable one) does not make a folder ours
    except HSQformerError as err:
        raise HSQformerError(f"--overwrite: {err}; not deleting {out}") from None
    foreign = foreign_entry(out)
    if foreign is not None:
        raise HSQformerError(
            f"--overwrite: {foreign} is not something hsqformer cv writes; not deleting {out} "
            "(move it away or choose another --out)"
        )


def _is_temporary(name: str) -> bool:
    """A temporary file of an atomic write that a killed run left behind."""
    return (name.startswith(".") and name.endswith(".tmp")) or name.endswith(".partial")


def foreign_entry(out: Path) -> Path | None:
    """The first file or folder in ``out`` that a cv run does not write (symbolic links included), or None."""
    for entry in sorted(out.iterdir()):
        if entry.is_symlink():
            return entry
        if entry.is_dir() and _FOLD_DIR.match(entry.name):
            for inner in sorted(entry.iterdir()):
                if inner.is_symlink():
                    return inner
                if inner.is_dir() and inner.name in FOLD_DIRS:
                    for root, dirs, files in os.walk(inner):
                        for name in sorted(dirs + files):
                            if Path(root, name).is_symlink():
                                return Path(root, name)
                elif not (inner.is_file() and (inner.name in FOLD_FILES or _is_temporary(inner.name))):
                    return inner
        elif not (entry.is_file() and (entry.name in TOP_FILES or _is_temporary(entry.name))):
            return entry
    return None


def package_versions() -> dict[str, Any]:
    """Versions of Python, the key packages and the machine, for reproducibility."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from hsqformer.hardware import system_info

    packages = {}
    for name in ("hsqformer", "torch", "torchvision", "timm", "lightning", "torchmetrics", "numpy", "pandas",
                 "scikit-learn", "safetensors", "pillow"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "system": system_info(),
        "packages": packages,
    }
