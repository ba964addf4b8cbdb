"""Core types and protocols shared by every algorithm and family.

Parameters are plain dicts of tensors. Inside the inner loop every leaf carries
a leading task dimension ``[T, *shape]``; the meta-parameters ``theta`` do not.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

Params = dict[str, Tensor]
"""A model's parameters: name -> tensor. Per-task stacks have shape ``[T, *shape]``."""

Data = Any
"""Whatever a task batch needs to compute a loss (fixed sets, sampled trajectories)."""

Metrics = dict[str, float]


@runtime_checkable
class TaskBatch(Protocol):
    """A meta-batch of ``n_tasks`` tasks, seen by the algorithms only through this.

    Getting data and computing a loss on it are separate calls, so that a loss on
    fixed data is a pure function of the parameters: iMAML's Hessian-vector
    products, TRPO's line search and the gradient checks evaluate it again and
    again on the same data and never resample.

    All ``params`` arguments are per-task stacks (every leaf ``[T, *shape]``).
    """

    n_tasks: int

    def inner_data(self, params: Params) -> Data:
        """Data to adapt on. Supervised: the support set. RL: trajectories
        sampled with ``params`` (no gradient through the simulator)."""
        ...

    def outer_data(self, params: Params) -> Data:
        """Data that scores adapted parameters. Supervised: the query set. RL:
        new trajectories sampled with the adapted ``params``."""
        ...

    def inner_loss(self, params: Params, data: Data) -> Tensor:
        """Per-task adaptation loss on ``data``: shape ``[T]``."""
        ...

    def outer_loss(self, params: Params, data: Data) -> Tensor:
        """Per-task meta-objective on ``data``: shape ``[T]``."""
        ...

    def metric(self, params: Params, data: Data) -> Tensor:
        """Per-task evaluation metric on ``data`` (MSE, accuracy, return): ``[T]``."""
        ...


@runtime_checkable
class ReportsExtraMetrics(Protocol):
    """A task batch that reports per-task metrics beside :meth:`TaskBatch.metric`, such as
    Meta-World's success rate. ``metarl evaluate`` scores each after 0..K adaptation steps
    like the metric, and training logs each before and after adaptation (``success/pre``,
    ``success/post``)."""

    def extra_metrics(self, params: Params, data: Data) -> dict[str, Tensor]:
        """name -> per-task value ``[T]`` on ``data`` (as :meth:`TaskBatch.metric`); empty
        when the batch has none to report."""
        ...


@runtime_checkable
class SupportsStepData(Protocol):
    """A task batch whose inner data changes from one inner step to the next, such as
    Reptile's inner minibatches of the support set; the inner loop asks it for step j's
    data instead of calling :meth:`TaskBatch.inner_data`."""

    def inner_data_at(self, params: Params, step: int) -> Data:
        """Data of inner step ``step`` (0-based, counted over an adaptation's calls)."""
        ...


@runtime_checkable
class SupportsSelect(Protocol):
    """A task batch that can be split into task chunks (``--task-chunk``)."""

    def select(self, idx: slice) -> TaskBatch:
        """The batch of tasks ``idx`` (a slice of the task dimension)."""
        ...


@runtime_checkable
class SupportsAdaptationKL(Protocol):
    """A task batch that measures how far an adaptation moved its policies (what
    ``--inner-kl-penalty`` adds to the meta-objective)."""

    def adaptation_kl(self, path: list[Params], phi: Params, data: list[Data]) -> Tensor:
        """``[T]``: the sum over inner steps j of the per-task mean KL(pi_path[j] ||
        pi_path[j+1]) on step j's ``data[j]`` (the last step ends at ``phi``),
        differentiable in both policies of every step."""
        ...


@runtime_checkable
class RLTaskBatch(TaskBatch, Protocol):
    """A task batch whose data are trajectories sampled with the parameters.

    Its score at adaptation step j is the return of the trajectories phi_j samples
    to adapt on (the metric ignores ``params``); TRPO constrains :meth:`kl`.
    """

    tasks: list[dict[str, Any]]
    """The T task specs."""
    sample_seconds: float
    """Wall seconds spent sampling, all calls together (time/sample in the log)."""

    def kl(self, old: Params, new: Params, data: Data) -> Tensor:
        """Per-task mean KL(pi_old || pi_new) on the states of ``data``: ``[T]``."""
        ...


class MetarlError(Exception):
    """Root of metarl's errors. The command line prints the message as one line and
    exits with ``exit_code``; library callers catch the subclass they care about."""

    exit_code = 1


class UsageError(MetarlError, ValueError):
    """Bad input (an option, a file, a task spec): the message names the bad value and
    the fix. Exit code 2; nothing has run yet, so nothing is lost."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration problem: unknown or malformed settings, families or options."""


class DataError(UsageError):
    """Data on disk is missing, unreadable or not what the family expects."""


class RunError(MetarlError):
    """A run that started failed; exit code 1. Training checkpoints the last finished
    iteration before raising it."""

    exit_code = 1


class SamplingError(RunError):
    """An environment failed while sampling (it raised in a worker, or a worker died).

    The failure happens while sampling, before the iteration's update, so the last
    finished iteration is intact.
    """


class DivergedError(RunError):
    """Training produced a non-finite meta-gradient; theta was left at its last finite value."""


def check_finite(grad: dict[str, Tensor], what: str) -> None:
    """Raise :class:`DivergedError` naming the first non-finite leaf of ``grad``.

    One host read for the whole tree (a single device synchronisation on CUDA), not one
    per leaf; only when something is not finite are the leaves examined one by one.
    """
    if not grad:
        return
    finite = torch.stack([torch.isfinite(v).all() for v in grad.values()])  # [n_leaves] bool
    if bool(finite.all()):
        return
    for k, ok in zip(grad, finite.tolist()):
        if not ok:
            raise DivergedError(f"{what} is not finite in {k!r}: lower the inner or outer "
                                "learning rate (iMAML: raise --lam so that I + H/lam stays "
                                "positive definite)")


def check_task_losses(loss: Tensor, n_tasks: int, what: str) -> Tensor:
    """Raise a readable error unless ``loss`` has shape ``[n_tasks]``."""
    if loss.shape != (n_tasks,):
        raise ValueError(
            f"{what} returned shape {tuple(loss.shape)}, expected ({n_tasks},): "
            "return one loss per task, not their mean"
        )
    return loss


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` picks CUDA when present; ``"cuda"`` without CUDA is a clear error."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but CUDA is not available: use --device "
                          "cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu or cuda") from e


DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}: use float32 or float64") from None
