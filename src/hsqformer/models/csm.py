"""Cross-Self-attention Mixed-experts (CSM) blocks (paper Section 3.2.1, Eq. 1-3).

Two uses of one idea:

* ``QueryCSMBlock`` (inside HSQformer): learnable queries cross-attend to the
  latent tokens of one stage, then self-attend, then pass through the MoE.
* ``ProjectorCSM`` (the projector): the symmetric form. The CNN and the ViT
  tokens of one stage are projected to D, each stream cross-attends to the
  other, the two are fused into one sequence, which then self-attends and
  passes through the MoE. Its output is that stage's latent representation.

All sub-layers are pre-norm residuals with optional LayerScale and stochastic
depth; attention runs through ``F.scaled_dot_product_attention``, which keeps
memory linear in the sequence length (stage 1 has 3136 tokens per stream).

The projector's three attentions (CNN from ViT, ViT from CNN, self) cost
quadratically in the number of tokens with ``projector_attn="full"`` (the
paper's). Two cheaper forms keep every query token at full resolution:

* ``"sr"``: spatial-reduction attention as PVTv2's linear SRA: keys and values
  come from the context average-pooled to at most ``grid x grid`` tokens (7x7 by
  default, whatever the stage or image size), then Linear, LayerNorm, GELU.
  Every token still sees the whole image, at a coarse resolution; the cost is
  linear in image area.
* ``"window"``: attention within non-overlapping ``grid x grid`` windows of the
  map (zero-padded, padded keys masked); keys and values at full resolution but
  only local. A map no larger than one window gets full attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale

from hsqformer.models.moe import MoE, MoEMode

AttnOrder = Literal["serial", "parallel"]
ProjectorAttn = Literal["full", "sr", "window"]
PROJECTOR_ATTN: tuple[str, ...] = ("full", "sr", "window")


def check_projector_attn(value: object) -> None:
    if value not in PROJECTOR_ATTN:
        allowed = ", ".join(repr(v) for v in PROJECTOR_ATTN)
        raise ValueError(f"projector_attn must be one of {allowed}, got {value!r}")


class Attention(nn.Module):
    """Multi-head attention; self-attention when ``context`` is None, else cross-attention."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        context = x if context is None else context
        b, n, d = x.shape
        m = context.shape[1]
        h = self.num_heads
        q = self.q(x).reshape(b, n, h, d // h).transpose(1, 2)
        k, v = self.kv(context).reshape(b, m, 2, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop if self.training else 0.0
        )
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class SpatialReduction(nn.Module):
    """PVTv2's linear spatial reduction: average-pool a token map to at most ``grid x grid``,
    then Linear (PVTv2's 1x1 convolution), LayerNorm and GELU."""

    def __init__(self, dim: int, grid: int = 7) -> None:
        super().__init__()
        self.grid = grid
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        b, n, d = x.shape
        h, w = size
        x = x.reshape(b, h, w, d).permute(0, 3, 1, 2)  # NCHW view of channels-last memory: pooled without a copy
        x = F.adaptive_avg_pool2d(x, (min(h, self.grid), min(w, self.grid)))
        return self.act(self.norm(self.proj(x.flatten(2).transpose(1, 2))))


class SRAttention(Attention):
    """Spatial-reduction attention: full-resolution queries, keys and values from the
    context reduced to at most ``grid x grid`` tokens (PVTv2 linear SRA)."""

    def __init__(self, dim: int, num_heads: int, grid: int = 7) -> None:
        super().__init__(dim, num_heads)
        self.sr = SpatialReduction(dim, grid)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, size: tuple[int, int] = (0, 0)
    ) -> torch.Tensor:
        context = x if context is None else context
        return super().forward(x, self.sr(context, size))


