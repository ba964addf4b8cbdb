"""The ``metarl`` command."""

from __future__ import annotations

import typer

from metarl.cli import (
    adapt,
    bench,
    curve,
    evaluate,
    export,
    families,
    gradcheck,
    oracle,
    plot,
    render,
    train,
)

app = typer.Typer(
    name="metarl",
    help="Gradient-based meta-learning: train, evaluate, check and benchmark MAML, FOMAML, "
         "Reptile and iMAML on task families.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command(rich_help_panel="Training")(train.train)
app.command(rich_help_panel="Training")(adapt.adapt)
app.command(rich_help_panel="Training")(evaluate.evaluate)
app.command(rich_help_panel="Training")(plot.plot)
app.command(rich_help_panel="Training")(curve.curve)
app.command(rich_help_panel="Training")(oracle.oracle)
app.command(rich_help_panel="Interop")(export.export)
app.command(rich_help_panel="Interop")(render.render)
app.add_typer(families.app, name="families", rich_help_panel="Families")
app.command(rich_help_panel="Diagnostics")(gradcheck.gradcheck)
app.command(rich_help_panel="Diagnostics")(bench.bench)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
