"""Outer optimizers: they turn a meta-gradient into an update of theta.

The meta-gradient (what an algorithm computes) and the outer optimizer (how
theta moves) are separate: any algorithm runs with any optimizer here. TRPO,
which needs to re-adapt candidates, lives in :mod:`metarl.rl.trpo` and has the
same ``step`` interface.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from metarl.algorithms.base import MetaGrad
from metarl.types import ConfigError, Params, TaskBatch, check_finite

Compute = Callable[[Params, TaskBatch], MetaGrad]
"""``(theta, batch) -> MetaGrad``: the chosen algorithm with its settings bound."""


class OuterOptimizer(Protocol):
    def step(self, theta: Params, batch: TaskBatch, compute: Compute) -> MetaGrad:
        """Compute the meta-gradient on ``batch`` and update ``theta`` in place."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class GradientOuter:
    """Adam or SGD on the meta-gradient (``theta`` leaves are updated in place)."""

    def __init__(self, theta: Params, kind: str = "adam", lr: float = 1e-3) -> None:
        leaves = list(theta.values())
        if kind == "adam":
            self.opt: torch.optim.Optimizer = torch.optim.Adam(leaves, lr=lr)
        elif kind == "sgd":
            self.opt = torch.optim.SGD(leaves, lr=lr)
        else:
            raise ConfigError(f"unknown gradient optimizer {kind!r}: use adam or sgd")

    def step(self, theta: Params, batch: TaskBatch, compute: Compute) -> MetaGrad:
        mg = compute(theta, batch)
        check_finite(mg.grad, "the meta-gradient")
        for k, p in theta.items():
            p.grad = mg.grad[k].detach().to(p.dtype)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return mg

    def state_dict(self) -> dict[str, Any]:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state)
