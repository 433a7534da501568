"""``hsqformer serve``: the local screening web app for a finished cv run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the ``serve`` command to the ``hsqformer`` application."""

    @app.command("serve")
    def serve(
        run: Annotated[Path, typer.Option("--run", help="A finished cv run folder.")],
        host: Annotated[
            str, typer.Option("--host", help="Address to bind; 0.0.0.0 exposes the app to the network.")
        ] = "127.0.0.1",
        port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 7860,
        method: Annotated[
            str, typer.Option("--method", help="Heat map method: gradcam, gradcam++, hirescam or attention.")
        ] = "gradcam",
    ) -> None:
        """A local web page that screens uploaded PNG/JPEG/DICOM images with the run's fold ensemble: probability,
        decision at the run's operating point, heat map, model card; a batch tab gives a CSV. Uploads are deleted
        when each request ends; DICOMs are cropped and their burned-in text blacked out, in memory."""
        from hsqformer.serve.app import serve as serve_app

        serve_app(run, host=host, port=port, method=method, echo=lambda line: typer.echo(line, err=True))
