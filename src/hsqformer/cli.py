"""The ``hsqformer`` command line.

Each area of the package contributes its commands through a ``register(app)``
function in its own ``cli`` module, listed in ``COMMAND_MODULES``; this keeps
the heavy imports of one command out of the start-up of the others.
"""

from __future__ import annotations

import importlib
import sys

import typer

from hsqformer.errors import HSQformerError

COMMAND_MODULES: tuple[str, ...] = (
    "hsqformer.models.cli",
    "hsqformer.training.cli",
    "hsqformer.dicom.cli",
    "hsqformer.data.cli",
    "hsqformer.evaluation.cli",
)


def build_app() -> typer.Typer:
    """Assemble the Typer application from every area's ``register`` hook."""
    app = typer.Typer(
        name="hsqformer",
        help="HSQformer: ultrasound HCC screening models, training protocol and tools.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(app)
    return app


def main() -> None:
    """Entry point: run the CLI, turning user-facing errors into one line."""
    try:
        build_app()()
    except HSQformerError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
