"""CSWin Transformer (Dong et al., "CSWin Transformer: A General Vision Transformer
Backbone with Cross-Shaped Windows", CVPR 2022), a baseline of the paper's Table 2.

Written from the paper's description:

* convolutional token embedding: a 7x7 convolution with stride 4 (padding 2) and
  LayerNorm, giving H/4 x W/4 tokens of C channels;
* four stages of CSWin blocks, the stage-``i`` width is ``C * 2**i``; between stages a
  3x3 convolution with stride 2 halves the resolution and doubles the channels,
  followed by LayerNorm;
* a CSWin block is pre-norm: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))`` (ratio 4);
* cross-shaped window self-attention: one linear layer gives q, k, v; the channels
  (and heads) are split in two halves, the first attends within vertical stripes of
  width ``sw``, the second within horizontal stripes of height ``sw`` (``sw`` = 1, 2, 7, 7
  per stage at 224 pixels); the two halves are concatenated and projected. The last
  stage (7x7 tokens) attends over the whole map with all heads;
* locally-enhanced positional encoding (LePE): a 3x3 depthwise convolution of V,
  computed inside each stripe, is added to the attention output;
* head: LayerNorm, global average pooling over tokens, linear classifier.

Variants (paper Table 1; parameters and FLOPs at 224 from its Table 2):
CSWin-T C=64, depths 1-2-21-1, heads 2-4-8-16 (23M, 4.3G);
CSWin-S C=64, depths 2-4-32-2, heads 2-4-8-16 (35M, 6.9G);
CSWin-B C=96, depths 2-4-32-2, heads 4-8-16-32 (78M, 15.0G);
CSWin-L C=144, depths 2-4-32-2, heads 6-12-24-24 (173M, 31.5G).

Tokens are kept as NHWC maps (like timm's Swin), so ``features_only`` gives the four
stage maps at strides 4, 8, 16 and 32 (NHWC) and the model can serve as an HSQformer
backbone. Stripe widths are fixed per stage, so the inputs' height and width must make
every stage's map divisible by its stripe width (any multiple of 224 / 32 * 7 = 224 does;
so do 112 and 448 among the usual sizes; the last stage takes any size).

Original checkpoint layout assumed by ``checkpoint_filter_fn`` (the module names of
the authors' ``CSWinTransformer`` release: ``stage1_conv_embed`` = Conv2d, Rearrange,
LayerNorm; ``stage{1..4}`` lists of blocks with ``qkv``, ``norm1``, ``proj``,
``attns.{0,1}.get_v`` (the LePE convolution), ``norm2``, ``mlp.fc1``/``mlp.fc2``;
``merge{1..3}`` with ``conv`` and ``norm``; final ``norm`` and ``head``). Mapping:

=====================================  =========================================
original                               here
=====================================  =========================================
``stage1_conv_embed.0`` / ``.2``       ``stem.conv`` / ``stem.norm``
``stage{s}.{j}.qkv`` / ``.proj``       ``stages.{s-1}.blocks.{j}.attn.qkv`` / ``.attn.proj``
``stage{s}.{j}.attns.{b}.get_v``       ``stages.{s-1}.blocks.{j}.attn.branches.{b}.lepe``
``stage{s}.{j}.norm1/norm2/mlp``       ``stages.{s-1}.blocks.{j}.norm1/norm2/mlp``
``merge{s}.conv`` / ``.norm``          ``stages.{s}.downsample.conv`` / ``.norm``
``norm`` / ``head``                    ``norm`` / ``head.fc``
=====================================  =========================================

No weights are on the timm hub: download a release file of the original repository and
convert it once to this layout (``checkpoint_filter_fn`` runs inside timm's loader)::

    import timm, torch, hsqformer
    from safetensors.torch import save_model
    # weights_only=False only for a file you trust (e.g. one that also pickles training arguments)
    state = torch.load("cswin_base_224.pth", map_location="cpu", weights_only=True)
    model = timm.create_model("cswin_base_224", pretrained=True, pretrained_cfg_overlay=dict(state_dict=state))
    save_model(model, "cswin_base_224.safetensors")

then fine-tune with ``--set model.pretrained=cswin_base_224.safetensors``, or use the file
as an HSQformer backbone (``pretrained_backbones``), which takes either layout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, Mlp, calculate_drop_path_rates, trunc_normal_, use_fused_attn
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from hsqformer.models.backbones import build_release_pyramid, model_weights

__all__ = ["CSWinTransformer", "checkpoint_filter_fn"]


def _stripes(x: torch.Tensor, sh: int, sw: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/sh * W/sw, sh * sw, C): the tokens of each stripe."""
    b, h, w, c = x.shape
    x = x.view(b, h // sh, sh, w // sw, sw, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, sh * sw, c)


def _unstripe(x: torch.Tensor, sh: int, sw: int, b: int, h: int, w: int) -> torch.Tensor:
    """Inverse of ``_stripes``."""
    c = x.shape[-1]
    x = x.view(b, h // sh, w // sw, sh, sw, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


class StripeAttention(nn.Module):
    """Multi-head self-attention inside vertical or horizontal stripes, plus LePE.

    ``orientation`` "vertical": stripes of ``split_size`` columns spanning the full
    height (the original's branch 0); "horizontal": stripes of ``split_size`` rows
    spanning the full width (branch 1); None: the whole map (last stage).
    LePE is a 3x3 depthwise convolution of V computed inside each stripe (zero-padded
    at the stripe's borders) and added to the attention output.
    """

    def __init__(
        self, dim: int, num_heads: int, split_size: int, orientation: str | None, attn_drop: float = 0.0
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.split_size = split_size
        if orientation not in ("vertical", "horizontal", None):
            raise ValueError(f"orientation must be 'vertical', 'horizontal' or None, got {orientation!r}")
        self.orientation = orientation
        self.attn_drop = attn_drop
        self.fused_attn = use_fused_attn()
        self.lepe = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def stripe_shape(self, h: int, w: int) -> tuple[int, int]:
        if self.orientation is None:
            return h, w
        sh, sw = (h, self.split_size) if self.orientation == "vertical" else (self.split_size, w)
        if h % sh or w % sw:
            raise ValueError(
                f"CSWin: a {h}x{w} token map cannot be cut into stripes of {self.split_size}; "
                "use an input size whose stage maps divide by the stripe widths (e.g. 224)"
            )
        return sh, sw

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: (B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = q.shape
        sh, sw = self.stripe_shape(h, w)
        q, k, v = (_stripes(t, sh, sw) for t in (q, k, v))
        n = q.shape[0]
        lepe = self.lepe(v.transpose(1, 2).reshape(n, c, sh, sw)).flatten(2).transpose(1, 2)
        q, k, v = (t.view(n, sh * sw, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = F.dropout(attn.softmax(dim=-1), self.attn_drop, self.training)
            x = attn @ v
        x = x.transpose(1, 2).reshape(n, sh * sw, c) + lepe
        return _unstripe(x, sh, sw, b, h, w)


class CrossShapedWindowAttention(nn.Module):
    """Half the heads attend in horizontal stripes, half in vertical ones; or one full-map branch."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        split_size: int,
        full_attention: bool = False,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if full_attention:
            self.branches = nn.ModuleList([StripeAttention(dim, num_heads, split_size, None, attn_drop)])
        else:
            if dim % 2 or num_heads % 2:
                raise ValueError(f"cross-shaped attention splits width {dim} and {num_heads} heads in two halves")
            self.branches = nn.ModuleList(
                StripeAttention(dim // 2, num_heads // 2, split_size, orientation, attn_drop)
                for orientation in ("vertical", "horizontal")
            )
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if len(self.branches) == 1:
            x = self.branches[0](q, k, v)
        else:
            parts = zip(q.chunk(2, -1), k.chunk(2, -1), v.chunk(2, -1))
            x = torch.cat([branch(*qkv) for branch, qkv in zip(self.branches, parts)], dim=-1)
        return self.proj_drop(self.proj(x))


class CSWinBlock(nn.Module):
    """Pre-norm transformer block with cross-shaped window attention; NHWC in and out."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        split_size: int,
        full_attention: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = CrossShapedWindowAttention(
            dim, num_heads, split_size, full_attention, qkv_bias, attn_drop, proj_drop
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class ConvEmbed(nn.Module):
    """Convolutional token embedding: 7x7 conv, stride 4, then LayerNorm; NCHW in, NHWC out."""

    def __init__(self, in_chans: int, dim: int, norm_layer: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, dim, kernel_size=7, stride=4, padding=2)
        self.norm = norm_layer(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


class MergeBlock(nn.Module):
    """Between stages: 3x3 conv with stride 2 (halves the map, changes the width), LayerNorm; NHWC."""

    def __init__(self, dim: int, out_dim: int, norm_layer: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, kernel_size=3, stride=2, padding=1)
        self.norm = norm_layer(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class CSWinStage(nn.Module):
    """Optional merge block followed by ``depth`` CSWin blocks."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        split_size: int,
        downsample: bool,
        full_attention: bool,
        drop_paths: Sequence[float],
        norm_layer: type[nn.Module] = nn.LayerNorm,
        **block_kwargs,
    ) -> None:
        super().__init__()
        self.downsample = MergeBlock(in_dim, dim, norm_layer) if downsample else nn.Identity()
        self.blocks = nn.Sequential(
            *[
                CSWinBlock(
                    dim,
                    num_heads,
                    split_size,
                    full_attention,
                    drop_path=drop_paths[j],
                    norm_layer=norm_layer,
                    **block_kwargs,
                )
                for j in range(depth)
            ]
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class CSWinTransformer(nn.Module):
    """CSWin Transformer classifier: conv embedding, four CSWin stages, LayerNorm, pooled linear head."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 4, 32, 2),
        split_sizes: Sequence[int] = (1, 2, 7, 7),
        num_heads: Sequence[int] = (4, 8, 16, 32),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        if not len(depths) == len(split_sizes) == len(num_heads):
            raise ValueError("depths, split_sizes and num_heads need one entry per stage")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.output_fmt = "NHWC"
        self.grad_checkpointing = False
        num_stages = len(depths)
        dims = [embed_dim * 2**i for i in range(num_stages)]
        self.num_features = self.head_hidden_size = dims[-1]

        self.stem = ConvEmbed(in_chans, dims[0], norm_layer)
        drop_paths = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        stages = []
        self.feature_info = []
        for i in range(num_stages):
            stages.append(
                CSWinStage(
                    dims[max(i - 1, 0)],
                    dims[i],
                    depths[i],
                    num_heads[i],
                    split_sizes[i],
                    downsample=i > 0,
                    full_attention=i == num_stages - 1,
                    drop_paths=drop_paths[i],
                    norm_layer=norm_layer,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    act_layer=act_layer,
                )
            )
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.norm = norm_layer(self.num_features)
        self.head = ClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt=self.output_fmt
        )
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

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        fine = [
            (r"^stages\.(\d+)\.downsample", (0,)),
            (r"^stages\.(\d+)\.blocks\.(\d+)", None),
            (r"^norm", (99999,)),
        ]
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else fine)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

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
        """Final features and the stage outputs picked by ``indices`` (NCHW or NHWC)."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError("output_fmt must be NCHW or NHWC")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        intermediates = []
        x = self.stem(x)
        last = len(self.stages) - 1
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                y = self.norm(x) if norm and i == last else x
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        if i == last:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[: max_index + 1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.head = ClassifierHead(self.num_features, 0, pool_type="", input_fmt=self.output_fmt)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> normalised final tokens as an NHWC map (B, H/32, W/32, C)."""
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: CSWinTransformer) -> dict[str, torch.Tensor]:
    """Rename a checkpoint of the original CSWin repository onto this module's layout.

    A training checkpoint's EMA weights (``state_dict_ema``) are preferred to its ``state_dict``.

    A checkpoint already in this layout passes unchanged (``module.`` prefixes of
    DataParallel checkpoints are removed either way).
    """
    state_dict = {k.removeprefix("module."): v for k, v in model_weights(state_dict).items()}
    if "stem.conv.weight" in state_dict:
        return dict(state_dict)
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^stage1_conv_embed\.0\.", "stem.conv.", key)
        key = re.sub(r"^stage1_conv_embed\.2\.", "stem.norm.", key)
        key = re.sub(r"^merge(\d)\.", lambda m: f"stages.{int(m.group(1))}.downsample.", key)
        match = re.match(r"^stage(\d)\.(\d+)\.(.*)$", key)
        if match:
            stage, block, rest = int(match.group(1)) - 1, match.group(2), match.group(3)
            rest = re.sub(r"^attns\.(\d)\.get_v\.", r"attn.branches.\1.lepe.", rest)
            rest = re.sub(r"^(qkv|proj)\.", r"attn.\1.", rest)
            key = f"stages.{stage}.blocks.{block}.{rest}"
        key = re.sub(r"^head\.", "head.fc.", key)
        out[key] = value
    return out


def _create_cswin(variant: str, pretrained: bool = False, **kwargs) -> CSWinTransformer:
    return build_release_pyramid(CSWinTransformer, variant, pretrained, "CSWin", **kwargs)


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv",
        "classifier": "head.fc",
        "license": "mit",
        "paper_ids": "arXiv:2107.00652",
        "origin_url": "https://github.com/microsoft/CSWin-Transformer",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "cswin_tiny_224.untrained": _cfg(),
        "cswin_small_224.untrained": _cfg(),
        "cswin_base_224.untrained": _cfg(),
        "cswin_large_224.untrained": _cfg(),
    }
)

VARIANTS: dict[str, dict] = {
    "cswin_tiny_224": dict(embed_dim=64, depths=(1, 2, 21, 1), split_sizes=(1, 2, 7, 7), num_heads=(2, 4, 8, 16)),
    "cswin_small_224": dict(embed_dim=64, depths=(2, 4, 32, 2), split_sizes=(1, 2, 7, 7), num_heads=(2, 4, 8, 16)),
    "cswin_base_224": dict(embed_dim=96, depths=(2, 4, 32, 2), split_sizes=(1, 2, 7, 7), num_heads=(4, 8, 16, 32)),
    "cswin_large_224": dict(
        embed_dim=144, depths=(2, 4, 32, 2), split_sizes=(1, 2, 7, 7), num_heads=(6, 12, 24, 24)
    ),
}


def _variant(name: str, pretrained: bool, **kwargs) -> CSWinTransformer:
    return _create_cswin(name, pretrained, **{**VARIANTS[name], **kwargs})


@register_model
def cswin_tiny_224(pretrained: bool = False, **kwargs) -> CSWinTransformer:
    """CSWin-T: C=64, depths 1-2-21-1, heads 2-4-8-16, stripes 1-2-7-7 (23M params, 4.3 GMACs)."""
    return _variant("cswin_tiny_224", pretrained, **kwargs)


@register_model
def cswin_small_224(pretrained: bool = False, **kwargs) -> CSWinTransformer:
    """CSWin-S: C=64, depths 2-4-32-2, heads 2-4-8-16, stripes 1-2-7-7 (35M params, 6.9 GMACs)."""
    return _variant("cswin_small_224", pretrained, **kwargs)


@register_model
def cswin_base_224(pretrained: bool = False, **kwargs) -> CSWinTransformer:
    """CSWin-B: C=96, depths 2-4-32-2, heads 4-8-16-32, stripes 1-2-7-7 (78M params, 15.0 GMACs)."""
    return _variant("cswin_base_224", pretrained, **kwargs)


@register_model
def cswin_large_224(pretrained: bool = False, **kwargs) -> CSWinTransformer:
    """CSWin-L: C=144, depths 2-4-32-2, heads 6-12-24-24, stripes 1-2-7-7 (173M params, 31.5 GMACs)."""
    return _variant("cswin_large_224", pretrained, **kwargs)
