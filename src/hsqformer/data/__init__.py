"""Datasets: reading and checking manifests, decoding images, patient-level splits."""

from hsqformer.data.dataset import UltrasoundDataset
from hsqformer.data.images import load_image
from hsqformer.data.manifest import MANIFEST_COLUMNS, class_names, load_dataset
from hsqformer.data.splits import check_no_leakage, folds_table, patient_folds, save_folds

__all__ = [
    "MANIFEST_COLUMNS",
    "UltrasoundDataset",
    "check_no_leakage",
    "class_names",
    "folds_table",
    "load_dataset",
    "load_image",
    "patient_folds",
    "save_folds",
]
