"""CPU speed of HSQformer-S/B and their backbones: images/s, time and FLOPs per component.

Run from the repository root:

    .venv/bin/python benchmarks/bench_speed.py --out benchmarks/results/speed_cpu.md

Measures, in one run: the practical peak of this machine (a large bf16 and fp32
matmul); inference and training images/s of hsqformer_small, hsqformer_base
and each of their backbones alone (bf16 autocast and fp32, batch 16, 224x224);
time, FLOPs and achieved GFLOP/s of each HSQformer component; one MoE layer
with 4 experts under top-1, top-2 and dense routing; and, in a fresh process,
the peak memory of one bf16 training step of hsqformer_base at batch 50.

With ``--device cuda`` (a GPU) it measures instead, for each variant and each of its backbones alone:
inference and training images/s with bf16 autocast at 224x224 (batch 50; 20 for hsqformer_large, as
Table 5), the achieved TFLOP/s (FLOPs of a forward pass; a training step counted as 3x) and the peak GPU
memory of training:

    python benchmarks/bench_speed.py --device cuda --variants hsqformer_small,hsqformer_base,hsqformer_large \
        --out benchmarks/results/speed_cuda_h200.md
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hsqformer  # noqa: E402,F401  (registers the variants)
from common import benchmark_device, cpu_autocast, device_name, markdown_header, matmul_gflops, timed  # noqa: E402
from hsqformer.models.complexity import count_flops  # noqa: E402
from hsqformer.models.moe import MoE  # noqa: E402

PRECISIONS = ("bf16", "fp32")


CPU = torch.device("cpu")


def _timed_on(device: torch.device, step, repeats: int, warmup: int) -> float:
    """Median seconds of ``step``; on a GPU each run waits for the device to finish."""
    def run() -> None:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return timed(run, repeats, warmup=warmup)


def inference_rate(
    model: torch.nn.Module, precision: str, batch: int, repeats: int, device: torch.device = CPU, warmup: int = 1
) -> float:
    model.eval()
    x = torch.randn(batch, 3, 224, 224, device=device)

    def step() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            model(x)

    return batch / _timed_on(device, step, repeats, warmup)


def training_rate(
    model: torch.nn.Module, precision: str, batch: int, repeats: int, device: torch.device = CPU, warmup: int = 1
) -> float:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 2, (batch,), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(model(x), y)
            aux = getattr(model, "aux_loss", None)
            if aux is not None:
                loss = loss + 0.01 * aux
        loss.backward()
        optimizer.step()

    return batch / _timed_on(device, step, repeats, warmup)


def component_times(model, precision: str, batch: int, repeats: int) -> dict[str, float]:
    """Eval seconds per batch of the backbones, projector, query stages and head, run one by one."""
    model.eval()
    x = torch.randn(batch, 3, 224, 224)
    out: dict[str, float] = {}
    with torch.no_grad(), cpu_autocast(precision):
        out["cnn"] = timed(lambda: model.cnn(x), repeats)
        out["vit"] = timed(lambda: model.vit(x), repeats)
        cnn_maps, vit_maps = model._pyramid(model.cnn, x), model._pyramid(model.vit, x)
        latents = {k: model.projector[k](cnn_maps[int(k)], vit_maps[int(k)]) for k in model.projector}
        out["projector"] = timed(lambda: [model.projector[k](cnn_maps[int(k)], vit_maps[int(k)]) for k in latents], repeats)
        queries = model.queries.expand(batch, -1, -1)

        def run_stages():
            q = queries
            for key, stage in model.stages.items():
                q = stage(q, latents[key])
            return q

        final = run_stages()
        out["stages"] = timed(run_stages, repeats)
        out["head"] = timed(lambda: model.forward_head(model.norm(final)), repeats)
    return out


def moe_times(tokens: int, dim: int, repeats: int) -> dict[str, float]:
    x = torch.randn(tokens, dim)
    out = {}
    for label, mode, k in (("top-1", "sparse", 1), ("top-2", "sparse", 2), ("dense", "dense", 4)):
        layer = MoE(dim, num_experts=4, top_k=k, mode=mode).eval()
        with torch.no_grad(), cpu_autocast("bf16"):
            out[label] = timed(lambda: layer(x), repeats)
    return out


def memory_step(model_name: str, batch: int, grad_checkpointing: bool) -> dict:
    """One bf16 training step in this process; returns peak resident memory."""
    model = timm.create_model(model_name, num_classes=2)
    model.set_grad_checkpointing(grad_checkpointing)
    start = time.perf_counter()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 2, (batch,))
    with cpu_autocast("bf16"):
        loss = F.cross_entropy(model(x), y) + 0.01 * model.aux_loss
    loss.backward()
    optimizer.step()
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "model": model_name,
        "batch": batch,
        "grad_checkpointing": grad_checkpointing,
        "peak_rss_gib": round(peak_gib, 2),
        "step_s": round(time.perf_counter() - start, 1),
    }


def measure_model(name: str, batch: int, repeats: int) -> dict:
    model = timm.create_model(name, num_classes=2)
    return {
        "gflops": count_flops(model)["total"] / 1e9,
        "infer": {p: inference_rate(model, p, batch, repeats) for p in PRECISIONS},
        "train": {p: training_rate(model, p, batch, repeats) for p in PRECISIONS},
        "backbones": [model.cnn.default_cfg["architecture"], model.vit.default_cfg["architecture"]]
        if hasattr(model, "cnn")
        else [],
    }


def measure_components(variant: str, batch: int, repeats: int) -> dict:
    model = timm.create_model(variant, num_classes=2)
    return {"flops": count_flops(model), "time": {p: component_times(model, p, batch, repeats) for p in PRECISIONS}}


def in_subprocess(*args: str) -> dict:
    """Run one measurement in a fresh process, so that each starts with clean memory."""
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] or 'killed'}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


DEVICE_BATCH = {"hsqformer_large": 20}  # Table 5: batch 20 for -L, 50 for the others


def device_rates(name: str, device: torch.device, batch: int, repeats: int) -> dict:
    """bf16 images/s (inference, training), achieved TFLOP/s and peak training memory of one model on ``device``."""
    model = timm.create_model(name, num_classes=2)
    flops = count_flops(model)["total"]
    model.to(device)
    cuda = device.type == "cuda"
    infer_rate = inference_rate(model, "bf16", batch, repeats, device, warmup=2)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    train_rate = training_rate(model, "bf16", batch, repeats, device, warmup=2)
    peak = torch.cuda.max_memory_allocated(device) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "gflops": flops / 1e9,
        "infer": infer_rate,
        "train": train_rate,
        "infer_tflops": flops * infer_rate / 1e12,
        "train_tflops": 3 * flops * train_rate / 1e12,
        "peak_gib": peak / 2**30,
        "backbones": [model.cnn.default_cfg["architecture"], model.vit.default_cfg["architecture"]]
        if hasattr(model, "cnn")
        else [],
    }


def device_report(device: torch.device, variants: tuple[str, ...], repeats: int, batch: int | None = None) -> list[str]:
    """The ``--device`` report: every variant and its backbones, one fresh model at a time (markdown lines)."""
    memory = "peak GPU memory of training" if device.type == "cuda" else "peak process RSS (whole run so far)"
    lines = [
        f"## Throughput on {device_name(device)}, bf16 autocast, 224x224, eager (median of {repeats} after 2 warm-ups)\n",
        f"| model | batch | GFLOPs/img | infer images/s | infer TFLOP/s | train images/s | train TFLOP/s | {memory} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant in variants:
        size = batch or DEVICE_BATCH.get(variant, 50)
        first = device_rates(variant, device, size, repeats)
        for name in [variant, *first["backbones"]]:
            r = first if name == variant else device_rates(name, device, size, repeats)
            lines.append(
                f"| {name} | {size} | {r['gflops']:.1f} | {r['infer']:.1f} | {r['infer_tflops']:.1f} | "
                f"{r['train']:.1f} | {r['train_tflops']:.1f} | {r['peak_gib']:.1f} GiB |"
            )
            print(lines[-1], flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/speed_cpu.md"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-batch", type=int, default=50)
    parser.add_argument("--variants", default="hsqformer_small,hsqformer_base", help="comma-separated variants")
    parser.add_argument("--skip-memory", action="store_true", help="leave out the batch-50 memory measurement")
    parser.add_argument("--worker", nargs=2, metavar=("TASK", "MODEL"), help=argparse.SUPPRESS)
    parser.add_argument("--grad-checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help="cpu (this CPU report) or cuda[:N] (the GPU report)")
    args = parser.parse_args()

    device = benchmark_device(args.device)
    if device.type == "cuda":
        variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
        lines = [markdown_header("GPU speed: HSQformer and its backbones"), *device_report(device, variants, args.repeats)]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")
        return

    if args.worker:
        task, name = args.worker
        if task == "model":
            result = measure_model(name, args.batch, args.repeats)
        elif task == "components":
            result = measure_components(name, args.batch, args.repeats)
        else:
            result = memory_step(name, args.memory_batch, args.grad_checkpointing)
        print(json.dumps(result))
        return

    common = ["--batch", str(args.batch), "--repeats", str(args.repeats)]
    lines = [markdown_header("CPU speed: HSQformer and its backbones")]
    peaks = {p: matmul_gflops(p, 4096, warmup=2) for p in PRECISIONS}
    lines.append("## Practical peak (4096x4096 matmul)\n")
    lines += [f"- {p}: {v:.0f} GFLOP/s" for p, v in peaks.items()]

    lines.append(f"\n## Throughput, batch {args.batch}, 224x224 (images/s; median of {args.repeats})\n")
    lines.append("| model | GFLOPs/img | infer bf16 | infer fp32 | train bf16 | train fp32 | infer bf16 GFLOP/s |")
    lines.append("|---|---|---|---|---|---|---|")
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    for variant in variants:
        first = in_subprocess("--worker", "model", variant, *common)
        for name in [variant, *first.get("backbones", [])]:
            r = first if name == variant else in_subprocess("--worker", "model", name, *common)
            if "error" in r:
                lines.append(f"| {name} | {r['error']} |")
                continue
            i, t = r["infer"], r["train"]
            lines.append(
                f"| {name} | {r['gflops']:.1f} | {i['bf16']:.2f} | {i['fp32']:.2f} | {t['bf16']:.2f} "
                f"| {t['fp32']:.2f} | {r['gflops'] * i['bf16']:.0f} |"
            )
            print(lines[-1], flush=True)

    lines.append(f"\n## Components (eval, batch {args.batch}; GFLOP/s = FLOPs x batch / time)\n")
    lines.append("| model | component | GFLOPs/img | share | bf16 s | bf16 GFLOP/s | fp32 s | fp32 GFLOP/s |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for variant in variants:
        data = in_subprocess("--worker", "components", variant, *common)
        if "error" in data:
            lines.append(f"| {variant} | {data['error']} |")
            continue
        total = data["flops"]["total"]
        for part in ("cnn", "vit", "projector", "stages", "head"):
            f = data["flops"].get(part, 0)
            tb, tf = data["time"]["bf16"][part], data["time"]["fp32"][part]
            lines.append(
                f"| {variant} | {part} | {f / 1e9:.2f} | {100 * f / total:.0f}% | {tb:.3f} | "
                f"{f * args.batch / tb / 1e9:.0f} | {tf:.3f} | {f * args.batch / tf / 1e9:.0f} |"
            )
        print("\n".join(lines[-5:]), flush=True)

    tokens = args.batch * 784
    moe = moe_times(tokens, 384, args.repeats)
    lines.append(f"\n## One MoE layer, 4 experts, D=384, {tokens} tokens (bf16, eval)\n")
    lines.append("| routing | seconds | vs dense |\n|---|---|---|")
    lines += [f"| {k} | {v:.3f} | {v / moe['dense']:.2f}x |" for k, v in moe.items()]

    memory_runs = () if args.skip_memory else (False, True)
    if memory_runs:
        lines.append("\n## Memory: one bf16 training step of hsqformer_base, 224x224 (fresh process, peak RSS)\n")
    for checkpointing in memory_runs:
        extra = ["--grad-checkpointing"] if checkpointing else []
        r = in_subprocess("--worker", "memory", "hsqformer_base", "--memory-batch", str(args.memory_batch), *extra)
        label = f"batch {args.memory_batch}, grad checkpointing {'on' if checkpointing else 'off'}"
        if "error" in r:
            lines.append(f"- {label}: failed ({r['error']}; exit -9 is the kernel's out-of-memory kill)")
        else:
            lines.append(f"- {label}: peak {r['peak_rss_gib']} GiB, step {r['step_s']} s")
        print(lines[-1], flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
