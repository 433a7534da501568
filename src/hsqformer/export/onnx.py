"""ONNX export of a finished cv run: each fold model, or the fold ensemble as one graph.

A graph takes preprocessed images (NCHW float32, dynamic batch) and returns softmax
probabilities, so that onnxruntime gives what ``hsqformer predict`` gives: the ensemble graph
returns the mean over the folds (``probabilities``) and each fold's (``fold_probabilities``); a
per-fold graph returns its model's ``probabilities``. Decoding and resizing stay outside the
graph (torchvision's antialiased PIL resize has no exact ONNX equivalent); ``export.json`` and
``README.md`` in the export folder say exactly how to prepare an image.

The exporter is ``torch.onnx.export(..., dynamo=True)``, run once per run: on fold 0, whose graph
then receives each other fold's weights (the folds share one architecture; tracing is what takes
minutes). ``torch.export`` cannot trace the sparse MoE layers as they are written for training
(expert batch sizes read from the routing as Python integers, expert-load counters updated in
place), so the exported copy of a model has each sparse MoE replaced by ``EvalMoE``: the same
router and experts, evaluation-time routing only, with the same result (``tests/test_export.py``
checks it).
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx.compose
import torch
import torch.nn as nn
from onnx import helper, numpy_helper
from torch.utils.data import DataLoader

from hsqformer.errors import HSQformerError
from hsqformer.models.moe import MoE
from hsqformer.files import check_replaceable, read_format_json, write_json, write_text
from hsqformer.training.inference import ImageFiles, RunEnsemble, find_images, load_ensemble, predict_probabilities
from hsqformer.training.transforms import eval_transform

if TYPE_CHECKING:
    import onnx_ir

EXPORT_FORMAT = "hsqformer-onnx-export/1"
EXPORT_FILE = "export.json"
README_FILE = "README.md"
ENSEMBLE_FILE = "ensemble.onnx"
ENSEMBLE_OUTPUTS = ["probabilities", "fold_probabilities"]
INPUT_NAME = "image"
#: Verification requires onnxruntime's and torch's probabilities to differ by less than this.
TOLERANCE = 1e-3
_VERSIONED = ("hsqformer", "torch", "timm", "onnx", "onnxscript", "onnxruntime")
_DECODE = (
    "decode to 8-bit RGB as hsqformer.data.images.load_image does: EXIF orientation applied, grayscale "
    "and palette images replicated to RGB, alpha dropped, 16-bit images scaled by their bit depth"
)


class EvalMoE(nn.Module):
    """The evaluation-time forward pass of a sparse ``MoE`` layer, in a form ``torch.export`` can trace.

    ``MoE._sparse`` sizes each expert's batch with Python integers read from the routing and counts
    the tokens per expert in a buffer: neither can be part of an exported graph. Here each expert
    takes the rows that ``nonzero`` finds routed to it (a size the graph computes at run time), in
    ascending token order, weighted by the same gate values and summed in the same expert order as
    ``MoE._sparse`` does, with the layer's own router and experts. Evaluation only: the router adds
    no noise and no load-balancing loss is computed.
    """

    def __init__(self, moe: MoE) -> None:
        super().__init__()
        if moe.mode != "sparse":
            raise ValueError(f"EvalMoE replaces sparse MoE layers, got mode {moe.mode!r}")
        self.router = moe.router
        self.experts = moe.experts
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        weights, indices, _ = self.router(tokens)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            chosen = indices == e  # (tokens, k); an expert appears at most once per token
            rows = chosen.any(dim=-1).nonzero().squeeze(1)
            gate = (weights * chosen).sum(dim=-1)[rows, None]
            out = out.index_add(0, rows, (expert(tokens[rows]) * gate.to(tokens.dtype)).to(out.dtype))
        return out.reshape(x.shape)


def export_ready(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every sparse MoE layer replaced by ``EvalMoE``; ``model`` is untouched."""
    ready = copy.deepcopy(model).eval()
    for parent in list(ready.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MoE) and child.mode == "sparse":
                setattr(parent, name, EvalMoE(child))
    return ready


