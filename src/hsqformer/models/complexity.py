"""Model size and cost: total and active parameters, FLOPs per component."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from hsqformer.models.moe import MoE


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}
"""torch's counter knows the CUDA attention kernels only; these add the CPU ones.

They count from the shapes of queries and keys, so they also hold for the projector's
cheaper attentions (``projector_attn``): spatial-reduction attention is counted with its
pooled keys (N x 49 instead of N x N), window attention per window with a key mask (the
mask does not change the work), including the zero-padded tokens, which are computed."""


@dataclass(frozen=True)
class ParameterCount:
    """``active`` counts, for each sparse MoE layer, only the k experts a token uses,
    and leaves out the router-noise weights, which act only in training."""

    total: int
    active: int


def count_parameters(model: nn.Module) -> ParameterCount:
    """Total parameters, and parameters active for one token at inference."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for module in model.modules():
        if not isinstance(module, MoE) or module.router is None:
            continue
        if module.router.noise is not None:
            inactive += module.router.noise.weight.numel()
        if module.mode == "sparse":
            per_expert = sum(p.numel() for p in module.experts[0].parameters())
            inactive += (module.num_experts - module.top_k) * per_expert
    return ParameterCount(total=total, active=total - inactive)


def count_flops(model: nn.Module, img_size: int | tuple[int, int] = 224, batch_size: int = 1) -> dict[str, int]:
    """FLOPs (2 per multiply-add) of one eval forward pass, by top-level child module.

    Uses ``torch.utils.flop_counter``, which counts matrix products, convolutions
    and attention; element-wise work (norms, activations, the average pooling of
    spatial-reduction attention) is not counted. The key
    ``"total"`` holds the sum; sparse MoE layers count only the tokens actually
    dispatched to each expert.
    """
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, depth=3, custom_mapping=CPU_ATTENTION_FLOPS)
    try:
        with counter:
            model(torch.randn(batch_size, 3, h, w))
    finally:
        model.train(was_training)
    per_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    flops = {"total": counter.get_total_flops()}
    root = type(model).__name__
    for name, _ in model.named_children():
        prefix = f"{root}.{name}"
        if prefix in per_module:
            flops[name] = per_module[prefix]
        else:
            flops[name] = sum(v for k, v in per_module.items() if k.startswith(prefix + ".") and k.count(".") == 2)
    return flops


def projector_flops(model: nn.Module, img_size: int | tuple[int, int] = 224, batch_size: int = 1) -> dict[str, int]:
    """FLOPs of an HSQformer's projector alone, per stage (keys "0".."3") and ``"total"``.

    Runs only the projector's CSM blocks, on random tokens of the shape the backbones give
    at ``img_size`` (stage i: (H / 4 / 2^i) x (W / 4 / 2^i) tokens), so it takes a fraction of
    ``count_flops``'s time; the counts are the same as ``count_flops(model)["projector"]``'s.
    """
    from hsqformer.models.backbones import STAGE_STRIDES

    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    was_training = model.training
    model.eval()
    flops: dict[str, int] = {}
    try:
        for key, block in model.projector.items():
            i = int(key)
            size = (h // STAGE_STRIDES[i], w // STAGE_STRIDES[i])
            n = size[0] * size[1]
            cnn = torch.randn(batch_size, n, model.cnn.stage_channels[i])
            vit = torch.randn(batch_size, n, model.vit.stage_channels[i])
            counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
            with counter, torch.no_grad():
                block(cnn, vit, size)
            flops[key] = counter.get_total_flops()
    finally:
        model.train(was_training)
    flops["total"] = sum(flops.values())
    return flops
