"""``hsqformer compare``: paired statistics of finished cross-validation runs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from hsqformer.errors import HSQformerError


def register(app: typer.Typer) -> None:
    """Add the ``compare`` command to the CLI."""

    @app.command()
    def compare(
        runs: Annotated[list[Path], typer.Argument(help="Finished hsqformer cv run folders (same data and folds).")],
        out: Annotated[Path, typer.Option("--out", help="Folder for report.md, report.json, per_image.csv, PNGs.")],
        reference: Annotated[
            Optional[Path], typer.Option("--reference", help="The run the others are tested against (default: the first).")
        ] = None,
        name: Annotated[
            Optional[list[str]], typer.Option("--name", help="Display name per run, in order (default: folder names).")
        ] = None,
        target_sensitivity: Annotated[
            Optional[float],
            typer.Option(help="Operating point: the highest threshold reaching this validation sensitivity "
                         "(default: Youden's J)."),
        ] = None,
        floor: Annotated[
            bool, typer.Option("--floor", help="Add the audit's shortcut floor (image size + grey histogram) as a model.")
        ] = False,
        resamples: Annotated[int, typer.Option(help="Patient-level bootstrap resamples.", min=100)] = 2000,
        seed: Annotated[int, typer.Option(help="Seed of the bootstrap and of the floor's forest.")] = 0,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier compare report in --out.")] = False,
    ) -> None:
        """Compare models on the same images: AUC (DeLong) and metrics (patient bootstrap) with 95 % CIs,
        paired DeLong and McNemar tests against a reference with Holm's correction, ROC/calibration figures."""
        from hsqformer.evaluation.compare import compare_runs, load_run, shortcut_floor
        from hsqformer.evaluation.comparison_report import prepare_out, summary_lines, write_comparison

        started = time.perf_counter()
        if name and len(name) != len(runs):
            raise HSQformerError(f"--name given {len(name)} times for {len(runs)} runs; give one per run or none")
        if target_sensitivity is not None and not 0 < target_sensitivity <= 1:
            raise HSQformerError(f"--target-sensitivity must be in (0, 1], got {target_sensitivity}")
        if out.resolve() in {run.resolve() for run in runs}:
            raise HSQformerError(f"--out {out} is one of the runs; choose another folder")
        loaded = [load_run(path, name[i] if name else None) for i, path in enumerate(runs)]
        ref = 0
        if reference is not None:
            matches = [i for i, path in enumerate(runs) if path.resolve() == reference.resolve()]
            if not matches:
                raise HSQformerError(f"--reference {reference} is not one of the runs given")
            ref = matches[0]
        if floor:
            loaded.append(shortcut_floor(loaded[ref], seed))
        report = compare_runs(loaded, reference=ref, target_sensitivity=target_sensitivity,
                              n_resamples=resamples, seed=seed)
        prepare_out(out, overwrite)
        path = write_comparison(loaded, report, out, seed)
        report["wall_seconds"] = round(time.perf_counter() - started, 1)
        for line in summary_lines(report):
            typer.echo(line)
        typer.echo(f"report: {path}", err=True)

