"""Building the network of a run: any timm model, with offline pretrained weights when asked."""

from __future__ import annotations

import re
from typing import Any

import torch.nn as nn
from timm.optim import param_groups_weight_decay

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


def backbone_parameters(model: nn.Module) -> set[int]:
    """Ids of the pretrained body's parameters, as the model describes them.

    timm's convention: ``model.group_matcher()`` names the body's groups (stem, stages; HSQformer's
    CNN and ViT); what no group matches is the neck and head (HSQformer's projector, queries and
    head; a plain model's classifier, and e.g. ConvNeXt's head norm, as in timm's layer decay), here
    the new layers. A model without a matcher is all body but its classifier.
    """
    if not hasattr(model, "group_matcher"):
        head = {id(p) for p in model.get_classifier().parameters()}
        return {id(p) for p in model.parameters() if id(p) not in head}
    patterns = []
    for spec in model.group_matcher(coarse=False).values():
        if spec is None:
            continue
        specs = spec if isinstance(spec, (list, tuple)) else [(spec, None)]
        patterns += [re.compile(pattern) for pattern, _ in specs]
    return {id(p) for name, p in model.named_parameters() if any(pattern.match(name) for pattern in patterns)}


def param_groups(model: nn.Module, weight_decay: float, backbone_lr_scale: float) -> list[dict[str, Any]]:
    """timm's weight-decay groups, each split into new layers and backbone.

    Backbone groups carry ``lr_scale``, which timm's schedulers multiply into every
    learning rate they set (as for timm's layer decay); the new layers' groups come
    first, so that the first group's learning rate is the configured one.
    """
    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay)
    if backbone_lr_scale == 1.0:
        return groups
    backbone = backbone_parameters(model)
    new_layers, backbone_groups = [], []
    for group in groups:
        own = [p for p in group["params"] if id(p) not in backbone]
        body = [p for p in group["params"] if id(p) in backbone]
        if own:
            new_layers.append({**group, "params": own})
        if body:
            backbone_groups.append({**group, "params": body, "lr_scale": backbone_lr_scale})
    return new_layers + backbone_groups
