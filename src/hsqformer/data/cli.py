"""``hsqformer audit``: counts, duplicates, shared patients and the shortcut floor of datasets."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import typer

from hsqformer.data.registry import REGISTRY_ENV
from hsqformer.errors import HSQformerError


def register(app: typer.Typer) -> None:
    """Add the ``audit`` command and the ``data`` commands (``data list``, ``data fetch``) to the CLI."""
    _register_data(app)

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
        from hsqformer.data.audit import run_audit
        from hsqformer.files import write_json, write_text

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
            write_text(out, markdown)
        if json_path is not None:
            write_json(json_path, report.to_dict())


_REGISTRY_HELP = "Dataset registry YAML to use instead of the one in the package (also $HSQFORMER_DATA_REGISTRY)."


def _register_data(app: typer.Typer) -> None:
    """Add ``hsqformer data list`` and ``hsqformer data fetch`` (public datasets, see ``data/registry.yaml``)."""
    data_app = typer.Typer(
        name="data", help="Public ultrasound datasets: list them, fetch one with checks.", no_args_is_help=True
    )
    app.add_typer(data_app)

    @data_app.command("list")
    def data_list(
        registry: Annotated[Path | None, typer.Option(envvar=REGISTRY_ENV, help=_REGISTRY_HELP)] = None,
    ) -> None:
        """List the datasets that 'data fetch' knows: images, download size, checksum, license, source, caveats."""
        from hsqformer.data.registry import load_registry

        for entry in load_registry(registry).values():
            size = f"{entry.size_bytes / 1e6:.1f} MB" if entry.size_bytes is not None else "size not published"
            checks = sorted({remote.checksum[0] for remote in entry.files if remote.checksum is not None})
            if entry.verifiable:
                checksum = f"{'/'.join(checks)} published"
            else:
                published = "published for only some archives" if checks else "no published checksum"
                checksum = f"{published} (needs --accept-unverified)"
            counts = ", ".join(f"{label} {n}" for label, n in entry.layout.expected_images.items())
            typer.echo(f"{entry.name}: {entry.n_images} images ({counts}); {size}; {checksum}")
            typer.echo(f"    {entry.title}")
            typer.echo(f"    license: {entry.license}")
            typer.echo(f"    source: {entry.homepage}")
            if entry.notes:
                typer.echo(f"    notes: {entry.notes}")

    @data_app.command("fetch")
    def data_fetch(
        name: Annotated[str, typer.Argument(help="Dataset name, as 'hsqformer data list' shows it.")],
        to: Annotated[Path, typer.Option(help="Parent folder: the dataset goes to TO/NAME.")] = Path("datasets"),
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace TO/NAME if an earlier fetch made it.")] = False,
        accept_unverified: Annotated[
            bool,
            typer.Option("--accept-unverified", help="Use a download that has no published checksum (its sha256 is recorded)."),
        ] = False,
        registry: Annotated[Path | None, typer.Option(envvar=REGISTRY_ENV, help=_REGISTRY_HELP)] = None,
    ) -> None:
        """Download a public dataset, verify it, extract it safely and write its manifest.csv.

        An interrupted download resumes on the next run. TO/NAME is never replaced without --overwrite.

        A dataset without a published checksum needs --accept-unverified (the sha256 is printed and recorded)."""
        from hsqformer.data.fetch import PROVENANCE_NAME, fetch_dataset
        from hsqformer.data.registry import get_entry, load_registry

        entry = get_entry(load_registry(registry), name)
        result = fetch_dataset(entry, to, overwrite=overwrite, accept_unverified=accept_unverified)
        for message in result.warnings:
            typer.echo(f"warning: {message}", err=True)
        counts = ", ".join(f"{label} {n}" for label, n in result.counts.items())
        typer.echo(f"{entry.name}: {sum(result.counts.values())} images ({counts}) in {result.folder} "
                   f"(manifest.csv; source, license and checksums in {PROVENANCE_NAME})")
        state = "verified against the published checksum" if result.verified else "NOT verified: no published checksum"
        for archive, digest in result.sha256.items():
            typer.echo(f"sha256 {digest}  {archive} ({state})")
        typer.echo(f"license: {entry.license}")
        typer.echo(f"cite: {entry.citation}")
