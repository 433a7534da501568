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


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


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

    from hsqformer.hardware import cpu_capability, cpu_native_bf16

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
        "cpu": _cpu_model(),
        "torch CPU capability": cpu_capability(),
        "CPU native bf16": f"yes, {why}" if native else f"no: {why}",
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "memory": f"{_memory_gib():.1f} GiB",
        "python": platform.python_version(),
        **versions,
    }


def markdown_header(title: str) -> str:
    """A report's title and its machine/versions table."""
    rows = "\n".join(f"| {k} | `{v}` |" for k, v in machine_info().items())
    return f"# {title}\n\n| | |\n|---|---|\n{rows}\n"


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
