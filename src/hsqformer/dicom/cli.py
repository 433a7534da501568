"""``hsqformer dicom2png``: de-identified, lossless PNGs and a manifest from a DICOM folder."""

from __future__ import annotations

from pathlib import Path

import typer

from hsqformer.errors import HSQformerError


def register(app: typer.Typer) -> None:
    """Add the ``dicom2png`` command to ``app``."""

    @app.command("dicom2png")
    def dicom2png(
        in_dir: Path = typer.Argument(..., help="Folder searched recursively for DICOM files (any extension)."),
        out_dir: Path = typer.Argument(..., help="Output folder: images/, manifest.csv, report.csv, errors.csv."),
        frames: str = typer.Option("all", help="Frames of multi-frame files: all, first, middle, last or 0-based indices '0,10,20'."),
        detect_text: bool = typer.Option(True, "--detect-text/--no-detect-text", help="Find and black out burned-in text."),
        label: str = typer.Option("", help="Label written for every image in manifest.csv."),
        label_from: str = typer.Option("none", help="'parent': label each image with its input's parent folder name (IN_DIR/benign/x.dcm -> benign)."),
        center: str = typer.Option("", help="Center name written in manifest.csv (never read from the header)."),
        salt: str = typer.Option("", envvar="HSQFORMER_DICOM_SALT", help="Secret for output names and patient pseudonyms; reuse it to keep them stable across batches. Random when empty."),
        key_file: Path | None = typer.Option(None, help="Write a JSON key (salt, pseudonym -> input, UID, PatientID) here; must be outside OUT_DIR."),
        workers: int = typer.Option(2, min=1, help="Worker processes."),
        overwrite: bool = typer.Option(False, help="Replace existing outputs."),
        min_text_score: float = typer.Option(0.5, help="Recognition confidence a text box needs to be masked."),
        max_text_height: float = typer.Option(0.06, help="Largest text box height, as a fraction of the image height."),
    ) -> None:
        """Convert every DICOM under IN_DIR to de-identified PNGs in OUT_DIR (exit 1 if any file failed)."""
        from hsqformer.dicom.convert import ConvertOptions, convert_tree
        from hsqformer.dicom.deidentify import new_salt
        from hsqformer.dicom.text_masking import TextRules

        if label_from not in ("none", "parent"):
            raise HSQformerError(f"--label-from must be 'none' or 'parent', not {label_from!r}")
        if label and label_from == "parent":
            raise HSQformerError("give either --label or --label-from parent, not both")
        if not salt:
            salt = new_salt()
            if key_file is None:
                typer.echo("note: no --salt given; pseudonyms are unique to this run (pass --salt to keep them stable)", err=True)
        options = ConvertOptions(
            salt=salt,
            frames=frames,
            detect_text=detect_text,
            rules=TextRules(min_score=min_text_score, max_height_fraction=max_text_height),
            overwrite=overwrite,
            label=label,
            label_from_parent=label_from == "parent",
            center=center,
        )
        summary = convert_tree(in_dir, out_dir, options, workers=workers, key_file=key_file)
        # Input paths go to the terminal only: errors.csv in OUT_DIR names inputs by pseudonym.
        for source, input_id, reason in summary.failures:
            typer.echo(f"failed: {source} [{input_id}]: {reason}", err=True)
        duplicates = f" ({summary.duplicates} of them duplicates)" if summary.duplicates else ""
        typer.echo(
            f"{summary.files} files: {summary.converted} converted into {summary.images} PNGs "
            f"({summary.masked_regions} text regions masked), {summary.failed} failed{duplicates}, {summary.skipped} skipped"
            + (f"; see {out_dir / 'errors.csv'}" if summary.failed else "")
        )
        if summary.failed:
            raise typer.Exit(code=1)
