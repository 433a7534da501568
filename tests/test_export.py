"""``hsqformer export --format onnx``: onnxruntime must give the probabilities torch gives.

On the smoke runs of HSQformer-S (tiny backbones, 2 folds) and of EfficientNet-Lite0 alone:
onnxruntime vs torch (max abs probability difference < 1e-3) on images of the embedded sample and of
liver-sysu (the latter needs ../shared/data), the ensemble graph vs ``predict_run``, dynamic batch
sizes, the sparse MoE's export form vs the layer itself, a broken export caught by verification,
and the refusals: an existing folder, a missing or unfinished run, an unknown format.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from hsqformer.errors import HSQformerError
from hsqformer.export.onnx import (
    EXPORT_FILE,
    EXPORT_FORMAT,
    TOLERANCE,
    EvalMoE,
    export_ready,
    fold_weightless,
    onnx_probabilities,
    save_model,
    verify_export,
)
from hsqformer.models.moe import MoE
from hsqformer.training.inference import ImageFiles, load_ensemble, predict_probabilities, predict_run
from hsqformer.training.transforms import eval_transform
from shared_data import DATA, requires_shared_data, sample_images
from test_cli_cv import run_cli

SAMPLE_IMAGES = sample_images("benign", 3) + sample_images("malignant", 3)


def liver_images() -> list[Path]:
    """The first three benign and the first three malignant liver-sysu images."""
    folders = [DATA / "liver-sysu" / label for label in ("benign", "malignant")]
    return [path for folder in folders for path in sorted(folder.glob("*.png"))[:3]]


def torch_probabilities(run: Path, images: list[Path]) -> np.ndarray:
    """Each fold model's probabilities in torch (folds, images, classes), as ``hsqformer predict`` computes them."""
    ensemble = load_ensemble(run)
    return predict_probabilities(ensemble.models, images, ensemble.transform, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def smoke_export(smoke_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The HSQformer smoke run exported by the command as one ensemble graph, verified on sample images."""
    out = tmp_path_factory.mktemp("export") / "hsqformer"
    verify = [arg for image in SAMPLE_IMAGES for arg in ("--verify", image)]
    code, err = run_cli("export", "--run", smoke_run, "--out", out, *verify)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def baseline_export(baseline_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The EfficientNet-Lite0 smoke run exported by the command with one graph per fold, with --overwrite
    over an earlier export (a stand-in: its export.json and an ensemble.onnx the new export does not have)."""
    out = tmp_path_factory.mktemp("export") / "baseline"
    out.mkdir()
    (out / EXPORT_FILE).write_text(json.dumps({"format": EXPORT_FORMAT}))
    (out / "ensemble.onnx").write_text("earlier export")
    code, err = run_cli("export", "--run", baseline_run, "--out", out, "--per-fold", "--overwrite")
    assert code == 0, err
    return out


def test_eval_moe_routes_like_the_sparse_moe_layer() -> None:
    """Top-1 and top-2 routing, with an expert that gets no token, give exactly the layer's output."""
    torch.manual_seed(0)
    tokens = torch.rand(2, 9, 16)  # positive, so that expert 0's all-negative gate row never wins
    for top_k in (1, 2):
        moe = MoE(16, num_experts=4, top_k=top_k).eval()
        with torch.no_grad():
            moe.router.gate.weight[0] = -1.0
            moe.router.gate.weight[1:] = torch.rand(3, 16)
            expected = moe(tokens)
            got = EvalMoE(moe)(tokens)
        assert moe.load_counts.tolist()[0] == 0 and moe.load_counts.sum() == 2 * 9 * top_k
        assert torch.equal(got, expected)


def test_export_ready_leaves_the_model_alone(smoke_run: Path) -> None:
    model = load_ensemble(smoke_run).models[0]
    ready = export_ready(model)
    assert any(isinstance(m, EvalMoE) for m in ready.modules())
    assert not any(isinstance(m, EvalMoE) for m in model.modules())
    assert all(m.mode == "sparse" for m in model.modules() if isinstance(m, MoE))


def test_top2_moe_graph_matches_torch_in_onnxruntime(tmp_path: Path) -> None:
    """The exported form of top-2 routing (topk, nonzero, gather, scatter-add), at other token counts."""
    torch.manual_seed(1)
    moe = MoE(16, num_experts=4, top_k=2).eval()
    with torch.no_grad():
        moe.router.gate.weight[0] = -1.0  # expert 0 takes no token: its batch in the graph is empty
        moe.router.gate.weight[1:] = torch.rand(3, 16)
    program = torch.onnx.export(  # as export_template does it
        EvalMoE(moe), (torch.rand(2, 5, 16),), dynamo=True, verbose=False, optimize=False,
        dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}},
    )
    fold_weightless(program.model)
    program.save(str(tmp_path / "moe.onnx"))
    session = ort.InferenceSession(str(tmp_path / "moe.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        tokens = torch.rand(batch, 5, 16)
        got = session.run(None, {session.get_inputs()[0].name: tokens.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, moe(tokens).numpy(), atol=1e-6)


def test_large_weights_go_to_an_external_data_file(tmp_path: Path) -> None:
    """Past protobuf's 2 GiB a graph's weights must live beside it; a 1-byte threshold shows the mechanism."""
    values = np.arange(300, dtype=np.float32).reshape(3, 100)  # onnx keeps tensors under 1 KiB inline
    weight = numpy_helper.from_array(values, "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["image", "w"], ["probabilities"])], "g",
        [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, ["batch", 100])], initializer=[weight],
    )
    template = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    files = save_model(template, graph, tmp_path / "m.onnx", external_above=1)
    assert files == {"file": "m.onnx", "external_data": "m.onnx.data"}
    assert (tmp_path / "m.onnx.data").stat().st_size == values.nbytes
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"image": np.ones((1, 3), np.float32)})[0], values.sum(0)[None])


