"""``metarl families``: list registered task families, or show one."""

from __future__ import annotations

import dataclasses
import re
from typing import Annotated, Any

import typer
from rich.table import Table

from metarl import families as F
from metarl.cli.common import out, user_errors

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
        train = {k: v for k, v in d.train.to_dict().items() if k not in ("family", "family_options")}
        for key, value in flatten(train):
            out.print(f"  {key} = {value}", markup=False)
        for algo, ov in d.per_algo.items():
            for key in ("steps", "lr"):
                if getattr(ov, key) is not None:
                    out.print(f"  {algo}: inner.{key} = {getattr(ov, key)}", markup=False)
        for key, value in flatten(dataclasses.asdict(d.eval), "eval."):
            out.print(f"  {key} = {value}", markup=False)
        out.print(f"options: {fam.options()}", markup=False)


def flatten(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``{"inner": {"lr": 0.1}}`` -> ``[("inner.lr", 0.1)]``, in order; None values left out."""
    rows: list[tuple[str, Any]] = []
    for key, value in tree.items():
        if isinstance(value, dict):
            rows += flatten(value, f"{prefix}{key}.")
        elif value is not None:
            rows.append((f"{prefix}{key}", value))
    return rows
