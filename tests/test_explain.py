"""``hsqformer explain``: Grad-CAM family maps and HSQformer's query attention for a run's fold ensemble.

Checked on a model built so that the answer is known (its evidence is local brightness: the map must
peak on a bright blob), on the smoke runs (an HSQformer and a plain timm baseline, with real
weights), through the command line, and, on liver-sysu, with Adebayo et al.'s (2018) randomisation
test: maps that do not change when the weights are randomised would explain nothing about the model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
from PIL import Image
from scipy.stats import spearmanr

from hsqformer.data.images import load_image
from hsqformer.errors import HSQformerError
from hsqformer.explain import CAM_METHODS, METHODS, Explanation, explain_image, overlay
from hsqformer.explain.attention import explicit_attention, recorded_cross_attention
from hsqformer.explain.cam import reshape_transform
from hsqformer.explain.explainer import crop_box, to_original
from hsqformer.training.inference import RunEnsemble, load_ensemble, predict_run
from hsqformer.training.transforms import eval_transform
from shared_data import DATA, requires_shared_data, sample_images
from test_cli_cv import last_line, run_cli

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PLAIN = {"interpolation": "bilinear", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


class Brightness(nn.Module):
    """A classifier whose evidence for class 1 is brightness: 8x8-pixel cell means, ReLU, mean, linear."""

    def __init__(self, gain: float = 1.0) -> None:
        super().__init__()
        conv = nn.Conv2d(3, 4, kernel_size=8, stride=8)
        nn.init.constant_(conv.weight, 1 / (3 * 64))
        nn.init.zeros_(conv.bias)
        self.features = nn.Sequential(conv, nn.ReLU())  # a last stage as CNNs have: non-negative maps
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[-1.0] * 4, [1.0] * 4]) * gain)
            self.head.bias.zero_()
        self.feature_info = [{"module": "features", "num_chs": 4, "reduction": 8}]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def ensemble_of(models: list[nn.Module], preprocess: dict) -> RunEnsemble:
    meta = {"classes": ["benign", "malignant"], "positive_class": "malignant", "preprocess": preprocess}
    return RunEnsemble(Path("synthetic"), models, meta, eval_transform(preprocess))


def blob_image() -> Image.Image:
    """120x90 dark image with a bright 20x20 square at x 60-79, y 30-49."""
    pixels = np.full((90, 120, 3), 20, dtype=np.uint8)
    pixels[30:50, 60:80] = 235
    return Image.fromarray(pixels)


@pytest.mark.parametrize("method", CAM_METHODS)
@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
def test_map_peaks_on_the_evidence_and_fits_the_original_image(method: str, crop_mode: str) -> None:
    preprocess = {**PLAIN, "img_size": 64, "crop_pct": 0.875, "crop_mode": crop_mode}
    models = [Brightness(1.0).eval(), Brightness(3.0).eval()]
    image = blob_image()
    explanation = explain_image(ensemble_of(models, preprocess), image, "blob", method)
    heat = explanation.heatmap
    assert heat.shape == (90, 120) and heat.dtype == np.float32
    assert 0.0 <= heat.min() and heat.max() == pytest.approx(1.0, abs=1e-3)
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    assert 52 <= x <= 87 and 22 <= y <= 57, f"peak at ({x}, {y}), the blob is at x 60-79, y 30-49"
    blob = np.zeros_like(heat, dtype=bool)
    blob[30:50, 60:80] = True
    assert heat[blob].mean() > 4 * heat[~blob].mean()
    x_tensor = eval_transform(preprocess)(image).unsqueeze(0)
    with torch.no_grad():
        expected = np.mean([m(x_tensor).softmax(dim=1)[0, 1].item() for m in models])
    assert explanation.probability == pytest.approx(expected, abs=1e-6)
    left, _, right, _ = crop_box(image.size, preprocess)
    if crop_mode == "center":  # the crop cuts the image's sides off: the model never saw them
        assert left > 0 and (heat[:, : int(left)] == 0).all() and (heat[:, int(np.ceil(right)) :] == 0).all()


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
@pytest.mark.parametrize("size", [(120, 90), (70, 100)])
def test_maps_go_back_through_the_evaluation_transform(crop_mode: str, size: tuple[int, int]) -> None:
    """A map equal to the network input's pixels, mapped back, is the original image where the input covers it."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    grey = (127 + 100 * np.sin(xx / 9.0) * np.cos(yy / 13.0)).astype(np.uint8)
    image = Image.fromarray(grey).convert("RGB")
    preprocess = {**PLAIN, "img_size": 64, "crop_pct": 0.8, "crop_mode": crop_mode, "mean": [0, 0, 0], "std": [1, 1, 1]}
    seen = eval_transform(preprocess)(image)[0].numpy() * 255
    back = to_original(seen, image.size, preprocess)
    left, top, right, bottom = crop_box(image.size, preprocess)
    inside = np.zeros((h, w), dtype=bool)
    rows = slice(max(0, int(np.ceil(top))) + 2, min(h, int(bottom)) - 2)
    inside[rows, max(0, int(np.ceil(left))) + 2 : min(w, int(right)) - 2] = True
    assert inside.sum() > 0.3 * h * w
    assert np.abs(back[inside] - grey[inside]).mean() < 6, "the map lands shifted or scaled on the image"
    centres_x, centres_y = np.arange(w) + 0.5, np.arange(h) + 0.5
    unseen = ((centres_x < left - 0.5) | (centres_x > right + 0.5))[None, :] | (
        (centres_y < top - 0.5) | (centres_y > bottom + 0.5)
    )[:, None]
    assert (back[unseen] == 0).all()
    if crop_mode != "border":  # "border" pads: the input covers the whole image
        assert unseen.any()


