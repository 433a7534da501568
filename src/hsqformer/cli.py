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
from hsqformer.interrupts import Interrupted, exit_on_signals, interruption_behind

COMMAND_MODULES: tuple[str, ...] = (
    "hsqformer.info_cli",
    "hsqformer.training.cli",
    "hsqformer.dicom.cli",
    "hsqformer.data.cli",
    "hsqformer.evaluation.cli",
    "hsqformer.evaluation.readers_cli",
    "hsqformer.demo_cli",
    "hsqformer.export.cli",
    "hsqformer.sweep.cli",
    "hsqformer.serve.cli",
    "hsqformer.explain.cli",
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
    @app.callback()
    def options(
        version: bool = typer.Option(
            False, "--version", help="Print the version and exit.", is_eager=True, callback=_print_version
        ),
    ) -> None:
        """HSQformer: ultrasound HCC screening models, training protocol and tools."""

    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(app)
    return app


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"hsqformer {version('hsqformer')} (hsqformer info --system: this machine's facts)")
        raise typer.Exit()


def main() -> None:
    """Entry point: run the CLI, turning user-facing errors into one line."""
    try:
        with exit_on_signals():
            build_app()()
    except HSQformerError as err:
        typer.echo(f"error: {_one_line(err)}", err=True)
        sys.exit(2)
    except Interrupted as err:
        _interrupted(err)
    except Exception as err:
        # a signal sent to the whole process group also ends the data-loader workers, whose death
        # then surfaces as an error while the main process is already handling the interruption
        cause = interruption_behind(err)
        if cause is None:
            raise
        _interrupted(cause)


def _interrupted(err: Interrupted) -> None:
    typer.echo(f"interrupted by {err.name}" + (f"; {err.hint}" if err.hint else ""), err=True)
    sys.exit(err.exit_code)


def _one_line(err: HSQformerError) -> str:
    """The message of ``err``; one raised in a data-loader worker arrives wrapped in the worker's
    traceback, whose last line is the original message."""
    message = str(err).strip()
    if "Original Traceback" in message:
        message = message.splitlines()[-1]
        for prefix in (f"{HSQformerError.__module__}.{HSQformerError.__name__}: ", f"{HSQformerError.__name__}: "):
            message = message.removeprefix(prefix)
    return " ".join(message.split())