def test_hsqformer_export_describes_itself_and_was_verified(smoke_export: Path, smoke_run: Path) -> None:
    record = json.loads((smoke_export / EXPORT_FILE).read_text())
    assert sorted(p.name for p in smoke_export.iterdir()) == ["README.md", "ensemble.onnx", "export.json"]
    assert record["graphs"] == [
        {"file": "ensemble.onnx", "folds": [0, 1], "outputs": ["probabilities", "fold_probabilities"]}
    ]
    assert record["input"]["shape"] == ["batch", 3, 64, 64] and record["input"]["dtype"] == "float32"
    assert record["classes"] == ["benign", "malignant"] and record["positive_class"] == "malignant"
    assert record["preprocess"] == load_ensemble(smoke_run).meta["preprocess"]
    opsets = onnx.load(str(smoke_export / "ensemble.onnx"), load_external_data=False).opset_import
    assert record["opset"] == next(o.version for o in opsets if o.domain == "")
    assert record["verification"]["images"] == len(SAMPLE_IMAGES)
    assert record["verification"]["max_abs_diff"] < TOLERANCE
    assert "Resize" in (smoke_export / "README.md").read_text()


def test_hsqformer_ensemble_graph_equals_predict(smoke_export: Path, smoke_run: Path) -> None:
    table = predict_run(smoke_run, SAMPLE_IMAGES)
    folds, mean = onnx_probabilities(smoke_export, SAMPLE_IMAGES)
    assert np.abs(mean[:, 1] - table["prob_ensemble"].to_numpy()).max() < TOLERANCE
    for k in range(2):
        assert np.abs(folds[k, :, 1] - table[f"prob_fold{k}"].to_numpy()).max() < TOLERANCE
    assert np.abs(folds.sum(axis=2) - 1).max() < 1e-5


def test_dynamic_batch_sizes_1_and_5(smoke_export: Path, smoke_run: Path) -> None:
    record = json.loads((smoke_export / EXPORT_FILE).read_text())
    images = torch.stack(list(ImageFiles(SAMPLE_IMAGES[:5], eval_transform(record["preprocess"])))).numpy()
    session = ort.InferenceSession(str(smoke_export / "ensemble.onnx"), providers=["CPUExecutionProvider"])
    five = session.run(["fold_probabilities"], {"image": images})[0]
    one = np.concatenate([session.run(["fold_probabilities"], {"image": images[i : i + 1]})[0] for i in range(5)])
    expected = torch_probabilities(smoke_run, SAMPLE_IMAGES[:5]).transpose(1, 0, 2)
    assert five.shape == (5, 2, 2)
    assert np.abs(five - expected).max() < TOLERANCE and np.abs(one - expected).max() < TOLERANCE