class WindowAttention(Attention):
    """Attention within non-overlapping ``window x window`` windows of the token map.

    Queries of a window attend to the context tokens of the same window. Maps whose
    sides are not multiples of the window are zero-padded and the padded keys masked;
    a side shorter than the window gives windows as long as that side.
    """

    def __init__(self, dim: int, num_heads: int, window: int = 7) -> None:
        super().__init__(dim, num_heads)
        self.window = window

    def _partition(self, x: torch.Tensor, size: tuple[int, int], wh: int, ww: int) -> torch.Tensor:
        b, _, d = x.shape
        h, w = size
        x = x.reshape(b, h, w, d)
        ph, pw = -h % wh, -w % ww
        if ph or pw:
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
        hp, wp = h + ph, w + pw
        x = x.reshape(b, hp // wh, wh, wp // ww, ww, d).transpose(2, 3)
        return x.reshape(-1, wh * ww, d)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, size: tuple[int, int] = (0, 0)
    ) -> torch.Tensor:
        context = x if context is None else context
        b, n, d = x.shape
        h, w = size
        wh, ww = min(h, self.window), min(w, self.window)
        mask = None
        if h % wh or w % ww:
            valid = torch.ones(1, h * w, 1, dtype=x.dtype, device=x.device)
            valid = self._partition(valid, size, wh, ww)[:, :, 0] > 0  # (windows, wh * ww)
            mask = valid[:, None, None, :].repeat(b, 1, 1, 1)  # (b * windows, 1, 1, keys)
        out = super().forward(self._partition(x, size, wh, ww), self._partition(context, size, wh, ww), mask)
        nh, nw = -(-h // wh), -(-w // ww)
        out = out.reshape(b, nh, nw, wh, ww, d).transpose(2, 3).reshape(b, nh * wh, nw * ww, d)
        return out[:, :h, :w].reshape(b, n, d)


class Residual(nn.Module):
    """``x + drop_path(layer_scale(y))`` for a sub-layer output ``y``."""

    def __init__(self, dim: int, layer_scale_init: float | None, drop_path: float) -> None:
        super().__init__()
        self.ls = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.ls(y))


@dataclass(frozen=True)
class MoEConfig:
    """The MoE settings shared by every CSM block of a model."""

    num_experts: int = 4
    top_k: int = 1
    mode: MoEMode = "sparse"
    mlp_ratio: float = 4.0
    router_noise: bool = True

    def build(self, dim: int, drop: float = 0.0) -> MoE:
        return MoE(dim, self.num_experts, self.top_k, self.mlp_ratio, self.mode, self.router_noise, drop)


