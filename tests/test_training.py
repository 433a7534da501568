"""Training building blocks: configs, transforms, loss, best-epoch export, checkpoints, atomic files."""

from __future__ import annotations

import json
import math
import os
import pickle
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from hsqformer.checkpoint import load_checkpoint, read_meta, save_checkpoint
from hsqformer.data import load_image
from hsqformer.errors import HSQformerError
from hsqformer.training.config import Config, config_to_dict, load_config
from hsqformer.files import atomic_path, write_json, write_text
from hsqformer.training.modeling import build_model
from hsqformer.training.module import ClassifierModule, ExportBest
from hsqformer.training.transforms import build_mixup, eval_transform, preprocess_config, train_transform
from shared_data import SAMPLE

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

TINY_OVERRIDES = [
    "model.name=hsqformer_small",
    "model.kwargs={backbones: [tf_efficientnet_lite0, convnext_atto], num_queries: 16, embed_dim: 32}",
    "augment.img_size=64",
]


def test_paper_config_is_the_table5_recipe():
    cfg = load_config(CONFIGS / "paper.yaml")
    assert cfg.model.name == "hsqformer_base"
    o, s, a, t = cfg.optimizer, cfg.scheduler, cfg.augment, cfg.trainer
    assert (o.name, o.lr, o.weight_decay, o.betas, o.grad_clip) == ("adamw", 1e-4, 1e-4, (0.9, 0.999), None)
    assert (s.name, s.warmup_epochs) == ("cosine", 1)
    assert (t.batch_size, t.epochs) == (50, 20)
    assert (a.img_size, a.scale, a.hflip, a.auto_augment) == (224, (0.7, 1.0), 0.5, "original")
    assert (a.mixup, a.cutmix, a.re_prob, a.label_smoothing) == (0.8, 1.0, 0.25, 0.1)
    kwargs = cfg.model.kwargs
    assert (kwargs["drop_path_rate"], kwargs["drop_rate"], kwargs["layer_scale_init"]) == (0.2, 0.5, 1e-6)
    assert not cfg.ema.enabled and cfg.cv.n_folds == 5
    # the code defaults are the same recipe, so a config only needs what differs
    defaults = config_to_dict(Config())
    for section in ("optimizer", "scheduler", "augment", "ema", "cv"):
        assert config_to_dict(cfg)[section] == defaults[section]


def test_large_config_uses_batch_20_and_ema():
    cfg = load_config(CONFIGS / "paper_large.yaml")
    assert cfg.model.name == "hsqformer_large"
    assert cfg.trainer.batch_size == 20 and cfg.ema.enabled and cfg.ema.decay == 0.9999
    assert cfg.optimizer.lr == 1e-4  # inherited from paper.yaml


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.trainer.batch_size % 2 == 0  # mixup needs even batches


CPU_VARIANTS = {"pooled_head": {"head_inputs": "queries+pooled"}, "sr_attention": {"projector_attn": "sr"}}


def test_cpu_variants_change_one_model_argument_of_the_cpu_preset():
    """A variant file replaces model.kwargs whole: it must repeat configs/cpu.yaml's and add only its change."""
    assert sorted(p.stem for p in (CONFIGS / "cpu_variants").glob("*.yaml")) == sorted(CPU_VARIANTS)
    base = config_to_dict(load_config(CONFIGS / "cpu.yaml"))
    for name, change in CPU_VARIANTS.items():
        variant = config_to_dict(load_config(CONFIGS / "cpu_variants" / f"{name}.yaml"))
        assert variant["model"]["kwargs"] == {**base["model"]["kwargs"], **change}, name
        assert {**variant, "model": base["model"]} == base, name


def test_extends_merges_sections_but_replaces_model_kwargs():
    cfg = load_config(CONFIGS / "smoke.yaml")
    assert cfg.model.name == "hsqformer_small"  # from paper_small.yaml
    assert cfg.model.kwargs["backbones"] == ["tf_efficientnet_lite0", "convnext_atto"]
    assert set(cfg.model.kwargs) == set(load_config(CONFIGS / "smoke.yaml").model.kwargs)
    assert cfg.optimizer.lr == 1e-4 and cfg.cv.n_folds == 2 and cfg.data.max_images == 40


