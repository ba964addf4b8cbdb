"""TRPO on the meta-objective (Finn et al. 2017, section 5.3; Schulman et al. 2015).

The step maximises the post-adaptation surrogate subject to a bound on the mean
KL between the old and the new *adapted* policies on the post-adaptation
trajectories:

1. g = meta-gradient of the surrogate (as the algorithm prescribes: second
   order through the inner steps for MAML).
2. s = CG solution of F s = -g, with F v = d/dtheta (d KL/dtheta . v) + damping v
   taken through the adaptation for MAML (for first-order algorithms, at the
   adapted parameters, d phi/d theta := I). Should CG meet non-positive
   curvature it stops there, and ``trpo/cg_indefinite`` reports it.
3. full step sqrt(2 max_kl / s^T F s) s, then a backtracking line search: each
   candidate theta' is re-adapted from the *stored* inner trajectories (no
   resampling) and accepted when the surrogate improves and the KL is within
   ``max_kl``; if none is, theta is left unchanged.

Cost. Each Fisher-vector product through one inner step is three double-backward
passes (J v, F_phi J v, J^T F_phi J v) over the whole batch, and CG takes ``cg_iters``
of them plus one for s^T F s: with the defaults that was 77% of an update. With
``fisher_subsample < 1`` the products are taken on a share of the batch (inner and
post-adaptation trajectories alike), as OpenAI's TRPO takes its Fisher on a subsample:
by default every s-th step of every trajectory (``fisher_unit = "steps"``, s = 1 /
share, staggered across trajectories), or the first ``ceil(share * E)`` trajectories of
every task (``"trajectories"``). F is then the exact Hessian of the mean KL through the
adaptation on that subsample (a noisier metric, not a different one), while g, the
improvement and the KL bound of the line search stay on every trajectory, so each
accepted step still satisfies the bound on the full batch. Steps within an episode are
strongly correlated, so the same number of steps spread over all E episodes estimates
F much better than a few whole episodes do (navigation's two-step return learns
measurably better with it: README, "TRPO's cost and the fast Fisher option").
The line search scores a candidate with one policy forward (the old policy's
distribution is the one the meta-gradient's outer loss computed, which the RL batch
remembers); those numbers equal the separate
``outer_loss`` and ``kl`` calls bit for bit, so ``fisher_subsample = 1`` is the
previous code path exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from metarl import params as P
from metarl.algorithms.base import MetaGrad
from metarl.distributed import LOCAL, Group
from metarl.inner import LR_KEY, Adaptation, InnerConfig, adapt, split_lr, step_rates
from metarl.linalg import cg
from metarl.outer import Compute
from metarl.types import (
    ConfigError,
    Data,
    Params,
    RLTaskBatch,
    SupportsAdaptationKL,
    TaskBatch,
    check_finite,
)

FAST_FISHER_SUBSAMPLE = 0.05
"""The fast path's share of the batch for the Fisher-vector products (every 20th step of
every trajectory: what ``metarl bench --section rl`` compares with the exact path, 1.0;
navigation's validation return with it is in the README)."""
FISHER_SUBSAMPLE = 1.0
"""Default share of trajectories for the Fisher-vector products (see :class:`TRPOConfig`)."""

Readapt = Callable[[Params, TaskBatch, list[Data], bool], Adaptation]
"""``(theta, batch, inner_data, create_graph) -> adaptation`` (its ``phi``, the adapted
parameters): the algorithm's inner loop on stored data."""


