"""Table 2 baselines: CSWin, MPViT and ThyNet (written here), and the configs of all twelve.

Published sizes (ImageNet-1k classifiers, 1000 classes, 224x224 input; "G" = GMACs,
one multiply-add each, while ``count_flops`` counts 2 FLOPs per multiply-add):

* CSWin: Dong et al., "CSWin Transformer", CVPR 2022, Table 2 (and the official
  README): T 23M / 4.3G, S 35M / 6.9G, B 78M / 15.0G, L 173M / 31.5G.
* MPViT: Lee et al., "MPViT: Multi-Path Vision Transformer for Dense Prediction",
  CVPR 2022, Table 2 (and the official README): T 5.8M / 1.6G, XS 10.5M / 2.9G,
  S 22.8M / 4.7G, B 74.8M / 16.4G.

Sizes are counted on the meta device (no memory, no arithmetic), so each check takes
about a second even for CSWin-L.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file, save_model

import hsqformer  # noqa: F401  (registers the models)
from hsqformer.errors import HSQformerError
from hsqformer.models import CSWinTransformer, MPViT, ThyNet
from hsqformer.models import cswin as cswin_module
from hsqformer.models import mpvit as mpvit_module
from hsqformer.models import thynet as thynet_module
from hsqformer.models.backbones import create_backbone, load_pretrained
from hsqformer.models.complexity import count_flops, count_parameters
from hsqformer.training.config import load_config
from hsqformer.training.modeling import build_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "baselines"


@pytest.fixture(autouse=True)
def one_thread():
    """These models are small; with two threads on a busy 2-core machine every op waits for the other
    thread (30x slower here), so this file runs single-threaded and restores the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# name: (published params in M, published GMACs at 224)
PUBLISHED = {
    "cswin_tiny_224": (23.0, 4.3),
    "cswin_small_224": (35.0, 6.9),
    "cswin_base_224": (78.0, 15.0),
    "cswin_large_224": (173.0, 31.5),
    "mpvit_tiny": (5.8, 1.6),
    "mpvit_xsmall": (10.5, 2.9),
    "mpvit_small": (22.8, 4.7),
    "mpvit_base": (74.8, 16.4),
}

# Figures we cannot reach with the architecture both papers describe, with the bound we hold them to
# instead of 2 %. CSWin-T: the count of the described network is exactly 22.32M
# (test_cswin_parameters_follow_the_architecture_table), 3.0 % under the printed "23M" (S and B, built
# the same way, are within 1 %). CSWin-L: its parameters match (173.26M vs 173M), and T, S, B's FLOPs
# match within 1.5 %, but the same widths give 33.1 GMACs, 5.2 % over the printed 31.5G.
KNOWN_DEVIATIONS = {("cswin_tiny_224", "params"): 0.035, ("cswin_large_224", "flops"): 0.06}


def tolerance(name: str, kind: str, published: float) -> float:
    """2 %, or half a unit of the published figure's last digit when that is wider (e.g. 1.6G: 3.1 %)."""
    decimals = len(f"{published:g}".partition(".")[2])
    rounding = 0.5 * 10**-decimals / published
    return KNOWN_DEVIATIONS.get((name, kind), max(0.02, rounding))


def meta_model(name: str, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_sizes_match_the_papers(name):
    params_m, gmacs = PUBLISHED[name]
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=1000)
        flops = count_flops(model, 224)["total"]
    measured_params = count_parameters(model).total / 1e6
    measured_gmacs = flops / 2 / 1e9
    assert measured_params == pytest.approx(params_m, rel=tolerance(name, "params", params_m))
    assert measured_gmacs == pytest.approx(gmacs, rel=tolerance(name, "flops", gmacs))


