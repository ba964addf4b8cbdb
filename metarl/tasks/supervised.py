"""Supervised few-shot tasks: a fixed support set to adapt on, a query set to score."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


class SupervisedBatch:
    """A :class:`~metarl.types.TaskBatch` of T supervised tasks.

    The inner loss is ``loss(model(phi, support.x), support.y)`` and the outer
    loss the same on the query set; both are ``[T]``. The data calls just return
    the fixed sets, whatever the parameters.
    """

    def __init__(self, model: Model, loss: LossFn, metric: LossFn, support: Examples,
                 query: Examples) -> None:
        if support.x.shape[0] != query.x.shape[0]:
            raise ValueError(f"support has {support.x.shape[0]} tasks but query has "
                             f"{query.x.shape[0]}: both need the same leading task dimension")
        self.model, self.loss, self._metric = model, loss, metric
        self.support, self.query = support, query
        self.n_tasks = support.x.shape[0]

    def inner_data(self, params: Params) -> Examples:
        return self.support

    def outer_data(self, params: Params) -> Examples:
        return self.query

    def inner_loss(self, params: Params, data: Examples) -> Tensor:
        return self.loss(self.model.forward(params, data.x), data.y)

    outer_loss = inner_loss

    def metric(self, params: Params, data: Examples) -> Tensor:
        return self._metric(self.model.forward(params, data.x), data.y)

    def select(self, idx: Tensor | slice | int) -> SupervisedBatch:
        """The sub-batch of the given tasks (the per-task loop reference uses it)."""
        return SupervisedBatch(self.model, self.loss, self._metric, self.support.select(idx),
                               self.query.select(idx))
