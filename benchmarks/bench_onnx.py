"""CPU inference speed: onnxruntime vs torch eager (fp32 and bf16 autocast), HSQformer-S and its backbones.

Run from the repository root:

    .venv/bin/python benchmarks/bench_onnx.py --out benchmarks/results/onnx_cpu_avx512-no-bf16.md

For each model (random weights, 2 classes, 224x224): latency per image at batch 1 and throughput at
batch 16 of the softmax probabilities, computed by torch eager in fp32, by torch eager under bf16
autocast, and by onnxruntime (CPU provider, default session options) on the graph that
``hsqformer export`` writes (``hsqformer.export.onnx.export_template``: torch.onnx dynamo export,
sparse MoE in its export form). HSQformer-S is built with the CPU preset's model kwargs
(configs/cpu.yaml: EfficientNet-Lite0 + Lite1 backbones, 64 queries, D=192) at 224 px; the backbones
are the plain timm classifiers. Each row also gives the 1-minute load average before and after it,
since on a shared machine the load moves the numbers; bf16 gets fewer repeats where it is slow.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import onnxruntime as ort
import timm
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hsqformer  # noqa: E402,F401  (registers the variants)
from common import markdown_header, timed  # noqa: E402
from hsqformer.export.onnx import ProbabilityModel, export_template  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIZE = 224


def cpu_preset_model() -> torch.nn.Module:
    """hsqformer_small with configs/cpu.yaml's model kwargs, random weights, at 224 px."""
    kwargs = yaml.safe_load((REPO / "configs" / "cpu.yaml").read_text())["model"]["kwargs"]
    kwargs.update(pretrained_backbones=False, img_size=SIZE)
    return timm.create_model("hsqformer_small", num_classes=2, **kwargs)


def measure(name: str, model: torch.nn.Module, repeats: dict[str, tuple[int, int]]) -> dict:
    """Seconds per batch of 1 and of 16 for torch fp32, torch bf16 autocast and onnxruntime, plus parity."""
    graph = ProbabilityModel(model)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    template = export_template(model, SIZE)
    export_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        template_bytes = template.SerializeToString()
        path.write_bytes(template_bytes)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    torch.manual_seed(0)
    inputs = {batch: torch.randn(batch, 3, SIZE, SIZE) for batch in (1, 16)}

    def torch_run(x: torch.Tensor, bf16: bool) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return graph(x)

    result: dict = {"name": name, "export_s": export_s, "onnx_mb": len(template_bytes) / 2**20, "seconds": {}}
    for batch, x in inputs.items():
        array = x.numpy()
        runners = {
            "torch fp32": lambda x=x: torch_run(x, False),
            "torch bf16": lambda x=x: torch_run(x, True),
            "onnxruntime": lambda array=array: session.run(["probabilities"], {"image": array}),
        }
        for engine, run in runners.items():
            n, warmup = repeats[f"{engine} b{batch}"]
            result["seconds"][(engine, batch)] = timed(run, n, warmup)
        reference = torch_run(x, False).numpy()
        onnx_probs = session.run(["probabilities"], {"image": array})[0]
        result[f"diff_onnx_b{batch}"] = float(np.abs(onnx_probs - reference).max())
        result[f"diff_bf16_b{batch}"] = float(np.abs(torch_run(x, True).float().numpy() - reference).max())
    result["load"] = (load_before, os.getloadavg()[0])
    return result


def repeat_plan(slow: bool) -> dict[str, tuple[int, int]]:
    """(repeats, warm-up runs) per engine and batch; bf16 autocast and HSQformer at batch 16 get fewer."""
    plan = {}
    for engine in ("torch fp32", "torch bf16", "onnxruntime"):
        plan[f"{engine} b1"] = (3, 1) if slow and engine == "torch bf16" else (7, 2)
        plan[f"{engine} b16"] = (1, 1) if slow and engine == "torch bf16" else ((3, 1) if slow else (5, 1))
    return plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/onnx_cpu_avx512-no-bf16.md"))
    args = parser.parse_args()

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = []
    models = [
        ("hsqformer_small (cpu.yaml kwargs)", cpu_preset_model, True),
        ("tf_efficientnet_lite0", lambda: timm.create_model("tf_efficientnet_lite0", num_classes=2), False),
        ("tf_efficientnet_lite1", lambda: timm.create_model("tf_efficientnet_lite1", num_classes=2), False),
    ]
    for name, build, slow in models:
        rows.append(measure(name, build().eval(), repeat_plan(slow)))
        r = rows[-1]
        print(name, {f"{e} b{b}": round(s, 4) for (e, b), s in r["seconds"].items()}, "load", r["load"], flush=True)

    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("onnx", "onnxscript", "onnxruntime"))
    lines = [markdown_header("CPU inference: onnxruntime vs torch eager (fp32, bf16 autocast)")]
    lines.append(
        f"\nAlso: {versions}; onnxruntime CPUExecutionProvider with default session options "
        f"(graph optimisation ORT_ENABLE_ALL, intra-op threads = physical cores). Started {started}.\n"
    )
    lines.append(f"## Latency per image, batch 1, {SIZE}x{SIZE} (ms; median)\n")
    lines.append(
        "| model | torch fp32 | torch bf16 autocast | onnxruntime fp32 | onnxruntime vs torch fp32 "
        "| load before / after |"
    )
    lines.append("|---|---|---|---|---|---|")
    for r in rows:
        s = r["seconds"]
        lines.append(
            f"| {r['name']} | {1e3 * s[('torch fp32', 1)]:.1f} | {1e3 * s[('torch bf16', 1)]:.1f} "
            f"| {1e3 * s[('onnxruntime', 1)]:.1f} | {s[('torch fp32', 1)] / s[('onnxruntime', 1)]:.2f}x faster "
            f"| {r['load'][0]:.1f} / {r['load'][1]:.1f} |"
        )
    lines.append(f"\n## Throughput, batch 16, {SIZE}x{SIZE} (images/s; median)\n")
    lines.append("| model | torch fp32 | torch bf16 autocast | onnxruntime fp32 | onnxruntime vs torch fp32 |")
    lines.append("|---|---|---|---|---|")
    for r in rows:
        s = r["seconds"]
        lines.append(
            f"| {r['name']} | {16 / s[('torch fp32', 16)]:.2f} | {16 / s[('torch bf16', 16)]:.2f} "
            f"| {16 / s[('onnxruntime', 16)]:.2f} | {s[('torch fp32', 16)] / s[('onnxruntime', 16)]:.2f}x |"
        )
    lines.append("\n## Export and parity (max abs probability difference from torch fp32, random input)\n")
    lines.append("| model | export s | ONNX MB | onnxruntime b1 / b16 | torch bf16 b1 / b16 |")
    lines.append("|---|---|---|---|---|")
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['export_s']:.0f} | {r['onnx_mb']:.0f} "
            f"| {r['diff_onnx_b1']:.1e} / {r['diff_onnx_b16']:.1e} "
            f"| {r['diff_bf16_b1']:.1e} / {r['diff_bf16_b16']:.1e} |"
        )
    repeats = repeat_plan(True)
    lines.append(
        "\nRepeats (timed, after warm-up runs): batch 1: 7 after 2; batch 16: 5 after 1 for the backbones, "
        f"{repeats['torch fp32 b16'][0]} after 1 for HSQformer-S; HSQformer-S under bf16 autocast: "
        f"{repeats['torch bf16 b1'][0]} at batch 1 and {repeats['torch bf16 b16'][0]} at batch 16 "
        "(slow without native bf16)."
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