def test_token_channels_last_and_channels_first_maps_are_read_alike() -> None:
    nchw = torch.arange(2 * 5 * 3 * 4, dtype=torch.float32).reshape(2, 5, 3, 4)
    to_nchw = reshape_transform(frozenset({5}), (3, 4))
    assert torch.equal(to_nchw(nchw), nchw)
    assert torch.equal(to_nchw(nchw.permute(0, 2, 3, 1)), nchw)
    tokens = nchw.flatten(2).transpose(1, 2)
    with_class_token = torch.cat((torch.full((2, 1, 5), -1.0), tokens), dim=1)
    assert torch.equal(to_nchw(with_class_token), nchw)
    with pytest.raises(HSQformerError, match="cannot read a layer output"):
        to_nchw(torch.zeros(2, 7, 3, 4))


def test_a_token_pooled_vit_is_explained_through_its_last_attention() -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=2, img_size=64).eval()
    preprocess = {**PLAIN, "img_size": 64, "crop_pct": 1.0, "crop_mode": "squash"}
    explanation = explain_image(ensemble_of([model], preprocess), blob_image(), method="gradcam")
    assert explanation.target == "blocks.11.norm1"
    assert explanation.heatmap.max() == pytest.approx(1.0, abs=1e-3)  # the last block's own output has no gradient


def test_overlay_blends_at_the_image_size() -> None:
    image = blob_image()
    heat = np.zeros((90, 120), dtype=np.float32)
    heat[:, 60:] = 1.0
    assert overlay(image, heat, alpha=0.0).tobytes() == image.tobytes()
    full = np.asarray(overlay(image, heat, alpha=1.0))
    assert full.shape == (90, 120, 3)
    assert full[0, 0, 2] > 100 and full[0, 0, 0] < 50  # jet: 0 is blue
    assert full[0, 119, 0] > 100 and full[0, 119, 2] < 50  # 1 is red
    grey = overlay(image.convert("L"), heat)
    assert grey.mode == "RGB" and grey.size == image.size
    with pytest.raises(HSQformerError, match=r"heatmap of shape \(64, 64\) does not fit an image of 120x90"):
        overlay(image, np.zeros((64, 64)))


