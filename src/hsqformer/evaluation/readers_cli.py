"""``hsqformer readers``: radiologists' reads against a finished cross-validation run (Table 3, Fig. 3)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hsqformer.errors import HSQformerError


def register(app: typer.Typer) -> None:
    """Add the ``readers`` command to the CLI."""

    @app.command()
    def readers(
        reads: Annotated[Path, typer.Option("--reads", help="CSV with the columns reader,group,image,call[,score].")],
        run: Annotated[Path, typer.Option("--run", help="A finished hsqformer cv run folder.")],
        cohort: Annotated[str, typer.Option("--cohort", help="The run's cohort the readers read: 'validation' "
                                            "(pooled out-of-fold scores) or a test cohort (fold ensemble).")],
        out: Annotated[Path, typer.Option("--out", help="Folder for report.md, report.json, reads.csv, PNGs.")],
        target_sensitivity: Annotated[
            Optional[float],
            typer.Option(help="Model operating point: the highest threshold reaching this sensitivity on the run's "
                         "out-of-fold validation scores (default: Youden's J)."),
        ] = None,
        resamples: Annotated[int, typer.Option(help="Patient-level bootstrap resamples.", min=100)] = 2000,
        seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
        overwrite: Annotated[
            bool, typer.Option("--overwrite", help="Replace an earlier readers report in --out.")
        ] = False,
    ) -> None:
        """Reader study: each radiologist against the model on the same images (metrics with 95 % CIs, McNemar
        at the model's operating point and at the reader's own sensitivity/specificity, Holm), Table 3 and Fig. 3,
        and an Obuchowski-Rockette MRMC test of the readers' mean AUC against the model's."""
        from hsqformer.evaluation.compare import load_run
        from hsqformer.evaluation.readers import analyse, load_reads
        from hsqformer.evaluation.readers_report import prepare_out, print_table3, write_report
        from hsqformer.evaluation.statistics import format_p

        if target_sensitivity is not None and not 0 < target_sensitivity <= 1:
            raise HSQformerError(f"--target-sensitivity must be in (0, 1], got {target_sensitivity}")
        if out.resolve() == run.resolve():
            raise HSQformerError(f"--out {out} is the run folder; choose another folder")
        loaded = load_run(run)
        study = load_reads(reads, loaded, cohort)
        report = analyse(study, target_sensitivity=target_sensitivity, n_resamples=resamples, seed=seed)
        prepare_out(out, overwrite)
        path = write_report(study, report, out, seed)
        for line in print_table3(report):
            typer.echo(line)
        for key, label in (("scores", "MRMC, readers' mean score AUC vs model AUC"),
                           ("calls", "MRMC, readers' mean balanced accuracy vs model at its operating point")):
            result = report["mrmc"][key]
            if "skipped" not in result:
                typer.echo(f"{label}: {100 * result['mean_reader_auc']:.2f} vs {100 * result['model_auc']:.2f}, "
                           f"difference {100 * result['difference']:+.2f} "
                           f"[{100 * result['difference_ci'][0]:+.2f}, {100 * result['difference_ci'][1]:+.2f}], "
                           f"p {format_p(result['p'])}")
        typer.echo(f"report: {path}", err=True)
