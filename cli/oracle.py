"""``metarl oracle``: train a locomotion family's oracle with Stable-Baselines3 PPO."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from metarl.cli.common import (
    THREADS_HELP,
    err,
    is_tty,
    out,
    parse_options,
    set_threads,
    user_errors,
)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def oracle(
    family: Annotated[str, typer.Argument(help="A locomotion family: halfcheetah-vel, halfcheetah-dir, ant-vel or ant-dir.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Run folder: oracle.zip (SB3 model), checkpoint.pt (usable as --family-opt oracle_run=RUN), metrics.jsonl, oracle.json.")],
    timesteps: Annotated[int, typer.Option(min=1, help="Environment steps of PPO training (the budget).")] = 1_000_000,
    seed: Annotated[int, typer.Option(help="Seed of PPO and of the environments (tasks drawn per episode).")] = 0,
    n_envs: Annotated[int, typer.Option(min=1, help="Environments PPO steps together (in this process).")] = 8,
    ppo_opt: Annotated[Optional[list[str]], typer.Option(help="A PPO setting as KEY=VALUE (JSON values), repeatable: --ppo-opt n_steps=1024 --ppo-opt learning_rate=1e-4. \\[default: metarl.sb3.PPO_DEFAULTS]")] = None,
    family_opt: Annotated[Optional[list[str]], typer.Option(help="A family option as KEY=VALUE, repeatable (hidden=[64,64], horizon=100); the policy architecture must match the meta-trained run's.")] = None,
    eval_tasks: Annotated[int, typer.Option(min=0, help="After training, measure the oracle line on the first N test tasks of `metarl evaluate` (seed 0, the family's rollouts per task); 0 skips it.")] = 40,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Rewrite oracle.zip and checkpoint.pt every this many environment steps.")] = 100_000,
    resume: Annotated[bool, typer.Option(help="Continue the oracle in --out up to --timesteps.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an oracle already in --out.")] = False,
    threads: Annotated[Optional[int], typer.Option(help=THREADS_HELP)] = None,
) -> None:
    """Train the oracle of a locomotion family: PPO (Stable-Baselines3) on its oracle
    variant, whose observation ends with the task parameter, for a stated budget.

    The policy has the family's architecture, so the run folder is also a metarl
    checkpoint of the oracle; give it to a meta-trained run's evaluation as its
    oracle line. Example:

        metarl oracle halfcheetah-vel --timesteps 1000000 --out runs/hc-vel-ppo-oracle

        metarl evaluate runs/hc-vel --family-opt oracle_run=runs/hc-vel-ppo-oracle
    """
    with user_errors():
        set_threads(threads)
        from metarl import sb3

        ppo = parse_options(ppo_opt)
        options = parse_options(family_opt)
        tty = is_tty()
        with Progress(TextColumn("oracle"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), TextColumn("{task.fields[m]}"), console=err,
                      disable=not tty) as bar:
            task = bar.add_task("oracle", total=timesteps, m="")
            shown = {"n": 0}

            def progress(done: int, row: dict[str, float] | None) -> None:
                bar.update(task, completed=done)
                if row is not None:
                    text = (f"return/train={row['return/train']:.1f} "
                            f"std={row['policy/std']:.3f}")
                    bar.update(task, m=text)
                    shown["n"] += 1
                    if not tty and shown["n"] % 10 == 0:
                        err.print(f"[{done}/{timesteps}] {text}", markup=False)

            previous = signal.signal(signal.SIGTERM, _terminate)
            try:
                result = sb3.train_oracle(family, out_dir, timesteps=timesteps, seed=seed,
                                          n_envs=n_envs, options=options, ppo_kwargs=ppo,
                                          checkpoint_every=checkpoint_every, resume=resume,
                                          overwrite=overwrite, eval_tasks=eval_tasks,
                                          progress=progress,
                                          notify=lambda m: err.print(m, markup=False))
            except KeyboardInterrupt:
                err.print(f"interrupted; the oracle so far is saved in {out_dir} "
                          "(continue it with --resume)", markup=False)
                raise typer.Exit(code=130) from None
            finally:
                signal.signal(signal.SIGTERM, previous)
        train_ret = "n/a" if result.train_return is None else f"{result.train_return:.2f}"
        out.print(f"oracle of {family}: {result.timesteps} environment steps in "
                  f"{result.seconds / 60:.1f} min; training return (last 100 episodes) "
                  f"{train_ret}", markup=False)
        if result.test_return is not None:
            out.print(f"oracle line on {result.n_test_tasks} test tasks (as metarl evaluate "
                      f"draws it): {result.test_return:.2f}", markup=False)
        err.print(f"run folder: {result.out} (use --family-opt oracle_run={result.out})",
                  markup=False)
