"""The ``export`` command: a finished cv run's models to a deployable format (ONNX for now)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hsqformer.errors import HSQformerError

FORMATS: tuple[str, ...] = ("onnx",)


def register(app: typer.Typer) -> None:
    """Add ``export`` to the ``hsqformer`` application."""

    @app.command("export")
    def export(
        run: Annotated[Path, typer.Option("--run", help="A finished cv run folder.")],
        out: Annotated[Path, typer.Option("--out", help="Folder to write (never replaced without --overwrite).")],
        format_: Annotated[str, typer.Option("--format", help="Export format: onnx.")] = "onnx",
        ensemble: Annotated[
            bool,
            typer.Option(
                "--ensemble/--per-fold", help="One graph averaging all folds (as predict does), or one per fold."
            ),
        ] = True,
        opset: Annotated[
            Optional[int], typer.Option("--opset", min=18, help="ONNX opset, 18 or later (default: torch's).")
        ] = None,
        verify: Annotated[
            Optional[list[Path]],
            typer.Option(
                "--verify", help="Image or folder on which onnxruntime must match torch (< 1e-3); repeatable."
            ),
        ] = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier export in --out.")] = False,
    ) -> None:
        """Export the fold models of a cv run, with their preprocessing described in export.json and README.md."""
        if format_ not in FORMATS:
            raise HSQformerError(f"--format {format_}: unsupported; choose one of {', '.join(FORMATS)}")
        from hsqformer.export.onnx import EXPORT_FILE, export_run

        record = export_run(run, out, ensemble=ensemble, opset=opset, verify=verify or [], overwrite=overwrite)
        files = ", ".join(graph["file"] for graph in record["graphs"])
        typer.echo(
            f"wrote {files} (opset {record['opset']}, {record['folds']} folds) and {EXPORT_FILE} to {out}", err=True
        )
        checked = record.get("verification")
        if checked:
            typer.echo(
                f"verified on {checked['images']} images: onnxruntime vs torch max abs probability difference "
                f"{checked['max_abs_diff']:.2e} (tolerance {checked['tolerance']:g})",
                err=True,
            )
