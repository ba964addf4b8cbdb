"""Supervised few-shot tasks: a fixed support set to adapt on, a query set to score."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metarl.models.base import Model
from metarl.types import Params

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``(prediction [T, N, ...], target [T, N, ...]) -> per-task value [T]``."""


@dataclass(frozen=True)
class Examples:
    """Inputs ``x [T, N, *in]`` and targets ``y [T, N, *out]`` for T tasks."""

    x: Tensor
    y: Tensor

    def select(self, idx: Tensor | slice | int) -> Examples:
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return Examples(self.x[idx], self.y[idx])


def mse(pred: Tensor, y: Tensor) -> Tensor:
    """Mean squared error per task: ``[T]``."""
    return (pred - y).pow(2).flatten(1).mean(1)


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy per task: logits ``[T, N, C]``, labels ``[T, N]`` -> ``[T]``."""
    T, N, C = logits.shape
    return torch.nn.functional.cross_entropy(logits.reshape(T * N, C), y.reshape(T * N),
                                             reduction="none").view(T, N).mean(1)


def accuracy(logits: Tensor, y: Tensor) -> Tensor:
    """Fraction of correct predictions per task: ``[T]``."""
    return (logits.argmax(-1) == y).to(logits.dtype).mean(1)


class MinibatchPlan:
    """Which support examples each inner step of each task takes (Reptile's inner
    minibatches): every task's support set in a fresh random order each epoch, cut into
    consecutive minibatches of ``size``, so within an epoch no example repeats and a
    minibatch may straddle two epochs. Step j's rows are a pure function of ``(seed, j)``,
    the same for a task whether its batch is processed whole or in task chunks.

    Args:
        n_tasks: T.
        n_examples: support examples per task (N).
        size: examples per inner step (< N; at N or more every step takes the whole set).
        seed: the plan's random stream (drawn from the batch's generator).
    """

    def __init__(self, n_tasks: int, n_examples: int, size: int, seed: int) -> None:
        if size < 1:
            raise ValueError(f"an inner minibatch needs at least one example, got {size}")
        self.n_tasks, self.n_examples, self.size, self.seed = n_tasks, n_examples, size, seed
        self._orders: dict[int, Tensor] = {}

    def _order(self, epoch: int) -> Tensor:
        """``[T, N]``: each task's permutation of its support set in ``epoch``."""
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(self.seed + 7919 * epoch)
            self._orders[epoch] = torch.rand(self.n_tasks, self.n_examples, generator=g).argsort(1)
        return self._orders[epoch]

    def rows(self, step: int) -> Tensor:
        """``[T, size]`` (CPU, long): the support rows of inner step ``step``."""
        start = step * self.size
        first, last = start // self.n_examples, (start + self.size - 1) // self.n_examples
        stream = torch.cat([self._order(e) for e in range(first, last + 1)], 1)  # epochs spanned
        offset = start - first * self.n_examples
        return stream[:, offset:offset + self.size]


class SupervisedBatch:
    """A :class:`~metarl.types.TaskBatch` of T supervised tasks.

    The inner loss is ``loss(model(phi, support.x), support.y)`` and the outer
    loss the same on the query set; both are ``[T]``. The data calls just return
    the fixed sets, whatever the parameters; with ``plan`` each inner step adapts on
    its minibatch of the support set instead (:class:`MinibatchPlan`, through
    :meth:`inner_data_at`).
    """

    def __init__(self, model: Model, loss: LossFn, metric: LossFn, support: Examples,
                 query: Examples, *, plan: MinibatchPlan | None = None,
                 plan_rows: Tensor | None = None) -> None:
        if support.x.shape[0] != query.x.shape[0]:
            raise ValueError(f"support has {support.x.shape[0]} tasks but query has "
                             f"{query.x.shape[0]}: both need the same leading task dimension")
        self.model, self.loss, self._metric = model, loss, metric
        self.support, self.query = support, query
        self.n_tasks = support.x.shape[0]
        self.plan = plan if plan is not None and plan.size < support.x.shape[1] else None
        self.plan_rows = torch.arange(self.n_tasks) if plan_rows is None else plan_rows
        """This batch's tasks among the plan's (a task chunk keeps its tasks' rows)."""

    def inner_data(self, params: Params) -> Examples:
        return self.support

    def inner_data_at(self, params: Params, step: int) -> Examples:
        """Inner step ``step``'s data: its minibatch of the support set under the plan, the
        whole set without one."""
        if self.plan is None:
            return self.support
        dev = self.support.x.device
        cols = self.plan.rows(step)[self.plan_rows].to(dev)  # [T, size]
        tasks = torch.arange(self.n_tasks, device=dev)[:, None]
        return Examples(self.support.x[tasks, cols], self.support.y[tasks, cols])

    def _selected(self, idx: Tensor | slice | int) -> dict[str, Any]:
        """The constructor's data arguments for the sub-batch of tasks ``idx``."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return {"support": self.support.select(idx), "query": self.query.select(idx),
                "plan": self.plan, "plan_rows": self.plan_rows[idx]}

    def outer_data(self, params: Params) -> Examples:
        return self.query

    def inner_loss(self, params: Params, data: Examples) -> Tensor:
        return self.loss(self.model.forward(params, data.x), data.y)

    outer_loss = inner_loss

    def metric(self, params: Params, data: Examples) -> Tensor:
        return self._metric(self.model.forward(params, data.x), data.y)

    def select(self, idx: Tensor | slice | int) -> SupervisedBatch:
        """The sub-batch of the given tasks (the per-task loop reference uses it)."""
        return SupervisedBatch(self.model, self.loss, self._metric, **self._selected(idx))
