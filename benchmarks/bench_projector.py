"""Projector attention full (the paper's) against sr (PVTv2 linear spatial reduction) and window, on this CPU.

Run from the repository root:

    .venv/bin/python benchmarks/bench_projector.py --out benchmarks/results/projector_attention_cpu.md

Measures, in one run (random initialisation; no pretrained weights needed except the CPU preset's,
which ship offline):

1. FLOPs at 224 px of hsqformer_small (ConvNeXt-T + Swin-T) with ``projector_attn`` full / sr /
   window: projector per stage, projector total, model total, and the attention-free floor of the
   projector (its per-token Linear layers and MoE, which no attention form removes).
2. Inference images/s (fp32, eval) of hsqformer_small full vs sr vs window at 224 px, and of sr at
   448 px (Swin-T built for 448: its 7x7 windows divide every stage's map), all timed interleaved
   in one process: one batch of each model in turn (order reversed every other round), median of
   ``--repeats`` rounds; speed-ups are medians of the per-round time ratios.
3. The CPU preset (configs/cpu.yaml: EfficientNet-Lite0 + Lite1, 64 queries, width 192, 160 px)
   with ``model.kwargs.projector_attn`` full vs sr: FLOPs, inference and training images/s (fp32,
   batch 16, interleaved likewise).
4. Unless ``--memory-batch 0``: peak RSS of one fp32 training step of hsqformer_small, full vs sr at
   224 px, each in a fresh process whose address space is capped near the memory available at
   start (and whose OOM score is raised), so that a step that does not fit fails alone.

The goals it reports against (issue 16): projector FLOPs >= 4x lower at 224 px; HSQformer-S
inference >= 2.5x faster; HSQformer-S with sr at 448 px no more expensive than full at 224 px.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hsqformer  # noqa: E402,F401  (registers the variants)
from common import markdown_header  # noqa: E402
from hsqformer.models.complexity import count_flops, projector_flops  # noqa: E402
from hsqformer.training.config import load_config  # noqa: E402
from hsqformer.training.modeling import build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def interleaved(steps: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """One warm-up call of each step, then ``repeats`` rounds of one call per step, the order
    reversed every other round (so that a drift in the machine's load hits all alike).

    Returns the median seconds of each step, and the median over rounds of the first step's
    time divided by each step's time in the same round (the speed-up, robust to load that
    changes between rounds).
    """
    for step in steps.values():
        step()
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    ref = names[0]
    speedup = {n: median([a / b for a, b in zip(times[ref], times[n])]) for n in names}
    return {n: median(t) for n, t in times.items()}, speedup


def infer_step(model: torch.nn.Module, batch: int, size: int) -> Callable[[], object]:
    model.eval()
    x = torch.randn(batch, 3, size, size)

    def step() -> None:
        with torch.no_grad():
            model(x)

    return step


def train_step(model: torch.nn.Module, batch: int, size: int) -> Callable[[], object]:
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 2, (batch,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if model.aux_loss is not None:
            loss = loss + 0.01 * model.aux_loss
        loss.backward()
        optimizer.step()

    return step


def attention_free_floor(model, img_size: int) -> float:
    """FLOPs of the projector's per-token layers at full resolution: embeddings, the three
    attentions' query and output projections, the fusion and the MoE (top-k experts)."""
    flops = 0
    for key, block in model.projector.items():
        i = int(key)
        n = (img_size // (4 * 2**i)) ** 2
        d = block.fuse.out_features
        hidden = block.moe.experts[0].fc1.out_features
        macs = (model.cnn.stage_channels[i] + model.vit.stage_channels[i]) * d  # embeddings
        macs += 3 * 2 * d * d + 2 * d * d  # q and out projections of 3 attentions, fusion
        macs += block.moe.top_k * 2 * d * hidden
        flops += 2 * n * macs
    return flops


def memory_step(attn: str, batch: int) -> dict:
    """One fp32 training step of hsqformer_small at 224 px in this process; peak RSS."""
    model = timm.create_model("hsqformer_small", num_classes=2, projector_attn=attn)
    start = time.perf_counter()
    train_step(model, batch, 224)()
    return {
        "attn": attn,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "step_s": round(time.perf_counter() - start, 1),
    }


def available_gib() -> float:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def memory_in_subprocess(attn: str, batch: int, cap_gib: float) -> dict:
    def limit() -> None:
        cap = int(cap_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        try:  # if memory runs out anyway, the kernel kills this worker first, not another job
            Path("/proc/self/oom_score_adj").write_text("1000")
        except OSError:
            pass

    proc = subprocess.run(
        [sys.executable, __file__, "--memory-worker", attn, "--memory-batch", str(batch)],
        capture_output=True,
        text=True,
        preexec_fn=limit,
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["killed"]
        return {"error": f"exit {proc.returncode}: {tail[0][:200]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gf(flops: float) -> str:
    return f"{flops / 1e9:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/projector_attention_cpu.md"))
    parser.add_argument("--batch", type=int, default=8, help="inference batch of hsqformer_small")
    parser.add_argument("--preset-batch", type=int, default=16, help="batch of the CPU preset")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-repeats", type=int, default=3)
    parser.add_argument(
        "--memory-batch", type=int, default=16, help="batch of the memory measurement (the issue asks 50); 0 skips it"
    )
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_worker:
        print(json.dumps(memory_step(args.memory_worker, args.memory_batch)))
        return

    began = time.perf_counter()
    torch.manual_seed(0)
    lines = [markdown_header("Projector attention: full vs sr vs window (CPU)")]
    lines.append(
        "\nAll timings: fp32, models timed interleaved in one process (one batch of each in turn, the order "
        "reversed every other round); rates are medians over rounds, speed-ups medians of the per-round "
        "ratios; the machine is shared with other jobs, so absolute rates are noisy, "
        "ratios within one table much less so.\n"
    )

    # 1. FLOPs at 224 px
    attns = ("full", "sr", "window")
    small = {a: timm.create_model("hsqformer_small", num_classes=2, projector_attn=a) for a in attns}
    small_448 = timm.create_model("hsqformer_small", num_classes=2, projector_attn="sr", img_size=448)
    counted = {a: count_flops(small[a], 224) for a in attns}
    counted["sr@448"] = count_flops(small_448, 448)
    totals = {a: c["total"] for a, c in counted.items()}
    proj = {a: projector_flops(small[a], 224) for a in attns}
    proj["sr@448"] = projector_flops(small_448, 448)
    floor = {"224": attention_free_floor(small["full"], 224), "448": attention_free_floor(small_448, 448)}
    lines.append("## 1. hsqformer_small (ConvNeXt-T + Swin-T) GFLOPs per image\n")
    lines.append(
        "| projector_attn | img | projector stage 1 (stride 4) | stage 2 | stage 3 | stage 4 | projector | "
        "full@224 / this (projector) | attention-free floor | model total | total vs full@224 |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for a in (*attns, "sr@448"):
        p = proj[a]
        size = 448 if a == "sr@448" else 224
        lines.append(
            f"| {a.split('@')[0]} | {size} | {gf(p['0'])} | {gf(p['1'])} | {gf(p['2'])} | {gf(p['3'])} | "
            f"{gf(p['total'])} | {proj['full']['total'] / p['total']:.2f}x | {gf(floor[str(size)])} | "
            f"{gf(totals[a])} | {totals[a] / totals['full']:.2f}x |"
        )
    bound = proj["full"]["total"] / floor["224"]
    lines.append(
        f"\nThe floor is what remains with an attention of zero cost: queries keep full resolution, so the "
        f"embeddings, the query/output projections of the three attentions, the fusion and the MoE still run "
        f"on all 3136 stride-4 tokens at width 384. No attention form can make the projector more than "
        f"{bound:.2f}x cheaper at 224 px.\n"
    )
    print("\n".join(lines[-8:]), flush=True)

    # 2. Inference, hsqformer_small
    steps = {f"{a} @224": infer_step(small[a], args.batch, 224) for a in attns}
    steps["sr @448"] = infer_step(small_448, args.batch, 448)
    seconds, speedup = interleaved(steps, args.repeats)
    lines.append(f"## 2. hsqformer_small inference, batch {args.batch} (images/s, median of {args.repeats} rounds)\n")
    lines.append("| model | images/s | speed vs full @224 (median of per-round ratios) | GFLOPs/img |")
    lines.append("|---|---|---|---|")
    flops_by = {f"{a} @224": totals[a] for a in attns}
    flops_by["sr @448"] = totals["sr@448"]
    for name, s in seconds.items():
        rate = args.batch / s
        lines.append(f"| {name} | {rate:.2f} | {speedup[name]:.2f}x | {gf(flops_by[name])} |")
    print("\n".join(lines[-6:]), flush=True)
    del small, small_448, steps

    # 3. CPU preset
    preset = {}
    for a in ("full", "sr"):
        cfg = load_config(REPO / "configs" / "cpu.yaml", [f"model.kwargs.projector_attn={a}"])
        preset[a], _ = build_model(cfg, 2)
    size = cfg.augment.img_size
    preset_flops = {a: (count_flops(m, size)["total"], projector_flops(m, size)["total"]) for a, m in preset.items()}
    infer, infer_up = interleaved({a: infer_step(m, args.preset_batch, size) for a, m in preset.items()}, args.repeats)
    train, train_up = interleaved(
        {a: train_step(m, args.preset_batch, size) for a, m in preset.items()}, args.train_repeats
    )
    lines.append(
        f"\n## 3. CPU preset (configs/cpu.yaml: Lite0 + Lite1, Q=64, D=192), {size} px, batch {args.preset_batch}\n"
    )
    lines.append(
        f"| projector_attn | projector GFLOPs | total GFLOPs | infer images/s (median of {args.repeats}) | "
        f"train images/s (median of {args.train_repeats}) |"
    )
    lines.append("|---|---|---|---|---|")
    for a in preset:
        total, projector = preset_flops[a]
        lines.append(
            f"| {a} | {gf(projector)} | {gf(total)} | {args.preset_batch / infer[a]:.2f} "
            f"({infer_up[a]:.2f}x) | {args.preset_batch / train[a]:.2f} ({train_up[a]:.2f}x) |"
        )
    print("\n".join(lines[-5:]), flush=True)
    del preset

    # 4. Memory
    if args.memory_batch:
        cap = max(available_gib() + 2.0, 4.0)  # torch maps ~3.5 GiB of libraries it never makes resident
        lines.append(
            f"\n## 4. Memory: one fp32 training step of hsqformer_small, batch {args.memory_batch}, 224 px "
            f"(fresh process, peak RSS; address space capped at {cap:.1f} GiB)\n"
        )
        for a in ("full", "sr"):
            r = memory_in_subprocess(a, args.memory_batch, cap)
            if "error" in r:
                lines.append(f"- {a}: did not fit ({r['error']})")
            else:
                lines.append(f"- {a}: peak {r['peak_rss_gib']} GiB, step {r['step_s']} s")
            print(lines[-1], flush=True)

    # Goals
    sr_speedup = speedup["sr @224"]
    proj_ratio = proj["full"]["total"] / proj["sr"]["total"]
    lines.append("\n## Goals (issue 16)\n")
    lines.append("| goal | measured | met |\n|---|---|---|")
    lines.append(
        f"| projector FLOPs >= 4x lower at 224 px | {proj_ratio:.2f}x (bound for any attention: {bound:.2f}x) "
        f"| {'yes' if proj_ratio >= 4 else 'no'} |"
    )
    lines.append(
        f"| HSQformer-S inference >= 2.5x faster | {sr_speedup:.2f}x | {'yes' if sr_speedup >= 2.5 else 'no'} |"
    )
    r448_flops = totals["sr@448"] / totals["full"]
    r448_time = 1 / speedup["sr @448"]
    lines.append(
        f"| HSQformer-S sr @448 no more expensive than full @224 | {r448_flops:.2f}x the FLOPs, "
        f"{r448_time:.2f}x the time | {'yes' if r448_flops <= 1 and r448_time <= 1 else 'no'} |"
    )
    c448 = counted["sr@448"]
    others_448 = c448["cnn"] + c448["vit"] + c448["stages"]
    lines.append(
        f"\nWhy not: the projector's attention was {gf(proj['full']['total'] - floor['224'])} of its "
        f"{gf(proj['full']['total'])} GFLOPs at 224 px; sr cuts it to {gf(proj['sr']['total'] - floor['224'])}, "
        f"but the per-token layers ({gf(floor['224'])}) stay, since queries keep full resolution. "
        f"Time falls less than FLOPs because the CPU flash-attention kernel that full uses runs at more than "
        f"half the matmul rate (profiled: ~40 vs ~70 GFLOP/s), while the layers that remain (norms, GELU, "
        f"residual adds, MoE dispatch) are memory-bound. At 448 px the backbones and query stages alone cost "
        f"{gf(others_448)} GFLOPs and the "
        f"projector's per-token layers {gf(floor['448'])}: {gf(others_448 + floor['448'])} in all against "
        f"{gf(totals['full'])} for full at 224 px, whatever the attention. Memory: the CPU attention kernel "
        f"keeps no N x N matrix, so full attention's training memory is already linear in N and sr saves little."
    )
    lines.append(f"\nBenchmark wall time: {(time.perf_counter() - began) / 60:.1f} min.")
    print("\n".join(lines[-6:]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
