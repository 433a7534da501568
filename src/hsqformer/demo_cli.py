"""``hsqformer demo``: audit, cross-validate and compare two models on the embedded sample."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    """Add the ``demo`` command to the CLI."""

    @app.command()
    def demo(
        out: Annotated[Path, typer.Option("--out", help="Folder to create for the audit, the two runs and the report.")] = Path("runs/demo"),
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the folder of an earlier demo.")] = False,
        set_: Annotated[
            Optional[list[str]],
            typer.Option("--set", help="Config override for both models, e.g. trainer.epochs=1 (quicker)."),
        ] = None,
    ) -> None:
        """The workflow in a few minutes on a CPU, on 100 BUSI images shipped with the package: audit, cross-validation
        of a tiny HSQformer and of its backbone alone, paired comparison with figures; prints the report's path."""
        from hsqformer.demo import run_demo

        run_demo(out, overwrite=overwrite, overrides=set_ or [], echo=typer.echo)