def cswin_formula(embed_dim: int, depths: tuple[int, ...], num_classes: int = 1000) -> int:
    """Parameters of CSWin as the paper's Section 3 and Table 1 describe it, counted by hand."""
    total = 3 * embed_dim * 49 + embed_dim + 2 * embed_dim  # 7x7 stride-4 conv + LayerNorm
    for i, depth in enumerate(depths):
        d = embed_dim * 2**i
        if i:  # 3x3 stride-2 conv from d/2 to d channels + LayerNorm
            total += 9 * (d // 2) * d + d + 2 * d
        # per block: 2 LayerNorms, qkv (bias), LePE 3x3 depthwise (bias) on all d channels, proj, MLP 4d
        total += depth * (4 * d + (3 * d * d + 3 * d) + 10 * d + (d * d + d) + (8 * d * d + 5 * d))
    c = embed_dim * 8
    return total + 2 * c + c * num_classes + num_classes


@pytest.mark.parametrize("name", ["cswin_tiny_224", "cswin_small_224", "cswin_base_224", "cswin_large_224"])
def test_cswin_parameters_follow_the_architecture_table(name):
    cfg = cswin_module.VARIANTS[name]
    model = meta_model(name, num_classes=1000)
    assert count_parameters(model).total == cswin_formula(cfg["embed_dim"], cfg["depths"])


def test_registered_with_timm_and_data_config():
    for name in [*PUBLISHED, "thynet"]:
        assert timm.is_model(name)
    model = meta_model("cswin_base_224", num_classes=2)
    data = timm.data.resolve_data_config({}, model=model)
    assert data["input_size"] == (3, 224, 224) and data["mean"] == (0.485, 0.456, 0.406)
    assert model.num_classes == 2 and model.get_classifier().out_features == 2


# Narrow versions with every kind of module of the real variants (two-branch and full-map CSWin
# stages, MPViT encoders of two layers sharing their CPE/CRPE), small enough for 2 CPU cores.
# The CSWin stripes of 1, 2, 2, 2 fit 64x64 inputs (maps of 16, 8, 4, 2).
SMALL_CSWIN = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 4), split_sizes=(1, 2, 2, 2))
SMALL_MPVIT = dict(embed_dims=(16, 24, 32, 40), depths=(1, 2, 1, 1))
SIZE = 64


def small_cswin(**kwargs) -> CSWinTransformer:
    return timm.create_model("cswin_tiny_224", **SMALL_CSWIN, **kwargs)


def small_mpvit(**kwargs) -> MPViT:
    return timm.create_model("mpvit_tiny", **SMALL_MPVIT, **kwargs)


@pytest.mark.parametrize("build", [small_cswin, small_mpvit])
def test_forward_backward_features_and_classifier_reset(build):
    torch.manual_seed(0)
    model = build(num_classes=3).train()
    x = torch.randn(1, 3, SIZE, SIZE)
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert dead == []
    model.eval()
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (1, 3)
        assert torch.allclose(model.forward_head(model.forward_features(x)), logits)
        feats = model.forward_intermediates(x, intermediates_only=True)
        assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]
        assert [f.shape[1] for f in feats] == [i["num_chs"] for i in model.feature_info]
        model.reset_classifier(5)
        assert model(x).shape == (1, 5)
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (1, model.num_features)


@pytest.mark.parametrize(("build", "fmt"), [(small_cswin, "NHWC"), (small_mpvit, "NCHW")])
def test_features_only_gives_a_stride_4_to_32_pyramid(build, fmt):
    features = build(features_only=True).eval()
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        maps = features(torch.randn(1, 3, SIZE, SIZE))
    sizes = [m.shape[1:3] if fmt == "NHWC" else m.shape[2:] for m in maps]
    assert [tuple(s) for s in sizes] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    channels = [m.shape[-1] if fmt == "NHWC" else m.shape[1] for m in maps]
    assert channels == features.feature_info.channels()


def test_cswin_and_mpvit_serve_as_hsqformer_backbones():
    with torch.device("meta"):
        mpvit = create_backbone("mpvit_tiny")
        cswin = create_backbone("cswin_tiny_224")
    assert cswin.channels_last_output and not mpvit.channels_last_output
    assert mpvit.stage_channels == (96, 176, 216, 216)
    assert cswin.stage_channels == (64, 128, 256, 512)


