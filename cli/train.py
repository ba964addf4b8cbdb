"""``metarl train``: meta-train on a task family."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from metarl.cli.common import (THREADS_HELP, UserError, err, is_tty, parse_options, set_threads,
                               user_errors)
from metarl import checkpoint
from metarl import config as C
from metarl import families
from metarl.train import check
from metarl.types import DivergedError, SamplingError
from metarl.train import train as run_training

T, I, O, OUT = "Task", "Inner loop", "Outer loop", "Output"


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM (a scheduler preempting the job, ``kill``) stops training like Ctrl-C:
    the last finished iteration is checkpointed before the process exits."""
    raise KeyboardInterrupt


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.4g}" for k, v in metrics.items() if "/" in k)


def train(
    family: Annotated[Optional[str], typer.Option(help="Task family: a registered name (see `metarl families`) or package.module:Factory. \\[default: navigation2d]", rich_help_panel=T)] = None,
    algo: Annotated[Optional[str], typer.Option(help="Meta-gradient: maml, fomaml, reptile or imaml. \\[default: the family's]", rich_help_panel=O)] = None,
    iterations: Annotated[Optional[int], typer.Option(min=1, help="Meta-iterations (outer updates). \\[default: the family's]", rich_help_panel=O)] = None,
    meta_batch: Annotated[Optional[int], typer.Option(min=1, help="Tasks per meta-iteration. \\[default: the family's]", rich_help_panel=O)] = None,
    inner_steps: Annotated[Optional[int], typer.Option(min=0, help="Inner gradient steps per task (k). \\[default: the family's]", rich_help_panel=I)] = None,
    inner_lr: Annotated[Optional[float], typer.Option(help="Inner learning rate alpha. \\[default: the family's]", rich_help_panel=I)] = None,
    outer: Annotated[Optional[str], typer.Option(help="Outer optimizer: adam, sgd, or trpo (RL families). \\[default: the family's]", rich_help_panel=O)] = None,
    outer_lr: Annotated[Optional[float], typer.Option(help="Outer learning rate (adam/sgd). \\[default: the family's]", rich_help_panel=O)] = None,
    imaml_lam: Annotated[Optional[float], typer.Option("--lam", help="iMAML proximal strength lambda; must exceed -min eig of the inner Hessian. \\[default: the family's]", rich_help_panel=I)] = None,
    cg_iters: Annotated[Optional[int], typer.Option(min=1, help="iMAML conjugate-gradient iterations.", rich_help_panel=O)] = None,
    cg_damping: Annotated[Optional[float], typer.Option(min=0.0, help="iMAML CG damping (solves ((1+d)I + H/lam) g = v).", rich_help_panel=O)] = None,
    task_chunk: Annotated[Optional[int], typer.Option(min=1, help="Process the meta-batch this many tasks at a time and average: peak memory of one chunk, same gradient. \\[default: all tasks at once]", rich_help_panel=O)] = None,
    shots: Annotated[Optional[int], typer.Option(min=1, help="Support examples per class/task at training (supervised families).", rich_help_panel=T)] = None,
    ways: Annotated[Optional[int], typer.Option(min=2, help="Classes per task (classification families).", rich_help_panel=T)] = None,
    query: Annotated[Optional[int], typer.Option(min=1, help="Query examples per class/task at training (supervised families).", rich_help_panel=T)] = None,
    data: Annotated[Optional[list[Path]], typer.Option(help="Data files or folders (repeatable; merged), e.g. the Omniglot release's images_background.zip. Nothing is downloaded.", rich_help_panel=T)] = None,
    split: Annotated[Optional[str], typer.Option(help="Class split of a classification family: character (fixed seed) or alphabet.", rich_help_panel=T)] = None,
    rollouts: Annotated[Optional[int], typer.Option(min=1, help="RL: trajectories per task per sampling (E). \\[default: the family's, 20]", rich_help_panel=T)] = None,
    horizon: Annotated[Optional[int], typer.Option(min=1, help="RL: steps per trajectory (H). \\[default: the family's]", rich_help_panel=T)] = None,
    estimator: Annotated[Optional[str], typer.Option(help="RL inner-loss estimator: reinforce (the paper's), lvc (low-variance curvature) or dice (unbiased second derivatives). \\[default: reinforce]", rich_help_panel=I)] = None,
    max_kl: Annotated[Optional[float], typer.Option(help="TRPO: bound on the mean KL of the adapted policies. \\[default: 0.01]", rich_help_panel=O)] = None,
    family_opt: Annotated[Optional[list[str]], typer.Option(help="Any family option as KEY=VALUE (JSON values), repeatable: --family-opt hidden=[8,8].", rich_help_panel=T)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the initial parameters and training tasks. \\[default: 0]", rich_help_panel=O)] = None,
    device: Annotated[Optional[str], typer.Option(help="auto (CUDA when present), cpu or cuda. \\[default: auto]", rich_help_panel=O)] = None,
    dtype: Annotated[Optional[str], typer.Option(help="float32 or float64. \\[default: float32]", rich_help_panel=O)] = None,
    log_every: Annotated[Optional[int], typer.Option(min=1, help="Write a metrics.jsonl line every N iterations.", rich_help_panel=OUT)] = None,
    keep_checkpoints: Annotated[Optional[bool], typer.Option("--keep-checkpoints", help="Also keep each periodic checkpoint as RUN/checkpoints/iteration-NNNNNN.pt, to pick an iteration on validation tasks (metarl evaluate FILE --seed 1).", rich_help_panel=OUT)] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(min=1, help="Write checkpoint.pt every N iterations (and at the end). \\[default: 1000]", rich_help_panel=OUT)] = None,
    threads: Annotated[Optional[int], typer.Option(help=THREADS_HELP, rich_help_panel=O)] = None,
    config: Annotated[Optional[Path], typer.Option(help="TOML file of settings (keys as these options with underscores, a \\[family_options] table); flags override it.", rich_help_panel=OUT)] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder for config.json, metrics.jsonl and checkpoint.pt. \\[default: runs/FAMILY-ALGO]", rich_help_panel=OUT)] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a run already in --out.", rich_help_panel=OUT)] = False,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its checkpoint up to --iterations.", rich_help_panel=OUT)] = False,
) -> None:
    """Meta-train a model on a task family and write a run folder.

    Settings come from the family's defaults (the published hyperparameters),
    then --config, then flags; with --resume the run's own settings come first,
    so `metarl train --out RUN --resume --iterations N` continues it as it was. Examples:

        metarl train                                  (MAML-TRPO on navigation2d)

        metarl train --family sinusoid --algo imaml --out runs/sin
    """
    with user_errors():
        set_threads(threads)
        file_values = C.read_config_file(config) if config else {}
        saved = _saved_config(out) if resume else {}
        if saved and family and family != saved["family"]:
            raise UserError(f"--resume: the run in {str(out)!r} trains family {saved['family']!r}, "
                            f"not {family!r}: drop --family or choose another --out")
        name = family or file_values.get("family") or saved.get("family") or "navigation2d"
        options = {**saved.get("family_options", {}), **file_values.get("family_options", {}),
                   **parse_options(family_opt)}
        for key, value in (("shots", shots), ("ways", ways), ("query", query),
                           ("rollouts", rollouts), ("horizon", horizon), ("estimator", estimator),
                           ("data", [str(p) for p in data] if data else None), ("split", split)):
            if value is not None:
                options[key] = value
        fam = families.make(name, **options)
        flags = {"algo": algo, "iterations": iterations, "meta_batch": meta_batch,
                 "inner_steps": inner_steps, "inner_lr": inner_lr, "outer": outer,
                 "outer_lr": outer_lr, "imaml_lam": imaml_lam, "imaml_cg_iters": cg_iters,
                 "imaml_cg_damping": cg_damping, "task_chunk": task_chunk, "seed": seed, "device": device, "dtype": dtype,
                 "log_every": log_every, "checkpoint_every": checkpoint_every,
                 "keep_checkpoints": keep_checkpoints,
                 "family": name, "family_options": options,
                 "extra": {"max_kl": max_kl} if max_kl is not None else None}
        cfg = C.resolve(fam, {k: v for k, v in saved.items() if k != "family_options"},
                        {k: v for k, v in file_values.items() if k != "family_options"}, flags)
        run_dir = out or Path("runs") / f"{fam.name}-{cfg.algo}"
        check(cfg, fam, run_dir, overwrite=overwrite, resume=resume)
        err.print(f"training {cfg.algo} on {fam.name} for {cfg.iterations} iterations "
                  f"(meta-batch {cfg.meta_batch}, k={cfg.inner_steps}, inner lr {cfg.inner_lr}) "
                  f"-> {run_dir}", markup=False)
        tty = is_tty()
        with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                      MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.fields[m]}"),
                      console=err, disable=not tty) as bar:
            task = bar.add_task("train", total=cfg.iterations, m="")

            def progress(it: int, metrics: dict[str, float] | None) -> None:
                if metrics is not None:
                    bar.update(task, m=_fmt(metrics))
                    if not tty and (it % cfg.log_every == 0 or it == cfg.iterations):
                        err.print(f"[{it}/{cfg.iterations}] {_fmt(metrics)}", markup=False)
                bar.update(task, completed=it)

            previous = signal.signal(signal.SIGTERM, _terminate)
            try:
                result = run_training(cfg, run_dir, progress=progress, overwrite=overwrite,
                                      resume=resume)
            except KeyboardInterrupt:
                err.print(f"interrupted; checkpoint of the last finished iteration is in {run_dir}",
                          markup=False)
                raise typer.Exit(code=130) from None
            except SamplingError as e:
                err.print(f"error: {' '.join(str(e).split())}; the last finished iteration is "
                          f"checkpointed in {run_dir}", markup=False)
                raise typer.Exit(code=e.exit_code) from None
            except DivergedError as e:
                err.print(f"error: training diverged: {e}; the last finite checkpoint is in "
                          f"{run_dir}", markup=False)
                raise typer.Exit(code=1) from None
            finally:
                signal.signal(signal.SIGTERM, previous)
        err.print(f"done: {result.iterations} iterations in {result.seconds:.1f} s "
                  f"({1e3 * result.seconds / max(result.iterations, 1):.2f} ms/it); "
                  f"{_fmt(result.metrics)}", markup=False)
        err.print(f"run folder: {result.out}", markup=False)


def _saved_config(out: Path | None) -> dict:
    """The settings of the run being resumed (its checkpoint's), or {} when there is none
    (``check`` then says that --resume has nothing to continue)."""
    if out is None or not (out / checkpoint.CHECKPOINT).is_file():
        return {}
    return dict(checkpoint.load(out)["config"])
