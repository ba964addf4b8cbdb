"""Meta-training: sample a meta-batch, compute the meta-gradient, update theta; log and
checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from metarl import checkpoint, distributed, families, threads
from metarl import params as P
from metarl.algorithms import ChunkChooser, MetaGrad, meta_grad
from metarl.config import TrainConfig
from metarl.families import Family, SupportsTRPO
from metarl.inner import KLPenaltySchedule, has_learned_lr, with_learned_lr
from metarl.outer import GradientOuter, OuterOptimizer
from metarl.rl.diagnostics import rl_diagnostics
from metarl.rl.family import RLFamily
from metarl.types import (
    ConfigError,
    Params,
    ReportsExtraMetrics,
    RLTaskBatch,
    RunError,
    SupportsSelect,
    TaskBatch,
    resolve_device,
    resolve_dtype,
)
from metarl.validation import BEST, Validator

log = logging.getLogger(__name__)

Progress = Callable[[int, dict[str, float] | None], None]
"""Called after every iteration with the iteration number (1-based) and, every
few iterations, the latest metrics."""


@dataclass(frozen=True)
class Step:
    """What a :class:`Callback` sees after each meta-iteration."""

    iteration: int
    """The iteration just finished (1-based, counted across resumes)."""
    theta: Params
    """The meta-parameters after its update: the training's own tensors, updated in place
    by the next iteration (keep ``{k: v.detach().clone() for k, v in theta.items()}``;
    do not modify them)."""
    meta_grad: MetaGrad
    """Its meta-gradient and what was computed on the way (losses, adapted phi)."""
    metrics: dict[str, float] | None
    """Its metrics on the iterations that log or show them (every ``min(log_every, 10)``
    and the last), else None."""
    out: Path
    """The run folder."""


class Callback(Protocol):
    """A hook into :func:`train`: ``on_iteration`` runs after every meta-iteration, on
    every process of a distributed run. Returning False stops training there: that
    iteration is checkpointed and :func:`train` returns (on several processes, any rank
    asking stops all of them). None or True continues."""

    def on_iteration(self, step: Step) -> bool | None: ...


@dataclass
class RunResult:
    out: Path
    iterations: int
    seconds: float
    metrics: dict[str, float]


def make_outer(cfg: TrainConfig, theta: Params, family: Family,
               group: distributed.Group = distributed.LOCAL) -> OuterOptimizer:
    if cfg.outer.optimizer in ("adam", "sgd"):
        return GradientOuter(theta, cfg.outer.optimizer, cfg.outer.lr,
                             lr_final=cfg.outer.lr_final, iterations=cfg.iterations)
    if not isinstance(family, SupportsTRPO):
        raise ConfigError(f"outer optimizer {cfg.outer.optimizer!r} is for RL families; family "
                          f"{cfg.family!r} trains with --outer adam or sgd")
    return family.make_outer(cfg, theta, group=group)


def sample_share(family: Family, n: int, generator: torch.Generator, group: distributed.Group,
                 *, device: torch.device, dtype: torch.dtype) -> TaskBatch:
    """This rank's share of a meta-batch of ``n`` training tasks.

    Every rank draws the same ``n`` tasks from the shared generator (so the stream
    stays in step) and keeps :meth:`~metarl.distributed.Group.share` of them: an RL
    family samples trajectories for its own tasks only, with noise that depends on
    the task and the seed, not on the split; a supervised batch is split with
    ``select``.
    """
    if group.world == 1:
        return family.sample_batch(n, generator, split="train", device=device, dtype=dtype)
    share = group.share(n)
    if isinstance(family, RLFamily):
        return family.sample_batch(n, generator, split="train", device=device, dtype=dtype,
                                   share=share)
    batch = family.sample_batch(n, generator, split="train", device=device, dtype=dtype)
    if not isinstance(batch, SupportsSelect):
        raise ConfigError(f"family {family.name!r} returns {type(batch).__name__}, which cannot "
                          "be split over processes (it has no select): train it with one process")
    return batch.select(share)


def meta_batch_grad(cfg: TrainConfig, group: distributed.Group,
                    schedule: KLPenaltySchedule | None = None,
                    ) -> Callable[[Params, TaskBatch], MetaGrad]:
    """``(theta, this rank's tasks) -> MetaGrad`` whose ``grad`` is the mean over the whole
    meta-batch of ``cfg.meta_batch`` tasks: the per-task gradients averaged in task order
    (:meth:`~metarl.distributed.Group.ordered_mean`), so the step is the same to the last
    bit on any number of processes. With a ``schedule``, each call's inner KL coefficient
    is the schedule's at the time."""

    chooser = ChunkChooser() if cfg.task_chunk == "auto" else None

    def compute(theta: Params, batch: TaskBatch) -> MetaGrad:
        inner = cfg.inner if schedule is None else replace(cfg.inner, kl_penalty=schedule.eta)
        if chooser is not None:
            mg = chooser.meta_grad(cfg.algo, theta, batch, inner, cfg.imaml)
            mg = dataclasses.replace(mg, extra={**mg.extra,
                                                "time/task_chunk": float(chooser.chunk or 0)})
        else:
            chunk = cfg.task_chunk if isinstance(cfg.task_chunk, int) else None
            mg = meta_grad(cfg.algo, theta, batch, inner, cfg.imaml, chunk=chunk)
        assert mg.task_grads is not None  # every algorithm of meta_grad returns them
        grad = group.ordered_mean_params(mg.task_grads, group.counts(cfg.meta_batch))
        return dataclasses.replace(mg, grad=grad)

    return compute


def seeds(seed: int) -> tuple[torch.Generator, torch.Generator]:
    """Generators of the initial parameters and of the training tasks."""
    return (torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 7919))


