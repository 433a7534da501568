"""precision: auto follows what the processor computes natively; info --system reports it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hsqformer import hardware
from hsqformer.cli import build_app
from hsqformer.training.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _cpu(monkeypatch: pytest.MonkeyPatch, *, avx512_bf16: bool, amx: bool, flags: set[str]) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(hardware.platform, "machine", lambda: "x86_64")


def test_auto_is_fp32_on_a_cpu_without_native_bf16(monkeypatch, cpu_only):
    _cpu(monkeypatch, avx512_bf16=False, amx=False, flags={"avx2", "fma", "avx512f", "avx512bw"})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    choice = hardware.resolve_precision("auto")
    assert choice.precision == "32-true"
    assert "AVX2" in choice.reason and "emulated" in choice.reason


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "flags", "feature"),
    [
        (True, False, set(), "AVX-512 BF16"),
        (False, True, set(), "AMX"),
        (False, False, {"avx512_bf16"}, "AVX-512 BF16"),  # an older torch without the probes
    ],
)
def test_auto_is_bf16_on_a_cpu_with_native_bf16(monkeypatch, cpu_only, avx512_bf16, amx, flags, feature):
    _cpu(monkeypatch, avx512_bf16=avx512_bf16, amx=amx, flags=flags)
    choice = hardware.resolve_precision("auto")
    assert choice.precision == "bf16-mixed"
    assert feature in choice.reason


def test_auto_on_cuda_follows_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Test GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert hardware.resolve_precision("auto").precision == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert hardware.resolve_precision("auto").precision == "32-true"
    _cpu(monkeypatch, avx512_bf16=False, amx=False, flags=set())
    assert hardware.resolve_precision("auto", accelerator="cpu").precision == "32-true"


def test_an_explicit_precision_is_kept(monkeypatch, cpu_only):
    _cpu(monkeypatch, avx512_bf16=False, amx=False, flags=set())
    assert hardware.resolve_precision("bf16-mixed").precision == "bf16-mixed"
    assert hardware.resolve_precision("32-true").precision == "32-true"


def test_configs_default_to_auto():
    assert load_config().trainer.precision == "auto"
    for name in ("smoke", "cpu", "paper", "paper_small", "paper_large"):
        assert load_config(CONFIGS / f"{name}.yaml").trainer.precision == "auto", name


def test_info_system_prints_the_machine_facts():
    result = CliRunner().invoke(build_app(), ["info", "--system"])
    assert result.exit_code == 0, result.output
    lines = {line[:22].strip(): line[22:] for line in result.output.splitlines()}
    assert lines["torch CPU capability"] == torch.backends.cpu.get_cpu_capability()
    assert lines["CPU native bf16"].startswith(("yes", "no"))
    assert lines["precision: auto"].split()[0] in ("bf16-mixed", "32-true")
    assert lines["cpu"] and lines["cpu"] in hardware.machine_label("cpu")