class ProbabilityModel(nn.Module):
    """What an exported fold graph computes: the softmax probabilities (B, C) of an export-ready copy of a model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = export_ready(model)
        self.eval()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image).float().softmax(dim=1)


def export_template(model: nn.Module, img_size: int, opset: int | None = None) -> onnx.ModelProto:
    """The ONNX model of ``ProbabilityModel(model)``: input ``image`` with a dynamic batch axis, output
    ``probabilities``; every weight is an initializer named by its state-dict key, holding the tensor as
    it is, which ``fold_graph`` relies on to give the graph another fold's weights without tracing again.

    The exporter's own optimisation would break that (it folds batch norms into convolutions and drops a
    bias that happens to be zero), so the graph is exported without it and then only the computations
    that do not involve any weight are folded (``fold_weightless``).
    """
    graph_module = ProbabilityModel(model)
    example = torch.zeros(2, 3, img_size, img_size)  # torch.export would fix a batch axis of size 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracing notes, not about this graph
            program = torch.onnx.export(
                graph_module,
                (example,),
                dynamo=True,
                verbose=False,
                optimize=False,
                input_names=[INPUT_NAME],
                output_names=["probabilities"],
                dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1)}},
                opset_version=opset,
            )
    except Exception as err:  # the exporter wraps every failure in its own types, with pages of detail
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise HSQformerError(f"torch.onnx.export failed: {type(err).__name__}: {first}") from None
    weights = set(program.model.graph.initializers)
    unknown = sorted(weights - set(graph_module.state_dict()))
    if unknown:
        raise HSQformerError(f"the exported graph's initializer {unknown[0]!r} is not a weight of the model")
    fold_weightless(program.model)
    dropped = sorted(weights - set(program.model.graph.initializers))
    if dropped:
        raise HSQformerError(f"folding constants removed the model's weight {dropped[0]!r} from the graph")
    written = program.model.opset_imports[""]
    if opset is not None and written != opset:  # the exporter quietly raises an opset it cannot write
        raise HSQformerError(f"torch.onnx.export wrote ONNX opset {written}, not the {opset} asked for")
    return program.model_proto


def fold_weightless(model: onnx_ir.Model) -> None:
    """Fold, in place, the parts of ``model`` that involve no weight: shape arithmetic and constants that
    the unoptimised export leaves for onnxruntime to compute at every run (EfficientNet-Lite0 runs about
    twice as fast without them). The weights are declared graph inputs meanwhile: the folder leaves
    graph inputs alone, since their values may change."""
    import onnxscript.optimizer

    graph = model.graph
    inputs = len(graph.inputs)
    graph.inputs.extend(graph.initializers.values())
    try:
        onnxscript.optimizer.fold_constants(model)
        onnxscript.optimizer.remove_unused_nodes(model)
    finally:
        del graph.inputs[inputs:]


def fold_graph(template: onnx.ModelProto, model: nn.Module) -> onnx.GraphProto:
    """The graph of ``template`` holding the weights of ``model``, a model of the same architecture; the
    other initializers (folded constants) stay as they are."""
    state = ProbabilityModel(model).state_dict()
    graph = onnx.GraphProto()
    graph.CopyFrom(template.graph)
    for init in graph.initializer:
        tensor = state.get(init.name)
        if tensor is None:
            continue
        if tuple(tensor.shape) != tuple(init.dims):
            raise HSQformerError(
                f"weight {init.name!r} has shape {tuple(tensor.shape)}, the graph expects {tuple(init.dims)}"
            )
        init.CopyFrom(numpy_helper.from_array(tensor.detach().cpu().numpy(), init.name))
    return graph


def fold_graphs(template: onnx.ModelProto, models: Sequence[nn.Module]) -> list[onnx.GraphProto]:
    """``fold_graph`` for each model. ``models[0]``, the one ``template`` was exported from, must give
    back the template's initializers exactly: that shows they are the model's tensors, not transformed ones."""
    graphs = [fold_graph(template, model) for model in models]
    for exported, own in zip(template.graph.initializer, graphs[0].initializer, strict=True):
        if not np.array_equal(numpy_helper.to_array(exported), numpy_helper.to_array(own)):
            raise HSQformerError(
                f"the exported graph's initializer {exported.name!r} differs from the model's tensor of that name; "
                "cannot give the graph another fold's weights"
            )
    return graphs


def ensemble_graph(graphs: Sequence[onnx.GraphProto], num_classes: int) -> onnx.GraphProto:
    """One graph running every fold graph on the same ``image``; outputs ``probabilities`` (their mean, as
    ``hsqformer predict`` takes it) and ``fold_probabilities`` (batch, folds, classes).

    The fold graphs' intermediate shape annotations are left out: they name run-time sizes (how many
    tokens an expert takes) with symbols that would be shared across folds, whose sizes differ.
    onnxruntime infers the shapes itself.
    """
    nodes: list[onnx.NodeProto] = []
    initializers = [numpy_helper.from_array(np.array([1], dtype=np.int64), "fold_axis")]
    fold_outputs = []
    for k, graph in enumerate(graphs):
        prefixed = onnx.compose.add_prefix_graph(graph, f"fold{k}/", rename_inputs=False)
        nodes += prefixed.node
        initializers += prefixed.initializer
        fold_outputs.append(prefixed.output[0].name)
    nodes += [helper.make_node("Unsqueeze", [name, "fold_axis"], [f"{name}/unsqueezed"]) for name in fold_outputs]
    stacked = [f"{name}/unsqueezed" for name in fold_outputs]
    nodes.append(helper.make_node("Concat", stacked, ["fold_probabilities"], axis=1))
    nodes.append(helper.make_node("Mean", fold_outputs, ["probabilities"]))
    batch = graphs[0].input[0].type.tensor_type.shape.dim[0].dim_param
    outputs = [
        helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, [batch, num_classes]),
        helper.make_tensor_value_info("fold_probabilities", onnx.TensorProto.FLOAT, [batch, len(graphs), num_classes]),
    ]
    return helper.make_graph(nodes, "hsqformer_ensemble", [graphs[0].input[0]], outputs, initializer=initializers)


def save_model(
    template: onnx.ModelProto, graph: onnx.GraphProto, path: Path, *, external_above: float = 1.5 * 2**30
) -> dict[str, str]:
    """Write ``graph`` with ``template``'s opsets and metadata as ``path`` and check it with onnx's checker;
    the weights go to ``path.data`` beside it when they exceed ``external_above`` bytes (protobuf cannot
    write a file over 2 GiB). Returns the files for ``export.json``: ``file`` and, when written,
    ``external_data``."""
    model = onnx.ModelProto()
    model.CopyFrom(template)
    model.graph.CopyFrom(graph)
    data = f"{path.name}.data"
    external = sum(len(init.raw_data) for init in graph.initializer) > external_above
    onnx.save_model(model, str(path), save_as_external_data=external, location=data)
    onnx.checker.check_model(str(path))
    return {"file": path.name, "external_data": data} if external else {"file": path.name}


def export_run(
    run: str | Path,
    out: str | Path,
    *,
    ensemble: bool = True,
    opset: int | None = None,
    verify: Sequence[str | Path] = (),
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export a finished cv run's fold models to ONNX in the folder ``out``; returns ``export.json``'s record.

    ``ensemble``: one graph of all folds (``ensemble.onnx``), else one graph per fold (``fold_K.onnx``).
    ``verify``: images or folders on which onnxruntime's probabilities must match torch's within
    ``TOLERANCE``; the result is recorded, and a mismatch fails the export. Everything is written to a
    temporary folder beside ``out`` first, so ``out`` only ever holds a complete, checked export; an
    existing ``out`` is replaced only with ``overwrite`` and only if it holds an earlier export.
    """
    out = Path(out)
    check_replaceable(out, overwrite, EXPORT_FILE, EXPORT_FORMAT, "an hsqformer ONNX export")
    images = find_images(verify) if verify else []
    run_models = load_ensemble(run)
    template = export_template(run_models.models[0], int(run_models.meta["preprocess"]["img_size"]), opset)
    graphs = fold_graphs(template, run_models.models)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    staging = scratch / out.name  # made with the usual permissions, unlike mkdtemp's private folder
    staging.mkdir()
    try:
        if ensemble:
            files = save_model(template, ensemble_graph(graphs, len(run_models.classes)), staging / ENSEMBLE_FILE)
            written = [{**files, "folds": list(range(len(graphs))), "outputs": ENSEMBLE_OUTPUTS}]
        else:
            written = [
                {**save_model(template, graph, staging / f"fold_{k}.onnx"), "folds": [k], "outputs": ["probabilities"]}
                for k, graph in enumerate(graphs)
            ]
        record = describe(run_models, written, next(o.version for o in template.opset_import if o.domain == ""))
        write_json(staging / EXPORT_FILE, record)
        if images:  # onnx_probabilities reads the export as a user would, export.json included
            record["verification"] = verify_export(staging, run_models, images)
            write_json(staging / EXPORT_FILE, record)
        write_text(staging / README_FILE, readme(record))
        _publish(staging, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return record


def _publish(staging: Path, out: Path) -> None:
    """Move the finished export ``staging`` to ``out``, replacing an earlier export (``check_replaceable`` allowed it)."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.replace(staging, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, old / out.name)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def describe(run_models: RunEnsemble, graphs: list[dict[str, Any]], opset: int) -> dict[str, Any]:
    """The ``export.json`` record: graphs, input, outputs, preprocessing, classes and versions."""
    meta = run_models.meta
    size = int(meta["preprocess"]["img_size"])
    versions = {}
    for package in _VERSIONED:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return {
        "format": EXPORT_FORMAT,
        "run": str(Path(run_models.run).resolve()),
        "model_name": meta["model_name"],
        "model_kwargs": meta["model_kwargs"],
        "folds": len(run_models.models),
        "graphs": graphs,
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", 3, size, size],
            "dtype": "float32",
            "layout": "NCHW, RGB, normalised as in preprocess",
        },
        "outputs": {
            "probabilities": "(batch, classes) float32 softmax probabilities; the mean over the graph's folds",
            "fold_probabilities": "(batch, folds, classes) float32: each fold's probabilities (ensemble graph only)",
        },
        "classes": run_models.classes,
        "positive_class": run_models.positive_class,
        "positive_index": run_models.positive_index,
        "decode": _DECODE,
        "preprocess": meta["preprocess"],
        "preprocess_steps": [repr(step) for step in run_models.transform.transforms],
        "opset": opset,
        "exporter": (
            "torch.onnx.export(dynamo=True, optimize=False) of fold 0, sparse MoE layers as "
            "hsqformer.export.onnx.EvalMoE, then onnxscript's fold_constants on what involves no weight; "
            "the other folds' graphs are fold 0's with their weights"
        ),
        "versions": versions,
    }


def onnx_probabilities(
    export_dir: str | Path, images: Sequence[str | Path], *, batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities from an export's ONNX graphs, run by onnxruntime: each fold's (folds, images, classes)
    and the ensemble's (images, classes), the ensemble graph's own output or the mean of the fold graphs'.

    Images are decoded and prepared as ``export.json`` describes (the run's evaluation transform);
    nothing of the original run is needed.
    """
    import onnxruntime as ort

    export_dir = Path(export_dir)
    record = read_format_json(
        export_dir / EXPORT_FILE, EXPORT_FORMAT, f"{export_dir} is not an hsqformer ONNX export (no {EXPORT_FILE})"
    )
    sessions = [
        (ort.InferenceSession(str(export_dir / g["file"]), providers=["CPUExecutionProvider"]), g)
        for g in record["graphs"]
    ]
    folds: list[list[np.ndarray]] = [[] for _ in range(record["folds"])]
    means: list[np.ndarray] = []
    loader = DataLoader(ImageFiles(images, eval_transform(record["preprocess"])), batch_size=batch_size)
    for batch in loader:
        feed = {INPUT_NAME: batch.numpy()}
        for session, graph in sessions:
            outputs = dict(zip(graph["outputs"], session.run(graph["outputs"], feed), strict=True))
            if "fold_probabilities" in outputs:
                means.append(outputs["probabilities"])
                per_fold = outputs["fold_probabilities"].transpose(1, 0, 2)
            else:
                per_fold = outputs["probabilities"][None]
            for k, probs in zip(graph["folds"], per_fold, strict=True):
                folds[k].append(probs)
    fold_probs = np.stack([np.concatenate(chunks) for chunks in folds])
    return fold_probs, np.concatenate(means) if means else fold_probs.mean(axis=0)


def verify_export(
    export_dir: Path, run_models: RunEnsemble, images: Sequence[Path], *, tolerance: float = TOLERANCE
) -> dict[str, Any]:
    """Compare onnxruntime's probabilities from the export with the fold models' in torch (float32, CPU) on
    ``images``; one-line error when they differ by ``tolerance`` or more, else the comparison's record."""
    torch_folds = predict_probabilities(
        run_models.models, images, run_models.transform, batch_size=16, device=torch.device("cpu"), desc="verify"
    )
    onnx_folds, onnx_mean = onnx_probabilities(export_dir, images)
    per_fold = [float(np.abs(o - t).max()) for o, t in zip(onnx_folds, torch_folds, strict=True)]
    ensemble = float(np.abs(onnx_mean - torch_folds.mean(axis=0)).max())
    worst = max([*per_fold, ensemble])
    if not worst < tolerance:  # also catches NaN
        raise HSQformerError(
            f"verification failed: onnxruntime's probabilities differ from torch's by up to {worst:.3g} "
            f"(tolerance {tolerance:g}) on {len(images)} images; nothing was written"
        )
    return {
        "images": len(images),
        "first_image": str(images[0]),
        "max_abs_diff": worst,
        "max_abs_diff_per_fold": per_fold,
        "max_abs_diff_ensemble": ensemble,
        "tolerance": tolerance,
    }


def readme(record: dict[str, Any]) -> str:
    """The export folder's README: how to prepare an image, run a graph and read its outputs."""
    pre = record["preprocess"]
    size = pre["img_size"]
    graph = record["graphs"][0]
    files = ", ".join(
        f"`{g['file']}` (fold{'s' if len(g['folds']) > 1 else ''} {', '.join(map(str, g['folds']))}"
        + (f"; weights in `{g['external_data']}`, to keep beside it" if "external_data" in g else "")
        + ")"
        for g in record["graphs"]
    )
    steps = "\n".join(f"   - `{step}`" for step in record["preprocess_steps"])
    classes = ", ".join(f"{i}: `{name}`" for i, name in enumerate(record["classes"]))
    verified = record.get("verification")
    check = (
        f"onnxruntime matched torch on {verified['images']} images (max abs probability difference "
        f"{verified['max_abs_diff']:.2e}, tolerance {verified['tolerance']:g})."
        if verified else "Not verified at export (`hsqformer export --verify IMAGES` checks onnxruntime against torch)."
    )
    return f"""# ONNX export of `{record['model_name']}`

From the cv run `{record['run']}` ({record['folds']} folds), ONNX opset {record['opset']}: {files}.
{check}

## Input `{INPUT_NAME}`: float32, NCHW, shape (batch, 3, {size}, {size}); any batch size

1. {record['decode'][0].upper()}{record['decode'][1:]}.
2. torchvision's evaluation transform of the run (timm `create_transform` with img_size {size},
   interpolation `{pre['interpolation']}`, crop_pct {pre['crop_pct']}, crop_mode `{pre['crop_mode']}`),
   on the PIL image:
{steps}

   that is, pixel values scaled to [0, 1], then `(x - mean) / std` per channel with
   mean {pre['mean']} and std {pre['std']}.

## Outputs

- `probabilities`: (batch, {len(record['classes'])}) softmax probabilities of the classes {classes};
  for the ensemble graph, the mean over its folds (what `hsqformer predict` reports).
- `fold_probabilities` (ensemble graph only): (batch, folds, classes), each fold's probabilities.

The positive class is `{record['positive_class']}` (index {record['positive_index']}); `hsqformer predict` calls
an image positive when its probability is at least 0.5.

## Running it

```python
import onnxruntime as ort
from PIL import Image
from timm.data import create_transform

transform = create_transform(input_size={size}, is_training=False, interpolation="{pre['interpolation']}",
                             crop_pct={pre['crop_pct']}, crop_mode="{pre['crop_mode']}",
                             mean={tuple(pre['mean'])}, std={tuple(pre['std'])})
image = transform(Image.open("scan.png").convert("RGB")).numpy()[None]  # 8-bit images; see step 1 otherwise
session = ort.InferenceSession("{graph['file']}")
probabilities = session.run(["probabilities"], {{"{INPUT_NAME}": image}})[0]
```

With hsqformer installed, `hsqformer.export.onnx.onnx_probabilities("<this folder>", paths)` does the same
for image files. `export.json` holds all of the above as data, with the versions that wrote it.
"""
