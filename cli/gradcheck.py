"""``metarl gradcheck``: each meta-gradient against exact references in float64."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from metarl.checkpoint import atomic_write
from metarl.cli.common import THREADS_HELP, err, out, parse_options, set_threads, user_errors
from metarl.gradcheck import gradcheck as run_gradcheck


def gradcheck(
    family: Annotated[str, typer.Option(help="Task family (small models make this fast).")] = "sinusoid",
    steps: Annotated[int, typer.Option(min=1, help="Inner steps k.")] = 2,
    tasks: Annotated[int, typer.Option(min=1, help="Tasks in the meta-batch.")] = 4,
    inner_lr: Annotated[Optional[float], typer.Option(help="Inner lr alpha. \\[default: the family's]")] = None,
    lam: Annotated[float, typer.Option(help="iMAML lambda; CG converges only where I + H/lam is positive definite (lam > -lambda_min(H)), shown as 'min eig I+H/lam'.")] = 10.0,
    cg_iters: Annotated[Optional[list[int]], typer.Option(help="iMAML CG iteration counts to report (repeatable). \\[default: 1 2 5 10 50]")] = None,
    fd: Annotated[bool, typer.Option(help="Also compute the full central-difference gradient.")] = True,
    family_opt: Annotated[Optional[list[str]], typer.Option(help="Family option KEY=VALUE, e.g. hidden=[8,8] for a smaller MLP.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of parameters and tasks.")] = 0,
    threads: Annotated[Optional[int], typer.Option(help=THREADS_HELP)] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the result as JSON here.")] = None,
) -> None:
    """Compare MAML, FOMAML, Reptile and iMAML with the exact meta-gradient (float64).

    rel_error is against the exact gradient of the method's own objective (MAML:
    explicit Jacobian; iMAML: dense implicit solve) and against exact MAML for
    FOMAML and Reptile, which shows what they give up; cosine is to exact MAML.
    iMAML rows show the smallest eigenvalue of I + H/lam (min over tasks) from the
    dense solve; where it is <= 0 the row says indefinite and CG cannot converge.
    Example: metarl gradcheck --steps 3 --family-opt hidden=[16,16]
    """
    with user_errors():
        set_threads(threads)
        res = run_gradcheck(family, steps=steps, n_tasks=tasks, inner_lr=inner_lr, lam=lam,
                            cg_iters=tuple(cg_iters or (1, 2, 5, 10, 50)), seed=seed, fd=fd,
                            family_options=parse_options(family_opt))
        table = Table(title=f"{family}: k={steps}, {tasks} tasks, {res['n_params']} parameters, "
                            f"alpha={res['inner_lr']}, float64")
        cols = ("method", "rel_error", "cosine to MAML", "seconds", "peak MB",
                "min eig I+H/lam")
        for col in cols:
            table.add_column(col, justify="left" if col == "method" else "right")
        for name, m in res["methods"].items():
            eig = "-" if "min_eig" not in m else (
                f"{m['min_eig']:.3g}" + (" indefinite" if m["indefinite"] else ""))
            table.add_row(name, f"{m['rel_error']:.2e}", f"{m['cosine']:.6f}",
                          f"{m['seconds']:.4f}",
                          "-" if m["peak_mb"] is None else f"{m['peak_mb']:.2f}", eig)
        out.print(table)
        spec = res["imaml"]
        if spec is not None and spec["indefinite_tasks"]:
            out.print(f"iMAML: I + H/lam is not positive definite at lam={lam:g} for "
                      f"{spec['indefinite_tasks']} of {tasks} tasks (smallest eigenvalue "
                      f"{spec['min_eig']:.3g}, min over tasks), so CG cannot converge; "
                      f"lam > {spec['lam_pd']:.3g} (= -lambda_min(H) at this phi*) makes it "
                      "positive definite (phi* moves with lam: rerun to check).", markup=False)
        if json_path:
            text = json.dumps(res, indent=2) + "\n"
            atomic_write(json_path, lambda tmp: Path(tmp).write_text(text))
            err.print(f"wrote {json_path}", markup=False)
