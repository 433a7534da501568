"""``hsqformer demo``: the whole workflow on the embedded BUSI sample, in a few minutes on a laptop CPU.

1. ``audit`` of the sample (counts, duplicates, shortcut floor),
2. cross-validation of a tiny HSQformer-S (two offline-pretrained EfficientNet-Lite0 backbones),
3. the same cross-validation (same images, folds, input size, epochs) of EfficientNet-Lite0 alone,
4. ``compare`` of the two, with the audit's shortcut floor as a third model, and its figures.

Everything goes into one folder (``--out``)::

    OUT/demo.json            what ran, with the seconds each step took
    OUT/audit.md             the data audit
    OUT/runs/hsqformer/      hsqformer cv run folder
    OUT/runs/lite0/          hsqformer cv run folder
    OUT/compare/report.md    the paired comparison, with roc_/calibration_/confusion_ PNGs

The configs are ``sample_data/demo.yaml`` and ``sample_data/demo_lite0.yaml`` inside the package. On
100 images and 20 optimizer steps per fold the numbers show that the pipeline works, not which
model is better; the report's confidence intervals say as much.

Training runs on one CPU thread unless ``OMP_NUM_THREADS`` says otherwise: models this small gain
little from more threads, and on a machine whose cores are busy with anything else, torch's threads
wait for each other at every operation (measured on a 2-core machine under load: the demo's HSQformer
training step took 11 s with 2 threads, 1 s with one).
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hsqformer import sample_data
from hsqformer.errors import HSQformerError
from hsqformer.files import write_json

DEMO_FORMAT = "hsqformer-demo/1"
DEMO_FILE = "demo.json"
CONFIGS = {  # run name -> config file in hsqformer/sample_data; the first is the reference of the comparison
    "hsqformer": "demo.yaml",
    "lite0": "demo_lite0.yaml",
}
DISPLAY = {"hsqformer": "HSQformer-S (tiny)", "lite0": "EfficientNet-Lite0"}


def config_path(name: str) -> Path:
    """The packaged config of the demo's run ``name`` (``hsqformer`` or ``lite0``)."""
    return Path(sample_data.__file__).resolve().parent / CONFIGS[name]


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an existing ``out`` unless ``overwrite`` and it is an earlier demo's folder (or empty)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise HSQformerError(f"--out {out} exists and is not a folder")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise HSQformerError(f"{out} already exists; pass --overwrite to replace it")
    if not (out / DEMO_FILE).is_file():
        raise HSQformerError(f"--overwrite: {out} does not hold an earlier demo (no {DEMO_FILE}); not deleting it")


def run_demo(
    out: str | Path,
    *,
    overwrite: bool = False,
    overrides: Sequence[str] = (),
    resamples: int = 2000,
    echo: Callable[[str], None] = print,
) -> Path:
    """Run the demo into ``out``; returns the path of the comparison report (``out/compare/report.md``).

    ``overrides`` (``KEY=VALUE``, as ``hsqformer cv --set``) apply to both models' configs, e.g.
    ``trainer.epochs=1`` for a quicker run. ``echo`` receives the progress lines.
    """
    out = Path(out)
    check_out(out, overwrite)
    started = time.perf_counter()
    data = sample_data.path()

    from hsqformer.training.config import load_config  # no torch

    configs = {name: load_config(config_path(name), list(overrides)) for name in CONFIGS}  # bad --set: fail now
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    record: dict[str, Any] = {
        "format": DEMO_FORMAT,
        "data": str(data),
        "configs": {name: str(config_path(name)) for name in CONFIGS},
        "overrides": list(overrides),
        "finished": False,
    }
    write_json(out / DEMO_FILE, record)

    seen: set[str] = set()

    def show_once(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        text = " ".join(str(message).split())
        if text not in seen:
            seen.add(text)
            echo(f"warning: {text}")

    import torch

    threads = torch.get_num_threads()
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = show_once
            echo(f"[hsqformer demo] into {out}, torch threads: {torch.get_num_threads()} (OMP_NUM_THREADS changes it)")
            timings = _steps(out, data, configs, resamples, started, echo)
    finally:
        torch.set_num_threads(threads)
    timings["total"] = time.perf_counter() - started
    report_path = out / "compare" / "report.md"
    record.update(finished=True, seconds={k: round(v, 1) for k, v in timings.items()}, report=str(report_path))
    write_json(out / DEMO_FILE, record)
    echo(f"[hsqformer demo] done in {timings['total'] / 60:.1f} min; report: {report_path}")
    return report_path


def _steps(
    out: Path, data: Path, configs: dict[str, Any], resamples: int, started: float, echo: Callable[[str], None]
) -> dict[str, float]:
    """The demo's four steps; returns the seconds each took."""
    from hsqformer.data.audit import run_audit
    from hsqformer.training.engine import run_cv

    def step(number: int, text: str) -> float:
        echo(f"[hsqformer demo] {number}/4 {text} ({time.perf_counter() - started:.0f} s)")
        return time.perf_counter()

    timings: dict[str, float] = {}
    first = configs["hsqformer"]
    t = step(1, f"audit of the embedded sample {data}")
    report = run_audit([data], n_folds=first.cv.n_folds, seed=first.cv.seed, positive_class=first.data.positive_class)
    (out / "audit.md").write_text(report.to_markdown(), encoding="utf-8")
    counts = ", ".join(f"{n} {label}" for label, n in _class_counts(report).items())
    floor = report.shortcut_auc
    echo(f"audit: {report.sets[0].n_images} images ({counts}), {len(report.duplicates)} groups of duplicates, "
         f"shortcut floor AUC {floor if floor else 'n/a'}; {out / 'audit.md'}")
    timings["audit"] = time.perf_counter() - t

    for number, (name, cfg) in enumerate(configs.items(), start=2):
        t = step(number, f"{cfg.cv.n_folds}-fold cross-validation of {DISPLAY[name]} ({cfg.model.name}, "
                         f"{cfg.augment.img_size} px, {cfg.trainer.epochs} epochs)")
        metrics = run_cv(cfg, data, {}, out / "runs" / name, command=f"hsqformer demo --out {out}")
        auc = metrics["summary"]["validation"]["auc"]
        echo(f"{name}: validation AUC {100 * auc['mean']:.1f} ± {100 * auc['std']:.1f} (mean ± std of "
             f"{cfg.cv.n_folds} folds); {out / 'runs' / name}")
        timings[name] = time.perf_counter() - t

    t = step(4, "paired comparison (DeLong, McNemar, patient-level bootstrap) with the shortcut floor")
    for line in _compare(out, first.cv.seed, resamples):
        echo(line)
    timings["compare"] = time.perf_counter() - t
    return timings


def _compare(out: Path, seed: int, resamples: int) -> list[str]:
    """Compare the two runs and the shortcut floor into ``out/compare``; returns the summary lines."""
    from hsqformer.evaluation.compare import compare_runs, load_run, shortcut_floor
    from hsqformer.evaluation.comparison_report import prepare_out, summary_lines, write_comparison

    runs = [load_run(out / "runs" / name, DISPLAY[name]) for name in CONFIGS]
    runs.append(shortcut_floor(runs[0], seed))
    report = compare_runs(runs, reference=0, n_resamples=resamples, seed=seed)
    prepare_out(out / "compare", overwrite=False)
    write_comparison(runs, report, out / "compare", seed)
    return summary_lines(report)


def _class_counts(report: Any) -> dict[str, int]:
    """Images per class of the audit's first set (its counts are per class, then per center)."""
    return {label: sum(per_center.values()) for label, per_center in report.sets[0].counts.items()}
