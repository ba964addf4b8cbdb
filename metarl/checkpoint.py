"""Checkpoints: a typed run record on disk, written atomically.

A checkpoint file is a plain dict of tensors and JSON-like values, so it loads
with ``torch.load(path, weights_only=True)``: the meta-parameters ``theta``, the
resolved :class:`~metarl.config.TrainConfig` (family name and options
included), the iteration, the outer optimizer's state and the task stream's
RNG state. :func:`load` returns it as a :class:`Run`; every reader uses that.
Checkpoints written before the configuration was nested (format v1) load too.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metarl import families
from metarl.config import TrainConfig
from metarl.families import Family
from metarl.types import ConfigError, Params

FORMAT = "metarl-checkpoint-v2"
"""v2: nested configuration. v1 (flat ``inner_steps``, ``extra``, ...) still loads."""
FORMATS = ("metarl-checkpoint-v1", FORMAT)
CHECKPOINT = "checkpoint.pt"


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a partial file.

    Raises:
        ConfigError: the folder cannot be created or written (named, with the fix).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise ConfigError(f"cannot write {str(path)!r} ({e.strerror or e}): choose a folder "
                          "you can write to") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make results private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True, kw_only=True)
class Adapted:
    """How ``metarl adapt`` produced a policy from its parent checkpoint."""

    task: dict[str, Any]
    steps: int
    lr: list[float]
    seed: int
    returns: list[float]
    source: str
    """The run or checkpoint it was adapted from."""


@dataclass(frozen=True, kw_only=True)
class Run:
    """A checkpoint: meta-parameters, how they were trained, and where training stands.

    ``theta`` is on the CPU, without a task dimension. ``optimizer`` and ``task_rng``
    are None in checkpoints that do not continue training (an adapted policy). Two
    runs compare equal when their configuration, iteration and history are (tensors
    are not compared).
    """

    theta: Params = field(compare=False)
    config: TrainConfig
    iteration: int
    optimizer: dict[str, Any] | None = field(default=None, compare=False)
    """The outer optimizer's ``state_dict``."""
    task_rng: Tensor | None = field(default=None, compare=False)
    """State of the generator of training tasks (resume draws the tasks it would have)."""
    kl_penalty: float | None = None
    """The adaptive inner KL coefficient where training adapts it (``--inner-kl-target``)."""
    validation_best: tuple[int, float] | None = None
    """Where training validates (``--validate-every``): the iteration of the best validation
    metric so far and its value (the parameters kept as ``best.pt``)."""
    adapted: tuple[Adapted, ...] = ()
    """``metarl adapt`` steps that produced this policy, oldest first."""
    path: Path | None = field(default=None, compare=False)
    """The file it was loaded from."""

    def family(self) -> Family:
        """The family the run trained on, rebuilt with its recorded options."""
        return families.make(self.config.family, **self.config.family_options)

    def with_family_options(self, options: Mapping[str, Any]) -> Run:
        """The run with family options changed (``rollouts``, ``workers``, ...).

        Raises:
            ConfigError: the options change the model (its parameter names or shapes).
        """
        if not options:
            return self
        cfg = dataclasses.replace(self.config,
                                  family_options={**self.config.family_options, **options})
        if not families.fits(families.make(cfg.family, **cfg.family_options), self.theta):
            shown = " ".join(f"{k}={v}" for k, v in options.items())
            raise ConfigError(f"family options {shown} change the model of this run; only "
                              "options that keep its parameters (rollouts, workers, horizon, "
                              "...) can change")
        return dataclasses.replace(self, config=cfg)

    def to_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "format": FORMAT, "theta": {k: v.detach().cpu() for k, v in self.theta.items()},
            "config": self.config.to_dict(), "iteration": int(self.iteration),
            "optimizer": self.optimizer, "task_rng": self.task_rng,
            "family": self.config.family, "algo": self.config.algo}
        if self.kl_penalty is not None:
            state["kl_penalty"] = float(self.kl_penalty)
        if self.validation_best is not None:
            it, value = self.validation_best
            state["validation_best"] = {"iteration": int(it), "value": float(value)}
        if self.adapted:
            state["adapted_history"] = [
                {**dataclasses.asdict(a), "from": a.source} for a in self.adapted]
            for a in state["adapted_history"]:
                del a["source"]
            state["adapted"] = state["adapted_history"][-1]
        return state


def save(path: str | Path, run: Run) -> None:
    """Write ``run`` to ``path`` atomically."""
    state = run.to_state()
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def resolve_path(run_or_checkpoint: str | Path) -> Path:
    """A run folder (its ``checkpoint.pt``) or a checkpoint file."""
    p = Path(run_or_checkpoint)
    if p.is_dir():
        p = p / CHECKPOINT
        if not p.is_file():
            raise ConfigError(f"run folder {str(p.parent)!r} has no {CHECKPOINT}: "
                              "train first (metarl train --out DIR) or give a checkpoint file")
    elif not p.is_file():
        raise ConfigError(f"{str(p)!r} does not exist: give a run folder or a checkpoint file")
    return p


def load(run_or_checkpoint: str | Path) -> Run:
    """Load a checkpoint (safely: ``weights_only=True``), check its format and type it.

    Raises:
        ConfigError: missing, corrupt or not a metarl checkpoint.
    """
    p = resolve_path(run_or_checkpoint)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"cannot read checkpoint {str(p)!r} ({type(e).__name__}): the file is "
                          "corrupt or not a metarl checkpoint") from None
    if not isinstance(state, dict) or state.get("format") not in FORMATS:
        raise ConfigError(f"{str(p)!r} is not a metarl checkpoint (expected format {FORMAT})")
    try:
        config = TrainConfig.from_dict(state["config"], where=f"checkpoint {str(p)!r}")
        history = state.get("adapted_history") or ([state["adapted"]] if state.get("adapted")
                                                   else [])
        adapted = tuple(Adapted(task=dict(a["task"]), steps=int(a["steps"]),
                                lr=[float(x) for x in a["lr"]], seed=int(a["seed"]),
                                returns=[float(x) for x in a["returns"]], source=str(a["from"]))
                        for a in history)
        return Run(theta=dict(state["theta"]), config=config, iteration=int(state["iteration"]),
                   optimizer=state.get("optimizer"), task_rng=state.get("task_rng"),
                   kl_penalty=(None if state.get("kl_penalty") is None
                               else float(state["kl_penalty"])),
                   validation_best=_validation_best(state.get("validation_best")),
                   adapted=adapted, path=p)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"checkpoint {str(p)!r} is incomplete ({type(e).__name__}: {e}): it "
                          "was not written by metarl train or metarl adapt") from None


def _validation_best(saved: Any) -> tuple[int, float] | None:
    """``state["validation_best"]`` as ``(iteration, value)``; None when absent."""
    if saved is None:
        return None
    return int(saved["iteration"]), float(saved["value"])