@dataclass(frozen=True, kw_only=True)
class TRPOConfig:
    max_kl: float = 0.01
    """Bound on the mean KL between old and new adapted policies."""
    cg_iters: int = 10
    """Conjugate-gradient iterations on Fisher-vector products."""
    damping: float = 1e-5
    """Added to the Fisher-vector product: (F + damping I) v."""
    ls_steps: int = 15
    """Backtracking line-search steps."""
    ls_backtrack: float = 0.8
    """Step shrink factor per backtracking step."""
    fisher_subsample: float = FISHER_SUBSAMPLE
    """Share of the batch (of every trajectory's steps, or of the trajectories: see
    fisher_unit; inner and post-adaptation alike) on which conjugate gradient takes its
    Fisher-vector products, as OpenAI's TRPO does; the meta-gradient and the line
    search's improvement and KL bound always use every trajectory. 1.0: the full batch,
    the exact path of the published-number tables."""
    fisher_unit: Literal["steps", "trajectories"] = "steps"
    """What fisher_subsample takes a share of: steps (every s-th step of every
    trajectory, s = floor(1 / share), staggered across trajectories) or trajectories
    (the first ceil(share * E) of each task; the only one for the DiCE estimator)."""

    def __post_init__(self) -> None:
        if self.max_kl <= 0 or self.cg_iters < 1 or self.damping < 0 or self.ls_steps < 1:
            raise ConfigError("TRPO needs max_kl > 0, cg_iters >= 1, damping >= 0 and "
                              f"ls_steps >= 1, got {self.max_kl}, {self.cg_iters}, "
                              f"{self.damping}, {self.ls_steps}")
        if not 0 < self.ls_backtrack < 1:
            raise ConfigError(f"TRPO ls_backtrack must be in (0, 1), got {self.ls_backtrack}")
        if not 0 < self.fisher_subsample <= 1:
            raise ConfigError(f"TRPO fisher_subsample must be in (0, 1], got "
                              f"{self.fisher_subsample}: "
                              "it is the share of the batch the Fisher uses (1.0: all of it)")
        if self.fisher_unit not in ("steps", "trajectories"):
            raise ConfigError(f"TRPO fisher_unit must be steps or trajectories, got "
                              f"{self.fisher_unit!r}")


Score = Callable[[Params], tuple[Tensor, Tensor]]
"""``new -> (outer loss [T], KL(old || new) [T])`` on fixed trajectories."""


@runtime_checkable
class SupportsFisherSubsample(Protocol):
    """An RL task batch that can restrict its data to a share of its steps or trajectories
    and score line-search candidates with one policy forward (:class:`~metarl.rl.batch.RLBatch`)."""

    def subsample(self, data: Data, share: float, by: str = "steps") -> Data:
        """A share of every task's steps or trajectories (at least one)."""
        ...

    def line_search_score(self, old: Params, data: Data) -> Score:
        """``new -> (outer_loss(new, data), kl(old, new, data))``, equal to those calls."""
        ...


def _inner_loss_on(batch: TaskBatch, data: Data) -> Callable[[Params], Tensor]:
    """``params -> batch.inner_loss(params, data)``: one inner step's loss on its stored data."""
    return lambda params: batch.inner_loss(params, data)


def make_readapt(algo: str, inner: InnerConfig, lam: float | None = None) -> Readapt:
    """The inner loop of ``algo`` on stored data (iMAML: the proximal one)."""

    def readapt(theta: Params, batch: TaskBatch, data: list[Data],
                create_graph: bool) -> Adaptation:
        theta_T = P.expand(theta, batch.n_tasks)
        prox = (lam, P.expand(P.detach(theta), batch.n_tasks)) if algo == "imaml" and lam else None
        return adapt(theta_T, batch, inner, create_graph=create_graph, data=data, prox=prox)

    return readapt