def check(cfg: TrainConfig, family: Family, out: Path, *, overwrite: bool = False,
          resume: bool = False, group: distributed.Group = distributed.LOCAL,
          procs: int | None = None) -> None:
    """Raise :class:`ConfigError` for anything that would fail only once the run started
    (``procs``: the number of processes it will run on, when not yet launched)."""
    world = procs or group.world
    if world > cfg.meta_batch:
        raise ConfigError(f"{world} processes for a meta-batch of {cfg.meta_batch} tasks: use at "
                          f"most --procs {cfg.meta_batch}, or raise --meta-batch")
    resolve_device(cfg.device)
    resolve_dtype(cfg.dtype)
    family.prepare()  # load and check data now, not mid-run
    if cfg.tensorboard:
        from metarl.tensorboard import require_tensorboard

        require_tensorboard()  # the optional extra, named in the error when missing
    if cfg.outer.optimizer == "trpo" and not isinstance(family, SupportsTRPO):
        raise ConfigError(f"outer optimizer 'trpo' is for RL families; family {cfg.family!r} "
                          "trains with --outer adam or sgd")
    Validator.check(cfg, family, world)
    if cfg.task_chunk is not None and family.kind == "rl":
        raise ConfigError(f"--task-chunk splits supervised meta-batches; family {cfg.family!r} "
                          "samples its tasks as one batch: drop --task-chunk")
    ckpt = out / checkpoint.CHECKPOINT
    if ckpt.exists() and not (overwrite or resume):
        raise ConfigError(f"run folder {str(out)!r} already holds a checkpoint: pass --resume to "
                          "continue it, --overwrite to replace it, or choose another --out")
    if resume and not ckpt.exists():
        raise ConfigError(f"--resume: run folder {str(out)!r} has no checkpoint to continue")
    if resume:
        run = checkpoint.load(out)
        learned = has_learned_lr(run.theta)
        if run.config.family != cfg.family or not families.fits(family, run.theta) \
                or learned != cfg.inner.learn_lr:
            raise ConfigError(f"--resume: the checkpoint in {str(out)!r} is a "
                              f"{run.config.family!r} model that does not fit these "
                              "settings: resume with the run's own family and options")
        if run.iteration >= cfg.iterations:
            raise ConfigError(f"the run in {str(out)!r} already has {run.iteration} "
                              "iterations: raise --iterations to continue it")
    if group.is_main:
        check_writable(out)


