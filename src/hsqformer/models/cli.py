import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def info(model: str) -> None:
        """Placeholder."""