class TRPO:
    """TRPO outer optimizer for RL task batches (they must provide ``kl(old, new, data)``).

    Args:
        cfg: trust-region settings.
        readapt: the algorithm's inner loop on stored data.
        through_adaptation: take the Fisher through the inner steps (MAML);
            otherwise at the adapted parameters (first-order algorithms).
        inner: the inner steps' learning rates (needed when ``through_adaptation``).
    """

    def __init__(self, cfg: TRPOConfig, readapt: Readapt, *, through_adaptation: bool,
                 inner: InnerConfig | None = None, group: Group = LOCAL) -> None:
        if through_adaptation and inner is None:
            raise ValueError("TRPO through the adaptation needs the inner config (its learning "
                             "rates)")
        self.cfg, self.readapt, self.through = cfg, readapt, through_adaptation
        self.readapt_steps = inner or InnerConfig()
        self.group = group
        """The ranks sharing the meta-batch: each Fisher-vector product, s^T F s and each
        candidate's loss and KL are means over all of their tasks, averaged in task order,
        so every rank takes the step one process takes, to the last bit (one process: the
        group of one, no communication)."""

    def fisher_data(self, batch: RLTaskBatch, mg: MetaGrad) -> tuple[list[Data], Data]:
        """The inner and post-adaptation data the Fisher-vector products use: all of
        ``mg``'s, or with ``fisher_subsample < 1`` the batch's subsample of each."""
        share = self.cfg.fisher_subsample
        if share >= 1:
            return mg.inner_data, mg.outer_data
        if not isinstance(batch, SupportsFisherSubsample):
            raise ConfigError(f"TRPO fisher_subsample={share} needs a task batch that subsamples "
                              f"its data; {type(batch).__name__} has no subsample(data, "
                              "share, by): set fisher_subsample to 1.0")
        by = self.cfg.fisher_unit
        try:
            return ([batch.subsample(d, share, by) for d in mg.inner_data],
                    batch.subsample(mg.outer_data, share, by))
        except ValueError as e:
            raise ConfigError(f"TRPO fisher_unit={by}: {e}") from None

    def fisher_vector_product(self, theta: Params, batch: RLTaskBatch,
                              mg: MetaGrad) -> Callable[[Tensor], Tensor]:
        """``v -> (F + damping I) v`` with F the Hessian of the mean KL at theta: the mean
        over tasks of :meth:`task_fisher_vector_products`."""
        rows = self.task_fisher_vector_products(theta, batch, mg)
        counts = [batch.n_tasks]
        return lambda v: LOCAL.ordered_mean(rows(v), counts) + self.cfg.damping * v

    def task_fisher_vector_products(self, theta: Params, batch: RLTaskBatch,
                                    mg: MetaGrad) -> Callable[[Tensor], Tensor]:
        """``v -> [F_t v]_t``, ``[T, dim theta]``, F_t the Hessian of task t's KL at theta.

        At theta the new adapted policy equals the old one, so the KL's gradient
        vanishes there and its Hessian through the inner steps is exactly
        ``J^T F_phi J`` with ``J = prod_j (I - alpha_j H_j)`` (H_j: Hessian of the
        inner loss at phi_j on step j's trajectories) and F_phi the Hessian of the
        KL at phi_k. Each product is then 2k Hessian-vector products on the inner
        losses and one on the KL, every one a single backward pass over a graph
        built once (``direct_fisher_vector_product`` differentiates the KL through
        the unrolled steps instead: the same numbers, several times the cost).
        First-order algorithms take J = I. With ``fisher_subsample < 1`` every
        Hessian here is taken on the subsampled trajectories (:meth:`fisher_data`): the
        inner steps' H_j along the subsample's own adaptation, F_phi at the old adapted
        policy on the subsampled post-adaptation states (see
        :meth:`direct_fisher_vector_product` for the matrix this is).
        """
        old = mg.phi
        assert old is not None
        inner_data, out = self.fisher_data(batch, mg)
        T = batch.n_tasks
        model, rates = split_lr(theta)
        if rates and self.through:
            return self._learned_rate_fvp(theta, model, rates, batch, inner_data, out, old)
        inner_hvps: list[tuple[float, Callable[[Params], Params]]] = []
        if self.through:
            phi = P.expand(P.detach(model), T)
            steps = self.readapt_steps
            for j, d in enumerate(inner_data):
                g, H = P.grad_and_hvp(_inner_loss_on(batch, d), phi)
                alpha = steps.lr_at(j)
                inner_hvps.append((alpha, H))
                phi = P.add(phi, g, -alpha)  # phi_{j+1}, from the same graph
        phi_k = P.detach(old, requires_grad=True)
        grad_kl = P.grads(batch.kl(old, phi_k, out).sum(), phi_k, create_graph=True)  # [T, ...]
        like = {k: v[0] for k, v in phi_k.items()}

        def J(u: Params, order: list[tuple[float, Callable[[Params], Params]]]) -> Params:
            for alpha, H in order:
                u = P.add(u, H(u), -alpha)  # (I - alpha_j H_j) u
            return u

        def F(v: Tensor) -> Tensor:
            u = J(P.expand(P.unflatten(v, like), T), inner_hvps)  # J v, per task
            w = P.grads(P.task_dot(grad_kl, u).sum(), phi_k, retain_graph=True)  # F_phi J v
            w = J(w, inner_hvps[::-1])  # J^T F_phi J v (each H_j symmetric), per task
            return torch.cat([x.reshape(T, -1) for x in w.values()], 1)

        return F

    def _learned_rate_fvp(self, theta: Params, model: Params, rates: Params,
                          batch: RLTaskBatch, inner_data: list[Data], out: Data,
                          old: Params) -> Callable[[Tensor], Tensor]:
        """:meth:`task_fisher_vector_products` when the inner rates are meta-parameters too
        (``inner_lr.*`` in theta, learned per step j and tensor p: ``a_jp = exp(rho_jp)``).

        A step ``phi_{j+1} = phi_j - A_j g_j`` (``A_j`` scales tensor p by ``a_jp``) moves
        with ``d phi_{j+1} = (I - A_j H_j) d phi_j - A_j g_j * d rho_j``, so J maps
        ``(d theta, d rho)`` to ``d phi_k`` by that recursion and its transpose takes
        ``w -> (I - H_j A_j) w`` back through the steps, collecting
        ``d rho_jp = -a_jp g_jp . w_p`` on the way; F_t = J^T F_phi J as before."""
        T = batch.n_tasks
        rates_T = P.expand(P.detach(rates), T)  # [T, k] per tensor
        phi = P.expand(P.detach(model), T)
        steps: list[tuple[int, dict[str, Tensor], Params, Callable[[Params], Params]]] = []
        for j, d in enumerate(inner_data):
            g, H = P.grad_and_hvp(_inner_loss_on(batch, d), phi)
            i, a = step_rates(rates_T, j)  # a: [T] per tensor
            steps.append((i, a, g, H))
            phi = {k: v - P.per_task(a[k], g[k]) * g[k] for k, v in phi.items()}
        phi_k = P.detach(old, requires_grad=True)
        grad_kl = P.grads(batch.kl(old, phi_k, out).sum(), phi_k, create_graph=True)  # [T, ...]
        like = P.detach(theta)

        def F(v: Tensor) -> Tensor:
            vt = P.expand(P.unflatten(v, like), T)
            u = {k: vt[k] for k in model}
            for i, a, g, H in steps:  # J v
                Hu = H(u)
                u = {k: x - P.per_task(a[k], x) * (Hu[k] + g[k] * P.per_task(
                    vt[LR_KEY + k][:, i], x)) for k, x in u.items()}
            w = P.grads(P.task_dot(grad_kl, u).sum(), phi_k, retain_graph=True)  # F_phi J v
            back = {LR_KEY + k: torch.zeros_like(vt[LR_KEY + k]) for k in model}
            for i, a, g, H in reversed(steps):  # J^T w
                for k in model:
                    back[LR_KEY + k][:, i] -= a[k] * (g[k] * w[k]).flatten(1).sum(1)
                Haw = H({k: P.per_task(a[k], x) * x for k, x in w.items()})
                w = {k: x - Haw[k] for k, x in w.items()}
            res = {**w, **back}
            return torch.cat([res[k].reshape(T, -1) for k in theta], 1)

        return F

    def direct_fisher_vector_product(self, theta: Params, batch: RLTaskBatch,
                                     mg: MetaGrad) -> Callable[[Tensor], Tensor]:
        """Reference: the Hessian of the mean KL differentiated through the re-adaptation,
        on the same trajectories as :meth:`fisher_vector_product`. On a subsample the
        re-adaptation ``phi_sub(theta')`` is translated to pass through the old adapted
        policy at theta, ``phi_sub(theta') - phi_sub(theta) + phi_old``: the KL's gradient
        then vanishes at theta and its Hessian is ``J_sub^T F_sub J_sub``, the Fisher of
        the full batch estimated from the subsample's Jacobian and KL (without the shift
        the Hessian would carry the subsample's adaptation error times the curvature of
        the inner steps, and need not be positive semi-definite)."""
        old = mg.phi
        if old is None:
            raise ValueError("the Fisher of the KL needs the old adapted parameters: mg.phi is "
                             "None (metarl's algorithms return them in MetaGrad.phi)")
        inner_data, out = self.fisher_data(batch, mg)
        th = P.detach(theta, requires_grad=True)
        phi = self.readapt(th, batch, inner_data, True).phi
        if self.cfg.fisher_subsample < 1:
            phi = {k: v - v.detach() + old[k] for k, v in phi.items()}
        grad_kl = P.grads(batch.kl(old, phi, out).mean(), th, create_graph=True)

        def F(v: Tensor) -> Tensor:
            hv = P.grads(P.flatten(grad_kl) @ v, th, retain_graph=True)
            return P.flatten(hv) + self.cfg.damping * v

        return F

    def step(self, theta: Params, batch: TaskBatch, compute: Compute) -> MetaGrad:
        if not isinstance(batch, RLTaskBatch):
            raise ConfigError(f"TRPO steps RL task batches (with kl); got {type(batch).__name__}: "
                              "train this family with --outer adam or sgd")
        cfg = self.cfg
        mg = compute(theta, batch)
        if mg.phi is None or mg.outer_data is None or mg.outer_loss is None:
            raise ConfigError("TRPO needs the adapted parameters and post-adaptation trajectories")
        check_finite(mg.grad, "the meta-gradient")
        rows = self.task_fisher_vector_products(theta, batch, mg)  # flat v -> [F_t v]_t
        group = self.group
        counts = group.task_counts(batch.n_tasks)

        def F(v: Tensor) -> Tensor:  # (F + damping I) v, F the mean over every rank's tasks
            return group.ordered_mean(rows(v), counts) + cfg.damping * v

        like = P.detach(theta)
        s_tree, indefinite = cg(lambda u: P.unflatten(F(P.flatten(u)), like),
                                P.scale(P.detach(mg.grad), -1.0), cfg.cg_iters,
                                per_task=False)  # F s = -g, one system over all of theta
        s = P.flatten(s_tree)
        if cfg.fisher_subsample < 1:  # CG's iterate from 0: s^T (F + damping I) s = -s^T g
            sFs = float(-(s @ P.flatten(P.detach(mg.grad))))
        else:
            sFs = float(s @ F(s))  # the exact path: one more product
        theta0 = P.flatten(P.detach(theta))
        L0 = float(group.ordered_mean(mg.outer_loss, counts))
        accepted, frac, kl_new, L_new = False, 0.0, 0.0, L0
        penalty = mg.kl_penalty  # the coefficient of the objective mg is the gradient of
        moved = batch if isinstance(batch, SupportsAdaptationKL) else None
        if penalty and moved is None:
            raise ConfigError(f"the inner KL penalty needs adaptation_kl on the task batch; "
                              f"{type(batch).__name__} has none: set --inner-kl-penalty 0")
        if sFs > 0 and math.isfinite(sFs):
            full = s * math.sqrt(2 * cfg.max_kl / sFs)
            score = self._score(batch, mg)
            for i in range(cfg.ls_steps):
                frac = cfg.ls_backtrack ** i
                cand = P.unflatten(theta0 + frac * full, theta)
                ad = self.readapt(cand, batch, mg.inner_data, False)
                phi = P.detach(ad.phi)
                with torch.no_grad():
                    L_T, kl_T = score(phi)  # [T], [T] on every post-adaptation trajectory
                    if penalty and moved is not None:  # the meta-objective's KL term
                        L_T = L_T + penalty * moved.adaptation_kl(ad.path, phi, ad.data)
                    L_new, kl_new = group.ordered_mean(torch.stack([L_T, kl_T], 1),
                                                       counts).tolist()
                if L_new < L0 and kl_new <= cfg.max_kl:
                    accepted = True
                    break
        new = P.unflatten(theta0 + frac * full, theta) if accepted else None
        with torch.no_grad():
            if new is not None:
                for k, p in theta.items():
                    p.copy_(new[k])
        mg.extra.update({"trpo/kl": kl_new if accepted else 0.0,
                         "trpo/improvement": (L0 - L_new) if accepted else 0.0,
                         "trpo/step_frac": frac if accepted else 0.0,
                         "trpo/accepted": float(accepted),
                         "trpo/cg_indefinite": float(indefinite)})
        return mg

    @staticmethod
    def _score(batch: RLTaskBatch, mg: MetaGrad) -> Score:
        """The line search's ``phi -> (outer loss, KL)`` on ``mg``'s post-adaptation data."""
        old, out = mg.phi, mg.outer_data
        assert old is not None
        with torch.no_grad():
            if isinstance(batch, SupportsFisherSubsample):
                return batch.line_search_score(old, out)  # one policy forward per candidate
        return lambda phi: (batch.outer_loss(phi, out), batch.kl(old, phi, out))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