def test_baseline_per_fold_graphs_match_torch(baseline_export: Path, baseline_run: Path) -> None:
    record = json.loads((baseline_export / EXPORT_FILE).read_text())
    assert [g["file"] for g in record["graphs"]] == ["fold_0.onnx", "fold_1.onnx"]
    folds, mean = onnx_probabilities(baseline_export, SAMPLE_IMAGES)
    expected = torch_probabilities(baseline_run, SAMPLE_IMAGES)
    assert np.abs(folds - expected).max() < TOLERANCE
    assert np.abs(mean - expected.mean(axis=0)).max() < TOLERANCE


@requires_shared_data
def test_onnxruntime_matches_torch_on_liver_sysu(smoke_export: Path, smoke_run: Path, baseline_export: Path,
                                                 baseline_run: Path) -> None:
    images = liver_images()
    for export_dir, run in ((smoke_export, smoke_run), (baseline_export, baseline_run)):
        folds, mean = onnx_probabilities(export_dir, images)
        expected = torch_probabilities(run, images)
        assert np.abs(folds - expected).max() < TOLERANCE, export_dir.name
        assert np.abs(mean - expected.mean(axis=0)).max() < TOLERANCE, export_dir.name


def test_verification_catches_a_broken_graph(baseline_export: Path, baseline_run: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(baseline_export, broken)
    model = onnx.load(str(broken / "fold_1.onnx"))
    bias = next(init for init in model.graph.initializer if init.name.endswith("classifier.bias"))
    shifted = numpy_helper.to_array(bias) + np.array([5.0, 0.0], dtype=np.float32)  # odds of class 0 x e^5
    bias.CopyFrom(numpy_helper.from_array(shifted, bias.name))
    onnx.save(model, str(broken / "fold_1.onnx"))
    with pytest.raises(HSQformerError, match="verification failed"):
        verify_export(broken, load_ensemble(baseline_run), SAMPLE_IMAGES)


def test_overwrite_replaces_an_earlier_export_only(baseline_export: Path, baseline_run: Path, tmp_path: Path) -> None:
    written = sorted(p.name for p in baseline_export.iterdir())
    assert written == ["README.md", "export.json", "fold_0.onnx", "fold_1.onnx"]  # the earlier ensemble.onnx is gone

    out = tmp_path / "export"
    shutil.copytree(baseline_export, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, err = run_cli("export", "--run", baseline_run, "--out", out)
    assert code == 2 and err.strip() == f"error: {out} already exists; pass --overwrite to replace it"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    code, err = run_cli("export", "--run", baseline_run, "--out", foreign, "--overwrite")
    assert code == 2 and "does not hold an hsqformer ONNX export" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"] and (foreign / "keep.txt").read_text() == "mine"


def test_bad_input_fails_in_one_line(smoke_run: Path, tmp_path: Path) -> None:
    unfinished = tmp_path / "unfinished"
    shutil.copytree(smoke_run, unfinished)
    (unfinished / "fold_1" / "done.json").unlink()
    a_file = tmp_path / "file.onnx"
    a_file.write_text("")
    cases = {
        ("--run", tmp_path / "missing", "--out", tmp_path / "a"): "is not an hsqformer cv run folder",
        ("--run", unfinished, "--out", tmp_path / "b"): "is not finished (fold_1 missing)",
        ("--run", smoke_run, "--out", tmp_path / "c", "--format", "tflite"): "--format tflite: unsupported",
        ("--run", smoke_run, "--out", tmp_path / "d", "--verify", tmp_path / "nope.png"): "input not found",
        ("--run", smoke_run, "--out", a_file): "exists and is not a folder",
    }
    for args, message in cases.items():
        code, err = run_cli("export", *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.onnx", "unfinished"]
