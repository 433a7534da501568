"""Fast start: the command line and the light commands never import torch or timm, and yet
``import hsqformer`` + ``timm.create_model("hsqformer_...")`` works in either import order."""

from __future__ import annotations

import subprocess
import sys

from shared_data import SAMPLE

HEAVY = ("torch", "timm", "lightning", "torchvision")


def python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (this one has long imported torch)."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def heavy_after(code: str) -> list[str]:
    """The heavy modules imported once ``code`` has run."""
    result = python(f"{code}\nimport sys\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    return eval(result.stdout.strip().splitlines()[-1])  # noqa: S307  (our own print of a list of names)


def test_import_and_the_whole_command_line_do_not_import_torch() -> None:
    assert heavy_after("import hsqformer") == []
    assert heavy_after("from hsqformer.cli import build_app; build_app()") == []


def test_help_lists_every_command() -> None:
    result = python("import sys; sys.argv = ['hsqformer', '--help']\nfrom hsqformer.cli import main\n"
                     "try:\n    main()\nexcept SystemExit as exit_:\n    assert not exit_.code")
    for command in ("info", "cv", "evaluate", "predict", "dicom2png", "audit", "compare", "readers", "demo"):
        assert f" {command} " in result.stdout, result.stdout


def test_audit_runs_without_torch() -> None:
    code = (f"import sys; sys.argv = ['hsqformer', 'audit', {str(SAMPLE)!r}, '--folds', '2']\n"
            "from hsqformer.cli import main\ntry:\n    main()\nexcept SystemExit as exit_:\n    assert not exit_.code")
    assert heavy_after(code) == []


def test_dicom2png_modules_do_not_import_torch() -> None:
    assert heavy_after("import hsqformer.dicom.convert, hsqformer.dicom.cli") == []


def test_models_register_with_timm_in_either_import_order() -> None:
    create = ("m = timm.create_model('hsqformer_small', num_classes=2, img_size=64, num_queries=8, embed_dim=32, "
              "backbones=('tf_efficientnet_lite0', 'convnext_atto'))\nprint(type(m).__name__)")
    registered = "print(all(timm.is_model(n) for n in ('hsqformer_base', 'cswin_base_224', 'mpvit_base', 'thynet')))"
    assert python(f"import hsqformer\nimport timm\n{create}\n{registered}").stdout.split() == ["HSQformer", "True"]
    assert python(f"import timm\nimport hsqformer\n{registered}").stdout.strip() == "True"
    attribute = python(f"import hsqformer\nprint(hsqformer.HSQformer.__name__)\nimport timm\n{registered}")
    assert attribute.stdout.split() == ["HSQformer", "True"]


def test_version_prints_the_package_version_without_torch() -> None:
    from importlib.metadata import version

    result = python("import sys; sys.argv = ['hsqformer', '--version']\nfrom hsqformer.cli import main\n"
                    "try:\n    main()\nexcept SystemExit as exit_:\n    assert not exit_.code\n"
                    f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith(f"hsqformer {version('hsqformer')}")
    assert lines[-1] == "[]"


def test_reading_a_run_folder_needs_neither_torch_nor_the_engine(smoke_run) -> None:
    """The run-folder format is a module of its own: inference, compare and sweeps read runs through it."""
    code = ("from hsqformer.training import run_folder as rf\n"
            f"cfg, data, tests = rf.resume_request({str(smoke_run)!r})\n"
            f"assert rf.unfinished_folds({str(smoke_run)!r}, cfg.cv.n_folds) == []\n"
            "assert 'hsqformer.training.engine' not in sys.modules")
    assert heavy_after(f"import sys\n{code}") == []
    inference = python("import sys\nimport hsqformer.training.inference\n"
                       "print('hsqformer.training.engine' in sys.modules)")
    assert inference.stdout.strip() == "False"
