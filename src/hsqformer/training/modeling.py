"""Building the network of a run: any timm model, with offline pretrained weights when asked."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from hsqformer.checkpoint import create_model
from hsqformer.errors import HSQformerError
from hsqformer.models.backbones import load_pretrained
from hsqformer.training.config import Config


def build_model(cfg: Config, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """Create ``cfg.model.name``; returns the model and the kwargs it was built with.

    The input size ``augment.img_size`` is passed as ``img_size`` to models that take
    one (HSQformer, ViTs with fixed position embeddings) unless the kwargs set it.
    HSQformer variants take their backbones' weights through ``kwargs.pretrained_backbones``;
    ``model.pretrained`` is for plain timm models (baselines and backbones alone) and uses
    the offline weights that ``hsqformer.models.backbones.load_pretrained`` knows about.
    ``trainer.grad_checkpointing`` trades compute for memory (timm's ``set_grad_checkpointing``).
    """
    kwargs = dict(cfg.model.kwargs)
    if "img_size" in kwargs:
        model = create_model(cfg.model.name, num_classes, kwargs)
    else:
        try:
            model = create_model(cfg.model.name, num_classes, {**kwargs, "img_size": cfg.augment.img_size})
            kwargs["img_size"] = cfg.augment.img_size
        except HSQformerError as err:
            if "img_size" not in str(err):
                raise
            model = create_model(cfg.model.name, num_classes, kwargs)
    if cfg.model.pretrained is not False:
        load_pretrained(model, cfg.model.pretrained, cfg.model.name)
    if cfg.trainer.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model, kwargs
