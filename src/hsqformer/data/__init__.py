"""Datasets: reading and checking manifests, decoding images, patient-level splits.

The names below are imported on first use (PEP 562), so that importing one light submodule
(e.g. ``hsqformer.data.manifest`` for the command line) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from hsqformer.data.dataset import UltrasoundDataset
    from hsqformer.data.images import load_image
    from hsqformer.data.manifest import MANIFEST_COLUMNS, check_images, class_names, load_dataset
    from hsqformer.data.splits import check_no_leakage, folds_table, patient_folds, save_folds

_WHERE = {
    "UltrasoundDataset": "dataset",
    "load_image": "images",
    "MANIFEST_COLUMNS": "manifest",
    "check_images": "manifest",
    "class_names": "manifest",
    "load_dataset": "manifest",
    "check_no_leakage": "splits",
    "folds_table": "splits",
    "patient_folds": "splits",
    "save_folds": "splits",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'hsqformer.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"hsqformer.data.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
