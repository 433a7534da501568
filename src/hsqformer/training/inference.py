"""Batched inference of one or several exported models over image files, with a tqdm progress bar."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from hsqformer.data.dataset import worker_context
from hsqformer.data.images import load_image
from hsqformer.data.manifest import IMAGE_SUFFIXES, find_unreadable
from hsqformer.errors import HSQformerError
from hsqformer.training.run_folder import fold_path, read_run, read_saved_config, unfinished_folds


class ImageFiles(Dataset):
    """Transformed images of a list of files."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        transform: Callable[[Image.Image], torch.Tensor],
        where: Sequence[str] | None = None,
    ) -> None:
        self.paths = [str(p) for p in paths]
        self.transform = transform
        self.where = list(where) if where is not None else [""] * len(self.paths)  # e.g. "row 3 of data.csv"

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(load_image(self.paths[i], self.where[i]))


def default_device() -> torch.device:
    """The first GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.inference_mode()
def predict_probabilities(
    models: Sequence[nn.Module],
    paths: Sequence[str | Path],
    transform: Callable[[Image.Image], torch.Tensor],
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | None = None,
    desc: str = "predict",
    where: Sequence[str] | None = None,
) -> np.ndarray:
    """Softmax probabilities of each model for each image: an array (models, images, classes).

    Every image is decoded once and passed through all models (float32, eval mode);
    ``where`` (per image, e.g. "row 3 of data.csv") goes into the message of one that fails.
    """
    device = device or default_device()
    for model in models:
        model.eval().to(device)
    loader = DataLoader(
        ImageFiles(paths, transform, where), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        multiprocessing_context=worker_context(num_workers),
    )
    outputs: list[list[np.ndarray]] = [[] for _ in models]
    for images in tqdm(loader, desc=desc, unit="batch", leave=False):
        images = images.to(device)
        for out, model in zip(outputs, models, strict=True):
            out.append(model(images).float().softmax(dim=1).cpu().numpy())
    if not paths:
        return np.zeros((len(models), 0, 0), dtype=np.float32)
    return np.stack([np.concatenate(out) for out in outputs])


def find_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named directly or found (recursively, sorted) in folders."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise HSQformerError(f"input not found: {path}")
    if not found:
        raise HSQformerError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, inputs))}")
    return found


@dataclass(frozen=True)
class RunEnsemble:
    """The fold models of a finished cv run, with what is needed to feed them and read their outputs."""

    run: Path
    models: list[nn.Module]  # one per fold, in eval mode, on the CPU
    meta: dict[str, Any]  # fold 0's model.json (all folds agree on classes and preprocessing)
    transform: Callable[[Image.Image], torch.Tensor]  # the evaluation preprocessing of the run

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def positive_class(self) -> str:
        return str(self.meta["positive_class"])

    @property
    def positive_index(self) -> int:
        return self.classes.index(self.positive_class)


def load_ensemble(run: str | Path) -> RunEnsemble:
    """Load every fold model of a finished ``hsqformer cv`` run; one-line errors for an unfinished or
    inconsistent run."""
    from hsqformer.checkpoint import load_checkpoint
    from hsqformer.training.transforms import eval_transform

    run = Path(run)
    read_run(run)
    n_folds = read_saved_config(run).cv.n_folds
    unfinished = unfinished_folds(run, n_folds)
    if unfinished:
        raise HSQformerError(f"run {run} is not finished ({', '.join(unfinished)} missing); resume it first")
    loaded = [load_checkpoint(fold_path(run, k)) for k in range(n_folds)]
    meta = loaded[0][1]
    for _, other in loaded[1:]:
        if other["preprocess"] != meta["preprocess"] or other["classes"] != meta["classes"]:
            raise HSQformerError(f"run {run}: fold models differ in classes or preprocessing")
    return RunEnsemble(run, [model for model, _ in loaded], meta, eval_transform(meta["preprocess"]))


def predict_run(
    run: str | Path,
    inputs: Sequence[str | Path],
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    skip_bad: bool = False,
) -> pd.DataFrame:
    """Ensemble inference of a finished cv run's fold models over images or folders.

    Columns: image, the positive-class probability of each fold model, their mean
    (``prob_ensemble``), the ensemble probability of every class, the arg-max class
    and whether the ensemble's positive-class probability reaches 0.5. Every image is
    decoded in full first; one that cannot be stops the command, or, with ``skip_bad``,
    keeps its row with empty predictions and the reason in a ``skipped`` column.
    """
    ensemble = load_ensemble(run)
    found = find_images(inputs)
    failures = find_unreadable(found)
    if failures and not skip_bad:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise HSQformerError(f"{next(iter(failures.values()))}{more}; pass --skip-bad to predict the other images")
    paths = [p for i, p in enumerate(found) if i not in failures]
    if not paths:
        raise HSQformerError(f"none of the {len(found)} images can be read, e.g. {next(iter(failures.values()))}")
    models, classes, pos = ensemble.models, ensemble.classes, ensemble.positive_index
    probs = predict_probabilities(
        models, paths, ensemble.transform, batch_size=batch_size, num_workers=num_workers
    )
    mean = probs.mean(axis=0)
    table = pd.DataFrame({"image": [str(p) for p in paths]})
    for k in range(len(models)):
        table[f"prob_fold{k}"] = probs[k, :, pos]
    table["prob_ensemble"] = mean[:, pos]
    for i, name in enumerate(classes):
        table[f"prob_ensemble_{name}"] = mean[:, i]
    table["predicted_class"] = [classes[i] for i in mean.argmax(axis=1)]
    table[f"is_{ensemble.positive_class}"] = mean[:, pos] >= 0.5
    if not skip_bad:
        return table
    table["skipped"] = ""
    bad = pd.DataFrame({"image": [str(found[i]) for i in failures], "skipped": list(failures.values())})
    order = {str(p): i for i, p in enumerate(found)}
    table = pd.concat([table, bad], ignore_index=True)  # the skipped rows' predictions stay empty
    return table.sort_values("image", key=lambda c: c.map(order), kind="stable").reset_index(drop=True)
