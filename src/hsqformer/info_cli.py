"""``hsqformer info``: size and cost of an HSQformer variant or any timm model, or this machine's facts.

Outside ``hsqformer.models`` on purpose: importing anything in that package imports torch and timm
(its ``__init__`` registers the models), which would slow down every command's start.
"""

from __future__ import annotations

import typer

from hsqformer.errors import HSQformerError


def register(app: typer.Typer) -> None:
    """Add the model commands to the CLI."""

    @app.command()
    def info(
        model: str = typer.Argument(
            None, help="hsqformer_small | hsqformer_base | hsqformer_large, or any timm model name"
        ),
        img_size: int = typer.Option(224, help="input height and width for the FLOP count"),
        num_classes: int = typer.Option(2, help="number of output classes"),
        backbones: str = typer.Option(None, help="HSQformer only: two comma-separated timm backbone names"),
        system: bool = typer.Option(
            False, "--system", help="Print this machine's facts instead: CPU capability, bf16 support, threads, GPU."
        ),
    ) -> None:
        """Print total parameters, parameters active per token, and GFLOPs of one image (or, with --system, the machine)."""
        if system:
            from hsqformer.hardware import system_info

            for key, value in system_info().items():
                typer.echo(f"{key:<22}{value}")
            return
        if model is None:
            raise HSQformerError("info needs a MODEL name, or --system for this machine's facts")
        import timm

        from hsqformer.models import HSQformer  # importing hsqformer.models registers the variants with timm
        from hsqformer.models.complexity import count_flops, count_parameters

        if not timm.is_model(model):
            raise HSQformerError(f"unknown model '{model}' (see timm.list_models() and hsqformer_small/base/large)")
        kwargs: dict = {"num_classes": num_classes}
        if model.startswith("hsqformer_"):
            kwargs["img_size"] = img_size
            if backbones:
                kwargs["backbones"] = tuple(b.strip() for b in backbones.split(","))
        elif backbones:
            raise HSQformerError("--backbones applies to HSQformer variants only")
        try:
            net = timm.create_model(model, **kwargs)
            params = count_parameters(net)
            flops = count_flops(net, img_size)
        except (ValueError, RuntimeError, AssertionError) as err:
            raise HSQformerError(f"{model} at {img_size}x{img_size}: {err}") from None

        typer.echo(f"model                 {model}")
        if isinstance(net, HSQformer):
            typer.echo(f"backbones             {net.cnn.default_cfg['architecture']} + {net.vit.default_cfg['architecture']}")
        typer.echo(f"parameters, total     {params.total / 1e6:.2f} M")
        typer.echo(f"parameters, active    {params.active / 1e6:.2f} M  (per token: k of E experts in each MoE)")
        typer.echo(f"GFLOPs @ {img_size}x{img_size}    {flops['total'] / 1e9:.2f}  (2 FLOPs per multiply-add)")
        parts = {k: v for k, v in flops.items() if k != "total" and v}
        if isinstance(net, HSQformer) and parts:
            for name, value in parts.items():
                typer.echo(f"  {name:<20}{value / 1e9:8.2f}")
