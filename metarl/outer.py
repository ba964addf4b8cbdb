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
    """Adam or SGD on the meta-gradient (``theta`` leaves are updated in place).

    With ``lr_final`` the learning rate of step ``i`` (0-based) of ``iterations`` is
    ``lr + (lr_final - lr) * i / iterations``: linear annealing, as Reptile's meta-step.
    The number of steps taken is part of the state, so a resumed run continues the
    schedule.
    """

    def __init__(self, theta: Params, kind: str = "adam", lr: float = 1e-3, *,
                 lr_final: float | None = None, iterations: int | None = None) -> None:
        if lr_final is not None and (iterations is None or iterations < 1):
            raise ConfigError("an annealed outer learning rate needs the number of iterations")
        self.lr, self.lr_final, self.iterations = lr, lr_final, iterations
        self.t = 0
        leaves = list(theta.values())
        if kind == "adam":
            self.opt: torch.optim.Optimizer = torch.optim.Adam(leaves, lr=lr)
        elif kind == "sgd":
            self.opt = torch.optim.SGD(leaves, lr=lr)
        else:
            raise ConfigError(f"unknown gradient optimizer {kind!r}: use adam or sgd")

    def lr_at(self, i: int) -> float:
        """The learning rate of step ``i`` (0-based)."""
        if self.lr_final is None or self.iterations is None:
            return self.lr
        return self.lr + (self.lr_final - self.lr) * min(i, self.iterations) / self.iterations

    def step(self, theta: Params, batch: TaskBatch, compute: Compute) -> MetaGrad:
        mg = compute(theta, batch)
        check_finite(mg.grad, "the meta-gradient")
        for k, p in theta.items():
            p.grad = mg.grad[k].detach().to(p.dtype)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.t)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.t += 1
        return mg

    def state_dict(self) -> dict[str, Any]:
        return {"opt": self.opt.state_dict(), "t": self.t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "param_groups" in state:  # written before the step count was kept
            self.opt.load_state_dict(state)
            return
        self.opt.load_state_dict(state["opt"])
        self.t = int(state["t"])
