"""Patient-level, class-stratified K-fold splits, and the check that they do not leak.

Images of one patient are strongly correlated; if they fall on both sides of a
split, validation scores measure recognition of the patient, not of the lesion.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from hsqformer.errors import HSQformerError

Fold = tuple[np.ndarray, np.ndarray]


def patient_groups(frame: pd.DataFrame) -> np.ndarray:
    """One integer group per patient; each row without a patient id is its own group."""
    ids = frame["patient_id"].astype(str).to_numpy()
    codes, _ = pd.factorize(ids)
    missing = ids == ""
    codes[missing] = codes.max(initial=-1) + 1 + np.arange(int(missing.sum()))
    return codes


def patient_folds(frame: pd.DataFrame, n_folds: int = 5, seed: int = 0) -> list[Fold]:
    """Stratified patient-level K-fold over row positions: ``[(train_rows, val_rows), ...]``.

    Uses scikit-learn's ``StratifiedGroupKFold(shuffle=True, random_state=seed)``
    with patients as groups. Rows without a patient id are their own group, with
    a warning that those splits are image-level.
    """
    if n_folds < 2:
        raise HSQformerError(f"n_folds must be at least 2 (got {n_folds})")
    groups = patient_groups(frame)
    labels = frame["label"].to_numpy()
    for label in sorted(set(labels)):
        n_patients = len(set(groups[labels == label]))
        if n_patients < n_folds:
            raise HSQformerError(
                f"class '{label}' has {n_patients} patients, fewer than n_folds={n_folds}: "
                "lower the number of folds or add data"
            )
    missing = int((frame["patient_id"] == "").sum())
    if missing:
        warnings.warn(
            f"{missing} of {len(frame)} images have no patient_id: their folds are image-level "
            "and images of one patient may be in both train and validation",
            UserWarning,
            stacklevel=2,
        )
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        return [
            (np.sort(train), np.sort(val))
            for train, val in splitter.split(np.zeros(len(frame)), labels, groups)
        ]


def check_no_leakage(frame: pd.DataFrame, folds: Sequence[Fold]) -> None:
    """Raise ``HSQformerError`` if a patient is in train and validation of one fold,
    or if the validation sets are not a partition of the rows."""
    ids = frame["patient_id"].astype(str).to_numpy()
    n = len(frame)
    seen = np.zeros(n, dtype=np.int64)
    for k, (train, val) in enumerate(folds):
        train, val = np.asarray(train), np.asarray(val)
        if np.intersect1d(train, val).size:
            raise HSQformerError(f"fold {k}: row {int(np.intersect1d(train, val)[0])} is in train and validation")
        shared = sorted((set(ids[train]) & set(ids[val])) - {""})
        if shared:
            raise HSQformerError(
                f"fold {k}: patient '{shared[0]}' is in train and validation"
                + (f" (and {len(shared) - 1} more patients)" if len(shared) > 1 else "")
            )
        np.add.at(seen, val, 1)
    if (seen != 1).any():
        row = int(np.flatnonzero(seen != 1)[0])
        raise HSQformerError(
            f"validation sets are not a partition of the rows: row {row} is validated {int(seen[row])} times"
        )


def folds_table(frame: pd.DataFrame, folds: Sequence[Fold]) -> pd.DataFrame:
    """The dataset table with a ``fold`` column: the fold in which each row is validated."""
    table = frame.reset_index(drop=True).copy()
    fold_of = np.full(len(table), -1, dtype=np.int64)
    for k, (_, val) in enumerate(folds):
        fold_of[np.asarray(val)] = k
    table["fold"] = fold_of
    return table


def save_folds(frame: pd.DataFrame, folds: Sequence[Fold], path: str | Path) -> Path:
    """Write ``folds_table`` as CSV to a new file (never over an existing one), after a leakage check."""
    check_no_leakage(frame, folds)
    from hsqformer.files import write_csv

    try:
        return write_csv(path, folds_table(frame, folds), exclusive=True)
    except FileExistsError:
        raise HSQformerError(f"splits file already exists, not overwriting: {path}") from None
