"""``metarl curve``: the training curves of one or more runs, from their logs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from metarl.cli.common import UserError, err, out, user_errors
from metarl.plots import moving_average, training_curves
from metarl.train import read_metrics

DEFAULT_KEYS = (("return/pre", "return/post"), ("inner/loss_0", "outer/loss"))
"""Drawn when no --metric is given: the first pair a run logs (RL returns before
and after adaptation; otherwise the losses before and after)."""

X_AXES = ("iteration", "seconds")


def curve(
    runs: Annotated[list[Path], typer.Argument(help="Run folders written by `metarl train` (or their metrics.jsonl).")],
    out_png: Annotated[Path, typer.Option("--out", help="PNG to write.")],
    metric: Annotated[Optional[list[str]], typer.Option("--metric", "-m", help="A logged metric to draw, repeatable: return/post, trpo/kl, time/sample, ... (the keys of metrics.jsonl). \\[default: return/pre and return/post for RL runs, inner/loss_0 and outer/loss otherwise]")] = None,
    x: Annotated[str, typer.Option(help="Horizontal axis: iteration, or seconds (training time, drawn in minutes, counted across resumes).")] = "iteration",
    smooth: Annotated[int, typer.Option(min=1, help="Moving average over this many logged rows; the raw values stay as a faint line.")] = 1,
    label: Annotated[Optional[list[str]], typer.Option(help="Run labels, one per run, in order. \\[default: each run's folder name]")] = None,
    title: Annotated[str, typer.Option(help="Plot title.")] = "",
) -> None:
    """Draw logged training metrics versus meta-iteration or training time, and print
    where each run got to (iterations, training time, first and last values).

    Example: metarl curve runs/cheetah-dir --smooth 10 --out cheetah-dir-training.png
    """
    with user_errors():
        if x not in X_AXES:
            raise UserError(f"--x {x!r} is not an axis: use iteration or seconds")
        if label and len(label) != len(runs):
            raise UserError(f"got {len(label)} --label for {len(runs)} runs: give one per run")
        loaded = []
        for i, run in enumerate(runs):
            rows = read_metrics(run)
            if not rows:
                raise UserError(f"{str(run)!r} has no logged iterations yet: train it first")
            name = label[i] if label else (run.name if run.is_dir() else run.parent.name)
            loaded.append((name, rows))
        keys = list(metric or _default_keys(loaded[0][1]))
        for name, rows in loaded:
            logged = sorted({k for r in rows for k in r} - {"iteration", "seconds"})
            missing = [k for k in keys if k not in logged]
            if missing:
                raise UserError(f"run {name!r} logs no {', '.join(missing)}: choose --metric from "
                                f"{', '.join(logged)}")
        training_curves(loaded, keys, out_png, x=x, smooth=smooth, title=title)
        table = Table(title=f"first and last logged values{f' (mean of {smooth})' if smooth > 1 else ''}")
        for col in ("run", "iterations", "training time", *keys):
            table.add_column(col, justify="left" if col == "run" else "right")
        for name, rows in loaded:
            ends = []
            for k in keys:
                ys = [float(r[k]) for r in rows if k in r]
                first, last = moving_average(ys[:smooth], smooth)[-1], moving_average(ys, smooth)[-1]
                ends.append(f"{first:.4g} -> {last:.4g}")
            table.add_row(name, str(rows[-1]["iteration"]), _duration(rows[-1]["seconds"]), *ends)
        out.print(table)
        err.print(f"wrote {out_png}", markup=False)


def _default_keys(rows: list[dict[str, Any]]) -> tuple[str, ...]:
    logged = {k for r in rows for k in r}
    for pair in DEFAULT_KEYS:
        if set(pair) <= logged:
            return pair
    raise UserError("the run logs neither returns nor losses: name what to draw with --metric")


def _duration(seconds: float) -> str:
    minutes = seconds / 60
    return f"{minutes:.1f} min" if minutes < 120 else f"{minutes / 60:.1f} h"
