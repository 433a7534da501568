"""The ``cv`` (cross-validation), ``evaluate`` (a finished run scored again) and ``predict`` (ensemble
inference) commands."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from hsqformer.errors import HSQformerError


def register(app: typer.Typer) -> None:
    """Add ``cv``, ``evaluate`` and ``predict`` to the ``hsqformer`` application."""

    @app.command("cv")
    def cv(
        out: Annotated[Path, typer.Option("--out", help="Run folder to create (or to continue with --resume).")],
        config: Annotated[
            Optional[Path], typer.Option("--config", help="YAML config, e.g. configs/paper.yaml.")
        ] = None,
        data: Annotated[
            Optional[str], typer.Option("--data", help="Dataset: class folders, a folder with manifest.csv, or a CSV.")
        ] = None,
        test: Annotated[
            Optional[list[str]], typer.Option("--test", help="Test cohort NAME=DATA; repeat for several.")
        ] = None,
        set_: Annotated[
            Optional[list[str]], typer.Option("--set", help="Config override KEY=VALUE, e.g. trainer.epochs=2.")
        ] = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run folder.")] = False,
        resume: Annotated[
            bool, typer.Option("--resume", help="Continue an interrupted run: skip done folds, resume the rest.")
        ] = False,
    ) -> None:
        """Patient-level K-fold cross-validation: train each fold, keep its best-AUC model, evaluate all cohorts."""
        from hsqformer.training.config import config_from_dict, config_to_dict, load_config
        from hsqformer.interrupts import Interrupted, interruption_behind
        from hsqformer.training.engine import parse_tests, run_cv
        from hsqformer.training.run_folder import RUN_FILE, resume_request

        tests = parse_tests(test or [])
        if resume:
            saved_cfg, saved_data, saved_tests = resume_request(out)
            if config is not None:
                cfg = load_config(config, set_ or [])
            else:
                cfg = config_from_dict(config_to_dict(saved_cfg), overrides=set_ or [])
            data = data or saved_data
            tests = tests or saved_tests
        else:
            if config is None or data is None:
                raise HSQformerError("cv needs --config and --data (or --resume with an existing --out)")
            cfg = load_config(config, set_ or [])
        try:  # hsqformer.cli.main turns SIGTERM / Ctrl-C into Interrupted (exit status 143 / 130)
            run_cv(cfg, data, tests, out, overwrite=overwrite, resume=resume, command=shlex.join(sys.argv))
        except (Interrupted, Exception) as err:
            interruption = interruption_behind(err)
            if interruption is None:
                raise
            if (out / RUN_FILE).is_file():
                interruption.hint = (
                    f"finished folds are kept; continue with: hsqformer cv --out {shlex.quote(str(out))} --resume"
                )
            else:
                interruption.hint = f"no run was started in {out}"
            raise interruption from None

    @app.command("evaluate")
    def evaluate(
        run: Annotated[Path, typer.Argument(help="A finished cv run folder.")],
        out: Annotated[Path, typer.Option("--out", help="New run folder for the new evaluation.")],
        set_: Annotated[
            list[str],
            typer.Option("--set", help="Evaluation setting KEY=VALUE: augment.crop_mode (center, squash, border), "
                         "augment.crop_pct or augment.interpolation."),
        ],
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier run folder at --out.")] = False,
    ) -> None:
        """Score a finished cv run's fold models again with other evaluation preprocessing (e.g. whole frames),
        into a run folder that hsqformer compare pairs with the original."""
        from hsqformer.evaluation.report import run_table
        from hsqformer.training.engine import evaluate_again

        metrics = evaluate_again(run, out, set_, overwrite=overwrite, command=shlex.join(sys.argv))
        typer.echo(run_table(metrics), err=True)
        typer.echo(f"[hsqformer evaluate] done: {out} (pair it with the original: hsqformer compare {run} {out} "
                   "--out REPORT_DIR)", err=True)

    @app.command("predict")
    def predict(
        inputs: Annotated[list[Path], typer.Argument(help="Images and/or folders of images (searched recursively).")],
        run: Annotated[Path, typer.Option("--run", help="A finished cv run folder.")],
        out: Annotated[
            Path, typer.Option("--out", help="CSV file to write (never replaced without --overwrite).")
        ] = Path("predictions.csv"),
        batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
        num_workers: Annotated[int, typer.Option("--num-workers", min=0)] = 0,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out file.")] = False,
        skip_bad: Annotated[
            bool,
            typer.Option("--skip-bad", help="Predict the readable images; list unreadable ones with the reason "
                         "in a 'skipped' column instead of stopping."),
        ] = False,
    ) -> None:
        """Ensemble inference with the fold models of a cv run: one row per image."""
        from hsqformer.files import write_csv
        from hsqformer.training.inference import predict_run

        if out.exists() and not overwrite:
            raise HSQformerError(f"{out} already exists; pass --overwrite to replace it")
        table = predict_run(run, inputs, batch_size=batch_size, num_workers=num_workers, skip_bad=skip_bad)
        write_csv(out, table)
        skipped = int((table["skipped"] != "").sum()) if "skipped" in table else 0
        typer.echo(f"wrote {len(table) - skipped} predictions to {out}", err=True)
        decided = table[table["skipped"] == ""] if "skipped" in table else table
        if len(decided):
            counts = decided["predicted_class"].value_counts()
            typer.echo(
                "predicted (ensemble arg-max): " + ", ".join(f"{name} {n}" for name, n in counts.items())
                + f"; ensemble probability: min {decided['prob_ensemble'].astype(float).min():.3f}, "
                f"median {decided['prob_ensemble'].astype(float).median():.3f}, "
                f"max {decided['prob_ensemble'].astype(float).max():.3f}",
                err=True,
            )
        if skipped:
            typer.echo(f"skipped {skipped} unreadable images: listed in {out} with the reason in column 'skipped'", err=True)