def check_writable(folder: Path) -> None:
    """Raise :class:`ConfigError` unless ``folder`` can be created and written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ConfigError(f"cannot write the run folder {str(folder)!r} ({e.strerror or e}): "
                          "choose another --out") from None


KEPT_DIR = "checkpoints"
"""Sub-folder of a run holding the checkpoints kept with ``keep_checkpoints``."""


def kept_checkpoint(out: Path, iteration: int) -> Path:
    """Where ``keep_checkpoints`` keeps the checkpoint of ``iteration``."""
    return out / KEPT_DIR / f"iteration-{iteration:06d}.pt"


METRICS = "metrics.jsonl"
"""A run's log: one JSON row per logged iteration (``iteration``, ``seconds`` of
training so far, counted across resumes, and the metrics)."""


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's log (``path``: the run folder or its ``metrics.jsonl``).

    Logs written before ``seconds`` counted across resumes restart it at each
    resume; those segments are joined here, so ``seconds`` always grows.
    Raises :class:`ConfigError` naming the file (and line) when it is missing or malformed.
    """
    path = Path(path)
    file = path / METRICS if path.is_dir() else path
    try:
        lines = file.read_text().splitlines()
    except FileNotFoundError:
        raise ConfigError(f"{str(file)!r} does not exist: give a run folder written by "
                          "metarl train (or its metrics.jsonl)") from None
    rows: list[dict[str, Any]] = []
    offset = 0.0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            it, sec = int(row["iteration"]), float(row["seconds"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ConfigError(f"{str(file)!r} line {n} is not a metrics row (JSON with "
                              "'iteration' and 'seconds'): is this a metarl run log?") from None
        if rows and sec + offset < rows[-1]["seconds"]:
            offset = rows[-1]["seconds"]
        rows.append({**row, "iteration": it, "seconds": sec + offset})
    return rows


def trim_metrics(out: Path, iteration: int) -> float:
    """On resume: drop logged rows past the checkpoint's ``iteration`` (an unclean
    stop can log iterations the checkpoint does not hold); return the training
    seconds logged up to it."""
    if not (out / METRICS).exists():
        return 0.0
    rows = [r for r in read_metrics(out) if r["iteration"] <= iteration]
    text = "".join(json.dumps({**r, "seconds": round(r["seconds"], 3)}) + "\n" for r in rows)
    checkpoint.atomic_write(out / METRICS, lambda tmp: Path(tmp).write_text(text))
    return rows[-1]["seconds"] if rows else 0.0


def prepare_out(out: Path, *, overwrite: bool, resume: bool) -> None:
    if overwrite and not resume:
        for name in (checkpoint.CHECKPOINT, BEST, METRICS, "config.json"):
            (out / name).unlink(missing_ok=True)
        for kept in (out / KEPT_DIR).glob("iteration-*.pt"):
            kept.unlink()
        from metarl.tensorboard import clear

        clear(out)
    out.mkdir(parents=True, exist_ok=True)


def train(cfg: TrainConfig, out: str | Path, *, progress: Progress | None = None,
          overwrite: bool = False, resume: bool = False,
          callbacks: Sequence[Callback] = ()) -> RunResult:
    """Meta-train ``cfg.family`` with ``cfg.algo``; write ``config.json``,
    ``metrics.jsonl`` and ``checkpoint.pt`` (atomically) under ``out``. Both
    record every family option as resolved, defaults included.

    With ``resume`` the run continues from ``out/checkpoint.pt`` (parameters,
    optimizer state and task stream) up to ``cfg.iterations``. A keyboard
    interrupt writes the checkpoint of the last finished iteration, then re-raises.
    ``callbacks`` see every iteration and can stop the run early (:class:`Callback`);
    ``RunResult.iterations`` then counts the iterations run.
    """
    out = Path(out)
    family = families.make(cfg.family, **cfg.family_options)
    # every option as resolved, so a later change of a family's defaults leaves the run as trained
    cfg = replace(cfg, family_options=family.options())
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    group = distributed.init(device)  # the group of one unless launched with several ranks
    device = distributed.local_device(device)
    check(cfg, family, out, overwrite=overwrite, resume=resume, group=group)
    if group.is_main:
        prepare_out(out, overwrite=overwrite, resume=resume)
    group.barrier()
    g_init, g_tasks = seeds(cfg.seed)
    schedule = KLPenaltySchedule.of(cfg.inner)  # None: a fixed coefficient, or none
    validator = (Validator(cfg, family, group=group, device=device, dtype=dtype)
                 if cfg.validate.every else None)
    theta, outer, start = _start(cfg, family, out if resume else None, g_init, g_tasks,
                                 group, device, dtype, schedule, validator)
    logged = 0.0  # seconds of training before this run
    if group.is_main:
        logged = trim_metrics(out, start) if resume else 0.0
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    compute = meta_batch_grad(cfg, group, schedule)

    def save(iteration: int, name: str = checkpoint.CHECKPOINT) -> None:
        if group.is_main:
            checkpoint.save(out / name,
                            checkpoint.Run(theta=theta, config=cfg, iteration=iteration,
                                           optimizer=outer.state_dict(),
                                           task_rng=g_tasks.get_state(),
                                           kl_penalty=None if schedule is None
                                           else schedule.eta,
                                           validation_best=None if validator is None
                                           else validator.best))

    t0 = time.perf_counter()
    metrics: dict[str, float] = {}
    it = start
    board = None
    if cfg.tensorboard and group.is_main:
        from metarl.tensorboard import Writer

        board = Writer(out, purge_step=start + 1 if resume else None)
    with open(out / METRICS, "a") if group.is_main else contextlib.nullcontext() as log_file:
        try:
            for it in range(start + 1, cfg.iterations + 1):
                threads.tick()  # the automatic thread count follows the machine's load
                t_it = time.perf_counter()
                batch = sample_share(family, cfg.meta_batch, g_tasks, group, device=device,
                                     dtype=dtype)
                mg = outer.step(theta, batch, compute)
                if schedule is not None:  # on every rank, from the whole meta-batch's KL
                    kl = group.task_mean_metrics({"kl": mg.extra["inner/kl"]}, batch.n_tasks)
                    schedule.update(kl["kl"])
                validated = validator is not None and validator.due(it)
                show = (it % max(1, min(cfg.log_every, 10)) == 0 or it == cfg.iterations
                        or validated)
                if show or it % cfg.log_every == 0:
                    metrics = iteration_metrics(batch, mg, theta, group,
                                                time.perf_counter() - t_it)
                if validated:
                    assert validator is not None
                    found, improved = validator(theta, it)
                    metrics.update(found)
                    if improved:
                        save(it, BEST)
                if it % cfg.log_every == 0 or it == cfg.iterations or validated:
                    row = {"iteration": it, "seconds": round(logged + time.perf_counter() - t0, 3),
                           **metrics}
                    if log_file is not None:
                        log_file.write(json.dumps(row) + "\n")
                        log_file.flush()
                    if board is not None:
                        board.row(row)
                if it % cfg.checkpoint_every == 0:
                    save(it)
                    if cfg.keep_checkpoints and group.is_main:
                        keep_checkpoint(out, it)
                if progress is not None:
                    progress(it, metrics if show else None)
                if callbacks:
                    step = Step(iteration=it, theta=theta, meta_grad=mg,
                                metrics=metrics if show else None, out=out)
                    if group.any(any([cb.on_iteration(step) is False for cb in callbacks])):
                        break
        except (KeyboardInterrupt, RunError):
            save(it - 1 if it > start else start)  # the last finished, finite iteration
            raise
        finally:
            if board is not None:
                board.close()
    save(it)
    return RunResult(out=out, iterations=it - start, seconds=time.perf_counter() - t0,
                     metrics=metrics)


def _start(cfg: TrainConfig, family: Family, resume_from: Path | None,
           g_init: torch.Generator, g_tasks: torch.Generator, group: distributed.Group,
           device: torch.device, dtype: torch.dtype,
           schedule: KLPenaltySchedule | None = None, validator: Validator | None = None,
           ) -> tuple[Params, OuterOptimizer, int]:
    """The meta-parameters, the outer optimizer and the last finished iteration a run
    starts from: fresh ones drawn with ``g_init``, or those of the checkpoint in
    ``resume_from`` (``g_tasks`` then continues the checkpoint's task stream,
    ``schedule`` its inner KL coefficient and ``validator`` its best validation)."""
    run = checkpoint.load(resume_from) if resume_from is not None else None
    if run is None:
        theta = family.init_params(g_init, device, dtype)
        if cfg.inner.learn_lr:
            theta = with_learned_lr(theta, cfg.inner)
        theta = P.clone_leaf(theta)
        return theta, make_outer(cfg, theta, family, group), 0
    theta = P.clone_leaf(P.to(run.theta, device, dtype))
    if run.task_rng is not None:
        g_tasks.set_state(run.task_rng)
    outer = make_outer(cfg, theta, family, group)
    if run.optimizer:
        outer.load_state_dict(run.optimizer)
    if schedule is not None and run.kl_penalty is not None:
        schedule.eta = run.kl_penalty
    if validator is not None:
        validator.best = run.validation_best
    return theta, outer, run.iteration


def iteration_metrics(batch: TaskBatch, mg: MetaGrad, theta: Params, group: distributed.Group,
                      seconds: float) -> dict[str, float]:
    """What a logged iteration reports: the meta-gradient's metrics, the returns (RL),
    the times and the RL diagnostics, averaged over the tasks of every rank."""
    metrics = mg.metrics()
    metrics.update(return_metrics(batch, mg))
    metrics.update(time_metrics(batch, seconds))
    if isinstance(batch, RLTaskBatch):
        metrics.update(rl_diagnostics(batch, theta, mg.inner_data, mg.outer_data,
                                      batch.sample_seconds, phi=mg.phi))
    return group.task_mean_metrics(metrics, batch.n_tasks)


def keep_checkpoint(out: Path, iteration: int) -> None:
    """Copy the run's checkpoint to ``checkpoints/iteration-NNNNNN.pt`` (atomically)."""
    checkpoint.atomic_write(kept_checkpoint(out, iteration),
                            lambda tmp: shutil.copyfile(out / checkpoint.CHECKPOINT, tmp))


def return_metrics(batch: TaskBatch, mg: MetaGrad) -> dict[str, float]:
    """RL: mean return of the trajectories before adaptation and after it, and likewise
    every extra metric the batch reports (Meta-World: ``success/pre``, ``success/post``)."""
    if not isinstance(batch, RLTaskBatch):
        return {}
    m: dict[str, float] = {}
    if mg.phi is None:
        return m
    extra = batch.extra_metrics if isinstance(batch, ReportsExtraMetrics) else None
    with torch.no_grad():
        first = mg.inner_data[0] if mg.inner_data else mg.outer_data
        for when, data in (("post", mg.outer_data), ("pre", first)):
            if data is None:
                continue
            m[f"return/{when}"] = float(batch.metric(mg.phi, data).mean())
            for name, value in (extra(mg.phi, data) if extra is not None else {}).items():
                m[f"{name}/{when}"] = float(value.mean())
    return m


def time_metrics(batch: TaskBatch, seconds: float) -> dict[str, float]:
    """Wall seconds of the iteration; for RL, split into sampling (environment
    steps and the policy calls that choose the actions) and update (losses,
    meta-gradient, line search and baseline fits). Read after the metrics, which
    wait for the device, so the update time includes the device's work. Also the
    torch thread count the iteration ran with (``metarl.threads``)."""
    m = {"time/iteration": seconds, "time/threads": float(torch.get_num_threads())}
    if isinstance(batch, RLTaskBatch):
        sampled = batch.sample_seconds
        m["time/sample"] = sampled
        m["time/update"] = max(seconds - sampled, 0.0)
    return m
