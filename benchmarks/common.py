"""What every benchmark report records: the command, the machine and the versions."""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def _memory_gib() -> float:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def machine_info() -> dict[str, str]:
    """Command line, date, CPU, cores, memory and package versions of this run."""
    import torch

    from hsqformer.hardware import cpu_capability, cpu_model, cpu_native_bf16

    native, why = cpu_native_bf16()
    versions = {}
    for package in ("hsqformer", "torch", "torchvision", "timm", "lightning", "numpy", "scikit-learn", "pydicom"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return {
        "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable), *sys.argv]),
        "date (UTC)": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_model(),
        "torch CPU capability": cpu_capability(),
        "CPU native bf16": f"yes, {why}" if native else f"no: {why}",
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "memory": f"{_memory_gib():.1f} GiB",
        **({"gpu": f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}"} if torch.cuda.is_available() else {}),
        "python": platform.python_version(),
        **versions,
    }


def benchmark_device(text: str) -> torch.device:
    """``--device`` as a torch device: ``cpu`` or ``cuda[:N]`` where torch sees a GPU; else stop in one line."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        sys.exit(f"error: --device {text}: expected cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"error: --device {text}: torch sees no CUDA GPU here")
    return device


def device_name(device: torch.device) -> str:
    """The device's name as a report should state it: the GPU's model, or ``the CPU``."""
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return "the CPU"


def markdown_header(title: str) -> str:
    """A report's title and its machine/versions table."""
    rows = "\n".join(f"| {k} | `{v}` |" for k, v in machine_info().items())
    return f"# {title}\n\n| | |\n|---|---|\n{rows}\n"


def cpu_autocast(precision: str):
    """bf16 autocast on the CPU for ``precision == "bf16"``, a no-op context for fp32."""
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def matmul_gflops(precision: str, n: int, warmup: int = 1) -> float:
    """GFLOP/s of one n x n matrix product at ``precision`` (fp32 or bf16): what the CPU can reach."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, repeats=5, warmup=warmup) / 1e9


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def keep_labels(data: str, labels: str, runs_dir: Path, overwrite: bool) -> str:
    """Write the rows of ``data`` whose label is one of ``labels`` as a manifest under ``runs_dir``.

    A manifest already there with other rows (earlier runs were trained on it) is replaced only with
    ``overwrite``.
    """
    import pandas as pd

    from hsqformer.data.manifest import load_dataset
    from hsqformer.errors import HSQformerError
    from hsqformer.files import write_csv

    frame = load_dataset(data, verify_images=False)
    wanted = [label.strip() for label in labels.split(",") if label.strip()]
    missing = [label for label in wanted if label not in set(frame["label"])]
    if len(wanted) < 2 or missing:
        raise HSQformerError(f"--labels {labels}: needs two or more labels of {data}"
                             + (f"; not found: {', '.join(missing)}" if missing else ""))
    kept = frame[frame["label"].isin(wanted)].reset_index(drop=True)
    target = runs_dir / "manifest.csv"
    if target.is_file() and not overwrite:
        earlier = pd.read_csv(target, dtype=str, keep_default_na=False)
        if not earlier.equals(kept):
            raise HSQformerError(f"{target} holds other rows than --labels {labels} selects; rerun with --overwrite")
        return str(target)
    return str(write_csv(target, kept))
