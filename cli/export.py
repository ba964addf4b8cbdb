"""``metarl export``: write a policy in another library's format (Stable-Baselines3)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from metarl import checkpoint
from metarl.cli.common import THREADS_HELP, UserError, err, out, set_threads, user_errors

FORMATS = ("sb3",)


def export(
    run: Annotated[Path, typer.Argument(help="A run folder, a checkpoint, or a policy saved by `metarl adapt --out`.")],
    out_path: Annotated[Path, typer.Option("--out", help="The file to write, e.g. policy.zip (an SB3 model is a zip; .zip is added when there is no suffix).")],
    format: Annotated[str, typer.Option("--format", help="Output format: sb3 (a Stable-Baselines3 PPO model whose MlpPolicy has the same action distribution).")] = "sb3",
    seed: Annotated[int, typer.Option(help="Seed of the SB3 model (its value network's initialisation).")] = 0,
    threads: Annotated[Optional[int], typer.Option(help=THREADS_HELP)] = None,
) -> None:
    """Export an RL policy (meta-parameters or an adapted policy) for another library.

    --format sb3 writes a Stable-Baselines3 PPO model: its MlpPolicy has the policy's
    architecture, activation and state-independent log-std, with metarl's action
    scaling folded in, so PPO.load(...) predicts, evaluates and fine-tunes with the
    same action distribution (mean and std) as metarl. Example:

        metarl export runs/hc-vel/adapted.pt --format sb3 --out policy.zip
    """
    with user_errors():
        set_threads(threads)
        if format not in FORMATS:
            raise UserError(f"unknown export format {format!r}: use {', '.join(FORMATS)}")
        from metarl import sb3

        run_ = checkpoint.load(run)
        done = sb3.export_sb3(run_, out_path, seed=seed)
        what = (f"adapted to {done.task} ({sum(a['steps'] for a in done.record['adapted'])} "
                "steps)" if done.task is not None else "meta-parameters (not adapted)")
        err.print(f"wrote {done.path}: SB3 PPO MlpPolicy of {done.record['family']}, {what}; "
                  f"mean and std equal metarl's to {done.max_abs_error:.1e}", markup=False)
        if done.env_id is not None:
            task = "" if done.task is None else f", task={done.task!r}"
            out.print("from stable_baselines3 import PPO; import gymnasium, metarl.envs\n"
                      f"env = gymnasium.make({done.env_id!r}{task}, "
                      f"max_episode_steps={done.record['max_episode_steps']})\n"
                      f"model = PPO.load({str(done.path)!r}, env=env)", markup=False)