class QueryCSMBlock(nn.Module):
    """Queries read one stage's latent tokens: CA(queries, latent) -> SA -> MoE (Eq. 1).

    ``attn_order="parallel"`` (Fig. 7 ablation) adds the cross- and self-attention
    of the same input instead of chaining them.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        moe: MoEConfig,
        attn_order: AttnOrder = "serial",
        layer_scale_init: float | None = 1e-6,
        drop_path: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if attn_order not in ("serial", "parallel"):
            raise ValueError(f"attn_order must be 'serial' or 'parallel', got {attn_order!r}")
        self.attn_order = attn_order
        self.norm_q = nn.LayerNorm(dim)
        self.norm_ctx = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, num_heads)
        self.res_cross = Residual(dim, layer_scale_init, drop_path)
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads)
        self.res_self = Residual(dim, layer_scale_init, drop_path)
        self.norm_moe = nn.LayerNorm(dim)
        self.moe = moe.build(dim, proj_drop)
        self.res_moe = Residual(dim, layer_scale_init, drop_path)

    def forward(self, queries: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        context = self.norm_ctx(latent)
        if self.attn_order == "serial":
            queries = self.res_cross(queries, self.cross_attn(self.norm_q(queries), context))
            queries = self.res_self(queries, self.self_attn(self.norm_self(queries)))
        else:
            cross = self.cross_attn(self.norm_q(queries), context)
            own = self.self_attn(self.norm_self(queries))
            queries = self.res_self(self.res_cross(queries, cross), own)
        return self.res_moe(queries, self.moe(self.norm_moe(queries)))


class ProjectorCSM(nn.Module):
    """Symmetric CSM fusing the CNN and ViT maps of one stage into D-dim latent tokens.

    CNN tokens attend to ViT tokens and ViT tokens to CNN tokens (both from the
    same inputs), the two streams are concatenated per token and linearly fused
    into one sequence of the stage's length, which then self-attends and passes
    through the MoE. A learned level embedding marks which stage the tokens
    come from. ``attn`` chooses the form of the three attentions (module
    docstring); ``grid`` is the pooled grid side of ``"sr"`` and the window side
    of ``"window"``.
    """

    def __init__(
        self,
        cnn_channels: int,
        vit_channels: int,
        dim: int,
        num_heads: int,
        moe: MoEConfig,
        layer_scale_init: float | None = 1e-6,
        drop_path: float = 0.0,
        proj_drop: float = 0.0,
        attn: ProjectorAttn = "full",
        grid: int = 7,
    ) -> None:
        super().__init__()
        check_projector_attn(attn)
        if grid < 1:
            raise ValueError(f"projector_attn_size must be a positive grid side, got {grid}")
        self.attn = attn

        def attention() -> Attention:
            if attn == "sr":
                return SRAttention(dim, num_heads, grid)
            if attn == "window":
                return WindowAttention(dim, num_heads, grid)
            return Attention(dim, num_heads)

        self.embed_cnn = nn.Sequential(nn.Linear(cnn_channels, dim), nn.LayerNorm(dim))
        self.embed_vit = nn.Sequential(nn.Linear(vit_channels, dim), nn.LayerNorm(dim))
        self.level_embed = nn.Parameter(torch.zeros(dim))
        self.norm_cnn = nn.LayerNorm(dim)
        self.norm_vit = nn.LayerNorm(dim)
        self.cnn_from_vit = attention()
        self.vit_from_cnn = attention()
        self.res_cnn = Residual(dim, layer_scale_init, drop_path)
        self.res_vit = Residual(dim, layer_scale_init, drop_path)
        self.fuse = nn.Linear(2 * dim, dim)
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = attention()
        self.res_self = Residual(dim, layer_scale_init, drop_path)
        self.norm_moe = nn.LayerNorm(dim)
        self.moe = moe.build(dim, proj_drop)
        self.res_moe = Residual(dim, layer_scale_init, drop_path)
        nn.init.trunc_normal_(self.level_embed, std=0.02)

    @staticmethod
    def _map_size(n: int, size: tuple[int, int] | None) -> tuple[int, int]:
        if size is None:
            side = math.isqrt(n)
            size = (side, side)
        h, w = int(size[0]), int(size[1])
        if h * w != n:
            raise ValueError(f"a projector stage got {n} tokens, which is not a {h}x{w} map")
        return h, w

    def forward(
        self, cnn_tokens: torch.Tensor, vit_tokens: torch.Tensor, size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Fuse two (B, N, C) token maps; ``size`` = (H, W) of the map, N = H * W.

        ``size`` is needed by ``"sr"`` and ``"window"`` only; when omitted the map is taken as square.
        """
        n = cnn_tokens.shape[1]
        if n != vit_tokens.shape[1]:
            raise ValueError(
                f"the two backbones give {n} and {vit_tokens.shape[1]} tokens at one stage; "
                "both must have the same stride per stage"
            )
        # "sr" and "window" need the map's shape; "full" runs exactly the paper's code path
        kw = {} if self.attn == "full" else {"size": self._map_size(n, size)}
        c = self.embed_cnn(cnn_tokens) + self.level_embed
        v = self.embed_vit(vit_tokens) + self.level_embed
        nc, nv = self.norm_cnn(c), self.norm_vit(v)
        c = self.res_cnn(c, self.cnn_from_vit(nc, nv, **kw))
        v = self.res_vit(v, self.vit_from_cnn(nv, nc, **kw))
        x = self.fuse(torch.cat((c, v), dim=-1))
        x = self.res_self(x, self.self_attn(self.norm_self(x), **kw))
        return self.res_moe(x, self.moe(self.norm_moe(x)))
