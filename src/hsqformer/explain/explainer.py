"""``explain_image``: one image's heat map for a run's fold ensemble, at the image's own size.

Each fold model explains the image as the run's evaluation transform prepares it (resize and centre
crop); the fold maps are averaged, and the mean is mapped back through the transform onto the
original image, so that it can be laid over the image a user sees. Pixels the crop cut off get 0.

Scaling of the ensemble map: a CAM is evidence for the positive class, 0 where there is none, so the
mean of the fold maps (each in [0, 1]) is divided by its maximum; attention is a density whose floor
is not 0 (every token gets some weight), so its mean is stretched to [0, 1] (min-max).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from hsqformer.data.images import to_rgb8
from hsqformer.errors import HSQformerError
from hsqformer.explain import CAM_METHODS, METHODS, Explanation
from hsqformer.explain.attention import attention_maps, attention_stages, stage_name
from hsqformer.explain.cam import cam_map, target_layers

if TYPE_CHECKING:  # pragma: no cover
    from hsqformer.training.inference import RunEnsemble

# explaining hooks the ensemble's models for one forward pass: two explanations at once in one
# process (e.g. two web requests) must not share them
_LOCK = threading.Lock()


def check_request(models: Sequence[nn.Module], method: str, target: str) -> str:
    """Check that every model can be explained with ``method`` and ``target`` (a one-line error if not),
    before any image is read; returns the name of what is explained (layer or attention stages)."""
    if method not in METHODS:
        raise HSQformerError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    names = [
        attention_stages(model, target)[1] if method == "attention" else target_layers(model, target).name
        for model in models
    ]
    return names[0]


def crop_box(size: tuple[int, int], preprocess: Mapping[str, Any]) -> tuple[float, float, float, float]:
    """Where the evaluation transform's output lies on an image of ``size`` (W, H): the original-pixel
    coordinates (left, top, right, bottom) of the network input's edges (outside the image when padded).

    Follows timm's ``transforms_imagenet_eval`` for the three crop modes: "center" resizes the shorter
    side to img_size / crop_pct and crops the centre, "squash" resizes both sides to it and crops,
    "border" resizes the longer side to it and pads or crops to img_size.
    """
    width, height = size
    img = preprocess["img_size"]
    out_h, out_w = (img, img) if isinstance(img, int) else (int(img[0]), int(img[1]))
    crop_pct = float(preprocess.get("crop_pct") or 0.875)
    scale_h, scale_w = math.floor(out_h / crop_pct), math.floor(out_w / crop_pct)
    mode = preprocess.get("crop_mode") or "center"
    if mode == "squash":
        new_h, new_w = scale_h, scale_w
    elif mode == "border" or scale_h != scale_w:
        ratio_h, ratio_w = height / scale_h, width / scale_w
        ratio = max(ratio_h, ratio_w) if mode == "border" else min(ratio_h, ratio_w)
        new_h, new_w = round(height / ratio), round(width / ratio)
    elif width <= height:  # torchvision's Resize(int): the shorter side to scale, the other in proportion
        new_w, new_h = scale_w, int(scale_w * height / width)
    else:
        new_h, new_w = scale_h, int(scale_h * width / height)
    top = _crop_start(new_h, out_h)
    left = _crop_start(new_w, out_w)
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + out_w) * sx, (top + out_h) * sy


def _crop_start(size: int, out: int) -> int:
    """Offset of a centre crop of ``out`` pixels from a side of ``size`` (negative: padded, as torchvision pads)."""
    if size >= out:
        return round((size - out) / 2.0)
    return -((out - size) // 2)


def to_original(heatmap: np.ndarray, size: tuple[int, int], preprocess: Mapping[str, Any]) -> np.ndarray:
    """A map over the network input (h, w) resampled (bilinear) onto the original image of ``size`` (W, H);
    0 where the input does not cover the image."""
    width, height = size
    left, top, right, bottom = crop_box(size, preprocess)
    xs = (torch.arange(width, dtype=torch.float64) + 0.5 - left) / (right - left) * 2 - 1
    ys = (torch.arange(height, dtype=torch.float64) + 0.5 - top) / (bottom - top) * 2 - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None].float()
    source = torch.from_numpy(np.ascontiguousarray(heatmap, dtype=np.float32))[None, None]
    out = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, 0]
    inside = (grid[0].abs() <= 1).all(dim=-1)
    return torch.where(inside, out, torch.zeros(())).numpy().astype(np.float32)


def _scaled(heatmap: np.ndarray, stretch: bool) -> np.ndarray:
    """Divide by the maximum (``stretch``: min-max) so that the map spans up to [0, 1]; a flat map becomes 0."""
    low = float(heatmap.min()) if stretch else 0.0
    span = float(heatmap.max()) - low
    if span <= 0:
        return np.zeros_like(heatmap, dtype=np.float32)
    return np.clip((heatmap - low) / span, 0.0, 1.0).astype(np.float32)


def _on_image(heatmap: np.ndarray, image: Image.Image, ensemble: RunEnsemble) -> np.ndarray:
    """A [0, 1] map over the network input as a map over ``image`` whose maximum is again 1 (resampling
    can miss the peak by a little)."""
    return _scaled(to_original(heatmap, image.size, ensemble.meta["preprocess"]), stretch=False)


def explain_image(
    ensemble: RunEnsemble,
    image: Image.Image,
    name: str = "",
    method: str = "gradcam",
    target: str = "default",
) -> Explanation:
    """The heat map of ``image`` for the fold ensemble of a run: ``method`` (one of ``METHODS``) on
    ``target`` ("default"; for HSQformer CAMs also "projector", "cnn", "vit"; for attention
    "stage1" ... "stage4"), averaged over the fold models, at the image's size (W, H), with the
    ensemble's positive-class probability from the same forward passes. Deterministic; thread-safe
    against other explanations, but the models must not run elsewhere during the call (they are hooked).
    """
    what = check_request(ensemble.models, method, target)
    rgb = to_rgb8(image)
    x = ensemble.transform(rgb).unsqueeze(0)
    positive = ensemble.positive_index
    maps: list[np.ndarray] = []
    stage_maps: list[dict[str, np.ndarray]] = []
    probabilities: list[float] = []
    with _LOCK:
        for model in ensemble.models:
            model.eval()
            device_x = x.to(next(model.parameters()).device)
            if method in CAM_METHODS:
                heat, logits, _ = cam_map(model, device_x, method, target, positive)
                maps.append(heat)
            else:
                per_stage, logits = attention_maps(model, device_x)
                stage_maps.append(per_stage)
            probabilities.append(float(logits.float().softmax(dim=1)[0, positive].cpu()))
    parts: dict[str, np.ndarray] = {}
    spread: dict[str, tuple[float, float]] = {}
    if method == "attention":
        keys, _ = attention_stages(ensemble.models[0], target)
        mean = {stage_name(key): np.mean([m[key] for m in stage_maps], axis=0) for key in stage_maps[0]}
        density = np.mean([mean[stage_name(key)] for key in keys], axis=0)
        heatmap = _scaled(density, stretch=True)
        parts = {stage: _on_image(_scaled(value, stretch=True), rgb, ensemble) for stage, value in mean.items()}
        spread = {stage: _range(value) for stage, value in {"heatmap": density, **mean}.items()}
    else:
        heatmap = _scaled(np.mean(maps, axis=0), stretch=False)
    return Explanation(
        image=name,
        probability=float(np.mean(probabilities)),
        heatmap=_on_image(heatmap, rgb, ensemble),
        method=method,
        target=what,
        parts=parts,
        density_range=spread,
    )


def _range(values: np.ndarray) -> tuple[float, float]:
    return float(values.min()), float(values.max())