@pytest.mark.parametrize(("orientation", "stripe"), [("vertical", (8, 2)), ("horizontal", (2, 8)), (None, (8, 8))])
def test_cswin_attention_stays_inside_its_stripe(orientation, stripe):
    """Changing one token changes the outputs of its own stripe only (attention and LePE alike)."""
    torch.manual_seed(0)
    attn = cswin_module.StripeAttention(8, 2, split_size=2, orientation=orientation).eval()
    q, k, v = (torch.randn(1, 8, 8, 8) for _ in range(3))
    r, c = 5, 3
    with torch.no_grad():
        before = attn(q, k, v)
        k2, v2 = k.clone(), v.clone()
        k2[0, r, c] += 1.0
        v2[0, r, c] += 1.0
        changed = (attn(q, k2, v2) - before).abs().sum(-1)[0] > 1e-6
    sh, sw = stripe
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[r // sh * sh : r // sh * sh + sh, c // sw * sw : c // sw * sw + sw] = True
    assert changed[inside].any() and not changed[~inside].any()


def test_cswin_fused_and_explicit_attention_agree():
    torch.manual_seed(0)
    model = small_cswin(num_classes=4).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        fused = model(x)
        for m in model.modules():
            if isinstance(m, cswin_module.StripeAttention):
                m.fused_attn = False
        assert torch.allclose(model(x), fused, atol=1e-4)


def test_cswin_rejects_sizes_its_stripes_do_not_divide():
    model = small_cswin(num_classes=2).eval()
    with torch.no_grad():
        with pytest.raises(ValueError, match="stripes of 2"):
            model(torch.randn(1, 3, 80, 80))  # stage-3 map 5x5; stage 4 (3x3) attends over the full map
        assert model(torch.randn(1, 3, 128, 128)).shape == (1, 2)


# --- weights in the original repositories' layout ---------------------------------------------


def original_cswin_keys(model: CSWinTransformer) -> dict[str, str]:
    """Original name -> our name, spelled out from the original CSWinTransformer's modules."""
    pairs = {}

    def both(orig: str, ours: str, names=("weight", "bias")) -> None:
        for n in names:
            pairs[f"{orig}.{n}"] = f"{ours}.{n}"

    both("stage1_conv_embed.0", "stem.conv")
    both("stage1_conv_embed.2", "stem.norm")
    for s, stage in enumerate(model.stages, start=1):
        if s > 1:
            both(f"merge{s - 1}.conv", f"stages.{s - 1}.downsample.conv")
            both(f"merge{s - 1}.norm", f"stages.{s - 1}.downsample.norm")
        for j, block in enumerate(stage.blocks):
            ours = f"stages.{s - 1}.blocks.{j}"
            for part in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                both(f"stage{s}.{j}.{part}", f"{ours}.{part}")
            both(f"stage{s}.{j}.qkv", f"{ours}.attn.qkv")
            both(f"stage{s}.{j}.proj", f"{ours}.attn.proj")
            for b in range(len(block.attn.branches)):
                both(f"stage{s}.{j}.attns.{b}.get_v", f"{ours}.attn.branches.{b}.lepe")
    both("norm", "norm")
    both("head", "head.fc")
    return pairs


BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def original_mpvit_keys(model: MPViT) -> dict[str, str]:
    """Original name -> our name (None for the repeated shared CPE/CRPE), from the original MPViT's modules."""
    pairs: dict[str, str | None] = {}

    def both(orig: str, ours: str | None, names=("weight", "bias")) -> None:
        for n in names:
            pairs[f"{orig}.{n}"] = f"{ours}.{n}" if ours else None

    for i in range(2):
        both(f"stem.{i}.conv", f"stem.{i}.conv", ("weight",))
        both(f"stem.{i}.bn", f"stem.{i}.bn", BN)
    for i, stage in enumerate(model.stages):
        for p in range(len(stage.patch_embed.paths)):
            orig, ours = f"patch_embed_stages.{i}.patch_embeds.{p}.patch_conv", f"stages.{i}.patch_embed.paths.{p}"
            both(f"{orig}.dwconv", f"{ours}.conv_dw", ("weight",))
            both(f"{orig}.pwconv", f"{ours}.conv_pw", ("weight",))
            both(f"{orig}.bn", f"{ours}.bn", BN)
        orig, ours = f"mhca_stages.{i}", f"stages.{i}"
        for p, encoder in enumerate(stage.encoders):
            enc_o, enc = f"{orig}.mhca_blks.{p}", f"{ours}.encoders.{p}"
            both(f"{enc_o}.cpe.proj", f"{enc}.cpe.proj")
            for k in range(3):
                both(f"{enc_o}.crpe.conv_list.{k}", f"{enc}.crpe.convs.{k}")
            for j in range(len(encoder.blocks)):
                lay_o, lay = f"{enc_o}.MHCA_layers.{j}", f"{enc}.blocks.{j}"
                both(f"{lay_o}.cpe.proj", None)
                for k in range(3):
                    both(f"{lay_o}.crpe.conv_list.{k}", None)
                    both(f"{lay_o}.factoratt_crpe.crpe.conv_list.{k}", None)
                both(f"{lay_o}.factoratt_crpe.qkv", f"{lay}.attn.qkv")
                both(f"{lay_o}.factoratt_crpe.proj", f"{lay}.attn.proj")
                for part in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                    both(f"{lay_o}.{part}", f"{lay}.{part}")
        both(f"{orig}.InvRes.conv1.conv", f"{ours}.local.conv1.conv", ("weight",))
        both(f"{orig}.InvRes.conv1.bn", f"{ours}.local.conv1.bn", BN)
        both(f"{orig}.InvRes.dwconv", f"{ours}.local.conv_dw", ("weight",))
        both(f"{orig}.InvRes.norm", f"{ours}.local.bn", BN)
        both(f"{orig}.InvRes.conv2.conv", f"{ours}.local.conv2.conv", ("weight",))
        both(f"{orig}.InvRes.conv2.bn", f"{ours}.local.conv2.bn", BN)
        both(f"{orig}.aggregate.conv", f"{ours}.aggregate.conv", ("weight",))
        both(f"{orig}.aggregate.bn", f"{ours}.aggregate.bn", BN)
    both("cls_head", "head.fc")
    return pairs


def shared_source(ours: str | None, orig: str) -> str:
    """Where a repeated shared tensor of the original MPViT lives in our layout."""
    if ours is not None:
        return ours
    enc, _, rest = orig.partition(".MHCA_layers.")
    rest = rest.split(".", 1)[1].removeprefix("factoratt_crpe.")
    ours_enc = enc.replace("mhca_stages.", "stages.").replace(".mhca_blks.", ".encoders.")
    return f"{ours_enc}.{rest}".replace(".conv_list.", ".convs.")


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial values everywhere, BatchNorm statistics included."""
    torch.manual_seed(1)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) * 0.5 + 0.5 if t.ndim == 1 else torch.randn_like(t) * 0.05)
    return model.eval()


@pytest.mark.parametrize("family", ["cswin", "mpvit"])
def test_original_checkpoints_load_strictly_and_give_the_same_logits(family, tmp_path):
    if family == "cswin":
        build, keys, module, name, kwargs = (
            small_cswin, original_cswin_keys, cswin_module, "cswin_tiny_224", SMALL_CSWIN
        )
    else:
        build, keys, module, name, kwargs = (
            small_mpvit, original_mpvit_keys, mpvit_module, "mpvit_tiny", SMALL_MPVIT
        )
    reference = randomise(build(num_classes=1000))
    ours = reference.state_dict()
    pairs = keys(reference)
    original = {o: ours[shared_source(k, o) if family == "mpvit" else k].clone() for o, k in pairs.items()}
    assert {k for k in pairs.values() if k} == set(ours), "the spelled-out original layout covers every tensor"

    fresh = build(num_classes=1000)
    fresh.load_state_dict(module.checkpoint_filter_fn({"state_dict_ema": original}, fresh), strict=True)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = reference(x)
        assert torch.equal(fresh.eval()(x), expected)

    # timm's own loader with a file of the original release, given as a file or (the docstrings'
    # conversion recipe) as its state dict; then the converted file in training's loader
    path = tmp_path / f"{name}.pth"
    torch.save({"state_dict_ema": original}, path)
    from_file = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    state = torch.load(path, map_location="cpu", weights_only=True)
    converted = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=state), **kwargs)
    with torch.no_grad():
        assert torch.equal(from_file.eval()(x), expected)
        assert torch.equal(converted.eval()(x), expected)
    save_model(converted, str(tmp_path / f"{name}.safetensors"))
    two_class = build(num_classes=2)
    load_pretrained(two_class, tmp_path / f"{name}.safetensors", name)
    body = {k: v for k, v in two_class.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(v, ours[k]) for k, v in body.items())
    # training's loader (model.pretrained: FILE) also takes the original release's file as it is
    from_release = build(num_classes=2)
    load_pretrained(from_release, path, name)
    assert all(torch.equal(v, ours[k]) for k, v in from_release.state_dict().items() if not k.startswith("head."))
    # a file already in our layout passes the filter unchanged
    assert module.checkpoint_filter_fn(ours, fresh).keys() == ours.keys()


@pytest.mark.parametrize("name", ["cswin_base_224", "mpvit_base"])
def test_pretrained_without_a_file_fails_in_one_line(name):
    with pytest.raises(HSQformerError, match="no ImageNet weights .* on the timm hub"):
        timm.create_model(name, pretrained=True)


# --- ThyNet -----------------------------------------------------------------------------------


def test_thynet_is_resnet101_resnext101_densenet201_and_counts_their_parameters():
    model = meta_model("thynet", num_classes=1000)
    assert isinstance(model, ThyNet)
    assert list(model.members) == ["resnet101", "resnext101_32x8d", "densenet201"]
    members = sum(count_parameters(meta_model(n, num_classes=1000)).total for n in thynet_module.MEMBERS)
    assert count_parameters(model).total == members
    assert members / 1e6 == pytest.approx(44.55 + 88.79 + 20.01, abs=0.01)


SMALL_MEMBERS = ("resnet10t", "densenet121")
THY_SIZE = 32


def test_thynet_output_is_the_log_of_the_weighted_mean_probability_and_trains_every_member():
    torch.manual_seed(0)
    members = ("resnet10t", "resnet14t")
    model = timm.create_model("thynet", num_classes=3, members=members, vote_weights=(3.0, 1.0)).eval()
    x = torch.randn(2, 3, THY_SIZE, THY_SIZE)
    with torch.no_grad():
        features = model.forward_features(x)
        out = model.forward_head(features)
        first, second = model.member_logits(x)
    assert features.shape == (2, 512 + 2048)  # resnet10t, resnet14t
    expected = 0.75 * first.softmax(-1) + 0.25 * second.softmax(-1)
    assert torch.allclose(out.softmax(-1), expected, atol=1e-6)
    assert torch.allclose(out.exp().sum(-1), torch.ones(2), atol=1e-6)

    model.reset_classifier(2)
    assert [c.out_features for c in model.get_classifier()] == [2, 2]
    model.train()
    F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    assert all(m.get_classifier().weight.grad.abs().sum() > 0 for m in model.members.values())
    assert torch.allclose(timm.create_model("thynet", members=members).vote_weights, torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="vote_weights"):
        timm.create_model("thynet", members=members, vote_weights=(1.0,))


def test_thynet_loads_members_checkpoints_side_by_side_and_per_member_files(tmp_path):
    reference = randomise(timm.create_model("thynet", num_classes=1000, members=SMALL_MEMBERS))
    # members' own checkpoints under their names; DenseNet in torchvision's old key names
    original = {}
    for name, member in reference.members.items():
        for key, value in member.state_dict().items():
            if name.startswith("densenet"):
                key = key.replace(".norm1.", ".norm.1.").replace(".conv1.", ".conv.1.")
                key = key.replace(".norm2.", ".norm.2.").replace(".conv2.", ".conv.2.")
            original[f"{name}.{key}"] = value.clone()
    assert any(".denselayer1.norm.1." in k for k in original)
    fresh = timm.create_model("thynet", num_classes=1000, members=SMALL_MEMBERS)
    fresh.load_state_dict(thynet_module.checkpoint_filter_fn(original, fresh), strict=True)
    x = torch.randn(1, 3, THY_SIZE, THY_SIZE)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), reference(x))

    # ImageNet files, one per member, for a 2-class ThyNet: all but the classifiers are loaded
    paths = []
    for name, member in reference.members.items():
        paths.append(tmp_path / f"{name}.safetensors")
        save_file({k: v.contiguous() for k, v in member.state_dict().items()}, str(paths[-1]))
    sources = [str(p) for p in paths]
    model = timm.create_model("thynet", num_classes=2, members=SMALL_MEMBERS, pretrained_backbones=sources)
    for name, member in model.members.items():
        ref = reference.members[name].state_dict()
        head = member.pretrained_cfg["classifier"]
        for key, value in member.state_dict().items():
            if not key.startswith(head + "."):
                assert torch.equal(value, ref[key]), key


# --- the twelve configs -----------------------------------------------------------------------

TABLE2 = {
    "resnet101": "resnet101",
    "densenet201": "densenet201",
    "resnext101": "resnext101_32x8d",
    "thynet": "thynet",
    "hiera": "hiera_base_224",
    "vit": "vit_base_patch16_224",
    "swin": "swin_base_patch4_window7_224",
    "cswin": "cswin_base_224",
    "convnext": "convnext_base",
    "pvt_v2": "pvt_v2_b5",
    "focalnet": "focalnet_base_lrf",
    "mpvit": "mpvit_base",
}


def test_there_is_one_config_per_table2_baseline():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(TABLE2)


@pytest.mark.parametrize("stem", sorted(TABLE2))
def test_baseline_config_loads_and_builds(stem):
    cfg = load_config(CONFIGS / f"{stem}.yaml")
    paper = load_config(CONFIGS.parent / "paper.yaml")
    assert cfg.model.name == TABLE2[stem]
    assert cfg.model.pretrained is False  # offline: weights are passed as files (see the comments)
    assert (cfg.optimizer, cfg.scheduler, cfg.augment, cfg.trainer) == (
        paper.optimizer,
        paper.scheduler,
        paper.augment,
        paper.trainer,
    )
    assert cfg.model.kwargs["drop_rate"] == 0.5
    with torch.device("meta"):
        model, kwargs = build_model(cfg, num_classes=2)
    assert model.num_classes == 2
    assert count_parameters(model).total > 15e6  # the Base-size models of the paper's references
