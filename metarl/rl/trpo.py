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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metarl import params as P
from metarl.algorithms.base import MetaGrad
from metarl.inner import InnerConfig, adapt
from metarl.linalg import cg
from metarl.outer import Compute
from metarl.types import ConfigError, Data, Params, RLTaskBatch, TaskBatch, check_finite

Readapt = Callable[[Params, TaskBatch, list[Data], bool], Params]
"""``(theta, batch, inner_data, create_graph) -> phi``: the algorithm's inner loop on stored data."""


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

    def __post_init__(self) -> None:
        if self.max_kl <= 0 or self.cg_iters < 1 or self.damping < 0 or self.ls_steps < 1:
            raise ConfigError("TRPO needs max_kl > 0, cg_iters >= 1, damping >= 0 and ls_steps >= 1, "
                              f"got {self.max_kl}, {self.cg_iters}, {self.damping}, {self.ls_steps}")
        if not 0 < self.ls_backtrack < 1:
            raise ConfigError(f"TRPO ls_backtrack must be in (0, 1), got {self.ls_backtrack}")


def make_readapt(algo: str, inner: InnerConfig, lam: float | None = None) -> Readapt:
    """The inner loop of ``algo`` on stored data (iMAML: the proximal one)."""

    def readapt(theta: Params, batch: TaskBatch, data: list[Data], create_graph: bool) -> Params:
        theta_T = P.expand(theta, batch.n_tasks)
        prox = (lam, P.expand(P.detach(theta), batch.n_tasks)) if algo == "imaml" and lam else None
        return adapt(theta_T, batch, inner, create_graph=create_graph, data=data, prox=prox).phi

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
                 inner: InnerConfig | None = None) -> None:
        if through_adaptation and inner is None:
            raise ValueError("TRPO through the adaptation needs the inner config (its learning rates)")
        self.cfg, self.readapt, self.through = cfg, readapt, through_adaptation
        self.readapt_steps = inner or InnerConfig()

    def fisher_vector_product(self, theta: Params, batch: RLTaskBatch,
                              mg: MetaGrad) -> Callable[[Tensor], Tensor]:
        """``v -> (F + damping I) v`` with F the Hessian of the mean KL at theta.

        At theta the new adapted policy equals the old one, so the KL's gradient
        vanishes there and its Hessian through the inner steps is exactly
        ``J^T F_phi J`` with ``J = prod_j (I - alpha_j H_j)`` (H_j: Hessian of the
        inner loss at phi_j on step j's trajectories) and F_phi the Hessian of the
        KL at phi_k. Each product is then 2k Hessian-vector products on the inner
        losses and one on the KL, every one a single backward pass over a graph
        built once (``direct_fisher_vector_product`` differentiates the KL through
        the unrolled steps instead: the same numbers, several times the cost).
        First-order algorithms take J = I.
        """
        old, out = mg.phi, mg.outer_data
        assert old is not None
        T = batch.n_tasks
        inner_hvps: list[tuple[float, Callable[[Params], Params]]] = []
        if self.through:
            phi = P.expand(P.detach(theta), T)
            steps = self.readapt_steps
            for j, d in enumerate(mg.inner_data):
                g, H = P.grad_and_hvp(lambda p, d=d: batch.inner_loss(p, d), phi)
                alpha = steps.lr_at(j)
                inner_hvps.append((alpha, H))
                phi = P.add(phi, g, -alpha)  # phi_{j+1}, from the same graph
        phi_k = P.detach(old, requires_grad=True)
        grad_kl = P.grads(batch.kl(old, phi_k, out).mean(), phi_k, create_graph=True)  # [T, ...]
        like = {k: v[0] for k, v in phi_k.items()}

        def J(u: Params, order: list[tuple[float, Callable[[Params], Params]]]) -> Params:
            for alpha, H in order:
                u = P.add(u, H(u), -alpha)  # (I - alpha_j H_j) u
            return u

        def F(v: Tensor) -> Tensor:
            u = J(P.expand(P.unflatten(v, like), T), inner_hvps)  # J v, per task
            w = P.grads(P.task_dot(grad_kl, u).sum(), phi_k, retain_graph=True)  # F_phi J v / T
            w = J(w, inner_hvps[::-1])  # J^T F_phi J v / T (each H_j symmetric)
            return P.flatten({k: x.sum(0) for k, x in w.items()}) + self.cfg.damping * v

        return F

    def direct_fisher_vector_product(self, theta: Params, batch: RLTaskBatch,
                                     mg: MetaGrad) -> Callable[[Tensor], Tensor]:
        """Reference: the Hessian of the mean KL differentiated through the re-adaptation."""
        th = P.detach(theta, requires_grad=True)
        phi = self.readapt(th, batch, mg.inner_data, True)
        grad_kl = P.grads(batch.kl(mg.phi, phi, mg.outer_data).mean(), th, create_graph=True)

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
        F = self.fisher_vector_product(theta, batch, mg)  # flat v -> (F + damping I) v
        like = P.detach(theta)
        s_tree, indefinite = cg(lambda u: P.unflatten(F(P.flatten(u)), like),
                                P.scale(P.detach(mg.grad), -1.0), cfg.cg_iters,
                                per_task=False)  # F s = -g, one system over all of theta
        s = P.flatten(s_tree)
        sFs = float(s @ F(s))
        theta0 = P.flatten(P.detach(theta))
        L0 = float(mg.outer_loss.mean())
        accepted, frac, kl_new, L_new = False, 0.0, 0.0, L0
        if sFs > 0 and math.isfinite(sFs):
            full = s * math.sqrt(2 * cfg.max_kl / sFs)
            for i in range(cfg.ls_steps):
                frac = cfg.ls_backtrack ** i
                cand = P.unflatten(theta0 + frac * full, theta)
                phi = P.detach(self.readapt(cand, batch, mg.inner_data, False))
                with torch.no_grad():
                    L_new = float(batch.outer_loss(phi, mg.outer_data).mean())
                    kl_new = float(batch.kl(mg.phi, phi, mg.outer_data).mean())
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

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
