"""The inner loop: a few gradient steps per task, batched over tasks.

One loop serves training (with or without the graph of every step),
evaluation, TRPO's line search (re-adapting from stored data) and iMAML's
proximal solve.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from metarl import params as P
from metarl.types import ConfigError, Data, Params, SupportsStepData, TaskBatch, check_task_losses


@dataclass(frozen=True, kw_only=True)
class InnerConfig:
    """How each task adapts: ``phi_{j+1} = phi_j - alpha_j * grad L_in(phi_j)`` (sgd), or
    Adam's step on the same gradients with per-task moments (adam)."""

    steps: int = 1
    """Inner gradient steps per task (k). 0 scores theta itself."""
    lr: float | tuple[float, ...] = 0.01
    """Inner learning rate alpha; a tuple gives one rate per step, the last repeated."""
    optimizer: Literal["sgd", "adam"] = "sgd"
    """Inner optimizer: sgd, or adam (per-task moments started at zero for every task, as
    Reptile's protocol; first order: reptile and fomaml only)."""
    adam_beta1: float = 0.0
    """Inner Adam's first-moment decay (Reptile's 0: no momentum)."""
    adam_beta2: float = 0.999
    """Inner Adam's second-moment decay."""
    learn_lr: bool = False
    """Meta-learn the inner rates: one per inner step and parameter tensor (MAML++'s
    per-layer per-step rates, a coarse Meta-SGD), started at lr; maml only. Test steps past
    the trained ones take the last step's rates."""
    kl_penalty: float = 0.0
    """Add this times the KL each inner step moves the policy (summed over the steps, each
    the mean over its trajectories' states of KL(pi_before || pi_after)) to the
    meta-objective, which then penalises long adaptation steps, as ProMP's inner trust
    region does; RL families with maml only. 0: the plain MAML objective."""
    kl_target: float = 0.0
    """Adapt the penalty's coefficient to hold the adaptation's KL near this value, as
    ProMP does: after every iteration, the coefficient doubles when the meta-batch's mean
    adaptation KL exceeds 1.5 times the target and halves when it falls below the target
    over 1.5, within KL_PENALTY_RANGE times its start, kl_penalty. 0: a fixed coefficient."""

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ConfigError(f"inner steps must be >= 0, got {self.steps}")
        if not (self.kl_penalty >= 0 and math.isfinite(self.kl_penalty)):
            raise ConfigError(f"inner-kl-penalty must be a finite number >= 0, got "
                              f"{self.kl_penalty}")
        if not (self.kl_target >= 0 and math.isfinite(self.kl_target)):
            raise ConfigError(f"inner-kl-target must be a finite number >= 0, got "
                              f"{self.kl_target}")
        if self.kl_target and not self.kl_penalty:
            raise ConfigError("--inner-kl-target adapts the coefficient --inner-kl-penalty "
                              "starts from: give --inner-kl-penalty ETA > 0 as well")
        lrs = self.lr if isinstance(self.lr, tuple) else (self.lr,)
        if not lrs or any(a <= 0 for a in lrs):
            raise ConfigError(f"inner lr must be positive, got {self.lr}")
        if self.optimizer not in INNER_OPTIMIZERS:
            raise ConfigError(f"unknown inner optimizer {self.optimizer!r}: use one of "
                              f"{', '.join(INNER_OPTIMIZERS)}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                flag = "inner-" + name.replace("_", "-")
                raise ConfigError(f"{flag} must be in [0, 1), got {getattr(self, name)}")

    def with_steps(self, steps: int, lr: float | tuple[float, ...]) -> InnerConfig:
        """The same update rule (optimizer and its settings) with other steps and rates."""
        return dataclasses.replace(self, steps=steps, lr=lr)

    def lr_at(self, j: int) -> float:
        """alpha_j: the learning rate of inner step ``j`` (0-based)."""
        if isinstance(self.lr, tuple):
            return self.lr[min(j, len(self.lr) - 1)]
        return self.lr

    def lr_sum(self) -> float:
        return sum(self.lr_at(j) for j in range(self.steps))


KL_PENALTY_RANGE = 1024.0
"""An adaptive inner KL coefficient stays within [start / this, start * this]: ten
halvings or doublings, so a coefficient that has fallen while the KL was below its target
needs at most ten iterations to come back (unbounded, ProMP's rule can reach 0 or
overflow on a long run)."""


@dataclass
class KLPenaltySchedule:
    """ProMP's adaptive inner KL coefficient (Rothfuss et al. 2019, Algorithm 1): ``eta``
    doubles after an iteration whose mean adaptation KL exceeds ``1.5 target`` and halves
    after one below ``target / 1.5``, within ``KL_PENALTY_RANGE`` of ``start``."""

    start: float
    target: float
    eta: float = 0.0

    def __post_init__(self) -> None:
        if not (self.start > 0 and self.target > 0):
            raise ConfigError(f"an adaptive inner KL coefficient needs a start and a target "
                              f"> 0, got {self.start} and {self.target}")
        if not self.eta:
            self.eta = self.start

    @classmethod
    def of(cls, cfg: InnerConfig) -> KLPenaltySchedule | None:
        """The schedule ``cfg`` asks for (``kl_target > 0``), or None (fixed or no penalty)."""
        return cls(cfg.kl_penalty, cfg.kl_target) if cfg.kl_target else None

    def update(self, kl: float) -> float:
        """The coefficient for the next iteration, after one whose mean adaptation KL was
        ``kl``."""
        if not math.isfinite(kl):
            raise ValueError(f"the adaptation KL is {kl}: the coefficient cannot follow it")
        if kl > 1.5 * self.target:
            self.eta = min(2 * self.eta, self.start * KL_PENALTY_RANGE)
        elif kl < self.target / 1.5:
            self.eta = max(self.eta / 2, self.start / KL_PENALTY_RANGE)
        return self.eta


INNER_OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
ADAM_EPS = 1e-8
"""Inner Adam's epsilon (added to the bias-corrected root second moment)."""
LR_KEY = "inner_lr."
"""Prefix of the learned inner rates in the meta-parameters: ``inner_lr.{name}`` ``[k]``
holds ``log alpha_j`` for parameter ``name``, one entry per inner step j."""


def with_learned_lr(theta: Params, cfg: InnerConfig) -> Params:
    """``theta`` and, for each of its tensors, the learned log-rates of ``cfg.steps`` inner
    steps, started at ``log(cfg.lr_at(j))`` (leaves without a task dimension)."""
    if cfg.steps < 1:
        raise ConfigError("learned inner rates need inner steps >= 1")
    v0 = next(iter(theta.values()))
    logs = torch.tensor([math.log(cfg.lr_at(j)) for j in range(cfg.steps)], device=v0.device,
                        dtype=v0.dtype)
    return {**theta, **{LR_KEY + k: logs.clone() for k in theta}}


def split_lr(params: Params) -> tuple[Params, Params]:
    """``(model, rates)``: the model's parameters and the learned log-rates (``LR_KEY``)."""
    model = {k: v for k, v in params.items() if not k.startswith(LR_KEY)}
    return model, {k: v for k, v in params.items() if k.startswith(LR_KEY)}


def has_learned_lr(params: Params) -> bool:
    """Whether ``params`` hold learned inner rates (``LR_KEY``)."""
    return any(k.startswith(LR_KEY) for k in params)


def model_params(params: Params) -> Params:
    """``params`` without learned inner rates: what a model's forward takes."""
    return split_lr(params)[0]


@dataclass
class InnerState:
    """What an inner loop carries from step to step beyond phi, to continue an
    adaptation step by step (as evaluation does, scoring between steps)."""

    m: Params | None = None
    """Inner Adam's first moments, leaves ``[T, *shape]`` (None: sgd)."""
    v: Params | None = None
    """Inner Adam's second moments, leaves ``[T, *shape]``."""
    t: int = 0
    """Adam steps taken."""
    halvings: Tensor | None = None
    """``[T]`` step halvings of the proximal (iMAML) monotone steps so far."""
    rates: Params | None = None
    """Learned log-rates ``inner_lr.{name}`` ``[T, k]`` (None: the config's rates)."""
    taken: int = 0
    """Inner steps taken so far (which learned rate the next step takes)."""


@dataclass
class Adaptation:
    """What an inner loop produced."""

    phi: Params
    """Adapted per-task parameters phi_k, leaves ``[T, *shape]`` (the model's: learned
    inner rates are in ``state``)."""
    data: list[Data] = field(default_factory=list)
    """The inner data used at each step (k entries), for re-adaptation without resampling."""
    losses: list[Tensor] = field(default_factory=list)
    """Inner loss ``[T]`` at each step, detached."""
    path: list[Params] = field(default_factory=list)
    """With an inner KL penalty (``kl_penalty > 0``; else empty): the parameters each step
    started from, phi_0 .. phi_{k-1} (with their graph when ``create_graph``): step j
    moves ``path[j]`` to ``path[j + 1]`` (the last to ``phi``)."""
    state: InnerState = field(default_factory=InnerState)
    """What the next step continues from: inner Adam's moments, the monotone steps'
    halvings."""


def adapt(
    params: Params,
    batch: TaskBatch,
    cfg: InnerConfig,
    *,
    create_graph: bool,
    data: Sequence[Data] | None = None,
    prox: tuple[float, Params] | None = None,
    state: InnerState | None = None,
) -> Adaptation:
    """Run ``cfg.steps`` inner gradient steps for all tasks at once.

    Args:
        params: starting per-task parameters phi_0, leaves ``[T, *shape]``; learned
            inner rates among them (``LR_KEY``) set every step's rate (``cfg.lr`` is then
            unused) and are differentiated through with ``create_graph``.
        batch: the tasks.
        cfg: steps and learning rate(s).
        create_graph: keep the graph of every step (second-order MAML, TRPO).
            When False each step starts from detached parameters and the result
            carries no history (first-order methods, evaluation).
        data: inner data to reuse, one entry per step; ``None`` asks the batch
            for new data at every step (RL: resampled with the current phi_j; a
            :class:`~metarl.types.SupportsStepData` batch: step j's minibatch).
        prox: ``(lam, anchor)`` adds ``lam/2 * |phi - anchor|^2`` to the inner
            loss (iMAML's proximal problem). The steps are then monotone: a task
            whose objective would not decrease stays where it is for that step
            and halves its step size for the steps after it, so phi approaches
            the proximal minimiser whatever the curvature, as the implicit
            gradient assumes. Each step evaluates one candidate per task and
            nothing is read on the host (no device synchronisation per step).
        state: what to continue from (``Adaptation.state`` of an earlier call on the
            same tasks): inner Adam's moments and the monotone steps' halvings. None
            starts afresh (moments zero, no halving).

    Returns:
        The adapted parameters, the data and losses of every step, and the state to
        continue from.

    Raises:
        ConfigError: inner adam with ``create_graph`` or ``prox`` (it is first order);
            learned rates with inner adam or ``prox``.
    """
    if data is not None and len(data) < cfg.steps:
        raise ValueError(f"got inner data for {len(data)} steps, need {cfg.steps}")
    if cfg.optimizer == "adam" and (create_graph or prox is not None):
        raise ConfigError("the inner adam optimizer is first order: train it with --algo "
                          "reptile or fomaml and --outer adam or sgd")
    T = batch.n_tasks
    phi, rates = split_lr(params)
    out = Adaptation(phi=phi, state=InnerState() if state is None else state)
    if rates:  # learned rates of theta (the first call of an adaptation) override the state's
        out.state = dataclasses.replace(out.state, rates=rates)
    rates = out.state.rates or {}
    if rates and (cfg.optimizer != "sgd" or prox is not None):
        raise ConfigError("learned inner rates scale plain gradient steps: use --algo maml with "
                          "--inner-optimizer sgd")
    if rates and not create_graph:
        rates = P.detach(rates)
    taken = out.state.taken
    for j in range(cfg.steps):
        if not create_graph:
            phi = P.detach(phi, requires_grad=True)
        d = data[j] if data is not None else (
            batch.inner_data_at(phi, taken + j) if isinstance(batch, SupportsStepData)
            else batch.inner_data(phi))
        loss = check_task_losses(batch.inner_loss(phi, d), T, "inner_loss")  # [T]
        if cfg.kl_penalty:  # only the penalty reads it (it would keep every phi_j alive)
            out.path.append(phi)
        out.data.append(d)
        out.losses.append(loss.detach())
        if prox is not None:
            lam, anchor = prox
            loss = loss + _prox(phi, anchor, lam)
        g = P.grads(loss.sum(), phi, create_graph=create_graph)  # per-task grads [T, ...]
        if prox is not None and not create_graph:
            halvings = out.state.halvings
            phi, halvings = _monotone_step(
                batch, phi, g, d, loss.detach(), cfg.lr_at(j), prox,
                torch.zeros_like(loss.detach()) if halvings is None else halvings)
            out.state = dataclasses.replace(out.state, halvings=halvings)
        elif cfg.optimizer == "adam":
            phi, out.state = _adam_step(phi, g, out.state, cfg, cfg.lr_at(j))
        elif rates:
            phi = _learned_step(phi, g, rates, taken + j)
        else:
            phi = P.add(phi, g, -cfg.lr_at(j))
    out.phi = phi if create_graph else P.detach(phi)
    out.state = dataclasses.replace(out.state, taken=taken + cfg.steps)
    return out


def step_rates(rates: Params, j: int) -> tuple[int, dict[str, Tensor]]:
    """The learned rates of inner step ``j`` from log-rates ``rates`` (``inner_lr.{name}``
    ``[T, k]``): ``(i, {name: alpha [T]})``, i the rate index (steps past k take the last)."""
    k = next(iter(rates.values())).shape[1]
    i = min(j, k - 1)
    return i, {key[len(LR_KEY):]: v[:, i].exp() for key, v in rates.items()}


def _learned_step(phi: Params, g: Params, rates: Params, j: int) -> Params:
    """``phi - alpha_j * g`` per tensor and task with the learned rates (:func:`step_rates`)."""
    _, a = step_rates(rates, j)
    return {k: v - P.per_task(a[k], g[k]) * g[k] for k, v in phi.items()}


def _adam_step(phi: Params, g: Params, state: InnerState, cfg: InnerConfig,
               alpha: float) -> tuple[Params, InnerState]:
    """One bias-corrected Adam step of every task: ``m = b1 m + (1-b1) g``,
    ``v = b2 v + (1-b2) g^2``, ``phi - alpha m_hat / (sqrt(v_hat) + eps)``."""
    b1, b2 = cfg.adam_beta1, cfg.adam_beta2
    with torch.no_grad():
        m0 = state.m if state.m is not None else P.zeros_like(g)
        v0 = state.v if state.v is not None else P.zeros_like(g)
        t = state.t + 1
        m = {k: b1 * m0[k] + (1 - b1) * g[k] for k in g}
        v = {k: b2 * v0[k] + (1 - b2) * g[k] * g[k] for k in g}
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        phi = {k: phi[k] - alpha * (m[k] / c1) / ((v[k] / c2).sqrt() + ADAM_EPS) for k in phi}
    return phi, dataclasses.replace(state, m=m, v=v, t=t)


def _prox(phi: Params, anchor: Params, lam: float) -> Tensor:
    diff = P.sub(phi, anchor)
    return 0.5 * lam * P.task_dot(diff, diff)  # [T]


def _monotone_step(batch: TaskBatch, phi: Params, g: Params, data: Data, before: Tensor,
                   alpha: float, prox: tuple[float, Params],
                   halvings: Tensor) -> tuple[Params, Tensor]:
    """``phi - a_t g_t`` with ``a_t = alpha / 2^halvings_t``, for the tasks whose proximal
    objective decreases (``after <= before``; NaN counts as no decrease). The other tasks
    keep ``phi`` and one more halving for the next step: returns ``(phi', halvings')``.

    One candidate per task and no host read: the same work whatever the outcome, so no
    Python branch waits for the device (an earlier version halved within the step until
    every task decreased, which read a flag on the host after each evaluation).
    """
    lam, anchor = prox
    with torch.no_grad():
        a = alpha * torch.pow(0.5, halvings)  # [T]
        cand = P.add(phi, g, -a)
        after = batch.inner_loss(cand, data) + _prox(cand, anchor, lam)  # [T]
        ok = after <= before  # [T]
        phi = {k: torch.where(P.per_task(ok, v), v, phi[k]) for k, v in cand.items()}
        return phi, torch.where(ok, halvings, halvings + 1)
