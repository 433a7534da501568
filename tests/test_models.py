"""HSQformer model family: registration, shapes, determinism, gradients, MoE routing, offline weights."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from typer.testing import CliRunner

import hsqformer
from hsqformer.cli import build_app
from hsqformer.errors import HSQformerError
from hsqformer.models import HSQformer
from hsqformer.models.backbones import create_backbone, load_pretrained, offline_weights_path
from hsqformer.models.complexity import count_flops, count_parameters, projector_flops
from hsqformer.models.csm import Attention, SRAttention, WindowAttention
from hsqformer.models.moe import MoE

TINY = dict(
    backbones=("tf_efficientnet_lite0", "convnext_atto"),
    img_size=64,
    num_queries=64,
    embed_dim=64,
    layer_scale_init=None,
)


def tiny(**kwargs) -> HSQformer:
    return timm.create_model("hsqformer_small", num_classes=3, **{**TINY, **kwargs})


@pytest.mark.parametrize(
    ("name", "queries", "dim", "depths", "experts", "top_k"),
    [
        ("hsqformer_small", 200, 384, (1, 1, 1, 1), 4, 1),
        ("hsqformer_base", 200, 384, (2, 2, 6, 2), 4, 2),
        ("hsqformer_large", 400, 768, (2, 2, 6, 2), 8, 2),
    ],
)
def test_variants_follow_table4_and_classify_224(name, queries, dim, depths, experts, top_k):
    model = timm.create_model(name, num_classes=2).eval()
    assert model.queries.shape == (1, queries, dim)
    assert model.stage_depths == depths
    assert [len(s.blocks) for s in model.stages.values()] == list(depths)
    moe = model.moe_layers()
    assert len(moe) == 4 + sum(depths)
    assert all(m.num_experts == experts and m.top_k == top_k for m in moe)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 2)
    assert torch.isfinite(out).all()


def test_registered_with_timm():
    assert {"hsqformer_small", "hsqformer_base", "hsqformer_large"} <= set(timm.list_models("hsqformer*"))
    assert hsqformer.HSQformer is HSQformer


def test_other_input_sizes_work_or_fail_clearly():
    cnn_only = tiny(backbones=("convnext_atto", "resnet10t")).eval()
    for size in (64, 96, 160):
        assert cnn_only(torch.randn(1, 3, size, size)).shape == (1, 3)
    with pytest.raises(ValueError, match="multiples of 32"):
        cnn_only(torch.randn(1, 3, 100, 100))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        cnn_only(torch.randn(1, 1, 64, 64))
    swin = tiny(backbones=("convnext_atto", "swin_tiny_patch4_window7_224"), img_size=96).eval()
    assert swin(torch.randn(1, 3, 96, 96)).shape == (1, 3)
    with pytest.raises(ValueError, match="create the model with img_size=128"):
        swin(torch.randn(1, 3, 128, 128))


def test_eval_is_deterministic():
    model = tiny(top_k=2, num_experts=4).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_router_noise_only_in_training():
    moe = MoE(16, num_experts=4, top_k=1)
    x = torch.randn(200, 16)
    moe.train()
    assert not torch.equal(moe.router.logits(x), moe.router.logits(x))
    moe.eval()
    assert torch.equal(moe.router.logits(x), moe.router.logits(x))


@pytest.mark.parametrize("top_k", [1, 2])
def test_every_parameter_gets_a_gradient(top_k):
    torch.manual_seed(0)
    model = tiny(top_k=top_k, num_experts=4).train()
    logits = model(torch.randn(4, 3, 64, 64))
    loss = F.cross_entropy(logits, torch.tensor([0, 1, 2, 0])) + 0.01 * model.aux_loss
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert dead == []
    gates = [n for n, _ in model.named_parameters() if ".router.gate." in n]
    assert gates, "the model has routers"


def test_top1_gate_learns_from_the_task_loss_alone():
    torch.manual_seed(0)
    moe = MoE(16, num_experts=4, top_k=1).train()
    moe(torch.randn(64, 16)).pow(2).mean().backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_each_token_is_processed_by_exactly_k_experts(top_k):
    torch.manual_seed(0)
    moe = MoE(32, num_experts=4, top_k=top_k).eval()
    x = torch.randn(2, 50, 32)
    received: dict[int, torch.Tensor] = {}
    for e, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda mod, inp, out, e=e: received.__setitem__(e, inp[0].detach()))
    out = moe(x)
    tokens = x.reshape(-1, 32)
    _, chosen, _ = moe.router(tokens)
    assert all(len(set(row.tolist())) == top_k for row in chosen)
    for e in range(4):
        routed = tokens[(chosen == e).any(dim=-1)]
        assert torch.equal(received.get(e, torch.empty(0, 32)), routed)
    assert sum(len(v) for v in received.values()) == tokens.shape[0] * top_k
    assert moe.load_counts.sum().item() == tokens.shape[0] * top_k
    assert out.shape == x.shape


def test_dense_and_mlp_modes():
    x = torch.randn(2, 10, 16)
    dense = MoE(16, num_experts=4, mode="dense").eval()
    calls = []
    for expert in dense.experts:
        expert.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    assert dense(x).shape == x.shape
    assert calls == [20, 20, 20, 20]
    mlp = MoE(16, num_experts=4, mode="mlp")
    assert len(mlp.experts) == 1 and mlp.router is None
    assert mlp(x).shape == x.shape
    for mode in ("dense", "mlp"):
        model = tiny(moe_mode=mode).train()
        model(torch.randn(2, 3, 64, 64)).sum().backward()


def test_ablation_switches():
    last_only = tiny(stage_depths=(0, 0, 0, 1))
    assert list(last_only.stages) == ["3"] and list(last_only.projector) == ["3"]
    assert last_only(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    baseline = tiny(stage_depths=(0, 0, 0, 0))
    assert baseline.queries is None and baseline.aux_loss is None
    assert baseline(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    parallel = tiny(attn_order="parallel", stage_depths=(1, 0, 2, 0), num_queries=5, embed_dim=32)
    assert parallel(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    with pytest.raises(ValueError, match="top_k"):
        tiny(num_experts=2, top_k=3)


def test_expert_load_statistics():
    model = tiny(top_k=2).eval()
    model.reset_expert_load()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    load = model.expert_load()
    query_layer = next(v for k, v in load.items() if k.startswith("stages.0"))
    assert sum(query_layer) == 2 * 64 * 2


def test_active_parameters_count_k_of_e_experts():
    model = tiny(top_k=1, num_experts=4)
    counts = count_parameters(model)
    moe = model.moe_layers()
    per_expert = sum(p.numel() for p in moe[0].experts[0].parameters())
    noise = sum(m.router.noise.weight.numel() for m in moe)
    assert counts.total - counts.active == len(moe) * 3 * per_expert + noise


def test_flops_include_cpu_attention():
    model = tiny(stage_depths=(1, 0, 0, 0), num_queries=8)
    flops = count_flops(model, 64)
    tokens, dim = (64 // 4) ** 2, 64
    attention_core = 3 * 2 * 2 * tokens * tokens * dim
    assert flops["projector"] > attention_core
    assert flops["total"] == pytest.approx(sum(v for k, v in flops.items() if k != "total"))


def test_hsqformer_pretrained_has_no_published_weights():
    with pytest.raises(HSQformerError, match="no published weights"):
        timm.create_model("hsqformer_small", pretrained=True)


def test_hub_only_backbone_fails_fast_with_how_to(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HSQformerError, match="pass the weights as a local file instead of true") as err:
        create_backbone("convnext_atto", pretrained=True)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file_for_any_backbone(tmp_path, suffix):
    source = timm.create_model("convnext_atto")
    state = source.state_dict()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    backbone = create_backbone("convnext_atto", pretrained=str(path))
    assert torch.equal(backbone.stem_0.weight, state["stem.0.weight"])
    model = tiny(backbones=("convnext_atto", "resnet10t"), pretrained_backbones=[str(path), False])
    assert torch.equal(model.cnn.stem_0.weight, state["stem.0.weight"])


def test_bad_weights_file_is_one_line_error(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"not weights")
    with pytest.raises(HSQformerError, match="broken.safetensors: cannot read weights"):
        create_backbone("convnext_atto", pretrained=str(path))


def _imagenet_top1(model: torch.nn.Module, image: np.ndarray) -> int:
    x = torch.tensor(image).permute(2, 0, 1).float().div(255)[None]
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
    x = (x - 0.5) / 0.5
    with torch.no_grad():
        return int(model.eval()(x).argmax())


def test_offline_efficientnet_lite0_classifies_real_photographs():
    from skimage import data

    assert offline_weights_path("tf_efficientnet_lite0") is not None
    model = timm.create_model("tf_efficientnet_lite0")
    load_pretrained(model, True, "tf_efficientnet_lite0")
    assert _imagenet_top1(model, data.chelsea()) in range(281, 286)  # ImageNet's domestic cat classes
    assert _imagenet_top1(model, data.coffee()) == 967  # espresso


def test_offline_lite_weights_reach_hsqformer_backbone():
    reference = timm.create_model("tf_efficientnet_lite0")
    load_pretrained(reference, True, "tf_efficientnet_lite0")
    model = tiny(pretrained_backbones=[True, False])
    assert torch.equal(model.cnn.conv_stem.weight, reference.conv_stem.weight)


def test_info_command_prints_parameters_and_flops():
    result = CliRunner().invoke(build_app(), ["info", "hsqformer_small"])
    assert result.exit_code == 0, result.output
    assert "parameters, total     107.41 M" in result.output
    assert "GFLOPs @ 224x224" in result.output
    flops_line = next(line for line in result.output.splitlines() if line.startswith("GFLOPs"))
    assert 90 < float(flops_line.split()[3]) < 120


@pytest.mark.parametrize("projector_attn", ["full", "sr", "window"])
def test_grad_checkpointing_gives_the_same_gradients(projector_attn):
    model = tiny(top_k=2, projector_attn=projector_attn).train()
    x = torch.randn(2, 3, 64, 64)

    def gradients(enable: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        torch.manual_seed(1)
        (model(x).sum() + model.aux_loss).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, recomputed = gradients(False), gradients(True)
    assert all(torch.allclose(plain[n], recomputed[n], atol=1e-6) for n in plain)


def test_pretrained_classifier_with_new_classes_starts_near_zero_logits():
    model = timm.create_model("tf_efficientnet_lite0", num_classes=2)
    load_pretrained(model, True, "tf_efficientnet_lite0")
    reference = timm.create_model("tf_efficientnet_lite0")
    load_pretrained(reference, True, "tf_efficientnet_lite0")
    assert torch.equal(model.conv_head.weight, reference.conv_head.weight)
    bound = 1 / model.num_features**0.5  # PyTorch's nn.Linear initialisation, not timm's 1/sqrt(num_classes)
    assert model.classifier.weight.abs().max() <= bound
    torch.manual_seed(0)
    with torch.no_grad():
        logits = model.eval()(torch.randn(4, 3, 128, 128))
    assert logits.abs().max() < 2


# --- projector attention: full (the paper's) | sr | window ---------------------------------------------

# Logits and stage-1 latent tokens of the tiny model before projector_attn existed (seeded weights and input).
FULL_REFERENCE_LOGITS = [0.035310398787260056, 0.011834490112960339, -0.01902213878929615]
FULL_REFERENCE_LATENT = [-0.17421068251132965, 0.1996208131313324, 0.1914498209953308]
FULL_REFERENCE_LATENT_SUM = -357.87348319849457
FULL_REFERENCE_KEYS = 817


def test_full_projector_attention_is_unchanged():
    torch.manual_seed(0)
    model = tiny(projector_attn="full").eval()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
        latent = model.projector["0"](model._pyramid(model.cnn, x)[0], model._pyramid(model.vit, x)[0])
    assert torch.allclose(logits[0], torch.tensor(FULL_REFERENCE_LOGITS), atol=1e-6)
    assert torch.allclose(latent[0, 0, :3], torch.tensor(FULL_REFERENCE_LATENT), atol=1e-5)
    assert latent.double().sum().item() == pytest.approx(FULL_REFERENCE_LATENT_SUM, rel=1e-5)
    assert len(model.state_dict()) == FULL_REFERENCE_KEYS
    assert not any(".sr." in k for k in model.state_dict())
    assert all(type(m) is Attention for m in model.modules() if isinstance(m, Attention))


@pytest.mark.parametrize("projector_attn", ["sr", "window"])
def test_cheap_projector_attention_any_input_size(projector_attn):
    model = tiny(backbones=("convnext_atto", "resnet10t"), projector_attn=projector_attn).eval()
    assert sum(isinstance(m, (SRAttention, WindowAttention)) for m in model.modules()) == 3 * 4
    for size in ((64, 64), (96, 96), (160, 160), (64, 128), (224, 160)):
        with torch.no_grad():
            assert model(torch.randn(2, 3, *size)).shape == (2, 3)
    swin = tiny(backbones=("convnext_atto", "swin_tiny_patch4_window7_224"), img_size=96, projector_attn=projector_attn)
    assert swin.eval()(torch.randn(1, 3, 96, 96)).shape == (1, 3)


def test_sr_attention_reads_pooled_keys_at_full_query_resolution():
    torch.manual_seed(0)
    attn = SRAttention(32, 2, grid=3).eval()
    x, context = torch.randn(2, 6 * 9, 32), torch.randn(2, 6 * 9, 32)
    pooled = F.adaptive_avg_pool2d(context.transpose(1, 2).reshape(2, 32, 6, 9), 3).flatten(2).transpose(1, 2)
    reduced = attn.sr.act(attn.sr.norm(attn.sr.proj(pooled)))
    assert torch.allclose(attn(x, context, size=(6, 9)), Attention.forward(attn, x, reduced), atol=1e-6)
    assert attn(x, context, size=(6, 9)).shape == x.shape


@pytest.mark.parametrize(("h", "w"), [(6, 9), (7, 7), (3, 5)])
def test_window_attention_equals_attention_in_each_window(h, w):
    torch.manual_seed(0)
    attn = WindowAttention(32, 2, window=3).eval()
    x, context = torch.randn(2, h * w, 32), torch.randn(2, h * w, 32)
    out = attn(x, context, size=(h, w)).reshape(2, h, w, 32)
    grid_x, grid_c = x.reshape(2, h, w, 32), context.reshape(2, h, w, 32)
    for top in range(0, h, 3):
        for left in range(0, w, 3):
            q = grid_x[:, top : top + 3, left : left + 3].reshape(2, -1, 32)
            kv = grid_c[:, top : top + 3, left : left + 3].reshape(2, -1, 32)
            expected = Attention.forward(attn, q, kv).reshape(2, min(3, h - top), min(3, w - left), 32)
            assert torch.allclose(out[:, top : top + 3, left : left + 3], expected, atol=1e-5)


@pytest.mark.parametrize("projector_attn", ["sr", "window"])
def test_cheap_projector_attention_gets_gradients(projector_attn):
    torch.manual_seed(0)
    model = tiny(projector_attn=projector_attn).train()
    loss = F.cross_entropy(model(torch.randn(2, 3, 96, 96)), torch.tensor([0, 2])) + 0.01 * model.aux_loss
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert dead == []
    assert any(".sr.proj." in n for n, _ in model.named_parameters()) == (projector_attn == "sr")


def test_bad_projector_attn_names_the_allowed_values():
    with pytest.raises(ValueError, match="projector_attn must be one of 'full', 'sr', 'window', got 'linear'"):
        tiny(projector_attn="linear")


def test_attention_flops_are_counted_from_the_reduced_keys():
    n, d, grid = 12 * 12, 32, 4
    p = grid * grid
    counter = torch.utils.flop_counter.FlopCounterMode(
        display=False, custom_mapping=hsqformer.models.complexity.CPU_ATTENTION_FLOPS
    )
    with counter, torch.no_grad():
        SRAttention(d, 2, grid).eval()(torch.randn(1, n, d), size=(12, 12))
    linear = 2 * (n * d * d + p * d * d + p * 2 * d * d + n * d * d)  # q, reduction, kv, out
    assert counter.get_total_flops() == linear + 4 * n * p * d
    counter = torch.utils.flop_counter.FlopCounterMode(
        display=False, custom_mapping=hsqformer.models.complexity.CPU_ATTENTION_FLOPS
    )
    with counter, torch.no_grad():
        WindowAttention(d, 2, 5).eval()(torch.randn(1, n, d), size=(12, 12))
    padded = 15 * 15  # 12x12 padded to 3x3 windows of 5x5
    assert counter.get_total_flops() == 2 * 4 * padded * d * d + 4 * padded * 25 * d


def test_sr_cuts_hsqformer_small_projector_flops_at_224():
    full = projector_flops(timm.create_model("hsqformer_small", num_classes=2), 224)
    sr_model = timm.create_model("hsqformer_small", num_classes=2, projector_attn="sr")
    assert sr_model.projector_attn == "sr"
    sr = projector_flops(sr_model, 224)
    # Queries keep full resolution, so the projector's per-token Linears and MoE (20.5 GFLOPs at
    # 224 px) stay: no attention could make it more than 3.72x cheaper; sr reaches 3.47x.
    assert full["total"] / sr["total"] >= 3.4
    assert full["0"] / sr["0"] >= 4  # the stride-4 stage, where the attention was
    assert sr["total"] < 23e9


# --- head_inputs: queries | queries+pooled --------------------------------------------------------------


def test_head_with_pooled_backbone_features():
    torch.manual_seed(0)
    model = tiny(head_inputs="queries+pooled").eval()
    c_cnn, c_vit = model.cnn.stage_channels[3], model.vit.stage_channels[3]
    assert model.num_features == model.head_hidden_size == 64 + c_cnn + c_vit
    assert model.head.in_features == model.num_features
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        pre = model.forward_head(features, pre_logits=True)
        logits = model(x)
        pooled = torch.cat(
            (
                model.pool_norm_cnn(model._pyramid(model.cnn, x)[3].mean(1)),
                model.pool_norm_vit(model._pyramid(model.vit, x)[3].mean(1)),
            ),
            dim=-1,
        )
    assert features.shape == (2, 64, model.num_features)
    assert pre.shape == (2, model.num_features) and logits.shape == (2, 3)
    assert torch.equal(pre[:, 64:], pooled)
    assert torch.allclose(pre[:, :64], features[:, :, :64].mean(1))
    with torch.no_grad():
        model.head.weight[:, :64] = 0  # the query path's contribution zeroed: a linear probe on the backbones
        assert torch.allclose(model(x), pooled @ model.head.weight[:, 64:].T + model.head.bias, atol=1e-6)
    model.reset_classifier(5)
    assert model.head.in_features == model.num_features and model(x).shape == (2, 5)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    plain = tiny()
    assert plain.num_features == 64 and not hasattr(plain, "pool_norm_cnn")


def test_head_inputs_pooled_trains_and_rejects_bad_values():
    model = tiny(head_inputs="queries+pooled", projector_attn="sr").train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert model.pool_norm_cnn.weight.grad.any() and model.pool_norm_vit.weight.grad.any()
    with pytest.raises(ValueError, match="head_inputs must be one of 'queries', 'queries\\+pooled'"):
        tiny(head_inputs="pooled")
    with pytest.raises(ValueError, match="needs at least one query stage"):
        tiny(head_inputs="queries+pooled", stage_depths=(0, 0, 0, 0))
