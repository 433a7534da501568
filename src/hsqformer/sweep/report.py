"""Reading a grid: ``hsqformer compare`` over its finished points, a table per cohort and the paper's kind of figure.

The comparison is compare's own (same images, same folds): AUC with DeLong's CI, F1 with a
patient-bootstrap CI, the paired DeLong test of every point against the base config with Holm's
correction across the points. On top of it, per cohort:

- one swept setting with numbers (e.g. query number): AUC and F1 against it as lines with CI whiskers;
- named points or settings without numbers (stage schemes, serial/parallel): bars with CI whiskers;
- two swept settings (query number x dimension, experts x routing): lines of AUC and F1 against the
  first, one line per value of the second, and a heat map of each;
- points off the product (e.g. a plain-MLP point beside experts x top-k, or the base config) are
  dashed horizontal lines on line plots.

F1 is read at the paper's threshold 0.5; the tables also give F1 at each point's operating point.
A last table gives each point's training cost (minutes, precision, machine, from its folds' records),
because an ablation is also a trade of accuracy against cost, and because points trained on other
machines or in another precision (a grid split over sessions or a cluster) are not like for like.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hsqformer.errors import HSQformerError
from hsqformer.evaluation.statistics import format_ci, format_p
from hsqformer.hardware import gpus_label
from hsqformer.sweep.grid import Grid, Point
from hsqformer.sweep.settings import set_arguments
from hsqformer.files import write_csv, write_text
from hsqformer.training.run_folder import DONE_FILE, VERSIONS_FILE

#: What the figures show: label and how to read it (value, CI) from compare's per-model record.
METRICS: tuple[tuple[str, Callable[[dict[str, Any]], tuple[float, tuple[float, float]]]], ...] = (
    ("AUC", lambda m: (m["auc"], tuple(m["auc_ci"]))),
    ("F1 at 0.5", lambda m: (m["at_0.5"]["f1"]["value"], tuple(m["at_0.5"]["f1"]["ci"]))),
)


def write_sweep_report(grid: Grid, folders: dict[str, Path], out: Path, *, unfinished: Sequence[str] = (),
                       header: Sequence[str] = (), n_resamples: int = 2000) -> tuple[Path, dict[str, Any]]:
    """Compare the finished points (``folders``: point name -> run folder) and write ``out``, replacing an earlier
    report there; returns sweep.md's path and compare's report. The base point must be finished.
    """
    from hsqformer.evaluation.compare import compare_runs, load_run
    from hsqformer.evaluation.comparison_report import prepare_out, write_comparison

    points = [p for p in grid.points if p.name in folders]
    if grid.base.name not in folders:
        raise HSQformerError(f"the reference point '{grid.base.name}' (the base config) is not finished; nothing to compare with")
    if len(points) < 2:
        raise HSQformerError("only the reference point is finished; a report needs at least one other point")
    runs = [load_run(folders[p.name], name=p.name) for p in points]
    report = compare_runs(runs, reference=points.index(grid.base), n_resamples=n_resamples)
    prepare_out(out, overwrite=True)
    write_comparison(runs, report, out)
    fold_aucs = {run.name: run.fold_aucs for run in runs}
    tables, figures, rows = [], {}, []
    for cohort, part in report["cohorts"].items():
        figures[cohort] = [path.name for path in grid_figures(grid, part, cohort, out)]
        tables.append((cohort, part, _table(grid, points, part, fold_aucs if cohort == "validation" else None)))
        rows += _csv_rows(points, cohort, part, fold_aucs)
    costs = {p.name: training_cost(folders[p.name]) for p in points}
    for row in rows:
        cost = costs[row["point"]]
        row.update({"train_minutes": cost["minutes"], "precision": " ".join(cost["precisions"]),
                    "machine": "; ".join(cost["machines"])})
    write_csv(out / "sweep_table.csv", pd.DataFrame(rows))
    text = _markdown(grid, report, tables, figures, unfinished, header) + _cost_section(costs)
    return write_text(out / "sweep.md", text), report


def training_cost(run: Path) -> dict[str, Any]:
    """What training a run cost, from its folds' ``done.json`` and its ``versions.json``.

    ``minutes`` sums the folds' wall times (None when a fold did not record one); a fold resumed after
    an interruption recorded only the time since the resume, counted in ``resumed``. ``machines`` names
    each machine the folds trained on (a fold's own record, else the run's ``versions.json``, written
    where the run started): the GPUs' names, or the CPU, its cores and native bf16.
    """
    folds = [_read_json(path) for path in sorted(run.glob(f"fold_*/{DONE_FILE}"))]
    started_on = _machine(_read_json(run / VERSIONS_FILE))
    machines = sorted({str(fold.get("machine") or started_on) for fold in folds}) or [started_on]
    seconds = [fold.get("wall_seconds") for fold in folds]
    known = folds and all(isinstance(s, (int, float)) for s in seconds)
    return {
        "folds": len(folds),
        "minutes": round(sum(seconds) / 60, 1) if known else None,
        "resumed": sum(fold.get("resumed_from_epoch") is not None for fold in folds),
        "precisions": sorted({str(fold["precision"]) for fold in folds if fold.get("precision")}),
        "machines": machines,
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _machine(versions: dict[str, Any]) -> str:
    if versions.get("gpus"):
        return gpus_label(versions["gpus"])
    system = versions.get("system") or {}
    if not system and not versions.get("cpu_count"):
        return "unknown"
    cpu = f"CPU {system['cpu']}" if system.get("cpu") else "CPU"
    cores = system.get("cpu cores", versions.get("cpu_count", "?"))
    bf16 = system.get("CPU native bf16")
    bf16 = "no" if bf16 and bf16.startswith("no") else bf16  # as hsqformer.hardware.machine_label says it
    return f"{cpu}, {cores} cores" + (f", native bf16: {bf16}" if bf16 else "")


def _cost_section(costs: dict[str, dict[str, Any]]) -> str:
    lines = ["", "## Training cost", "",
             "Each point's training time is the sum of its folds' wall times as `cv` recorded them (evaluation "
             "included); times compare only between points trained on the same machine.", "",
             "| point | folds | training min | min per fold | precision | machine |", "| --- | --- | --- | --- | --- | --- |"]
    for name, cost in costs.items():
        minutes, folds = cost["minutes"], cost["folds"]
        total = "" if minutes is None else f"{minutes:.1f}" + (f" ({cost['resumed']} resumed)" if cost["resumed"] else "")
        per_fold = "" if minutes is None or not folds else f"{minutes / folds:.1f}"
        lines.append(f"| {name} | {folds} | {total} | {per_fold} | {', '.join(cost['precisions']) or 'unknown'} | "
                     f"{'; '.join(cost['machines'])} |")
    if any(cost["resumed"] for cost in costs.values()):
        lines += ["", "A fold resumed after an interruption recorded its time from the resume only: those totals "
                  "are too low."]
    precisions = sorted({p for cost in costs.values() for p in cost["precisions"]})
    machines = {machine for cost in costs.values() for machine in cost["machines"]}
    if len(precisions) > 1 or len(machines) > 1:
        lines += ["", "**Not like for like**: the points were trained in more than one precision or on more than one "
                  f"kind of machine (precisions: {', '.join(precisions) or 'unknown'}; machines: "
                  f"{'; '.join(sorted(machines))}); part of a difference between points may be that, and their "
                  "times do not compare."]
    return "\n".join(lines) + "\n"


def grid_figures(grid: Grid, part: dict[str, Any], cohort: str, out: Path) -> list[Path]:
    """The figures of one cohort (see the module docstring for which); returns their paths."""
    axes = grid.axes
    if len(axes) == 2:
        return [_lines(grid, part, cohort, out / f"sweep_{cohort}.png"),
                _heat_map(grid, part, cohort, out / f"heatmap_{cohort}.png")]
    if len(axes) == 1 and axes[0].numbers() is not None:
        return [_lines(grid, part, cohort, out / f"sweep_{cohort}.png")]
    return [_bars(grid, part, cohort, out / f"sweep_{cohort}.png")]


def _value(part: dict[str, Any], name: str, read: Callable) -> tuple[float, float, float]:
    """(value, CI low, CI high) in %, NaN where undefined."""
    value, (low, high) = read(part["models"][name])

    def percent(v: float | None) -> float:
        return math.nan if v is None else 100 * float(v)

    return percent(value), percent(low), percent(high)


def _label(grid: Grid, point: Point) -> str:
    if point.coords and len(grid.axes) == 1:
        return next(iter(point.coords.values()))
    return point.name + (" (base)" if point.is_base and point.name != "base" else "")


def _bars(grid: Grid, part: dict[str, Any], cohort: str, path: Path) -> Path:
    from hsqformer.evaluation.figures import pyplot, save_png

    plt = pyplot()
    points = [p for p in grid.points if p.name in part["models"]]
    fig, panels = plt.subplots(1, len(METRICS), figsize=(1.6 + 1.3 * len(points) * len(METRICS), 4.4))
    x = np.arange(len(points))
    for ax, (metric, read) in zip(panels, METRICS, strict=True):
        values = np.array([_value(part, p.name, read) for p in points])
        whiskers = np.abs(values[:, 1:].T - values[:, 0])
        colors = ["C1" if p.is_base else "C0" for p in points]
        ax.bar(x, values[:, 0], yerr=whiskers, capsize=4, color=colors, alpha=0.85)
        for xi, (v, _, high) in zip(x, values, strict=True):
            if not math.isnan(v):
                ax.text(xi, (high if not math.isnan(high) else v) + 0.4, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
        finite = values[np.isfinite(values)]
        if finite.size:
            ax.set_ylim(max(0.0, finite.min() - 5), min(100.0, finite.max() + 4))
        ax.set_xticks(x, [_label(grid, p) for p in points], rotation=25, ha="right", fontsize=8)
        ax.set_xlabel(grid.axes[0].name if len(grid.axes) == 1 else grid.axis_title)
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{grid.title}: {cohort} (whiskers: 95 % CI; orange: the base config; y axis cut)", fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)


def _lines(grid: Grid, part: dict[str, Any], cohort: str, path: Path) -> Path:
    from hsqformer.evaluation.figures import pyplot, save_png

    plt = pyplot()
    first = grid.axes[0]
    second = grid.axes[1] if len(grid.axes) > 1 else None
    series = second.labels if second else ("",)
    fig, panels = plt.subplots(1, len(METRICS), figsize=(5.2 * len(METRICS), 4.2))
    x = np.arange(len(first.labels))
    for ax, (metric, read) in zip(panels, METRICS, strict=True):
        for j, label in enumerate(series):
            values = np.full((len(first.labels), 3), math.nan)
            for i, value_label in enumerate(first.labels):
                coords = {first.name: value_label, **({second.name: label} if second else {})}
                point = next((p for p in grid.points if p.coords == coords), None)
                if point is not None and point.name in part["models"]:
                    values[i] = _value(part, point.name, read)
            shift = (j - (len(series) - 1) / 2) * 0.06
            ax.errorbar(x + shift, values[:, 0], yerr=np.abs(values[:, 1:].T - values[:, 0]), marker="o", ms=4,
                        capsize=3, color=f"C{j}", label=f"{second.name}={label}" if second else metric)
            base = grid.base.coords
            if base and (second is None or base[second.name] == label):
                i = first.labels.index(base[first.name])
                ax.plot(x[i] + shift, values[i, 0], "o", ms=11, mfc="none", mec="black", mew=1.2)
        for k, point in enumerate(p for p in grid.extras() if p.name in part["models"]):
            v, low, high = _value(part, point.name, read)
            ax.axhline(v, ls="--", lw=1.2, color=f"C{len(series) + k}",
                       label=f"{_label(grid, point)}: {v:.1f} [{low:.1f}, {high:.1f}]")
        ax.set_xticks(x, first.labels)
        ax.set_xlabel(first.name)
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ring = "; ring: the base config" if grid.base.coords else "; dashed: points off the grid"
    fig.suptitle(f"{grid.title}: {cohort} (whiskers: 95 % CI{ring})", fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)


def _heat_map(grid: Grid, part: dict[str, Any], cohort: str, path: Path) -> Path:
    from hsqformer.evaluation.figures import pyplot, save_png

    plt = pyplot()
    first, second = grid.axes
    fig, panels = plt.subplots(1, len(METRICS), figsize=(1.8 + 1.4 * len(first.labels) * len(METRICS),
                                                         1.6 + 0.8 * len(second.labels)))
    for ax, (metric, read) in zip(panels, METRICS, strict=True):
        matrix = np.full((len(second.labels), len(first.labels)), math.nan)
        cis = {}
        for point in grid.points:
            if not point.coords or point.name not in part["models"]:
                continue
            row, col = second.labels.index(point.coords[second.name]), first.labels.index(point.coords[first.name])
            value, low, high = _value(part, point.name, read)
            matrix[row, col] = value
            cis[row, col] = (low, high)
        image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", aspect="auto")
        fig.colorbar(image, ax=ax, shrink=0.85)
        for (row, col), value in np.ndenumerate(matrix):
            if not math.isnan(value):
                low, high = cis[row, col]
                ax.text(col, row, f"{value:.1f}\n[{low:.1f}, {high:.1f}]", ha="center", va="center", fontsize=7,
                        color="white" if value < np.nanmean(matrix) else "black")
        if grid.base.coords:
            row, col = second.labels.index(grid.base.coords[second.name]), first.labels.index(grid.base.coords[first.name])
            ax.add_patch(plt.Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, ec="red", lw=2))
        ax.set_xticks(range(len(first.labels)), first.labels)
        ax.set_yticks(range(len(second.labels)), second.labels)
        ax.set_xlabel(first.name)
        ax.set_ylabel(second.name)
        ax.set_title(f"{metric} (%)", fontsize=9)
    framed = "; red frame: the base config" if grid.base.coords else ""
    fig.suptitle(f"{grid.title}: {cohort} (95 % CI in brackets{framed})", fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)


def _settings_text(point: Point) -> str:
    return " ".join(set_arguments(point.settings)[1::2]) or "(the base config)"


def _table(grid: Grid, points: list[Point], part: dict[str, Any], fold_aucs: dict[str, list[float]] | None) -> list[str]:
    head = ["point", "settings", "AUC [95% CI]", "F1 at 0.5 [95% CI]", "F1 at operating point [95% CI]",
            f"ΔAUC vs {grid.base.name}", "DeLong p (Holm)"]
    if fold_aucs is not None:
        head.insert(5, "fold AUC mean ± sd")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for point in points:
        model = part["models"][point.name]
        paired = part["paired"].get(point.name)
        cells = [
            point.name + (" **(reference)**" if point.is_base else ""),
            f"`{_settings_text(point)}`",
            format_ci(model["auc"], model["auc_ci"]),
            format_ci(model["at_0.5"]["f1"]["value"], model["at_0.5"]["f1"]["ci"]),
            format_ci(model["at_operating_point"]["f1"]["value"], model["at_operating_point"]["f1"]["ci"]),
            f"{100 * paired['auc_difference']:+.1f}" if paired else "",
            f"{format_p(paired['delong_p'])} ({format_p(paired['delong_p_holm'])})" if paired else "",
        ]
        if fold_aucs is not None:
            aucs = np.array(fold_aucs[point.name], dtype=float)
            cells.insert(5, f"{100 * np.nanmean(aucs):.1f} ± {100 * np.nanstd(aucs, ddof=1):.1f}"
                         if np.isfinite(aucs).sum() > 1 else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _csv_rows(points: list[Point], cohort: str, part: dict[str, Any], fold_aucs: dict[str, list[float]]) -> list[dict]:
    rows = []
    for point in points:
        model = part["models"][point.name]
        paired = part["paired"].get(point.name, {})
        row: dict[str, Any] = {"cohort": cohort, "point": point.name, "reference": point.is_base,
                               "settings": _settings_text(point), **point.coords}
        for name, read in (("auc", METRICS[0][1]), ("f1_at_0.5", METRICS[1][1])):
            value, (low, high) = read(model)
            row.update({name: value, f"{name}_low": low, f"{name}_high": high})
        row["f1_at_operating_point"] = model["at_operating_point"]["f1"]["value"]
        row["auc_difference"] = paired.get("auc_difference")
        row["delong_p"] = paired.get("delong_p")
        row["delong_p_holm"] = paired.get("delong_p_holm")
        if cohort == "validation":
            row["fold_aucs"] = " ".join(f"{a:.4f}" for a in fold_aucs[point.name])
        rows.append(row)
    return rows


def _markdown(grid: Grid, report: dict[str, Any], tables: list, figures: dict[str, list[str]],
              unfinished: Sequence[str], header: Sequence[str]) -> str:
    boot = report["bootstrap"]
    lines = [
        f"# Sweep: {grid.title}",
        "",
        *header,
        "",
        f"Points compared: {len(report['runs'])}; reference (paired tests): **{grid.base.name}**, the base config. "
        + (f"Not finished, left out: {', '.join(unfinished)}." if unfinished else "Every point is finished."),
        "",
        (
            "How to read it: every point is a cross-validation run on the same images and folds. `validation` pools "
            "the out-of-fold predictions (each image scored by the fold model that did not train on it); a test "
            "cohort is scored by the mean of the fold models. AUC with DeLong's 95 % CI; F1 with a percentile "
            f"bootstrap CI ({boot['resamples']} resamples of patients), at the paper's threshold 0.5 and at each "
            f"point's operating point ({report['operating_point']['rule']} on its validation predictions). ΔAUC and "
            f"DeLong's paired test against **{grid.base.name}**, Holm-corrected across the points. The full "
            "comparison (ROC, calibration, McNemar tests, per-image scores) is in [report.md](report.md); every "
            "number is in sweep_table.csv."
        ),
    ]
    for cohort, part, table in tables:
        heading = (f"## {cohort}: {part['n_images']} images ({part['n_positive']} {report['positive_class']}), "
                   f"{part['n_patients']} patients")
        lines += ["", heading, ""]
        lines += [f"![{cohort}]({name})" for name in figures[cohort]]
        lines += ["", *table]
    return "\n".join(lines) + "\n"
