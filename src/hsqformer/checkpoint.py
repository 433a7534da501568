"""Model checkpoints as safetensors weights plus a JSON description; loading never unpickles.

A checkpoint folder holds ``model.safetensors`` (the weights) and ``model.json``
(the timm model name and kwargs, the class names, the positive class and the
evaluation preprocessing), which is all that is needed to rebuild the model and
prepare images for it. Pickle-based formats (``torch.load`` of ``.pt``/``.ckpt``)
can run code when read, so released models use this format only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from hsqformer.errors import HSQformerError
from hsqformer.files import atomic_path, read_format_json, write_json

WEIGHTS_NAME = "model.safetensors"
META_NAME = "model.json"
FORMAT = "hsqformer-checkpoint/1"


def create_model(name: str, num_classes: int, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """``timm.create_model`` with HSQformer registered, reporting a bad name or kwarg as one line."""
    import hsqformer.models  # noqa: F401  (registers the HSQformer variants with timm)

    kwargs = dict(kwargs or {})
    try:
        return timm.create_model(name, num_classes=num_classes, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise HSQformerError(f"model.name: unknown timm model '{name}'") from None
        raise HSQformerError(f"model '{name}': {err}") from None
    except (TypeError, ValueError, AssertionError, KeyError) as err:
        raise HSQformerError(f"model '{name}' with kwargs {kwargs}: {err}") from None


def save_checkpoint(directory: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` and ``model.json`` into ``directory`` atomically (weights first)."""
    directory = Path(directory)
    for key in ("model_name", "num_classes", "model_kwargs", "classes"):
        if key not in meta:
            raise ValueError(f"checkpoint meta lacks '{key}'")
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_model(model, str(tmp))
    write_json(directory / META_NAME, {"format": FORMAT, **meta})
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The ``model.json`` of a checkpoint folder."""
    path = Path(directory) / META_NAME
    return read_format_json(path, FORMAT, f"no model description {path}: not a checkpoint folder")


def load_checkpoint(directory: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint folder and load its safetensors weights; returns (model in eval mode, meta)."""
    directory = Path(directory)
    meta = read_meta(directory)
    kwargs = dict(meta["model_kwargs"])
    if "pretrained_backbones" in kwargs:
        kwargs["pretrained_backbones"] = False  # the weights come from the checkpoint
    model = create_model(meta["model_name"], int(meta["num_classes"]), kwargs)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise HSQformerError(f"missing weights file {weights}")
    try:
        load_model(model, str(weights), strict=True)
    except (RuntimeError, OSError, SafetensorError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HSQformerError(f"cannot load {weights} into '{meta['model_name']}': {first}") from None
    return model.eval(), meta
