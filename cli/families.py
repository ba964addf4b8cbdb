"""``metarl families``: list registered task families, or show one."""

from __future__ import annotations

import re
from typing import Annotated

import typer
from rich.table import Table

from metarl.cli.common import out, user_errors
from metarl import families as F

app = typer.Typer(help="List registered task families; `metarl families show NAME` for one.",
                  invoke_without_command=True, no_args_is_help=False)


@app.callback()
def list_families(ctx: typer.Context) -> None:
    """List registered task families with a one-line description."""
    if ctx.invoked_subcommand is not None:
        return
    with user_errors():
        table = Table(title="registered task families")
        table.add_column("name")
        table.add_column("metric")
        table.add_column("description")
        for name in F.names():
            try:
                fam = F.make(name)
                table.add_row(name, fam.metric, fam.description)
            except Exception as e:  # a broken third-party family must not hide the others
                table.add_row(name, "?", f"(cannot load: {' '.join(str(e).split())})")
        out.print(table)


def plain(doc: str) -> str:
    """A docstring for the terminal: ``code`` -> `code`, :class:`~a.b.C` -> C."""
    doc = re.sub(r":\w+:`~?(?:[\w.]+\.)?([\w]+)`", r"\1", doc)
    return doc.replace("``", "`")


@app.command()
def show(name: Annotated[str, typer.Argument(help="Family name or package.module:Factory.")]) -> None:
    """Print a family's task distribution, model and default hyperparameters."""
    with user_errors():
        fam = F.make(name)
        out.print(f"{fam.name}: {fam.description}", markup=False)
        out.print(plain(fam.describe()), markup=False)
        d = fam.defaults
        out.print("defaults:", markup=False)
        for key, value in vars(d).items():
            if key != "extra" and value is not None:
                out.print(f"  {key} = {value}", markup=False)
        for key, value in d.extra.items():
            out.print(f"  {key} = {value}", markup=False)
        out.print(f"options: {fam.options()}", markup=False)