def test_overrides_are_yaml_values_at_dotted_keys():
    cfg = load_config(
        CONFIGS / "smoke.yaml",
        [
            "trainer.epochs=3",
            "optimizer.lr=3e-4",  # YAML would keep this a string; the float field converts it
            "augment.scale=[0.5, 1]",
            "model.kwargs.embed_dim=48",
            "data.positive_class=null",
            "trainer.devices=2",
        ],
    )
    assert cfg.trainer.epochs == 3 and cfg.optimizer.lr == 3e-4 and cfg.augment.scale == (0.5, 1.0)
    assert cfg.model.kwargs["embed_dim"] == 48 and cfg.model.kwargs["num_queries"] == 32
    assert cfg.data.positive_class is None and cfg.trainer.devices == 2


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.epoch=2", "unknown config key 'trainer.epoch' (from --set); did you mean 'trainer.epochs'?"),
        ("trainer.epochs=two", "config key 'trainer.epochs' (from --set): expected an integer, got 'two'"),
        ("augment.scale=[0.5]", "config key 'augment.scale' (from --set): expected a list of 2 numbers"),
        ("cv.n_folds=1", "config key 'cv.n_folds': must be at least 2"),
        ("trainer.batch_size=7", "must be even with mixup/cutmix"),
        ("trainer.precision=fp8", "config key 'trainer.precision': must be one of"),
        ("data.verify_images=maybe", "expected true or false"),
        ("trainer=5", "config key 'trainer' (from --set): expected a mapping"),
        ("optimizer.backbone_lr_scale=-1", "config key 'optimizer.backbone_lr_scale': must not be negative"),
        ("noequals", "expected KEY=VALUE"),
    ],
)
def test_bad_keys_and_values_are_one_line_errors(override, message):
    with pytest.raises(HSQformerError) as err:
        load_config(CONFIGS / "smoke.yaml", [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_key_suggests_the_nearest(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: " + str(CONFIGS / "smoke.yaml") + "\noptimizer:\n  weight_decy: 0.1\n")
    with pytest.raises(HSQformerError, match=r"unknown config key 'optimizer.weight_decy' .*did you mean 'optimizer.weight_decay'"):
        load_config(bad)


def test_broken_yaml_and_extends_loops_name_the_file(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer:\n  epochs: [1,\n")
    with pytest.raises(HSQformerError, match=r"broken.yaml line \d+"):
        load_config(broken)
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(HSQformerError, match="loops back"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(HSQformerError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def _ultrasound_image():
    """An image of the embedded BUSI sample (128x128 grey, decoded to RGB)."""
    return load_image(sorted(SAMPLE.glob("*/*.png"))[0])


def test_timm_transforms_follow_the_config():
    cfg = load_config(CONFIGS / "paper.yaml", ["augment.img_size=64"])
    model, _ = build_model(load_config(CONFIGS / "smoke.yaml"), 2)
    pre = preprocess_config(cfg.augment, model)
    assert pre["mean"] == [0.485, 0.456, 0.406] and pre["img_size"] == 64
    train = train_transform(cfg.augment, pre)
    names = [type(t).__name__ for t in train.transforms]
    assert names[0] == "RandomResizedCropAndInterpolation" and "RandomErasing" in names
    assert any("AutoAugment" in n for n in names)
    image = _ultrasound_image()
    assert train(image).shape == (3, 64, 64)
    evaluate = eval_transform(pre)
    first, second = evaluate(image), evaluate(image)
    assert first.shape == (3, 64, 64) and torch.equal(first, second)


def test_loss_adds_the_weighted_moe_aux_loss():
    cfg = load_config(CONFIGS / "smoke.yaml", [*TINY_OVERRIDES, "augment.mixup_prob=0", "model.aux_loss_weight=0.5"])
    model, kwargs = build_model(cfg, 2)
    assert kwargs["img_size"] == 64  # passed on from augment.img_size
    module = ClassifierModule(model, cfg, num_classes=2, positive_index=1)
    torch.manual_seed(0)
    images, targets = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 1, 0])
    model.eval()  # no dropout or routing noise: the two forward passes agree
    loss, aux = module.compute_loss(images, targets)
    ce = F.cross_entropy(model(images), targets, label_smoothing=0.1)
    assert aux is not None and aux.item() > 0
    assert loss.item() == pytest.approx(ce.item() + 0.5 * aux.item(), rel=1e-5)


def test_plain_timm_models_train_without_aux_loss_and_with_mixup():
    cfg = load_config(CONFIGS / "smoke.yaml", ["model.name=resnet10t", "model.kwargs={}", "augment.img_size=32"])
    model, kwargs = build_model(cfg, 3)
    assert "img_size" not in kwargs  # ResNets take no input size
    module = ClassifierModule(model, cfg, num_classes=3, positive_index=1)
    assert build_mixup(cfg, 3) is not None
    loss, aux = module.compute_loss(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))
    assert aux is None and loss.ndim == 0 and math.isfinite(loss.item())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_unknown_model_and_bad_kwargs_are_one_line_errors():
    with pytest.raises(HSQformerError, match="unknown timm model 'resnet_nope'"):
        build_model(load_config(None, ["model.name=resnet_nope"]), 2)
    with pytest.raises(HSQformerError, match="hsqformer_small"):
        build_model(load_config(CONFIGS / "smoke.yaml", ["model.kwargs.backbones=[resnet10t]"]), 2)


def _fake_trainer(auc: float, epoch: int) -> SimpleNamespace:
    return SimpleNamespace(
        sanity_checking=False, callback_metrics={"val_auc": torch.tensor(auc)}, current_epoch=epoch, is_global_zero=True
    )


def test_export_best_keeps_the_best_auc_epoch_and_survives_resume():
    saved = []
    module = SimpleNamespace(eval_model=lambda: "weights")
    exporter = ExportBest(lambda weights, score, epoch: saved.append((epoch, score)))
    for epoch, auc in enumerate([math.nan, 0.6, 0.5, 0.7, 0.7]):
        exporter.on_validation_end(_fake_trainer(auc, epoch), module)
    assert [e for e, _ in saved] == [0, 1, 3]  # first epoch always; then only strict improvements
    state = exporter.state_dict()
    resumed = ExportBest(lambda weights, score, epoch: saved.append((epoch, score)))
    resumed.load_state_dict(state)
    resumed.on_validation_end(_fake_trainer(0.65, 5), module)
    assert len(saved) == 3 and resumed.best_epoch == 3


def test_checkpoint_roundtrip_never_unpickles(tmp_path, monkeypatch):
    cfg = load_config(CONFIGS / "smoke.yaml", TINY_OVERRIDES)
    model, kwargs = build_model(cfg, 3)
    model.eval()
    meta = {"model_name": cfg.model.name, "num_classes": 3, "model_kwargs": kwargs, "classes": ["a", "b", "c"]}
    save_checkpoint(tmp_path, model, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]

    def refuse(*args, **kwargs):
        raise AssertionError("checkpoint loading must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    loaded, loaded_meta = load_checkpoint(tmp_path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x), atol=1e-6)
    assert loaded_meta["classes"] == ["a", "b", "c"] and not loaded.training


def test_damaged_checkpoints_are_one_line_errors(tmp_path):
    cfg = load_config(CONFIGS / "smoke.yaml", ["model.name=resnet10t", "model.kwargs={}"])
    model, kwargs = build_model(cfg, 2)
    save_checkpoint(tmp_path, model, {"model_name": "resnet10t", "num_classes": 2, "model_kwargs": kwargs, "classes": ["a", "b"]})
    meta = read_meta(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({**meta, "model_name": "resnet14t"}))
    with pytest.raises(HSQformerError, match="cannot load .*model.safetensors into 'resnet14t'"):
        load_checkpoint(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps(meta))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(HSQformerError, match="cannot load"):
        load_checkpoint(tmp_path)
    with pytest.raises(HSQformerError, match="not a checkpoint folder"):
        load_checkpoint(tmp_path / "nowhere")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"auc": 0.8, "undefined": math.nan})
    assert json.loads(target.read_text()) == {"auc": 0.8, "undefined": None}
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_path(target) as tmp:
            tmp.write_text('{"auc": 0.')  # a half-written file ...
            raise RuntimeError("crash")  # ... when the process fails
    assert json.loads(target.read_text())["auc"] == 0.8
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_the_one_atomic_writer_keeps_files_readable_secrets_private_and_never_replaces_when_told(tmp_path):
    """Every file of the package goes through atomic_path: results get open()'s permissions (the temporary
    file's private 0600 must not leak into them), a key file keeps 0600, an exclusive write leaves an
    existing file alone, and a folder that cannot be written is one line naming the file."""
    old_mask = os.umask(0o022)
    try:
        assert stat.S_IMODE(write_text(tmp_path / "report.md", "# report\n").stat().st_mode) == 0o644
        assert stat.S_IMODE(write_json(tmp_path / "key.json", {"salt": "s"}, mode=0o600).stat().st_mode) == 0o600
    finally:
        os.umask(old_mask)
    with pytest.raises(FileExistsError):
        write_text(tmp_path / "report.md", "replaced?", exclusive=True)
    assert (tmp_path / "report.md").read_text() == "# report\n"
    assert write_text(tmp_path / "new.md", "fresh", exclusive=True).read_text() == "fresh"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.json", "new.md", "report.md"]
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root writes anywhere; a file where a folder is needed fails for everyone
        locked = tmp_path / "report.md" / "sub"
    with pytest.raises(HSQformerError, match=r"^cannot write .*out\.json: "):
        write_json(locked / "out.json", {})


def test_ema_weights_are_the_ones_validated():
    cfg = load_config(
        CONFIGS / "paper_large.yaml",
        ["model.name=resnet10t", "model.kwargs={}", "ema.decay=0.5", "ema.warmup=false"],
    )
    model, _ = build_model(cfg, 2)
    module = ClassifierModule(model, cfg, num_classes=2, positive_index=1)
    assert module.eval_model() is module.ema.module
    with torch.no_grad():
        model.conv1[0].weight.add_(1.0)
    assert not torch.allclose(module.ema.module.conv1[0].weight, model.conv1[0].weight)
    module.on_train_batch_end(None, None, 0)  # timm's first update (step 0) copies the weights
    assert torch.allclose(module.ema.module.conv1[0].weight, model.conv1[0].weight)


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_backbone_learning_rate_scale_reaches_the_optimizer_and_schedule(scale):
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    from hsqformer.training.modeling import backbone_parameters, param_groups

    model, _ = build_model(load_config(CONFIGS / "smoke.yaml", TINY_OVERRIDES), 2)
    groups = param_groups(model, weight_decay=0.05, backbone_lr_scale=scale)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    backbone = backbone_parameters(model)
    assert backbone == {id(p) for p in [*model.cnn.parameters(), *model.vit.parameters()]}
    for group in groups:
        in_backbone = {id(p) in backbone for p in group["params"]}
        assert len(in_backbone) == 1 or scale == 1.0
        assert group.get("lr_scale", 1.0) == (scale if in_backbone == {True} else 1.0)
        assert group["weight_decay"] in (0.0, 0.05)
    assert not any(id(p) in backbone for p in groups[0]["params"]) or scale == 1.0

    optimizer = create_optimizer_v2(groups, opt="adamw", lr=1e-3, weight_decay=0.05)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=2, warmup_epochs=1, step_on_epochs=False, updates_per_epoch=10
    )
    for step in (0, 5, 10, 15):
        scheduler.step_update(num_updates=step)
        base = optimizer.param_groups[0]["lr"]
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(base * group.get("lr_scale", 1.0))
    assert {g.get("lr_scale", 1.0) for g in optimizer.param_groups} == {1.0, scale}


def test_plain_model_backbone_is_all_but_its_classifier():
    from hsqformer.training.modeling import backbone_parameters

    model, _ = build_model(load_config(CONFIGS / "smoke.yaml", ["model.name=resnet10t", "model.kwargs={}"]), 2)
    head = {id(p) for p in model.get_classifier().parameters()}
    assert backbone_parameters(model) == {id(p) for p in model.parameters()} - head


@pytest.mark.parametrize(
    ("name", "new"),
    [
        ("tf_efficientnet_lite0", {"classifier"}),  # conv_head joins the last block group (timm's MATCH_PREV_GROUP)
        ("convnext_atto", {"head.norm", "head.fc"}),  # the head's norm too, as in timm's layer decay
        ("cswin_tiny_224", {"head.fc"}),  # our CSWin: its final norm belongs to the last stage
    ],
)
def test_the_new_layers_are_what_the_group_matcher_leaves_unmatched(name, new):
    """timm's convention: the groups name the pretrained body; the unmatched rest (neck, head) is new."""
    from hsqformer.training.modeling import backbone_parameters

    model, _ = build_model(load_config(CONFIGS / "smoke.yaml", [f"model.name={name}", "model.kwargs={}"]), 2)
    body = backbone_parameters(model)
    assert {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if id(p) not in body} == new
