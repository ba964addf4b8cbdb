"""``metarl adapt``: adapt a meta-trained policy to one new task."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from metarl import checkpoint
from metarl.checkpoint import Adapted
from metarl.cli.common import (
    FAMILY_OPT_HELP,
    THREADS_HELP,
    UserError,
    err,
    out,
    parse_options,
    set_threads,
    user_errors,
)
from metarl.cli.settings import DEVICE_HELP, Device
from metarl.evaluate import adapt_to_task, eval_rates
from metarl.rl.family import RLFamily
from metarl.types import resolve_device, resolve_dtype


def adapt(
    run: Annotated[Path, typer.Argument(help="A run folder, a checkpoint, or a policy saved by an earlier `metarl adapt`.")],
    task: Annotated[str, typer.Option(help='The task as JSON, e.g. \'{"goal": [0.3, -0.2]}\' for navigation2d (see `metarl families show`).')],
    steps: Annotated[int, typer.Option(min=0, help="Adaptation steps.")] = 1,
    rollouts: Annotated[Optional[int], typer.Option(min=1, help="Trajectories per step. \\[default: the family's]")] = None,
    lr: Annotated[Optional[list[float]], typer.Option(help="Inner learning rate; repeat for one per step (--lr 0.1 --lr 0.05). \\[default: the family's test-time rates]")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the sampled trajectories.")] = 0,
    device: Annotated[Device, typer.Option(help=DEVICE_HELP)] = Device.auto,
    family_opt: Annotated[Optional[list[str]], typer.Option(help=FAMILY_OPT_HELP)] = None,
    threads: Annotated[Optional[int], typer.Option(help=THREADS_HELP)] = None,
    out_path: Annotated[Optional[Path], typer.Option("--out", help="Save the adapted policy here (a checkpoint that metarl adapt/evaluate load again).")] = None,
) -> None:
    """Adapt to one new task in a few rollouts; print the average return before and after each step.

    Example: metarl adapt runs/navigation2d-maml --task '{"goal": [0.3, -0.2]}' --steps 2 --out adapted.pt
    """
    with user_errors():
        set_threads(threads)
        run_ = checkpoint.load(run).with_family_options(parse_options(family_opt))
        family = run_.family()
        if not isinstance(family, RLFamily):
            raise UserError(f"metarl adapt is for RL families; {family.name!r} is supervised: use "
                            "metarl evaluate")
        spec = parse_task_json(family, task)
        rates = eval_rates(run_, family, lr)
        dev, dtype = resolve_device(device.value), resolve_dtype(run_.config.dtype)
        phi, returns = adapt_to_task(family, run_.theta, spec, steps=steps, lr=rates,
                                     rollouts=rollouts, seed=seed, device=dev, dtype=dtype,
                                     rule=run_.config.inner)
        table = Table(title=f"{family.name}: adapting to {spec}")
        table.add_column("after step", justify="right")
        table.add_column("average return", justify="right")
        for j, r in enumerate(returns):
            table.add_row(str(j), f"{r:.3f}")
        out.print(table)
        if out_path is not None:
            step = Adapted(task=spec, steps=steps, lr=list(rates), seed=seed, returns=returns,
                           source=str(run))
            adapted = dataclasses.replace(run_, theta=phi, optimizer=None, task_rng=None,
                                          adapted=(*run_.adapted, step))
            checkpoint.save(out_path, adapted)
            err.print(f"saved the adapted policy to {out_path}", markup=False)


def parse_task_json(family: RLFamily, text: str) -> dict[str, Any]:
    """``--task`` text -> a checked task spec (one-line error with the fix on bad input)."""
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"--task is not valid JSON ({e.msg}): give e.g. "
                        "'{\"goal\": [0.3, -0.2]}'") from None
    try:
        return family.check_task(spec)
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"bad task for family {family.name!r}: {e}") from None
