"""``hsqformer explain``'s output folder: one figure per image, contact sheets, a CSV and report.json.

Layout of ``out``::

    overlays/<image stem>.png   image | heat map | blend, probability and method in the title
    contact_sheet.png           the blends of all images, if more than one (contact_sheet_<page>.png past 48)
    explanations.csv            image, probability, method, target, overlay
    report.json                 format tag, run, method, target, counts; "complete" once all is written

report.json is written first, so that ``--overwrite`` also recognises (and replaces) the folder of
an interrupted earlier call, and never a folder that this command did not write.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from hsqformer.errors import HSQformerError

REPORT_FORMAT = "hsqformer-explain/1"
CSV_NAME = "explanations.csv"
OVERLAYS = "overlays"


def overlay_names(paths: Sequence[Path]) -> list[str]:
    """A distinct PNG file name per image: its stem (unsafe characters replaced), then _2, _3 ... for repeats."""
    names, seen = [], set()
    for path in paths:
        stem = re.sub(r"[^\w.() +-]", "_", path.stem) or "image"
        name, k = f"{stem}.png", 1
        while name.lower() in seen:
            k += 1
            name = f"{stem}_{k}.png"
        seen.add(name.lower())
        names.append(name)
    return names


def explain_to_folder(
    run: Path,
    inputs: Sequence[Path],
    out: Path,
    *,
    method: str = "gradcam",
    target: str = "default",
    overwrite: bool = False,
    alpha: float = 0.45,
) -> pd.DataFrame:
    """Explain every image of ``inputs`` (files and folders, searched recursively) with the fold ensemble
    of ``run`` and write ``out`` (module docstring); returns the CSV's table. Every problem that can be
    seen before the work starts (run, method, target, unreadable images, ``out``) is a one-line error."""
    from hsqformer.data.images import load_image
    from hsqformer.data.manifest import find_unreadable
    from hsqformer.explain.explainer import check_request, explain_image
    from hsqformer.explain.figures import (
        SHEET_PAGE,
        contact_sheet,
        overlay,
        save_figure,
        thumbnail,
    )
    from hsqformer.files import prepare_report_dir, write_csv, write_json
    from hsqformer.training.inference import find_images, load_ensemble

    started = time.perf_counter()
    if not 0.0 <= alpha <= 1.0:
        raise HSQformerError(f"--alpha must be in [0, 1], got {alpha}")
    paths = find_images(inputs)
    failures = find_unreadable(paths)
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise HSQformerError(f"{next(iter(failures.values()))}{more}")
    ensemble = load_ensemble(run)
    what = check_request(ensemble.models, method, target)
    prepare_report_dir(out, overwrite, REPORT_FORMAT, "an explain output")
    report = {
        "format": REPORT_FORMAT,
        "run": str(run),
        "model": ensemble.meta.get("model_name", ""),
        "method": method,
        "target": what,
        "positive_class": ensemble.positive_class,
        "images": len(paths),
        "complete": False,
    }
    write_json(out / "report.json", report)
    rows, tiles = [], []
    for path, name in zip(tqdm(paths, desc="explain", unit="image"), overlay_names(paths), strict=True):
        image = load_image(path)
        explanation = explain_image(ensemble, image, name=str(path), method=method, target=target)
        figure = out / OVERLAYS / name
        save_figure(image, explanation, figure, ensemble.positive_class, alpha)
        caption = f"{explanation.probability:.3f} {path.name}"
        tiles.append((thumbnail(overlay(image, explanation.heatmap, alpha)), caption))
        rows.append(
            {
                "image": str(path),
                "probability": explanation.probability,
                "method": method,
                "target": explanation.target,
                "overlay": f"{OVERLAYS}/{name}",
            }
        )
    sheets = [tiles[i : i + SHEET_PAGE] for i in range(0, len(tiles), SHEET_PAGE)]
    sheet_files = []
    if len(tiles) > 1:
        for page, part in enumerate(sheets, start=1):
            sheet = "contact_sheet.png" if len(sheets) == 1 else f"contact_sheet_{page}.png"
            contact_sheet(part, out / sheet)
            sheet_files.append(sheet)
    table = pd.DataFrame(rows, columns=["image", "probability", "method", "target", "overlay"])
    write_csv(out / CSV_NAME, table)
    report.update(
        complete=True, contact_sheets=sheet_files, wall_seconds=round(time.perf_counter() - started, 1)
    )
    write_json(out / "report.json", report)
    return table
