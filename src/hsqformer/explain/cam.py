"""Grad-CAM, Grad-CAM++ and HiResCAM (the ``grad-cam`` package) on every kind of model a run can hold.

What is explained is the log-odds of the positive class, ``z_pos - logsumexp(z_other)``: a monotone
function of the probability the command reports (for two classes it is ``z_pos - z_neg``), which,
unlike the probability itself, does not saturate, and which, unlike the positive logit alone,
ignores what raises every class's logit alike.

Target layers (``target_layers``):

* HSQformer, ``"projector"`` (the default): the last projector block, whose output is the stride-32
  latent tokens that the last query stage cross-attends to. It is the last layer at which the
  evidence is still laid out on the image grid, and it holds both backbones' evidence fused; a
  backbone's last stage holds half of it. ``"cnn"`` / ``"vit"``: that backbone's stride-32 stage.
  A model without query stages (the backbones-only ablation) falls back to ``"cnn"``.
* any other timm model: its last feature stage (``feature_info[-1]``); a token-pooled ViT the
  input of its last block's attention instead (its last block's patch-token outputs reach no
  classifier, so their gradient is zero); ThyNet every member's last stage (grad-cam averages them).

Token maps (B, N, C), channels-last maps (B, H, W, C) (Swin, CSWin) and channels-first maps are all
brought to (B, C, H, W) by ``reshape_transform``; prefix tokens (class, register) are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from hsqformer.errors import HSQformerError
from hsqformer.models.backbones import STAGE_STRIDES
from hsqformer.models.hsqformer import HSQformer

HSQFORMER_TARGETS: tuple[str, ...] = ("default", "projector", "cnn", "vit")


@dataclass(frozen=True)
class TargetLayers:
    """The modules Grad-CAM hooks, with what is needed to read their outputs as (B, C, H, W) maps."""

    modules: list[nn.Module]
    channels: frozenset[int]  # the channel count(s) of the maps, to tell their layout
    stride: int  # input pixels per map cell (for token maps)
    name: str  # shown to the user, e.g. "projector stage 4"


class PositiveLogOdds:
    """A grad-cam target: the log-odds of class ``index`` from one image's logits."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        others = torch.cat((logits[: self.index], logits[self.index + 1 :]))
        return logits[self.index] - torch.logsumexp(others, dim=0)


def cam_class(method: str) -> type:
    """The grad-cam class of a CAM method name."""
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM

    classes = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "hirescam": HiResCAM}
    if method not in classes:
        raise HSQformerError(f"unknown CAM method {method!r}; choose one of {', '.join(classes)}")
    return classes[method]


def _submodule(model: nn.Module, name: str) -> nn.Module:
    """``model``'s submodule ``name``; timm's feature wrappers store "stages.3" as "stages_3"."""
    for candidate in (name, name.replace(".", "_")):
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    raise HSQformerError(f"{type(model).__name__} has no module {name!r} for Grad-CAM")


def _backbone_stage(backbone: nn.Module, which: str) -> TargetLayers:
    index = backbone.stage_indices[3]
    module_name = backbone.feature_info.module_name()[index]
    return TargetLayers(
        [_submodule(backbone, module_name)],
        frozenset({backbone.stage_channels[3]}),
        32,
        f"{which} stage 4 ({module_name})",
    )


def _hsqformer_layers(model: nn.Module, target: str) -> TargetLayers:
    if target not in HSQFORMER_TARGETS:
        raise HSQformerError(
            f"unknown --target {target!r} for an HSQformer; choose one of {', '.join(HSQFORMER_TARGETS)}"
        )
    if target in ("default", "projector") and len(model.projector):
        key = list(model.projector)[-1]
        return TargetLayers(
            [model.projector[key]],
            frozenset({model.embed_dim}),
            STAGE_STRIDES[int(key)],
            f"projector stage {int(key) + 1}",
        )
    if target == "projector":
        raise HSQformerError("--target projector: this HSQformer has no query stages, hence no projector")
    return _backbone_stage(model.vit if target == "vit" else model.cnn, target if target != "default" else "cnn")


