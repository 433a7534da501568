"""MPViT: Multi-Path Vision Transformer (Lee et al., "MPViT: Multi-Path Vision Transformer
for Dense Prediction", CVPR 2022), a baseline of the paper's Table 2.

Written from the paper's description:

* conv stem: two 3x3 convolutions with stride 2 (C1/2 then C1 channels), each followed
  by BatchNorm and Hardswish, giving an H/4 x W/4 map;
* four stages; stage ``i`` has ``P_i`` paths (2 in stage 1, 3 in stages 2-4).
  Multi-scale patch embedding: ``P_i`` depthwise-separable 3x3 convolutions
  (depthwise, pointwise, BatchNorm, Hardswish) applied one after another, so that path
  ``p`` sees a (2p+3)x(2p+3) receptive field; the first one has stride 2 in stages 2-4;
* each path's tokens pass through a transformer encoder: a convolutional position
  encoding (3x3 depthwise, residual, shared by the encoder's layers) before every
  layer, then pre-norm factorized attention with convolutional relative position
  encoding (CoaT's ``q * DWConv(v)`` term; kernels 3/5/7 for 2/3/3 of the 8 heads),
  then a pre-norm MLP;
* a local path: an inverted residual block (1x1 conv, 3x3 depthwise conv, 1x1 conv,
  BatchNorm and Hardswish) on the first embedding;
* global-to-local feature interaction: the local map and the ``P_i`` encoder outputs are
  concatenated along channels and a 1x1 conv (BatchNorm, Hardswish) aggregates them
  into the next stage's width (the last stage keeps its width);
* head: global average pooling, linear classifier.

Variants (paper Table 1; parameters and FLOPs at 224 from its Table 2):
MPViT-T widths 64-96-176-216, layers 1-2-4-1, MLP ratio 2 (5.8M, 1.6G);
MPViT-XS 64-128-192-256, layers 1-2-4-1, MLP ratio 4 (10.5M, 2.9G);
MPViT-S 64-128-216-288, layers 1-3-6-3, MLP ratio 4 (22.8M, 4.7G);
MPViT-B 128-224-368-480, layers 1-3-8-3, MLP ratio 4 (74.8M, 16.4G);
all with 8 heads and 2-3-3-3 paths.

``features_only`` gives the four stage outputs (NCHW, strides 4, 8, 16, 32; a stage's
output already has the next stage's width). Any input size divisible by 32 works.

Original checkpoint layout assumed by ``checkpoint_filter_fn`` (the module names of
the authors' ``MPViT`` release: ``stem.{0,1}`` = Conv2d_BN with ``conv``/``bn``;
``patch_embed_stages.{i}.patch_embeds.{p}.patch_conv`` with ``dwconv``, ``pwconv``,
``bn``; ``mhca_stages.{i}`` with ``mhca_blks.{p}`` (``cpe.proj``,
``crpe.conv_list.{k}``, ``MHCA_layers.{j}`` with ``factoratt_crpe.qkv/proj``,
``norm1``, ``norm2``, ``mlp.fc1/fc2``), ``InvRes`` (``conv1``, ``dwconv``, ``norm``,
``conv2``) and ``aggregate``; classifier ``cls_head``). The original layers keep
references to their encoder's shared ``cpe``/``crpe``, so its state dict repeats those
tensors under the layers' names; the copies are dropped. Mapping:

* ``stem.{0,1}.conv`` / ``.bn``: same names;
* ``patch_embed_stages.{i}.patch_embeds.{p}.patch_conv.{dwconv,pwconv,bn}`` ->
  ``stages.{i}.patch_embed.paths.{p}.{conv_dw,conv_pw,bn}``;
* ``mhca_stages.{i}.mhca_blks.{p}.cpe`` / ``.crpe.conv_list`` ->
  ``stages.{i}.encoders.{p}.cpe`` / ``.crpe.convs``;
* ``mhca_stages.{i}.mhca_blks.{p}.MHCA_layers.{j}.{factoratt_crpe,norm1,norm2,mlp}`` ->
  ``stages.{i}.encoders.{p}.blocks.{j}.{attn,norm1,norm2,mlp}``;
* ``mhca_stages.{i}.InvRes.{conv1,dwconv,norm,conv2}`` -> ``stages.{i}.local.{conv1,conv_dw,bn,conv2}``;
* ``mhca_stages.{i}.aggregate`` -> ``stages.{i}.aggregate``; ``cls_head`` -> ``head.fc``.

No weights are on the timm hub: download a release file of the original repository and
convert it once to this layout (``checkpoint_filter_fn`` runs inside timm's loader)::

    import timm, torch, hsqformer
    from safetensors.torch import save_model
    # weights_only=False only for a file you trust (e.g. one that also pickles training arguments)
    state = torch.load("mpvit_base.pth", map_location="cpu", weights_only=True)
    model = timm.create_model("mpvit_base", pretrained=True, pretrained_cfg_overlay=dict(state_dict=state))
    save_model(model, "mpvit_base.safetensors")

then fine-tune with ``--set model.pretrained=mpvit_base.safetensors``, or use the file
as an HSQformer backbone (``pretrained_backbones``), which takes either layout.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    BatchNormAct2d,
    ClassifierHead,
    ConvNormAct,
    DropPath,
    Mlp,
    calculate_drop_path_rates,
    trunc_normal_,
)
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

from hsqformer.models.backbones import build_release_pyramid, model_weights

__all__ = ["MPViT", "checkpoint_filter_fn"]

Size = tuple[int, int]

CRPE_WINDOWS = {3: 2, 5: 3, 7: 3}
"""Kernel size -> number of heads of the convolutional relative position encoding."""


class DWConvPatchEmbed(nn.Module):
    """Depthwise-separable patch embedding: k x k depthwise conv (stride s), 1x1 conv, BatchNorm, Hardswish."""

    def __init__(self, dim: int, kernel_size: int = 3, stride: int = 1, act_layer: type[nn.Module] = nn.Hardswish):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size, stride, kernel_size // 2, groups=dim, bias=False)
        self.conv_pw = nn.Conv2d(dim, dim, 1, bias=False)
        self.bn = BatchNormAct2d(dim, act_layer=act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv_pw(self.conv_dw(x)))


class MultiScalePatchEmbed(nn.Module):
    """``num_paths`` chained 3x3 embeddings; returns every intermediate map (growing receptive field)."""

    def __init__(self, dim: int, num_paths: int, stride: int) -> None:
        super().__init__()
        self.paths = nn.ModuleList(DWConvPatchEmbed(dim, 3, stride if p == 0 else 1) for p in range(num_paths))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for path in self.paths:
            x = path(x)
            maps.append(x)
        return maps


class ConvPosEnc(nn.Module):
    """Convolutional position encoding: tokens + 3x3 depthwise conv of their map."""

    def __init__(self, dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        b, n, c = x.shape
        feat = x.transpose(1, 2).reshape(b, c, *size)
        return x + self.proj(feat).flatten(2).transpose(1, 2)


class ConvRelPosEnc(nn.Module):
    """Convolutional relative position encoding (CoaT): q * DWConv(v), kernels split by heads."""

    def __init__(self, head_dim: int, num_heads: int, windows: Mapping[int, int] = CRPE_WINDOWS) -> None:
        super().__init__()
        if sum(windows.values()) != num_heads:
            raise ValueError(
                f"relative position windows {dict(windows)} cover {sum(windows.values())} of {num_heads} heads"
            )
        self.convs = nn.ModuleList(
            nn.Conv2d(h * head_dim, h * head_dim, k, padding=k // 2, groups=h * head_dim) for k, h in windows.items()
        )
        self.splits = [h * head_dim for h in windows.values()]

    def forward(self, q: torch.Tensor, v: torch.Tensor, size: Size) -> torch.Tensor:
        """q, v: (B, heads, N, head_dim) -> (B, heads, N, head_dim)."""
        b, h, n, d = v.shape
        v_img = v.transpose(2, 3).reshape(b, h * d, *size)
        conv_v = torch.cat([conv(part) for conv, part in zip(self.convs, v_img.split(self.splits, dim=1))], dim=1)
        return q * conv_v.reshape(b, h, d, n).transpose(2, 3)


class FactorizedAttention(nn.Module):
    """Factorized attention ``q (softmax_N(k)^T v) / sqrt(d)`` plus the conv relative position term."""

    def __init__(
        self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, size: Size, crpe: ConvRelPosEnc) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        context = self.attn_drop(k.softmax(dim=2).transpose(-2, -1) @ v)  # (B, h, d, d)
        x = self.scale * (q @ context) + crpe(q, v, size)
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class MHCABlock(nn.Module):
    """Pre-norm transformer layer with factorized conv attention; the encoder applies the shared CPE first."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = FactorizedAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, size: Size, crpe: ConvRelPosEnc) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), size, crpe))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MHCAEncoder(nn.Module):
    """One path's transformer encoder: CPE before each layer; CPE and CRPE shared by the layers."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float, drop_paths: Sequence[float], **kwargs):
        super().__init__()
        self.cpe = ConvPosEnc(dim)
        self.crpe = ConvRelPosEnc(dim // num_heads, num_heads)
        self.blocks = nn.ModuleList(
            MHCABlock(dim, num_heads, mlp_ratio, drop_path=drop_paths[j], **kwargs) for j in range(depth)
        )
        self.grad_checkpointing = False

    def _layer(self, block: MHCABlock, x: torch.Tensor, size: Size) -> torch.Tensor:
        return block(self.cpe(x, size), size, self.crpe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(self._layer, block, x, (h, w), use_reentrant=False)
            else:
                x = self._layer(block, x, (h, w))
        return x.transpose(1, 2).reshape(b, c, h, w)


class InvertedResidual(nn.Module):
    """Local path: x + (1x1 conv-BN-Hardswish, 3x3 depthwise conv-BN-Hardswish, 1x1 conv-BN)(x)."""

    def __init__(self, dim: int, act_layer: type[nn.Module] = nn.Hardswish) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(dim, dim, 1, act_layer=act_layer)
        self.conv_dw = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim, bias=False)
        self.bn = BatchNormAct2d(dim, act_layer=act_layer)
        self.conv2 = ConvNormAct(dim, dim, 1, apply_act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.bn(self.conv_dw(self.conv1(x))))


class MPViTStage(nn.Module):
    """Multi-scale patch embedding, one encoder per path plus the local path, 1x1 aggregation."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        depth: int,
        num_paths: int,
        num_heads: int,
        mlp_ratio: float,
        stride: int,
        drop_paths: Sequence[float],
        **kwargs,
    ) -> None:
        super().__init__()
        self.patch_embed = MultiScalePatchEmbed(dim, num_paths, stride)
        self.local = InvertedResidual(dim)
        self.encoders = nn.ModuleList(
            MHCAEncoder(dim, depth, num_heads, mlp_ratio, drop_paths, **kwargs) for _ in range(num_paths)
        )
        self.aggregate = ConvNormAct(dim * (num_paths + 1), out_dim, 1, act_layer=nn.Hardswish)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.patch_embed(x)
        outs = [self.local(maps[0])] + [encoder(m) for encoder, m in zip(self.encoders, maps)]
        return self.aggregate(torch.cat(outs, dim=1))


