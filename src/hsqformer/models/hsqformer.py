"""HSQformer: Hierarchical Sparse Query Transformer (She et al., paper Section 3).

Image -> two feature pyramids (a CNN and a ViT, ConvNeXt and Swin by default)
-> projector: one symmetric ``ProjectorCSM`` per stage fuses the two maps into
D-dimensional latent tokens with a level embedding -> HSQformer: Q learnable
queries pass through four stages; stage i's ``QueryCSMBlock``s cross-attend to
stage i's latent tokens (low-level first, high-level last) -> head.

Head: LayerNorm over the final queries, mean over the Q queries, dropout,
linear classifier. (The paper says only "a linear projection layer"; mean
pooling keeps every query's contribution and is invariant to query order.)
With ``head_inputs="queries+pooled"`` the classifier also reads the globally
pooled last-stage features of both backbones, each LayerNorm'ed.

Variants (Table 4; the backbone sizes are our choice, the paper does not give
them): S pairs ConvNeXt-T with Swin-T, B ConvNeXt-S with Swin-S, L ConvNeXt-B
with Swin-B, so that each variant's backbones grow with its query transformer.

Ablation switches (Figs. 4-8), all constructor arguments:
``stage_depths`` (blocks per stage; 0 removes a stage and its projector, all
zeros gives the backbones-only baseline of Fig. 4), ``num_queries`` and
``embed_dim`` (Fig. 6), ``attn_order`` serial/parallel (Fig. 7),
``num_experts``, ``top_k`` and ``moe_mode`` sparse/dense/mlp (Fig. 8).
Beyond the paper: ``projector_attn`` full/sr/window (cost of the projector's
attention quadratic or linear in image area) and ``head_inputs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn as nn
from timm.layers import calculate_drop_path_rates, trunc_normal_
from torch.utils.checkpoint import checkpoint
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from hsqformer.models.backbones import STAGE_STRIDES, PretrainedSource, create_backbone
from hsqformer.models.csm import AttnOrder, MoEConfig, ProjectorAttn, ProjectorCSM, QueryCSMBlock, check_projector_attn
from hsqformer.models.moe import MoE, MoEMode

__all__ = ["HSQformer"]

HeadInputs = Literal["queries", "queries+pooled"]
HEAD_INPUTS: tuple[str, ...] = ("queries", "queries+pooled")


class QueryStage(nn.Module):
    """The CSM blocks through which the queries read one stage's latent tokens."""

    def __init__(self, depth: int, **block_kwargs) -> None:
        super().__init__()
        drop_paths = block_kwargs.pop("drop_paths")
        self.blocks = nn.ModuleList(QueryCSMBlock(drop_path=dp, **block_kwargs) for dp in drop_paths[:depth])

        self.grad_checkpointing = False

    def forward(self, queries: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                queries = checkpoint(block, queries, latent, use_reentrant=False)
            else:
                queries = block(queries, latent)
        return queries


class HSQformer(nn.Module):
    """CNN + ViT feature pyramids read hierarchically by sparse-expert learnable queries."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        backbones: Sequence[str] = ("convnext_tiny", "swin_tiny_patch4_window7_224"),
        pretrained_backbones: PretrainedSource | Sequence[PretrainedSource] = False,
        img_size: int | Sequence[int] = 224,
        num_queries: int = 200,
        embed_dim: int = 384,
        stage_depths: Sequence[int] = (1, 1, 1, 1),
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        num_experts: int = 4,
        top_k: int = 1,
        moe_mode: MoEMode = "sparse",
        router_noise: bool = True,
        attn_order: AttnOrder = "serial",
        layer_scale_init: float | None = 1e-6,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        projector_attn: ProjectorAttn = "full",
        projector_attn_size: int = 7,
        head_inputs: HeadInputs = "queries",
    ) -> None:
        """Build the model; every argument can also be passed through ``timm.create_model``.

        Args (the paper's settings are the defaults; Table 4 sets the rest per variant):
            num_classes, in_chans, global_pool: timm's meaning (``global_pool`` "avg" or "").
            backbones: two timm model names (CNN, ViT) with maps at strides 4/8/16/32.
            pretrained_backbones: per backbone (or one for both) False, True or a weights file.
            img_size: input size the backbones are built for (Swin needs it fixed).
            num_queries, embed_dim, stage_depths, num_heads, mlp_ratio: query transformer shape.
            num_experts, top_k, moe_mode, router_noise: the MoE layers (Eq. 5-7, Fig. 8).
            attn_order: "serial" or "parallel" cross-/self-attention in the query blocks (Fig. 7).
            layer_scale_init, drop_rate, proj_drop_rate, drop_path_rate: regularisation.
            projector_attn: form of the projector's three attentions per stage (CNN tokens
                from ViT tokens, ViT from CNN, self-attention of the fused tokens).
                "full" (default, the paper's): every token attends to every token of the
                stage, cost quadratic in image area (3136 tokens at stride 4 and 224 px).
                "sr": spatial-reduction attention (PVTv2's linear SRA), at every stage: the
                keys and values come from the context average-pooled to at most
                ``projector_attn_size`` x ``projector_attn_size`` tokens, then Linear,
                LayerNorm and GELU; queries keep full resolution, so every token still sees
                the whole image, coarsely. Cost linear in image area.
                "window": attention within non-overlapping windows of that side (padded and
                masked where the map does not divide), full-resolution but local keys and
                values; cost linear in image area; a map no larger than a window gets full
                attention. "sr" and "window" add parameters (the reduction's Linear and
                LayerNorm, "sr" only); "full" has exactly the paper's modules and code path.
            projector_attn_size: the pooled grid side of "sr" and the window side of
                "window" (default 7, PVTv2's pooled size; ignored for "full").
            head_inputs: what the classifier reads. "queries" (default, the paper's): the
                mean of the final, LayerNorm'ed queries (``num_features = embed_dim``).
                "queries+pooled": that mean concatenated with the globally average-pooled
                last-stage (stride-32) features of the CNN and of the ViT, each through its
                own LayerNorm, so ``num_features = embed_dim + C_cnn + C_vit``; zeroing the
                query part of the classifier leaves a linear probe on the backbones.
                ``forward_features`` then returns (B, Q, num_features), the pooled features
                repeated for every query, and ``forward_head`` takes them from the first.
                Needs at least one query stage (without any, the head already reads the
                pooled backbone features).
        """
        super().__init__()
        if in_chans != 3:
            raise ValueError("HSQformer backbones take 3-channel images; convert grayscale to RGB first")
        if len(backbones) != 2:
            raise ValueError(f"backbones must name two timm models (CNN, ViT), got {list(backbones)}")
        if len(stage_depths) != 4 or any(d < 0 for d in stage_depths):
            raise ValueError(f"stage_depths must be four non-negative block counts, got {list(stage_depths)}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        check_projector_attn(projector_attn)
        if head_inputs not in HEAD_INPUTS:
            allowed = ", ".join(repr(v) for v in HEAD_INPUTS)
            raise ValueError(f"head_inputs must be one of {allowed}, got {head_inputs!r}")
        if head_inputs != "queries" and not any(stage_depths):
            raise ValueError(
                f"head_inputs={head_inputs!r} needs at least one query stage; with stage_depths all zero "
                "the head already reads the pooled backbone features"
            )
        sources = (
            list(pretrained_backbones)
            if isinstance(pretrained_backbones, (list, tuple))
            else [pretrained_backbones, pretrained_backbones]
        )
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.grad_checkpointing = False
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.stage_depths = tuple(stage_depths)
        self.embed_dim = embed_dim
        self.projector_attn = projector_attn
        self.head_inputs = head_inputs
        self.num_features = self.head_hidden_size = embed_dim
        num_heads = num_heads or max(1, embed_dim // 64)

        self.cnn = create_backbone(backbones[0], sources[0], self.img_size, drop_path_rate)
        self.vit = create_backbone(backbones[1], sources[1], self.img_size, drop_path_rate)

        moe = MoEConfig(num_experts, top_k, moe_mode, mlp_ratio, router_noise)
        total_blocks = sum(stage_depths) + sum(1 for d in stage_depths if d)
        rates = calculate_drop_path_rates(drop_path_rate, max(total_blocks, 1))
        self.projector = nn.ModuleDict()
        self.stages = nn.ModuleDict()
        cursor = 0
        for i, depth in enumerate(stage_depths):
            if depth == 0:
                continue
            self.projector[str(i)] = ProjectorCSM(
                self.cnn.stage_channels[i],
                self.vit.stage_channels[i],
                embed_dim,
                num_heads,
                moe,
                layer_scale_init,
                rates[cursor],
                proj_drop_rate,
                attn=projector_attn,
                grid=projector_attn_size,
            )
            self.stages[str(i)] = QueryStage(
                depth,
                dim=embed_dim,
                num_heads=num_heads,
                moe=moe,
                attn_order=attn_order,
                layer_scale_init=layer_scale_init,
                proj_drop=proj_drop_rate,
                drop_paths=rates[cursor + 1 : cursor + 1 + depth],
            )
            cursor += 1 + depth

        if self.stages:
            self.queries = nn.Parameter(torch.zeros(1, num_queries, embed_dim))
            trunc_normal_(self.queries, std=0.02)
            self.norm = nn.LayerNorm(embed_dim)
            if head_inputs == "queries+pooled":
                self.pool_norm_cnn = nn.LayerNorm(self.cnn.stage_channels[3])
                self.pool_norm_vit = nn.LayerNorm(self.vit.stage_channels[3])
                self.num_features = self.head_hidden_size = (
                    embed_dim + self.cnn.stage_channels[3] + self.vit.stage_channels[3]
                )
        else:
            self.queries = None
            self.num_features = self.head_hidden_size = self.cnn.stage_channels[3] + self.vit.stage_channels[3]
            self.norm = nn.LayerNorm(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self._init_own_weights()

    def _init_own_weights(self) -> None:
        for module in [*self.projector.modules(), *self.stages.modules(), self.head]:
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"queries"} | {f"projector.{k}.level_embed" for k in self.projector}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """timm's parameter groups: the CNN, then the ViT. The projector, the queries and the
        head match no group, which timm treats as the last layers ("neck and head"): the new,
        randomly initialised part that training may give its own learning rate."""
        return {"cnn": r"^cnn\.", "vit": r"^vit\."}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass (backbones, projector, query blocks) to save memory.

        Router noise is replayed exactly (the RNG state is restored), but the expert
        load counters also count the recomputed passes while this is on.
        """
        self.grad_checkpointing = enable
        self.cnn.set_grad_checkpointing(enable)
        self.vit.set_grad_checkpointing(enable)
        for stage in self.stages.values():
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def moe_layers(self) -> list[MoE]:
        """Every MoE layer of the projector and the query stages."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    @property
    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the MoE load-balancing losses of the last forward pass (None without sparse MoE)."""
        losses = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def expert_load(self) -> dict[str, list[int]]:
        """Tokens routed to each expert of each MoE layer since the last ``reset_expert_load``."""
        return {name: m.load_counts.tolist() for name, m in self.named_modules() if isinstance(m, MoE)}

    def reset_expert_load(self) -> None:
        for m in self.moe_layers():
            m.reset_load_stats()

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"HSQformer expects images of shape (B, 3, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % 32 or w % 32:
            raise ValueError(f"input {h}x{w}: height and width must be multiples of 32 (the deepest stride)")
        if (self.cnn.fixed_input_size or self.vit.fixed_input_size) and (h, w) != self.img_size:
            raise ValueError(
                f"input {h}x{w} differs from img_size {self.img_size[0]}x{self.img_size[1]} that the backbones were "
                f"built for; create the model with img_size={h if h == w else (h, w)}"
            )

    def _pyramid(self, backbone: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        maps = backbone(x)
        maps = [maps[i] for i in backbone.stage_indices]
        if backbone.channels_last_output:
            return [m.flatten(1, 2) for m in maps]
        return [m.flatten(2).transpose(1, 2) for m in maps]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final query tokens (B, Q, num_features), or pooled backbone features when no stage is active.

        With ``head_inputs="queries+pooled"`` the last ``num_features - embed_dim`` channels of every
        query hold the same LayerNorm'ed pooled backbone features.
        """
        self._check_input(x)
        cnn_maps = self._pyramid(self.cnn, x)
        vit_maps = self._pyramid(self.vit, x)
        if self.queries is None:
            return self.norm(torch.cat((cnn_maps[3].mean(1), vit_maps[3].mean(1)), dim=-1)).unsqueeze(1)
        h, w = x.shape[-2:]
        sizes = [(h // s, w // s) for s in STAGE_STRIDES]
        queries = self.queries.expand(x.shape[0], -1, -1)
        for key, stage in self.stages.items():
            i = int(key)
            if self.grad_checkpointing and torch.is_grad_enabled():
                latent = checkpoint(self.projector[key], cnn_maps[i], vit_maps[i], sizes[i], use_reentrant=False)
            else:
                latent = self.projector[key](cnn_maps[i], vit_maps[i], sizes[i])
            queries = stage(queries, latent)
        queries = self.norm(queries)
        if self.head_inputs == "queries+pooled":
            pooled = torch.cat(
                (self.pool_norm_cnn(cnn_maps[3].mean(1)), self.pool_norm_vit(vit_maps[3].mean(1))), dim=-1
            )
            queries = torch.cat((queries, pooled.unsqueeze(1).expand(-1, queries.shape[1], -1)), dim=-1)
        return queries

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            if self.head_inputs == "queries+pooled":
                # the pooled backbone features are the same in every row: take them as they are
                x = torch.cat((x[:, :, : self.embed_dim].mean(dim=1), x[:, 0, self.embed_dim :]), dim=-1)
            else:
                x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 2,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "hsqformer_small.untrained": _cfg(),
        "hsqformer_base.untrained": _cfg(),
        "hsqformer_large.untrained": _cfg(),
    }
)

VARIANTS: dict[str, dict] = {
    "hsqformer_small": dict(
        backbones=("convnext_tiny", "swin_tiny_patch4_window7_224"),
        num_queries=200,
        embed_dim=384,
        stage_depths=(1, 1, 1, 1),
        num_experts=4,
        top_k=1,
    ),
    "hsqformer_base": dict(
        backbones=("convnext_small", "swin_small_patch4_window7_224"),
        num_queries=200,
        embed_dim=384,
        stage_depths=(2, 2, 6, 2),
        num_experts=4,
        top_k=2,
    ),
    "hsqformer_large": dict(
        backbones=("convnext_base", "swin_base_patch4_window7_224"),
        num_queries=400,
        embed_dim=768,
        stage_depths=(2, 2, 6, 2),
        num_experts=8,
        top_k=2,
    ),
}


def _create_hsqformer(variant: str, pretrained: bool = False, **kwargs) -> HSQformer:
    if pretrained:
        from hsqformer.errors import HSQformerError

        raise HSQformerError(
            f"no published weights exist for {variant}: load a trained checkpoint instead, "
            "or use pretrained_backbones=True / a weights path for ImageNet backbones"
        )
    kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.pop("cache_dir", None)
    model_args = {**VARIANTS[variant], **kwargs}
    return build_model_with_cfg(HSQformer, variant, pretrained=False, **model_args)


@register_model
def hsqformer_small(pretrained: bool = False, **kwargs) -> HSQformer:
    """HSQformer-S: Q=200, D=384, stage ratio 1:1:1:1, 4 experts top-1; ConvNeXt-T + Swin-T."""
    return _create_hsqformer("hsqformer_small", pretrained, **kwargs)


@register_model
def hsqformer_base(pretrained: bool = False, **kwargs) -> HSQformer:
    """HSQformer-B: Q=200, D=384, stage ratio 2:2:6:2, 4 experts top-2; ConvNeXt-S + Swin-S."""
    return _create_hsqformer("hsqformer_base", pretrained, **kwargs)


@register_model
def hsqformer_large(pretrained: bool = False, **kwargs) -> HSQformer:
    """HSQformer-L: Q=400, D=768, stage ratio 2:2:6:2, 8 experts top-2; ConvNeXt-B + Swin-B."""
    return _create_hsqformer("hsqformer_large", pretrained, **kwargs)
