"""``metarl train``: meta-train on a task family."""

from __future__ import annotations

import enum
import json
import logging
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from metarl import checkpoint, distributed, families
from metarl import config as C
from metarl.cli.common import (
    THREADS_HELP,
    UserError,
    err,
    is_tty,
    parse_options,
    report,
    set_threads,
    user_errors,
)
from metarl.cli.settings import with_settings
from metarl.config import TrainConfig
from metarl.train import check
from metarl.train import train as run_training
from metarl.types import DivergedError, RunError

TASK, RUN, OUTPUT = "Task", "Run", "Output"
log = logging.getLogger(__name__)


class Split(str, enum.Enum):
    """Class split of a classification family."""

    character = "character"
    alphabet = "alphabet"


class Estimator(str, enum.Enum):
    """RL inner-loss estimator (see metarl.rl.batch)."""

    reinforce = "reinforce"
    lvc = "lvc"
    dice = "dice"


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM (a scheduler preempting the job, ``kill``) stops training like Ctrl-C:
    the last finished iteration is checkpointed before the process exits."""
    raise KeyboardInterrupt


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.4g}" for k, v in metrics.items() if "/" in k)


@with_settings
def train(
    shots: Annotated[Optional[int], typer.Option(help="Support examples per class/task at training (supervised families).", rich_help_panel=TASK)] = None,
    ways: Annotated[Optional[int], typer.Option(help="Classes per task (classification families).", rich_help_panel=TASK)] = None,
    query: Annotated[Optional[int], typer.Option(help="Query examples per class/task at training (supervised families).", rich_help_panel=TASK)] = None,
    data: Annotated[Optional[list[Path]], typer.Option(help="Data files or folders (repeatable; merged), e.g. the Omniglot release's images_background.zip. Nothing is downloaded.", rich_help_panel=TASK)] = None,
    split: Annotated[Optional[Split], typer.Option(help="Class split of a classification family: by character (fixed seed) or by alphabet.", rich_help_panel=TASK)] = None,
    rollouts: Annotated[Optional[int], typer.Option(help="RL: trajectories per task per sampling (E). \\[default: the family's, 20]", rich_help_panel=TASK)] = None,
    horizon: Annotated[Optional[int], typer.Option(help="RL: steps per trajectory (H). \\[default: the family's]", rich_help_panel=TASK)] = None,
    estimator: Annotated[Optional[Estimator], typer.Option(help="RL inner-loss estimator: reinforce (the paper's), lvc (low-variance curvature) or dice (unbiased second derivatives). \\[default: reinforce]", rich_help_panel=TASK)] = None,
    family_opt: Annotated[Optional[list[str]], typer.Option(help="Any family option as KEY=VALUE (JSON values), repeatable: --family-opt hidden=[8,8].", rich_help_panel=TASK)] = None,
    threads: Annotated[Optional[int], typer.Option(help=THREADS_HELP, rich_help_panel=RUN)] = None,
    procs: Annotated[Optional[int], typer.Option(min=1, help="Processes on this machine, each taking its share of the meta-batch (torch.distributed: gloo on CPU, NCCL with one GPU per process); results equal one process's. Across machines run this command under torchrun instead. \\[default: 1]", rich_help_panel=RUN)] = None,
    port: Annotated[Optional[int], typer.Option(min=1, max=65535, help="With --procs: the rendezvous port on 127.0.0.1. \\[default: a free one]", rich_help_panel=RUN)] = None,
    config: Annotated[Optional[Path], typer.Option(help="TOML file of settings: top-level keys as in config.json (iterations = 500), tables \\[inner], \\[outer], \\[imaml], \\[trpo] and \\[family_options]; flags override it.", rich_help_panel=OUTPUT)] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder for config.json, metrics.jsonl and checkpoint.pt. \\[default: runs/FAMILY-ALGO]", rich_help_panel=OUTPUT)] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a run already in --out.", rich_help_panel=OUTPUT)] = False,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its checkpoint up to --iterations.", rich_help_panel=OUTPUT)] = False,
    *,
    settings: dict[str, Any],
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
        saved = _saved_config(out) if resume else None
        family = settings.pop("family", None)
        if saved is not None and family and family != saved.family:
            raise UserError(f"--resume: the run in {str(out)!r} trains family {saved.family!r}, "
                            f"not {family!r}: drop --family or choose another --out")
        name = (family or file_values.get("family") or (saved.family if saved else None)
                or "navigation2d")
        options = {**(saved.family_options if saved else {}),
                   **file_values.get("family_options", {}), **parse_options(family_opt)}
        for key, value in (("shots", shots), ("ways", ways), ("query", query),
                           ("rollouts", rollouts), ("horizon", horizon),
                           ("estimator", estimator.value if estimator else None),
                           ("data", [str(p) for p in data] if data else None),
                           ("split", split.value if split else None)):
            if value is not None:
                options[key] = value
        fam = families.make(name, **options)
        layers = [{k: v for k, v in layer.items() if k != "family_options"}
                  for layer in ((saved.to_dict() if saved else {}), file_values)]
        cfg = C.resolve(fam, *layers, {**settings, "family": name, "family_options": options})
        run_dir = out or Path("runs") / f"{fam.name}-{cfg.algo}"
        many = procs is not None and procs > 1 and not distributed.launched()
        check(cfg, fam, run_dir, overwrite=overwrite, resume=resume, procs=procs)
        if many and port is not None:
            distributed.check_port(port)
        main = distributed.env_rank() == 0
        if main and not os.environ.get(distributed.ERRORS_ENV):  # our launcher said it already
            rule = "" if cfg.inner.optimizer == "sgd" else f"{cfg.inner.optimizer} "
            err.print(f"training {cfg.algo} on {fam.name} for {cfg.iterations} iterations "
                      f"(meta-batch {cfg.meta_batch}, k={cfg.inner.steps}, inner {rule}lr "
                      f"{cfg.inner.lr}){f' on {procs} processes' if many else ''} -> {run_dir}",
                      markup=False)
        if many:
            assert procs is not None
            _launch(cfg, run_dir, procs=procs, port=port, threads=threads, overwrite=overwrite,
                    resume=resume)
            return
        tty = is_tty() and main
        with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                      MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.fields[m]}"),
                      console=err, disable=not tty) as bar:
            task = bar.add_task("train", total=cfg.iterations, m="")

            def progress(it: int, metrics: dict[str, float] | None) -> None:
                if metrics is not None:
                    bar.update(task, m=_fmt(metrics))
                    if main and not tty and (it % cfg.log_every == 0
                                             or it == cfg.iterations):
                        err.print(f"[{it}/{cfg.iterations}] {_fmt(metrics)}", markup=False)
                bar.update(task, completed=it)

            previous = signal.signal(signal.SIGTERM, _terminate)
            try:
                result = run_training(cfg, run_dir, progress=progress, overwrite=overwrite,
                                      resume=resume)
            except KeyboardInterrupt:
                if main and not distributed.launched():
                    err.print(f"interrupted; checkpoint of the last finished iteration is in "
                              f"{run_dir}", markup=False)
                raise typer.Exit(code=130) from None
            except RunError as e:
                what = "training diverged: " if isinstance(e, DivergedError) else ""
                where = ("" if distributed.launched() else  # the launcher says where
                         f"; the last finished iteration is checkpointed in {run_dir}")
                report(f"{what}{' '.join(str(e).split())}{where}")
                raise typer.Exit(code=e.exit_code) from None
            finally:
                signal.signal(signal.SIGTERM, previous)
        distributed.shutdown()  # every rank leaves the process group (no-op for one process)
        if not main:
            return
        err.print(f"done: {result.iterations} iterations in {result.seconds:.1f} s "
                  f"({1e3 * result.seconds / max(result.iterations, 1):.2f} ms/it); "
                  f"{_fmt(result.metrics)}", markup=False)
        err.print(f"run folder: {result.out}", markup=False)


def _launch(cfg: TrainConfig, run_dir: Path, *, procs: int, port: int | None,
            threads: int | None, overwrite: bool, resume: bool) -> None:
    """Train ``cfg`` on ``procs`` ranks of this machine: each rank runs this command on the
    resolved settings (a config.json), rank 0 writes the run folder; one line if any fails."""
    with tempfile.TemporaryDirectory(prefix="metarl-launch-") as tmp:
        settings = Path(tmp) / "config.json"
        settings.write_text(json.dumps(cfg.to_dict()))
        args = ["train", "--config", str(settings), "--out", str(run_dir),
                *(["--overwrite"] if overwrite else []), *(["--resume"] if resume else [])]
        t0 = time.perf_counter()
        try:
            distributed.launch(args, procs, port=port, threads=threads)
        except KeyboardInterrupt:
            err.print(f"interrupted; checkpoint of the last finished iteration is in {run_dir}",
                      markup=False)
            raise typer.Exit(code=130) from None
        except RunError as e:
            err.print(f"error: {' '.join(str(e).split())}; the last finished iteration is "
                      f"checkpointed in {run_dir}", markup=False)
            raise typer.Exit(code=e.exit_code) from None
    log.info("%d processes finished in %.1f s", procs, time.perf_counter() - t0)


def _saved_config(out: Path | None) -> TrainConfig | None:
    """The settings of the run being resumed (its checkpoint's), or None when there is none
    (``check`` then says that --resume has nothing to continue)."""
    if out is None or not (out / checkpoint.CHECKPOINT).is_file():
        return None
    return checkpoint.load(out).config
