"""``metarl render``: a video of one episode before adaptation and after each step."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from metarl import checkpoint
from metarl.cli.adapt import parse_task_json
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
from metarl.rl.family import RLFamily

LAYOUTS = ("side-by-side", "sequence")


def render(
    run: Annotated[Path, typer.Argument(help="A run folder or checkpoint of an RL family.")],
    task: Annotated[str, typer.Option(help='The task as JSON, e.g. \'{"direction": -1}\' for halfcheetah-dir (see `metarl families show`).')],
    out_path: Annotated[Path, typer.Option("--out", help="rollouts.mp4 (needs the video extra), rollouts.gif, or a .png contact sheet (a row per policy).")],
    steps: Annotated[int, typer.Option(min=0, help="Adaptation steps K: episodes before adaptation and after each of the K steps.")] = 1,
    layout: Annotated[str, typer.Option(help="side-by-side (one panel per policy, playing together) or sequence (one episode after another).")] = "side-by-side",
    rollouts: Annotated[Optional[int], typer.Option(min=1, help="Trajectories per adaptation step. \\[default: the family's]")] = None,
    lr: Annotated[Optional[list[float]], typer.Option(help="Inner learning rate; repeat for one per step. \\[default: the family's test-time rates]")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the adaptation trajectories and of the recorded episodes (the same start state for every policy).")] = 0,
    fps: Annotated[Optional[float], typer.Option(min=1, help="Frames per second. \\[default: real time, 1 / the environment's dt]")] = None,
    width: Annotated[int, typer.Option(min=16, help="Panel width in pixels.")] = 320,
    height: Annotated[int, typer.Option(min=16, help="Panel height in pixels.")] = 240,
    frames: Annotated[int, typer.Option(min=1, help="Frames per row of a .png contact sheet.")] = 6,
    family_opt: Annotated[Optional[list[str]], typer.Option(help=FAMILY_OPT_HELP)] = None,
    threads: Annotated[Optional[int], typer.Option(help=THREADS_HELP)] = None,
) -> None:
    """Adapt to a task and record one episode before adaptation and after each step,
    titled with the step and its return.

    MuJoCo families render offscreen (MUJOCO_GL=egl, the default here, or osmesa);
    navigation2d is drawn as a trajectory plot. Example:

        metarl render runs/hc-dir --task '{"direction": -1}' --steps 1 --out rollouts.mp4
    """
    with user_errors():
        set_threads(threads)
        if layout not in LAYOUTS:
            raise UserError(f"--layout {layout!r} is not one of {', '.join(LAYOUTS)}")
        os.environ.setdefault("MUJOCO_GL", "egl")  # before MuJoCo is first imported
        from metarl.render import render_adaptation

        run_ = checkpoint.load(run).with_family_options(parse_options(family_opt))
        family = run_.family()
        if not isinstance(family, RLFamily):
            raise UserError(f"metarl render is for RL families; {family.name!r} is "
                            f"{family.kind}: use metarl evaluate --plot")
        spec = parse_task_json(family, task)
        done = render_adaptation(run_, spec, out_path, steps=steps, lr=tuple(lr) if lr else None,
                                 rollouts=rollouts, seed=seed, layout=layout,  # type: ignore[arg-type,unused-ignore]
                                 fps=fps, width=width, height=height, frames=frames)
        for ep, mean in zip(done.episodes, done.adapt_returns):
            out.print(f"{ep.label}: recorded episode's return {ep.ret:.2f} (average over the "
                      f"adaptation trajectories {mean:.2f})", markup=False)
        err.print(f"wrote {done.path} ({done.n_frames} frames)", markup=False)
