"""fp32 against bf16 autocast on this CPU, for the CPU preset's models, and what ``precision: auto`` picks.

Run from the repository root:

    .venv/bin/python benchmarks/bench_precision.py --out benchmarks/results/precision_cpu_<kind>.md

Measures, in one run and one process: a 1024x1024 matmul in fp32 and bf16; inference and
training images/s of the CPU preset's HSQformer-S (configs/cpu.yaml: EfficientNet-Lite0 + Lite1,
64 queries, width 192, 160 px) and of EfficientNet-Lite0 alone, each in fp32 and under bf16
autocast. Whether bf16 pays depends on whether the processor computes it natively (AVX-512 BF16
or AMX) or emulates it; the report's header records which.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_autocast, markdown_header, matmul_gflops, timed  # noqa: E402
from hsqformer.hardware import AUTO, resolve_precision  # noqa: E402
from hsqformer.training.config import load_config  # noqa: E402
from hsqformer.training.modeling import build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "bf16")


def rates(model: torch.nn.Module, precision: str, img_size: int, batch: int, repeats: int) -> tuple[float, float]:
    """(inference, training) images/s of one model at one precision."""
    x = torch.randn(batch, 3, img_size, img_size)
    y = torch.randint(0, 2, (batch,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def infer() -> None:
        with torch.no_grad(), cpu_autocast(precision):
            model(x)

    def train() -> None:
        optimizer.zero_grad(set_to_none=True)
        with cpu_autocast(precision):
            loss = F.cross_entropy(model(x).float(), y)
            aux = getattr(model, "aux_loss", None)
            if isinstance(aux, torch.Tensor):
                loss = loss + 0.01 * aux.float()
        loss.backward()
        optimizer.step()

    model.eval()
    infer_rate = batch / timed(infer, repeats)
    model.train()
    train_rate = batch / timed(train, repeats)
    return infer_rate, train_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cfg = load_config(REPO / "configs" / "cpu.yaml")
    lite0 = load_config(REPO / "configs" / "cpu_baselines" / "lite0.yaml")
    size = cfg.augment.img_size
    choice = resolve_precision(AUTO, "cpu")
    lines = [markdown_header("fp32 against bf16 autocast on this CPU")]
    lines.append(f"\n`precision: auto` here: **{choice.precision}** ({choice.reason}).\n")
    lines.append("## 1024x1024 matmul (GFLOP/s)\n")
    lines.append("| fp32 | bf16 |\n|---|---|")
    lines.append(f"| {matmul_gflops('fp32', 1024):.1f} | {matmul_gflops('bf16', 1024):.1f} |")
    lines.append(f"\n## CPU preset models, batch {args.batch}, {size}x{size} (images/s, median of {args.repeats})\n")
    lines.append("| model | infer fp32 | infer bf16 | bf16/fp32 | train fp32 | train bf16 | bf16/fp32 |")
    lines.append("|---|---|---|---|---|---|---|")
    for label, config in (("HSQformer-S, CPU preset (Lite0 + Lite1)", cfg), ("EfficientNet-Lite0 alone", lite0)):
        model, _ = build_model(config, 2)
        measured = {p: rates(model, p, size, args.batch, args.repeats) for p in PRECISIONS}
        (i32, t32), (i16, t16) = measured["fp32"], measured["bf16"]
        lines.append(f"| {label} | {i32:.2f} | {i16:.2f} | {i16 / i32:.2f}x | {t32:.2f} | {t16:.2f} | {t16 / t32:.2f}x |")
        print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