class MPViT(nn.Module):
    """Multi-Path Vision Transformer classifier: conv stem, four multi-path stages, pooled linear head."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        embed_dims: Sequence[int] = (64, 128, 216, 288),
        depths: Sequence[int] = (1, 3, 6, 3),
        num_paths: Sequence[int] = (2, 3, 3, 3),
        num_heads: Sequence[int] = (8, 8, 8, 8),
        mlp_ratios: Sequence[float] = (4, 4, 4, 4),
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        num_stages = len(embed_dims)
        if not len(depths) == len(num_paths) == len(num_heads) == len(mlp_ratios) == num_stages:
            raise ValueError("embed_dims, depths, num_paths, num_heads and mlp_ratios need one entry per stage")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.num_features = self.head_hidden_size = embed_dims[-1]

        self.stem = nn.Sequential(
            ConvNormAct(in_chans, embed_dims[0] // 2, 3, stride=2, act_layer=nn.Hardswish),
            ConvNormAct(embed_dims[0] // 2, embed_dims[0], 3, stride=2, act_layer=nn.Hardswish),
        )
        drop_paths = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        stages = []
        self.feature_info = []
        for i in range(num_stages):
            out_dim = embed_dims[min(i + 1, num_stages - 1)]
            stages.append(
                MPViTStage(
                    embed_dims[i],
                    out_dim,
                    depths[i],
                    num_paths[i],
                    num_heads[i],
                    mlp_ratios[i],
                    stride=1 if i == 0 else 2,
                    drop_paths=drop_paths[i],
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                )
            )
            self.feature_info.append(dict(num_chs=out_dim, reduction=4 * 2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
            nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [(r"^stages\.(\d+)\.patch_embed", (0,)), (r"^stages\.(\d+)\.(local|encoders|aggregate)", None)],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for module in self.modules():
            if isinstance(module, MHCAEncoder):
                module.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head.reset(num_classes, pool_type=global_pool)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Final features and the stage outputs picked by ``indices`` (NCHW; MPViT has no final norm)."""
        if output_fmt != "NCHW":
            raise ValueError("output_fmt must be NCHW")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        intermediates = []
        x = self.stem(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[: max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.head = ClassifierHead(self.num_features, 0, pool_type="")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> final map (B, C4, H/32, W/32)."""
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_SHARED_COPY = re.compile(r"\.MHCA_layers\.\d+\.(cpe|crpe|factoratt_crpe\.crpe)\.")


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: MPViT) -> dict[str, torch.Tensor]:
    """Rename a checkpoint of the original MPViT repository onto this module's layout.

    A training checkpoint's EMA weights (``model_ema``) are preferred to its ``model``.

    Drops the repeated references of the shared CPE/CRPE; a checkpoint already in this
    layout passes unchanged (``module.`` prefixes are removed either way).
    """
    state_dict = {k.removeprefix("module."): v for k, v in model_weights(state_dict).items()}
    if any(k.startswith("stages.") for k in state_dict):
        return dict(state_dict)
    out = {}
    for key, value in state_dict.items():
        if _SHARED_COPY.search(key):
            continue
        key = re.sub(
            r"^patch_embed_stages\.(\d+)\.patch_embeds\.(\d+)\.patch_conv\.", r"stages.\1.patch_embed.paths.\2.", key
        )
        key = re.sub(r"(patch_embed\.paths\.\d+)\.dwconv\.", r"\1.conv_dw.", key)
        key = re.sub(r"(patch_embed\.paths\.\d+)\.pwconv\.", r"\1.conv_pw.", key)
        key = re.sub(r"^mhca_stages\.(\d+)\.mhca_blks\.", r"stages.\1.encoders.", key)
        key = re.sub(r"\.crpe\.conv_list\.", ".crpe.convs.", key)
        key = re.sub(r"\.MHCA_layers\.(\d+)\.factoratt_crpe\.", r".blocks.\1.attn.", key)
        key = re.sub(r"\.MHCA_layers\.", ".blocks.", key)
        key = re.sub(r"^mhca_stages\.(\d+)\.InvRes\.dwconv\.", r"stages.\1.local.conv_dw.", key)
        key = re.sub(r"^mhca_stages\.(\d+)\.InvRes\.norm\.", r"stages.\1.local.bn.", key)
        key = re.sub(r"^mhca_stages\.(\d+)\.InvRes\.", r"stages.\1.local.", key)
        key = re.sub(r"^mhca_stages\.(\d+)\.aggregate\.", r"stages.\1.aggregate.", key)
        key = re.sub(r"^cls_head\.", "head.fc.", key)
        out[key] = value
    return out


def _create_mpvit(variant: str, pretrained: bool = False, **kwargs) -> MPViT:
    return build_release_pyramid(MPViT, variant, pretrained, "MPViT", **kwargs)


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0.conv",
        "classifier": "head.fc",
        "license": "bsd-3-clause",
        "paper_ids": "arXiv:2112.11010",
        "origin_url": "https://github.com/youngwanLEE/MPViT",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "mpvit_tiny.untrained": _cfg(),
        "mpvit_xsmall.untrained": _cfg(),
        "mpvit_small.untrained": _cfg(),
        "mpvit_base.untrained": _cfg(),
    }
)

VARIANTS: dict[str, dict] = {
    "mpvit_tiny": dict(embed_dims=(64, 96, 176, 216), depths=(1, 2, 4, 1), mlp_ratios=(2, 2, 2, 2)),
    "mpvit_xsmall": dict(embed_dims=(64, 128, 192, 256), depths=(1, 2, 4, 1), mlp_ratios=(4, 4, 4, 4)),
    "mpvit_small": dict(embed_dims=(64, 128, 216, 288), depths=(1, 3, 6, 3), mlp_ratios=(4, 4, 4, 4)),
    "mpvit_base": dict(embed_dims=(128, 224, 368, 480), depths=(1, 3, 8, 3), mlp_ratios=(4, 4, 4, 4)),
}


def _variant(name: str, pretrained: bool, **kwargs) -> MPViT:
    defaults = {"num_paths": (2, 3, 3, 3), "num_heads": (8, 8, 8, 8)}
    return _create_mpvit(name, pretrained, **{**defaults, **VARIANTS[name], **kwargs})


@register_model
def mpvit_tiny(pretrained: bool = False, **kwargs) -> MPViT:
    """MPViT-T: widths 64-96-176-216, layers 1-2-4-1, MLP ratio 2 (5.8M params, 1.6 GMACs)."""
    return _variant("mpvit_tiny", pretrained, **kwargs)


@register_model
def mpvit_xsmall(pretrained: bool = False, **kwargs) -> MPViT:
    """MPViT-XS: widths 64-128-192-256, layers 1-2-4-1, MLP ratio 4 (10.5M params, 2.9 GMACs)."""
    return _variant("mpvit_xsmall", pretrained, **kwargs)


@register_model
def mpvit_small(pretrained: bool = False, **kwargs) -> MPViT:
    """MPViT-S: widths 64-128-216-288, layers 1-3-6-3, MLP ratio 4 (22.8M params, 4.7 GMACs)."""
    return _variant("mpvit_small", pretrained, **kwargs)


@register_model
def mpvit_base(pretrained: bool = False, **kwargs) -> MPViT:
    """MPViT-B: widths 128-224-368-480, layers 1-3-8-3, MLP ratio 4 (74.8M params, 16.4 GMACs)."""
    return _variant("mpvit_base", pretrained, **kwargs)