def test_package_import_stays_light() -> None:
    code = (
        "import sys, hsqformer.explain as e\n"
        "print(e.METHODS, [m in sys.modules for m in ('numpy', 'torch', 'matplotlib')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "('gradcam', 'gradcam++', 'hirescam', 'attention') [False, False, False]"


@pytest.fixture(scope="module")
def smoke(smoke_run: Path) -> RunEnsemble:
    return load_ensemble(smoke_run)


@pytest.fixture(scope="module")
def images() -> list[Path]:
    return sample_images("malignant", 1) + sample_images("benign", 1)


@pytest.fixture(scope="module")
def predicted(smoke_run: Path, images) -> dict[str, float]:
    """``hsqformer predict``'s ensemble probability of each image, by file name."""
    table = predict_run(smoke_run, images)
    return {Path(image).name: p for image, p in zip(table["image"], table["prob_ensemble"], strict=True)}


def wide(path: Path) -> Image.Image:
    """A sample image stretched to 150x100, so that the size checks see a non-square original."""
    return load_image(path).resize((150, 100))


@pytest.mark.parametrize(
    ("method", "target", "named"),
    [
        ("gradcam", "default", "projector stage 4"),
        ("gradcam", "cnn", "cnn stage 4 (blocks.6)"),
        ("gradcam++", "vit", "vit stage 4 (stages.3)"),
        ("hirescam", "projector", "projector stage 4"),
        ("attention", "default", "mean of stages 1, 2, 3, 4"),
        ("attention", "stage2", "stage 2"),
    ],
)
def test_hsqformer_explanations(smoke: RunEnsemble, images, predicted, method, target, named) -> None:
    for path in images:
        image = load_image(path)
        explanation = explain_image(smoke, image, str(path), method, target)
        assert isinstance(explanation, Explanation) and explanation.method == method
        assert explanation.target == named
        assert explanation.heatmap.shape == (image.height, image.width) and explanation.heatmap.dtype == np.float32
        assert 0.0 <= explanation.heatmap.min() and explanation.heatmap.max() <= 1.0
        assert explanation.probability == pytest.approx(predicted[path.name], abs=1e-6)
    stretched = wide(images[0])
    again = explain_image(smoke, stretched, "wide", method, target)
    assert again.heatmap.shape == (100, 150)
    assert np.array_equal(again.heatmap, explain_image(smoke, stretched, "wide", method, target).heatmap)
    if method == "attention":
        assert list(again.parts) == ["stage1", "stage2", "stage3", "stage4"]
        for part in again.parts.values():
            assert part.shape == (100, 150) and part.max() == pytest.approx(1.0, abs=0.02)
        assert list(again.density_range) == ["heatmap", *again.parts]
        assert all(low <= 1.001 and high >= 0.999 for low, high in again.density_range.values())  # 1: uniform
    else:
        assert again.parts == {} and again.density_range == {}
    for model in smoke.models:  # explaining leaves the models as they were
        assert all(p.requires_grad and p.grad is None for p in model.parameters())
        assert not any(m._forward_hooks for m in model.modules())


def test_the_ensemble_map_is_the_mean_of_the_fold_maps(smoke: RunEnsemble, images) -> None:
    image = wide(images[0])
    folds = [explain_image(dataclasses.replace(smoke, models=[m]), image).heatmap for m in smoke.models]
    mean = np.mean(folds, axis=0)
    assert np.abs(explain_image(smoke, image).heatmap - mean / mean.max()).max() < 0.02


def test_attention_weights_give_the_fast_path_outputs(smoke: RunEnsemble, images) -> None:
    model = smoke.models[0]
    x = smoke.transform(load_image(images[0])).unsqueeze(0)
    with torch.no_grad():
        fast = model(x)
        with recorded_cross_attention(model) as recorded:
            explicit = model(x)
        block = model.stages["1"].blocks[0]
        queries, latent = torch.randn(1, 32, 64), torch.randn(1, 16, 64)
        out, weights = explicit_attention(block.cross_attn, queries, latent)
        assert torch.allclose(out, block.cross_attn(queries, latent), atol=1e-6)
    assert torch.allclose(explicit, fast, atol=1e-5)
    assert list(recorded) == ["0", "1", "2", "3"]
    for key, stride in zip(recorded, (4, 8, 16, 32)):
        (w,) = recorded[key]  # one block per stage; (batch, heads, queries, tokens)
        assert w.shape[2:] == (32, (64 // stride) ** 2)
        assert torch.allclose(w.sum(dim=-1), torch.ones(()), atol=1e-5)
    assert weights.shape == (1, 1, 32, 16)
    assert not any(m._forward_hooks for m in model.modules())


def test_baseline_explanations_and_one_line_errors(baseline_run: Path, images) -> None:
    ensemble = load_ensemble(baseline_run)
    image = load_image(images[0])
    explanation = explain_image(ensemble, image, method="gradcam")
    assert explanation.target == "blocks.6" and explanation.heatmap.shape == (128, 128)
    expected = predict_run(baseline_run, images[:1])["prob_ensemble"].iloc[0]
    assert explanation.probability == pytest.approx(expected, abs=1e-6)
    with pytest.raises(HSQformerError, match="--method attention needs an HSQformer with query stages; this run holds"):
        explain_image(ensemble, image, method="attention")
    with pytest.raises(HSQformerError, match="--target 'cnn' is for HSQformer runs"):
        explain_image(ensemble, image, target="cnn")
    with pytest.raises(HSQformerError, match="unknown --method 'lime'; choose one of gradcam, gradcam"):
        explain_image(ensemble, image, method="lime")
    assert set(METHODS) == {"gradcam", "gradcam++", "hirescam", "attention"}


def test_explain_command(smoke_run: Path, images, predicted, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for path in images:
        (folder / path.name).write_bytes(path.read_bytes())
    extra = tmp_path / "one" / images[0].name  # the same name again, from elsewhere
    extra.parent.mkdir()
    extra.write_bytes(images[0].read_bytes())
    out = tmp_path / "out"
    code, err = run_cli("explain", folder, extra, "--run", smoke_run, "--out", out)
    assert code == 0, err
    assert "explained 3 images with gradcam (projector stage 4)" in err
    table = pd.read_csv(out / "explanations.csv")
    assert list(table.columns) == ["image", "probability", "method", "target", "overlay"]
    assert len(set(table["overlay"])) == 3 and all((out / name).is_file() for name in table["overlay"])
    expected = [predicted[Path(image).name] for image in table["image"]]
    assert np.allclose(table["probability"], expected, atol=1e-6)
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size == (3 * 208, 236)
    report = json.loads((out / "report.json").read_text())
    assert report["format"] == "hsqformer-explain/1" and report["complete"] and report["images"] == 3

    code, err = run_cli("explain", extra, "--run", smoke_run, "--out", out)
    assert code == 2 and last_line(err) == f"error: {out} already exists; pass --overwrite to replace it"
    code, err = run_cli("explain", extra, "--run", smoke_run, "--out", out, "--overwrite", "--method", "attention")
    assert code == 0, err
    assert not (out / "contact_sheet.png").exists() and len(list((out / "overlays").iterdir())) == 1

    broken = folder / "broken.png"
    broken.write_bytes(b"not a png")
    code, err = run_cli("explain", folder, "--run", smoke_run, "--out", tmp_path / "bad")
    assert code == 2 and last_line(err).startswith(f"error: unreadable image {broken}")
    assert not (tmp_path / "bad").exists()
    code, err = run_cli("explain", extra, "--run", tmp_path, "--out", tmp_path / "bad")
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(tmp_path) in err
    code, err = run_cli("explain", extra, "--run", smoke_run, "--out", tmp_path / "bad", "--target", "stage9")
    assert code == 2 and last_line(err).startswith("error: unknown --target 'stage9' for an HSQformer")


def randomised(ensemble: RunEnsemble) -> RunEnsemble:
    """The ensemble with every layer that has ``reset_parameters`` re-initialised (Adebayo et al.'s full
    randomisation; the learnable queries, level embeddings and LayerScales keep their values)."""
    models = []
    for k, model in enumerate(ensemble.models):
        torch.manual_seed(k)
        model = copy.deepcopy(model)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        models.append(model.eval())
    return dataclasses.replace(ensemble, models=models)


@requires_shared_data
def test_maps_change_when_the_weights_are_randomised(smoke: RunEnsemble) -> None:
    """Adebayo et al. (2018): a map that survives randomising the model's weights does not explain the model.

    Measured on these 8 liver-sysu images (smoke run, 64-pixel inputs, so 2x2 stride-32 maps), as the
    mean Spearman correlation of the trained and the randomised ensemble's maps over the pixels the
    crop keeps: Grad-CAM on the projector 0.16, on the CNN's last stage -0.25, HiResCAM 0.40,
    attention 0.24 (single images range from -0.5 to 0.97: a 2x2 map has few orders). The threshold
    0.5 is far below the 1 of a weight-independent map.
    """
    manifest = pd.read_csv(DATA / "liver-sysu" / "manifest.csv")
    rows = pd.concat([manifest[manifest["label"] == label].head(4) for label in ("benign", "malignant")])
    pictures = [load_image(DATA / "liver-sysu" / path) for path in rows["path"]]
    random = randomised(smoke)
    for method in ("gradcam", "attention"):
        rhos = []
        for image in pictures:
            trained = explain_image(smoke, image, method=method).heatmap
            shuffled = explain_image(random, image, method=method).heatmap
            left, top, right, bottom = crop_box(image.size, smoke.meta["preprocess"])
            keep = (slice(max(0, int(np.ceil(top))), int(bottom), 4), slice(max(0, int(np.ceil(left))), int(right), 4))
            rhos.append(spearmanr(trained[keep].ravel(), shuffled[keep].ravel()).statistic)
        assert np.mean(rhos) < 0.5, f"{method}: maps barely change with random weights, Spearman {np.round(rhos, 2)}"
