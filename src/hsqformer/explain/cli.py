"""``hsqformer explain``: heat maps of a finished run's fold ensemble over images and folders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hsqformer.explain import METHODS


def register(app: typer.Typer) -> None:
    """Add the ``explain`` command to the CLI."""

    @app.command()
    def explain(
        inputs: Annotated[list[Path], typer.Argument(help="Images and/or folders of images (searched recursively).")],
        run: Annotated[Path, typer.Option("--run", help="A finished cv run folder.")],
        out: Annotated[
            Path, typer.Option("--out", help="Folder for overlays/*.png, contact_sheet.png, explanations.csv.")
        ],
        method: Annotated[
            str, typer.Option("--method", help=f"One of {', '.join(METHODS)} (attention: HSQformer runs only).")
        ] = "gradcam",
        target: Annotated[
            str,
            typer.Option(
                "--target",
                help="What is explained. CAM methods on HSQformer: default (= projector, the fused last-stage "
                "tokens the queries read), projector, cnn or vit (a backbone's last stage); on other models: "
                "default (the last feature stage). attention: default (mean of the query stages) or stage1..stage4.",
            ),
        ] = "default",
        alpha: Annotated[float, typer.Option("--alpha", help="Weight of the heat map in the blend.")] = 0.45,
        overwrite: Annotated[
            bool, typer.Option("--overwrite", help="Replace the folder of an earlier hsqformer explain.")
        ] = False,
    ) -> None:
        """Explain the ensemble's predictions: Grad-CAM, Grad-CAM++, HiResCAM or HSQformer's query attention,
        averaged over the fold models, as one figure per image, a contact sheet and a CSV."""
        from hsqformer.explain.report import CSV_NAME, explain_to_folder

        table = explain_to_folder(
            run, inputs, out, method=method, target=target, overwrite=overwrite, alpha=alpha
        )
        target_name = table["target"].iloc[0]
        typer.echo(f"explained {len(table)} images with {method} ({target_name}): {out / CSV_NAME}", err=True)
