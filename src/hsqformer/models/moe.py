"""Noisy top-k Mixture-of-Experts (paper Eq. 5-7) with sparse token dispatch.

Differences from a literal reading of the equations, each needed for a usable layer:

* Router noise (the ``R_noise`` of Eq. 6) is drawn only in training, so evaluation
  is deterministic.
* Under top-1 the softmax over a single selected logit is always 1 and gives the
  router no gradient. For k = 1 the gate value is therefore the expert's
  probability under the softmax over all E logits (Switch Transformer); for k > 1
  it is Eq. 6, the softmax over the k selected logits.
* Every forward pass also computes the Switch load-balancing loss
  ``E * sum_e f_e * P_e`` (``f_e``: share of routing slots sent to expert e,
  ``P_e``: mean router probability of e), kept in ``aux_loss`` for the trainer.
* Dispatch is sparse: each expert runs only on the tokens routed to it.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_

MoEMode = Literal["sparse", "dense", "mlp"]


class NoisyTopKRouter(nn.Module):
    """Linear gate with learned, input-dependent Gaussian noise (training only)."""

    def __init__(self, dim: int, num_experts: int, top_k: int, noise: bool = True) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.noise = nn.Linear(dim, num_experts, bias=False) if noise else None
        trunc_normal_(self.gate.weight, std=0.02)
        if self.noise is not None:
            trunc_normal_(self.noise.weight, std=0.02)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits ``xW (+ noise while training)`` of shape (tokens, experts)."""
        logits = self.gate(x)
        if self.training and self.noise is not None:
            logits = logits + torch.randn_like(logits) * F.softplus(self.noise(x))
        return logits.float()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return gate values (T, k), expert indices (T, k) and full probabilities (T, E)."""
        logits = self.logits(x)
        probs = logits.softmax(dim=-1)
        if self.top_k == 1:
            weights, indices = probs.topk(1, dim=-1)
        else:
            top_logits, indices = logits.topk(self.top_k, dim=-1)
            weights = top_logits.softmax(dim=-1)
        return weights, indices, probs


class MoE(nn.Module):
    """Mixture of MLP experts over tokens.

    ``mode="sparse"``: noisy top-k routing, each token processed by exactly k experts.
    ``mode="dense"``: every expert processes every token, mixed by the full softmax.
    ``mode="mlp"``: a single MLP of the same width (the no-MoE ablation of Fig. 8).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int = 4,
        top_k: int = 1,
        mlp_ratio: float = 4.0,
        mode: MoEMode = "sparse",
        router_noise: bool = True,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        if mode not in ("sparse", "dense", "mlp"):
            raise ValueError(f"moe mode must be 'sparse', 'dense' or 'mlp', got {mode!r}")
        self.mode = mode
        hidden = int(dim * mlp_ratio)
        n = 1 if mode == "mlp" else num_experts
        self.num_experts = n
        self.top_k = 1 if mode == "mlp" else (num_experts if mode == "dense" else top_k)
        self.experts = nn.ModuleList(
            Mlp(dim, hidden_features=hidden, act_layer=nn.GELU, drop=drop) for _ in range(n)
        )
        self.router = None if mode == "mlp" else NoisyTopKRouter(dim, num_experts, self.top_k, router_noise)
        self.aux_loss: torch.Tensor | None = None
        self.register_buffer("load_counts", torch.zeros(n, dtype=torch.long), persistent=False)

    def reset_load_stats(self) -> None:
        """Zero the per-expert token counters."""
        self.load_counts.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.router is None:
            self.aux_loss = None
            return self.experts[0](x)
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        if self.mode == "dense":
            out = self._dense(tokens)
        else:
            out = self._sparse(tokens)
        return out.reshape(shape)

    def _dense(self, tokens: torch.Tensor) -> torch.Tensor:
        probs = self.router.logits(tokens).softmax(dim=-1)
        self.aux_loss = None
        self.load_counts += tokens.shape[0]
        outputs = torch.stack([expert(tokens) for expert in self.experts], dim=-1)
        return (outputs * probs.unsqueeze(1).to(outputs.dtype)).sum(dim=-1)

    def _sparse(self, tokens: torch.Tensor) -> torch.Tensor:
        weights, indices, probs = self.router(tokens)
        num_tokens, k = indices.shape
        flat_experts = indices.reshape(-1)
        counts = torch.bincount(flat_experts, minlength=self.num_experts)
        self.load_counts += counts.detach()
        share = counts.float() / (num_tokens * k)
        self.aux_loss = self.num_experts * (share * probs.mean(dim=0)).sum()

        order = flat_experts.argsort(stable=True)
        token_ids = torch.arange(num_tokens, device=tokens.device).repeat_interleave(k)[order]
        gate_values = weights.reshape(-1)[order]
        out = torch.zeros_like(tokens)
        start = 0
        for expert, count in zip(self.experts, counts.tolist()):
            if count == 0:
                continue
            ids = token_ids[start : start + count]
            y = expert(tokens[ids]) * gate_values[start : start + count, None].to(tokens.dtype)
            out.index_add_(0, ids, y.to(out.dtype))
            start += count
        return out
