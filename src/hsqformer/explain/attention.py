"""HSQformer's own evidence: where its learnable queries look in each stage.

In every query block the queries cross-attend to one stage's latent tokens (``QueryCSMBlock``'s
``cross_attn``); the attention weights, averaged over heads, queries and the stage's blocks, are a
distribution over that stage's token grid. No CAM method gives them: they are the weights the model
itself mixed its evidence with.

The models compute attention with ``F.scaled_dot_product_attention``, which returns no weights.
``recorded_cross_attention`` therefore hooks the query blocks' cross-attention for the duration of
one forward pass and replaces each output by an explicit computation, ``softmax(q k^T / sqrt(d))``
times the values, through the module's own layers: the reported weights are the ones that produced
the prediction, and the logits agree with the fast path (tests/test_explain.py checks both). The
models themselves are not changed.

Each stage's map is returned as a density: the mean weight per token times the number of tokens,
so that 1 is uniform attention at every stage whatever its resolution, and maps of different
stages can be averaged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hsqformer.errors import HSQformerError
from hsqformer.models.backbones import STAGE_STRIDES
from hsqformer.models.csm import Attention
from hsqformer.models.hsqformer import HSQformer

ATTENTION_TARGETS: tuple[str, ...] = ("default", "stage1", "stage2", "stage3", "stage4")


def stage_name(key: str) -> str:
    """The paper's 1-based name of a query stage (model key "0" is stage 1)."""
    return f"stage{int(key) + 1}"


def attention_stages(model: nn.Module, target: str = "default") -> tuple[list[str], str]:
    """The query-stage keys that ``target`` averages, and its name; one-line error for another model."""
    if not isinstance(model, HSQformer) or not len(model.stages):
        raise HSQformerError(
            f"--method attention needs an HSQformer with query stages; this run holds a {type(model).__name__}"
        )
    keys = list(model.stages)
    if target == "default":
        return keys, "mean of stages " + ", ".join(str(int(k) + 1) for k in keys)
    if target not in ATTENTION_TARGETS:
        raise HSQformerError(
            f"unknown --target {target!r} for --method attention; choose one of {', '.join(ATTENTION_TARGETS)}"
        )
    key = str(int(target.removeprefix("stage")) - 1)
    if key not in keys:
        present = ", ".join(stage_name(k) for k in keys)
        raise HSQformerError(f"--target {target}: this HSQformer has no such query stage (it has {present})")
    return [key], f"stage {int(key) + 1}"


def explicit_attention(
    module: Attention, x: torch.Tensor, context: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``module(x, context)`` computed with explicit weights: (output (B, N, D), weights (B, heads, N, M))."""
    b, n, d = x.shape
    m = context.shape[1]
    h = module.num_heads
    q = module.q(x).reshape(b, n, h, d // h).transpose(1, 2)
    k, v = module.kv(context).reshape(b, m, 2, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
    weights = (q @ k.transpose(-2, -1) * (d // h) ** -0.5).softmax(dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, d)
    return module.proj(out), weights


@contextmanager
def recorded_cross_attention(model: HSQformer) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Within the block, each forward pass records every query block's cross-attention weights
    (stage key -> one (B, heads, queries, tokens) tensor per block) and uses them for the output."""
    recorded: dict[str, list[torch.Tensor]] = {key: [] for key in model.stages}

    def hook_for(key: str):
        def hook(module: Attention, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            out, weights = explicit_attention(module, args[0], args[1])
            recorded[key].append(weights.detach())
            return out

        return hook

    handles = [
        block.cross_attn.register_forward_hook(hook_for(key))
        for key, stage in model.stages.items()
        for block in stage.blocks
    ]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def attention_maps(model: HSQformer, x: torch.Tensor) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """Each query stage's attention density over one preprocessed image ``x`` (1, 3, H, W), bilinearly
    upsampled to (H, W) (stage key -> map), and the logits (1, classes) of the same forward pass."""
    attention_stages(model)
    h, w = x.shape[-2:]
    with torch.no_grad(), recorded_cross_attention(model) as recorded:
        logits = model(x)
    maps = {}
    for key, per_block in recorded.items():
        stride = STAGE_STRIDES[int(key)]
        grid = (h // stride, w // stride)
        weights = torch.stack(per_block).mean(dim=(0, 2, 3))  # over blocks, heads and queries: (B, tokens)
        density = weights.reshape(1, 1, *grid) * weights.shape[-1]
        upsampled = F.interpolate(density.float(), size=(h, w), mode="bilinear", align_corners=False)
        maps[key] = upsampled[0, 0].cpu().numpy()
    return maps, logits.detach()
