"""``hsqformer audit``: counts, duplicates, shared patients and the shortcut floor of datasets."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Annotated

import typer

from hsqformer.errors import HSQformerError


def register(app: typer.Typer) -> None:
    """Add the ``audit`` command to the CLI."""

    @app.command()
    def audit(
        data: Annotated[list[Path], typer.Argument(help="Dataset folders or CSV manifests.")],
        classes: Annotated[str | None, typer.Option(help="Comma-separated class names, in order.")] = None,
        folds: Annotated[int, typer.Option(help="Folds of the shortcut cross-validation.")] = 5,
        seed: Annotated[int, typer.Option(help="Seed of the folds and the random forest.")] = 0,
        positive_class: Annotated[str | None, typer.Option(help="Positive class of a binary AUC.")] = None,
        out: Annotated[Path | None, typer.Option(help="Also write the Markdown report here.")] = None,
        json_path: Annotated[Path | None, typer.Option("--json", help="Also write the report as JSON here.")] = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing --out / --json files.")] = False,
    ) -> None:
        """Audit datasets: counts per class and center, exact duplicate images, patient ids
        shared across sets, and the shortcut floor (AUC from image size and grey histogram alone)."""
        from hsqformer.evaluation.audit import run_audit

        targets = [(flag, path) for flag, path in (("--out", out), ("--json", json_path)) if path is not None]
        if out is not None and json_path is not None and out.resolve() == json_path.resolve():
            raise HSQformerError(f"--out and --json name the same file {out}")
        for flag, path in targets:  # before the audit's minutes of work, not after
            if path.is_dir():
                raise HSQformerError(f"{flag} {path} is a folder; give a file name")
            if path.exists() and not overwrite:
                raise HSQformerError(f"{flag} {path} already exists; pass --overwrite to replace it")

        class_list = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = run_audit(data, class_list, folds, seed, positive_class=positive_class)
        for message in dict.fromkeys(str(w.message) for w in caught):
            typer.echo(f"warning: {message}", err=True)
        markdown = report.to_markdown()
        typer.echo(markdown)
        if out is not None:
            _write_text(out, markdown)
        if json_path is not None:
            _write_text(json_path, json.dumps(report.to_dict(), indent=2) + "\n")


def _write_text(path: Path, text: str) -> None:
    """Write through a temporary file, so a failed write never leaves half a report."""
    partial = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
    except OSError as err:
        from hsqformer.data.manifest import one_line

        raise HSQformerError(f"cannot write report {path}: {one_line(err)}") from None
