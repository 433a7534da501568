"""What this machine can compute fast, and the training precision that follows from it.

bf16 autocast is 2-3x faster than float32 on processors that compute bf16
natively (CPUs with AVX-512 BF16 or AMX, recent NVIDIA GPUs) and many times
slower on those that emulate it (AVX2 or plain AVX-512 CPUs: a bf16 matrix
product ran 4-60x slower than float32 on such machines). ``precision: auto``
therefore picks bf16 only where the hardware runs it natively.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

AUTO = "auto"
BF16 = "bf16-mixed"
FP32 = "32-true"


@dataclass(frozen=True)
class PrecisionChoice:
    """The Lightning precision a run uses and why."""

    precision: str
    reason: str


def _cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is no such file)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo; the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def gpus_label(names: list[str]) -> str:
    """GPU names in one line: ``N× NAME`` for identical GPUs, else each name."""
    return f"{len(names)}× {names[0]}" if len(set(names)) == 1 else ", ".join(names)


def machine_label(accelerator: str = AUTO) -> str:
    """The machine training runs on, in one line: its GPUs where CUDA is used, else the CPU, its cores and native bf16.

    Recorded per fold, because a run resumed elsewhere trains its folds on different machines.
    """
    import torch

    if uses_cuda(accelerator):
        return gpus_label([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
    native, why = cpu_native_bf16()
    return f"CPU {cpu_model()}, {os.cpu_count()} cores, native bf16: {'yes, ' + why if native else 'no'}"


def cpu_capability() -> str:
    """torch's name for the widest vector instruction set it uses here (e.g. AVX2, AVX512)."""
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def cpu_native_bf16() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively, and the feature that says so (or its absence)."""
    import torch

    probes = (
        ("AMX", getattr(torch.cpu, "_is_amx_tile_supported", None), "amx_bf16"),
        ("AVX-512 BF16", getattr(torch.cpu, "_is_avx512_bf16_supported", None), "avx512_bf16"),
    )
    flags = _cpu_flags()
    for name, probe, flag in probes:
        if (probe is not None and probe()) or flag in flags:
            return True, name
    if platform.machine().lower() in ("arm64", "aarch64") and ("bf16" in flags or "asimdbf16" in flags):
        return True, "Arm BF16"
    return False, f"neither AVX-512 BF16 nor AMX (torch CPU capability {cpu_capability()})"


def uses_cuda(accelerator: str) -> bool:
    """Whether Lightning's ``accelerator`` setting puts training on a CUDA GPU here."""
    import torch

    return accelerator in (AUTO, "gpu", "cuda") and torch.cuda.is_available()


def resolve_precision(precision: str, accelerator: str = AUTO) -> PrecisionChoice:
    """Turn ``auto`` into bf16 autocast where the device runs bf16 natively, float32 elsewhere.

    Any other value is kept as it is: an explicit choice is the user's.
    """
    if precision != AUTO:
        return PrecisionChoice(precision, "set in the config")
    if uses_cuda(accelerator):
        import torch

        name = torch.cuda.get_device_name(0)
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice(BF16, f"{name} computes bf16 natively")
        return PrecisionChoice(FP32, f"{name} has no native bf16")
    native, why = cpu_native_bf16()
    if native:
        return PrecisionChoice(BF16, f"the CPU has {why}")
    return PrecisionChoice(FP32, f"the CPU has {why}: bf16 would be emulated, several times slower")


def system_info() -> dict[str, str]:
    """The facts about this machine that a user or a bug report needs."""
    import torch

    native, why = cpu_native_bf16()
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "torch CPU capability": cpu_capability(),
        "CPU native bf16": f"yes, {why}" if native else f"no: {why}",
        "CUDA": "yes" if torch.cuda.is_available() else "no",
    }
    for i in range(torch.cuda.device_count()):
        info[f"GPU {i}"] = f"{torch.cuda.get_device_name(i)} (bf16: {'yes' if torch.cuda.is_bf16_supported() else 'no'})"
    choice = resolve_precision(AUTO)
    info["precision: auto"] = f"{choice.precision} ({choice.reason})"
    return info
