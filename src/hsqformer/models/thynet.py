"""ThyNet (Peng et al., "Deep learning-based artificial intelligence model to assist thyroid
nodule diagnosis and management: a multicentre diagnostic study", Lancet Digital Health
2021), a baseline of the paper's Table 2.

ThyNet is an ensemble of three CNN classifiers, a ResNet, a ResNeXt and a DenseNet,
whose class probabilities are combined by weighted voting. Peng et al. name the three
families; the depths are our assumption, the same networks the HSQformer paper reports
on their own in Table 2: ResNet-101 (``resnet101``), ResNeXt-101 32x8d
(``resnext101_32x8d``, torchvision's ResNeXt-101) and DenseNet-201 (``densenet201``).
Voting weights default to equal (1/3 each) and are configurable (``vote_weights``).

One forward pass runs the three members and returns
``log(sum_i w_i softmax(z_i))``, the log of the weighted mean probability, so that
``softmax`` of the output is the ensemble's probability and the usual cross-entropy
trains the members through the combined probability. ``forward_features`` gives the
members' pooled features concatenated (B, 2048 + 2048 + 1920); ``forward_head`` applies
each member's classifier to its slice and votes.

Weights: ``pretrained_backbones`` (False, True, or one weights file per member, as for
HSQformer's backbones) loads the members' ImageNet classifiers; ``pretrained=True``
means the same. Peng et al. released no ThyNet weights; ``checkpoint_filter_fn`` maps a
state dict in the layout ``<member name>.<member's own key>`` (the three members'
torchvision/timm checkpoints side by side, e.g. ``resnet101.conv1.weight``,
``densenet201.features.denseblock1.denselayer1.norm.1.weight`` in torchvision's old
DenseNet names) onto ``members.<member name>.<timm key>``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import timm
import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from hsqformer.errors import HSQformerError
from hsqformer.models.backbones import PretrainedSource, pretrained_kwargs, weights_given

__all__ = ["ThyNet", "checkpoint_filter_fn"]

MEMBERS = ("resnet101", "resnext101_32x8d", "densenet201")


class ThyNet(nn.Module):
    """Weighted-voting ensemble of timm classifiers; outputs log of the weighted mean probability."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        members: Sequence[str] = MEMBERS,
        vote_weights: Sequence[float] | None = None,
        pretrained_backbones: PretrainedSource | Sequence[PretrainedSource] = False,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        members = list(members)
        if not members:
            raise ValueError("ThyNet needs at least one member")
        weights = [1.0] * len(members) if vote_weights is None else [float(w) for w in vote_weights]
        if len(weights) != len(members) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"vote_weights must be {len(members)} non-negative numbers, not all zero; got {weights}")
        sources = (
            list(pretrained_backbones)
            if isinstance(pretrained_backbones, (list, tuple))
            else [pretrained_backbones] * len(members)
        )
        if len(sources) != len(members):
            raise ValueError(f"pretrained_backbones: {len(sources)} sources for {len(members)} members")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.member_names = members
        self.members = nn.ModuleDict()
        for name, source in zip(members, sources):
            key = name.split(".")[0]
            if key in self.members:
                raise ValueError(f"member '{key}' appears twice")
            self.members[key] = _create_member(name, num_classes, in_chans, source, drop_rate, drop_path_rate)
        total = sum(weights)
        self.register_buffer("vote_weights", torch.tensor([w / total for w in weights]), persistent=False)
        self.feature_dims = [m.num_features for m in self.members.values()]
        self.num_features = self.head_hidden_size = sum(self.feature_dims)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for member in self.members.values():
            member.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The members' classifiers (an ``nn.ModuleList``)."""
        return nn.ModuleList(m.get_classifier() for m in self.members.values())

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        for member in self.members.values():
            if global_pool is None:
                member.reset_classifier(num_classes)
            else:
                member.reset_classifier(num_classes, global_pool)

    def member_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each member's own logits (B, num_classes)."""
        return [m(x) for m in self.members.values()]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Members' pooled (pre-classifier) features, concatenated: (B, sum of widths)."""
        return torch.cat([m.forward_head(m.forward_features(x), pre_logits=True) for m in self.members.values()], 1)

    def vote(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """log(sum_i w_i softmax(z_i)), computed stably as a logsumexp over members."""
        log_probs = torch.stack([z.float().log_softmax(dim=-1) for z in logits])  # (M, B, K)
        log_w = self.vote_weights.float().log().view(-1, 1, 1)
        return torch.logsumexp(log_probs + log_w, dim=0)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits:
            return x
        parts = x.split(self.feature_dims, dim=1)
        return self.vote([m.get_classifier()(p) for m, p in zip(self.members.values(), parts)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_member(
    name: str, num_classes: int, in_chans: int, source: PretrainedSource, drop_rate: float, drop_path_rate: float
) -> nn.Module:
    kwargs = dict(num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate, **pretrained_kwargs(name, source))
    if drop_path_rate:
        try:
            return timm.create_model(name, drop_path_rate=drop_path_rate, **kwargs)
        except TypeError:  # e.g. DenseNet has no stochastic depth
            pass
    return timm.create_model(name, **kwargs)


def _densenet_torchvision_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's old DenseNet names (``denselayerN.norm.1``) -> timm's (``denselayerN.norm1``)."""
    tensors = "weight|bias|running_mean|running_var|num_batches_tracked"
    pattern = re.compile(rf"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:{tensors}))$")
    out = {}
    for key, value in state_dict.items():
        match = pattern.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: ThyNet) -> dict[str, torch.Tensor]:
    """Map ``<member>.<key>`` (members' own checkpoints side by side) onto ``members.<member>.<key>``.

    A state dict already in this layout passes unchanged.
    """
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if any(k.startswith("members.") for k in state_dict):
        return dict(state_dict)
    out = {}
    for member in model.members:
        prefix = member + "."
        part = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if member.startswith("densenet"):
            part = _densenet_torchvision_keys(part)
        out.update({f"members.{member}.{k}": v for k, v in part.items()})
    unknown = [k for k in state_dict if not k.startswith(tuple(m + "." for m in model.members))]
    if unknown:
        raise HSQformerError(f"ThyNet weights: key '{unknown[0]}' belongs to none of the members {list(model.members)}")
    return out


def _create_thynet(variant: str, pretrained: bool = False, **kwargs) -> ThyNet:
    if kwargs.pop("features_only", False):
        raise HSQformerError("ThyNet is an ensemble of classifiers and has no single feature pyramid")
    if pretrained and not weights_given(kwargs):
        # ImageNet-pretrained ThyNet = ImageNet-pretrained members
        kwargs.setdefault("pretrained_backbones", True)
        pretrained = False
    model = build_model_with_cfg(ThyNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)
    # name the classifiers and first convolutions of the members actually built
    member_cfgs = [(key, m.pretrained_cfg) for key, m in model.members.items()]
    model.pretrained_cfg = model.default_cfg = {
        **model.pretrained_cfg,
        "first_conv": tuple(f"members.{key}.{cfg['first_conv']}" for key, cfg in member_cfgs),
        "classifier": tuple(f"members.{key}.{cfg['classifier']}" for key, cfg in member_cfgs),
    }
    return model


default_cfgs = generate_default_cfgs(
    {
        "thynet.untrained": {
            "url": "",
            "num_classes": 1000,
            "input_size": (3, 224, 224),
            "pool_size": (7, 7),
            "crop_pct": 0.875,
            "interpolation": "bilinear",
            "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD,
            "first_conv": tuple(f"members.{m}.{c}" for m, c in zip(MEMBERS, ("conv1", "conv1", "features.conv0"))),
            "classifier": tuple(f"members.{m}.{c}" for m, c in zip(MEMBERS, ("fc", "fc", "classifier"))),
            "paper_ids": "doi:10.1016/S2589-7500(21)00041-8",
        }
    }
)


@register_model
def thynet(pretrained: bool = False, **kwargs) -> ThyNet:
    """ThyNet: ResNet-101 + ResNeXt-101 32x8d + DenseNet-201, weighted voting of probabilities (equal weights)."""
    return _create_thynet("thynet", pretrained, **kwargs)
