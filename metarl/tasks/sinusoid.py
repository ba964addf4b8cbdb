"""Sinusoid regression (Finn et al. 2017, section 5.1)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch

from metarl.algorithms.imaml import IMAMLConfig
from metarl.config import Defaults, EvalDefaults, InnerOverride, OuterConfig, TrainConfig
from metarl.families import FamilyBase
from metarl.inner import InnerConfig
from metarl.models.mlp import MLP
from metarl.options import require
from metarl.tasks.supervised import Examples, SupervisedBatch, mse
from metarl.types import ConfigError, Params


class SinusoidFamily(FamilyBase):
    """``y = A sin(x + p)`` with ``A ~ U[0.1, 5]``, ``p ~ U[0, pi]``, ``x ~ U[-5, 5]``.

    Each task draws K support and Q query points; the model is a 1-40-40-1 ReLU
    MLP with MSE loss. Training follows the MAML paper: K = Q = 10, one inner
    step with lr 0.01, meta-batch 25, Adam 1e-3, 70,000 meta-iterations.
    Evaluation scores adapted models on ``eval_query`` fresh points per task
    (100 by default: the expected MSE is the same as with 10, with less noise).

    Args:
        shots: support points per task (K) at training.
        query: query points per task at training.
        eval_query: query points per task at test time.
        hidden: hidden layer sizes of the MLP.
        activation: "relu" (the paper) or "tanh" (smooth: the proximal problem of
            iMAML then has a true stationary point).

    References: Finn et al. 2017, section 5.1 and appendix.
    """

    name = "sinusoid"
    description = "Sinusoid regression y = A sin(x + p), K-shot, 1-40-40-1 MLP (MAML paper 5.1)"
    metric = "mse"
    higher_is_better = False
    amplitude = (0.1, 5.0)
    phase = (0.0, math.pi)
    x_range = (-5.0, 5.0)
    defaults = Defaults(
        train=TrainConfig(algo="maml", iterations=70_000, meta_batch=25,
                          inner=InnerConfig(steps=1, lr=0.01), outer=OuterConfig(lr=1e-3),
                          imaml=IMAMLConfig(lam=10.0, cg_iters=5), log_every=500,
                          checkpoint_every=5000),
        per_algo={"imaml": InnerOverride(steps=10), "reptile": InnerOverride(steps=5)},
        eval=EvalDefaults(steps=10, tasks=600))
    """The paper's MAML settings. The papers give none for iMAML or Reptile on
    sinusoid: iMAML solves its proximal problem (lambda 10) with 10 steps, Reptile
    takes 5 (with k = 1 Reptile is joint training)."""

    def __init__(self, shots: int = 10, query: int = 10, eval_query: int = 100,
                 hidden: Sequence[int] = (40, 40),
                 activation: Literal["relu", "tanh"] = "relu") -> None:
        for what, v in (("shots", shots), ("query", query), ("eval_query", eval_query)):
            require(int(v) >= 1, self.name, what, v, ">= 1")
        self.shots, self.query, self.eval_query = int(shots), int(query), int(eval_query)
        self.hidden = tuple(int(h) for h in hidden)
        require(all(h >= 1 for h in self.hidden), self.name, "hidden", hidden,
                "a list of layer sizes >= 1 (e.g. [40, 40]; [] is a linear model)")
        require(activation in ("relu", "tanh"), self.name, "activation", activation,
                "relu or tanh")
        self.activation = activation
        self.model = MLP(1, 1, self.hidden, activation)

    def options(self) -> dict[str, Any]:
        return {"shots": self.shots, "query": self.query, "eval_query": self.eval_query,
                "hidden": list(self.hidden), "activation": self.activation}

    def describe(self) -> str:
        lo, hi = self.amplitude
        return "\n".join([
            "y = A sin(x + p)",
            f"  amplitude A ~ U[{lo}, {hi}], phase p ~ U[0, pi], x ~ U[{self.x_range[0]}, "
            f"{self.x_range[1]}]",
            f"  support K = {self.shots} points, query {self.query} points (test: "
            f"{self.eval_query})",
            f"  model: MLP 1-{'-'.join(map(str, self.hidden))}-1, {self.activation}; loss and "
            f"metric: MSE",
            "  test tasks: same distribution, drawn with a separate test seed",
        ])

    def init_params(self, generator: torch.Generator, device: torch.device,
                    dtype: torch.dtype) -> Params:
        return self.model.init(generator, device, dtype)

    def sample_batch(self, n_tasks: int, generator: torch.Generator, *, split: str = "train",
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                     shots: int | None = None, query: int | None = None) -> SupervisedBatch:
        """T tasks with ``shots`` support and ``query`` query points each.

        Random numbers are drawn on the CPU generator, then moved, so that a seed
        gives the same tasks on every device.
        """
        K = self.shots if shots is None else int(shots)
        Q = (self.query if split == "train" else self.eval_query) if query is None else int(query)
        if K < 1 or Q < 1:
            raise ConfigError(f"sinusoid needs shots >= 1 and query >= 1, got {K} and {Q}")
        u = torch.rand(n_tasks, 2, generator=generator, dtype=torch.float64)
        A = self.amplitude[0] + (self.amplitude[1] - self.amplitude[0]) * u[:, :1]  # [T, 1]
        p = self.phase[0] + (self.phase[1] - self.phase[0]) * u[:, 1:]  # [T, 1]
        lo, hi = self.x_range
        x = lo + (hi - lo) * torch.rand(n_tasks, K + Q, generator=generator, dtype=torch.float64)
        y = A * torch.sin(x + p)  # [T, K+Q]
        x = x.unsqueeze(-1).to(device=device, dtype=dtype)  # [T, K+Q, 1]
        y = y.unsqueeze(-1).to(device=device, dtype=dtype)
        return SupervisedBatch(self.model, mse, mse, Examples(x[:, :K], y[:, :K]),
                               Examples(x[:, K:], y[:, K:]))
