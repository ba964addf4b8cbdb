"""``metarl plot``: overlay the adaptation curves of several evaluations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from metarl.cli.common import UserError, err, user_errors
from metarl.evaluate import Curve
from metarl.plots import adaptation_curves


def plot(
    results: Annotated[list[Path], typer.Argument(help="JSON files written by `metarl evaluate --json`.")],
    out: Annotated[Path, typer.Option(help="PNG to write.")],
    title: Annotated[str, typer.Option(help="Plot title.")] = "",
    baselines: Annotated[bool, typer.Option(help="Also draw the baselines stored in the files (random init, pretrained, oracle).")] = False,
    label: Annotated[Optional[list[str]], typer.Option(help="Curve labels, one per file, in order. \\[default: each file's algorithm]")] = None,
) -> None:
    """Draw the metric versus adaptation steps of several evaluations in one figure.

    Example: metarl plot runs/sin-maml/eval.json runs/sin-imaml/eval.json --out sinusoid.png
    """
    with user_errors():
        if label and len(label) != len(results):
            raise UserError(f"got {len(label)} --label for {len(results)} files: give one per file")
        curves, hlines, metric = [], {}, None
        for i, path in enumerate(results):
            try:
                d = json.loads(Path(path).read_text())
                c = Curve(label=label[i] if label else d["algo"], steps=d["steps"], mean=d["mean"],
                          ci95=d["ci95"], n_tasks=d["n_tasks"])
            except FileNotFoundError:
                raise UserError(f"{path} does not exist: give files written by metarl evaluate --json") from None
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path} is not a metarl evaluate --json result") from None
            if metric not in (None, d["metric"]):
                raise UserError(f"{path} reports {d['metric']!r} but earlier files {metric!r}: "
                                "plot one metric at a time")
            metric = d["metric"]
            curves.append(c)
            if baselines:
                for name, b in d.get("baselines", {}).items():
                    curves.append(Curve(label=name, steps=b["steps"], mean=b["mean"],
                                        ci95=b["ci95"], n_tasks=b["n_tasks"]))
                hlines.update(d.get("reference_lines", {}))
        adaptation_curves(curves, out, metric=metric or "", title=title, hlines=hlines)
        err.print(f"wrote {out}", markup=False)
