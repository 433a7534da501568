"""A PyTorch dataset over the table that ``load_dataset`` returns."""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable, Sequence
from multiprocessing.context import BaseContext

import numpy as np
import pandas as pd
import torch
from PIL import Image

from hsqformer.data.images import load_image
from hsqformer.data.manifest import row_origins
from hsqformer.errors import HSQformerError


class UltrasoundDataset(torch.utils.data.Dataset):
    """Images of a dataset table as ``(transform(image), class index)`` pairs.

    ``class_names`` fixes the index of each label, so that the train and
    validation parts of one split (and a saved model) agree on it.
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        class_names: Sequence[str],
        transform: Callable[[Image.Image], object] | None = None,
    ) -> None:
        index = {name: i for i, name in enumerate(class_names)}
        unknown = sorted(set(frame["label"]) - set(index))
        if unknown:
            raise HSQformerError(
                f"unknown label '{unknown[0]}' in dataset; expected one of {', '.join(class_names)}"
            )
        self.paths: list[str] = frame["path"].tolist()
        self.where: list[str] = row_origins(frame)  # a file that changes after the check is reported by its row
        self.targets = np.array([index[label] for label in frame["label"]], dtype=np.int64)
        self.class_names = list(class_names)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | Image.Image, int]:
        image = load_image(self.paths[i], self.where[i])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[i])


WORKER_PRELOAD = ["torch", "hsqformer.data.dataset", "hsqformer.training.transforms"]


def worker_context(num_workers: int) -> BaseContext | None:
    """How DataLoader workers start: from a clean forkserver on Linux, not forked from the trainer.

    A forked worker keeps a copy-on-write snapshot of its parent's whole heap. After a fold of training
    that heap holds gigabytes of freed activation memory, which the trainer then rewrites, so each
    loader's workers pin their own snapshot: the CPU preset reached 23 GiB in its second fold with two
    train and two validation workers (about 8 GiB per snapshot). Workers started by the forkserver (which
    has imported torch and the transforms once) share none of it. Elsewhere (macOS and Windows spawn
    workers already) and without workers, PyTorch's default stays.
    """
    if num_workers == 0 or not sys.platform.startswith("linux"):
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)
    return context