def _timm_layers(model: nn.Module, target: str) -> TargetLayers:
    if target != "default":
        raise HSQformerError(f"--target {target!r} is for HSQformer runs; a {type(model).__name__} has only 'default'")
    members = getattr(model, "members", None)
    if isinstance(members, nn.ModuleDict) and not hasattr(model, "feature_info"):
        parts = [_timm_layers(member, "default") for member in members.values()]
        return TargetLayers(
            [m for part in parts for m in part.modules],
            frozenset(c for part in parts for c in part.channels),
            parts[0].stride,
            "last stage of each member (" + ", ".join(members) + ")",
        )
    info = getattr(model, "feature_info", None)
    if not info:
        raise HSQformerError(f"{type(model).__name__} has no feature_info: cannot find its last feature stage")
    last = info[-1]
    module_name = last["module"]
    if getattr(model, "num_prefix_tokens", 0) and getattr(model, "global_pool", "") == "token":
        module_name = f"{module_name}.norm1"
    return TargetLayers(
        [_submodule(model, module_name)], frozenset({int(last["num_chs"])}), int(last["reduction"]), module_name
    )


def target_layers(model: nn.Module, target: str = "default") -> TargetLayers:
    """The layer(s) whose maps Grad-CAM weighs for ``model`` (module docstring); one-line error for a bad target."""
    if isinstance(model, HSQformer):
        return _hsqformer_layers(model, target)
    return _timm_layers(model, target)


def reshape_transform(
    channels: frozenset[int], grid: tuple[int, int]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A grad-cam ``reshape_transform``: any of the layouts above to (B, C, H, W)."""

    def to_nchw(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.ndim == 3:
            h, w = grid
            if tensor.shape[1] < h * w:
                raise HSQformerError(f"a token map of {tensor.shape[1]} tokens cannot fill a {h}x{w} grid")
            tokens = tensor[:, tensor.shape[1] - h * w :]
            return tokens.reshape(tensor.shape[0], h, w, tensor.shape[2]).permute(0, 3, 1, 2)
        if tensor.ndim == 4 and tensor.shape[1] in channels:
            return tensor
        if tensor.ndim == 4 and tensor.shape[-1] in channels:
            return tensor.permute(0, 3, 1, 2)
        raise HSQformerError(f"cannot read a layer output of shape {tuple(tensor.shape)} as a feature map")

    return to_nchw


@contextmanager
def gradient_only_above(model: nn.Module, modules: Sequence[nn.Module]) -> Iterator[None]:
    """Within the block, autograd records only what lies above ``modules``, the target layers.

    Grad-CAM needs the gradient at the target layer and nothing else. The outputs of ``modules``
    become the only leaves that require a gradient (the parameters are frozen meanwhile and restored
    afterwards), so that neither the forward pass records nor the backward pass runs through the
    layers below them or through any path that does not reach them: for HSQformer's projector, the
    backbones and the earlier query stages, nearly all of the cost. The gradient at the target layer
    is unchanged. The hooks run before grad-cam's, which are registered later.
    """

    def leaf(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return output.detach().requires_grad_(True)

    frozen = [p for p in model.parameters() if p.requires_grad]
    handles = [module.register_forward_hook(leaf) for module in modules]
    try:
        for p in frozen:
            p.requires_grad_(False)
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for handle in handles:
            handle.remove()


def cam_map(
    model: nn.Module, x: torch.Tensor, method: str, target: str, positive_index: int
) -> tuple[np.ndarray, torch.Tensor, str]:
    """One model's CAM of one preprocessed image ``x`` (1, 3, H, W).

    Returns the map at the input's size (H, W) in [0, 1] (grad-cam scales each map by its own range),
    the logits (1, classes) of the same forward pass and the target layer's name. The model is left
    as it was (no ``.grad``, no hooks, the same ``requires_grad``).
    """
    layers = target_layers(model, target)
    grid = (x.shape[-2] // layers.stride, x.shape[-1] // layers.stride)
    with gradient_only_above(model, layers.modules):
        cam = cam_class(method)(model, layers.modules, reshape_transform=reshape_transform(layers.channels, grid))
        try:
            with torch.inference_mode(False), torch.enable_grad():
                heat = cam(input_tensor=x, targets=[PositiveLogOdds(positive_index)])
                logits = cam.outputs.detach()
        finally:
            cam.activations_and_grads.release()
            _drop_graph(model)
    return heat[0].astype(np.float32), logits, layers.name


def _drop_graph(model: nn.Module) -> None:
    """Detach what a forward pass leaves on the model (HSQformer's MoE ``aux_loss``), so that the model
    holds no autograd graph after an explanation (it would keep activations alive and block deepcopy)."""
    if isinstance(model, HSQformer):
        for layer in model.moe_layers():
            if layer.aux_loss is not None:
                layer.aux_loss = layer.aux_loss.detach()
