"""Image transforms and batch mixing, built from timm's own utilities.

The evaluation preprocessing is also stored with each exported model, so that
``predict`` prepares images exactly as validation did.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn
from timm.data import Mixup, create_transform, resolve_model_data_config

from hsqformer.training.config import AugmentConfig, Config, mixup_enabled


def preprocess_config(aug: AugmentConfig, model: nn.Module) -> dict[str, Any]:
    """Evaluation preprocessing: size, crop and the normalisation of the model's pretrained weights."""
    data_config = resolve_model_data_config(model)
    return {
        "img_size": aug.img_size,
        "interpolation": aug.interpolation,
        "crop_pct": aug.crop_pct,
        "crop_mode": aug.crop_mode,
        "mean": list(aug.mean or data_config["mean"]),
        "std": list(aug.std or data_config["std"]),
    }


def eval_transform(preprocess: dict[str, Any]) -> Callable:
    """timm's evaluation transform (resize, crop, normalise) for a ``preprocess_config``."""
    return create_transform(
        input_size=preprocess["img_size"],
        is_training=False,
        interpolation=preprocess["interpolation"],
        crop_pct=preprocess["crop_pct"],
        crop_mode=preprocess["crop_mode"],
        mean=tuple(preprocess["mean"]),
        std=tuple(preprocess["std"]),
    )


def train_transform(aug: AugmentConfig, preprocess: dict[str, Any]) -> Callable:
    """timm's training transform: RandomResizedCrop, flips, AutoAugment, normalisation, random erasing."""
    return create_transform(
        input_size=aug.img_size,
        is_training=True,
        scale=aug.scale,
        ratio=aug.ratio,
        hflip=aug.hflip,
        vflip=aug.vflip,
        color_jitter=aug.color_jitter,
        auto_augment=aug.auto_augment,
        interpolation=aug.interpolation,
        mean=tuple(preprocess["mean"]),
        std=tuple(preprocess["std"]),
        re_prob=aug.re_prob,
        re_mode=aug.re_mode,
        re_count=aug.re_count,
    )


def build_mixup(cfg: Config, num_classes: int) -> Mixup | None:
    """timm Mixup/CutMix with label smoothing, or None when mixing is off."""
    if not mixup_enabled(cfg):
        return None
    aug = cfg.augment
    return Mixup(
        mixup_alpha=aug.mixup,
        cutmix_alpha=aug.cutmix,
        prob=aug.mixup_prob,
        switch_prob=aug.mixup_switch_prob,
        label_smoothing=aug.label_smoothing,
        num_classes=num_classes,
    )
