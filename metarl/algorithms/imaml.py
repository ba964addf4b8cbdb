"""Implicit MAML.

Rajeswaran, Finn, Kakade and Levine 2019, "Meta-Learning with Implicit
Gradients". The inner problem is proximal,
``phi* = argmin_phi L_in(phi) + lam/2 |phi - theta|^2``, solved approximately by
k gradient steps. Its Jacobian is ``d phi*/d theta = (I + H/lam)^{-1}`` with H
the Hessian of L_in at phi*, so the meta-gradient g solves (eq. 7)

    ((1 + damping) I + H / lam) g = grad L_out(phi*)

by conjugate gradient, one Hessian-vector product per iteration, batched over
tasks (each task runs its own CG on its own block). H is never formed, and no
graph of the inner steps is kept: memory is flat in k.

CG needs ``I + H/lam`` positive definite, i.e. the proximal inner problem must
be strongly convex: ``lam > -lambda_min(H)``. Where it is not, CG stops at the
first direction of negative curvature and the fraction of such tasks is
reported as ``imaml/cg_indefinite``: raise ``lam`` or ``cg_damping``.
"""

from __future__ import annotations

from collections.abc import Callable
import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from metarl import params as P
from metarl.algorithms.base import MetaGrad
from metarl.inner import InnerConfig, adapt
from metarl.types import ConfigError, Params, TaskBatch, check_task_losses

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class IMAMLConfig:
    lam: float = 2.0
    """Proximal regularisation strength lambda."""
    cg_iters: int = 5
    """Conjugate-gradient iterations (Hessian-vector products) per meta-gradient."""
    cg_damping: float = 0.0
    """Added to the identity: solves ((1 + damping) I + H/lam) g = v."""

    def __post_init__(self) -> None:
        if self.lam <= 0:
            raise ConfigError(f"iMAML lambda must be > 0, got {self.lam}")
        if self.cg_iters < 1:
            raise ConfigError(f"CG iterations must be >= 1, got {self.cg_iters}")
        if self.cg_damping < 0:
            raise ConfigError(f"CG damping must be >= 0, got {self.cg_damping}")


def cg(A: Callable[[Params], Params], b: Params, iters: int) -> tuple[Params, Tensor]:
    """Batched conjugate gradient: solve ``A x_t = b_t`` for every task t at once.

    ``A`` maps a per-task stack to a per-task stack and must be symmetric
    positive definite on each task's block. Step sizes alpha, beta are ``[T]``.
    A task whose residual reaches round-off stops; a task that meets a direction
    of non-positive curvature (``p^T A p <= 0``: A is not positive definite)
    stops there too and is flagged.

    Returns:
        The solutions ``x [T, ...]`` and a ``[T]`` bool tensor of flagged tasks.
    """
    x = P.zeros_like(b)
    r = b  # residual b - A x with x = 0
    p = r
    rs = P.task_dot(r, r)  # [T]
    # a task whose residual fell to round-off stops moving (its alpha, beta are 0)
    floor = rs * torch.finfo(rs.dtype).eps ** 2
    indefinite = torch.zeros_like(rs, dtype=torch.bool)
    for _ in range(iters):
        Ap = A(p)
        pAp = P.task_dot(p, Ap)  # [T]
        indefinite |= (rs > floor) & (pAp <= 0)
        active = (rs > floor) & ~indefinite
        alpha = torch.where(active, rs / torch.where(active, pAp, torch.ones_like(pAp)),
                            torch.zeros_like(rs))
        x = P.add(x, p, alpha)
        r = P.add(r, Ap, -alpha)
        rs_new = P.task_dot(r, r)
        beta = torch.where(active, rs_new / torch.where(active, rs, torch.ones_like(rs)),
                           torch.zeros_like(rs))
        p = P.add(r, p, beta)
        rs = torch.where(active, rs_new, rs)
    return x, indefinite


def grad_and_hvp(loss_fn: Callable[[Params], Tensor],
                 phi: Params) -> tuple[Params, Callable[[Params], Params]]:
    """Per-task gradient (detached) and Hessian-vector products of ``loss_fn``
    (returning ``[T]``) at ``phi``, from one graph.

    Tasks are independent, so the Hessian of the summed losses is block
    diagonal and one backward pass gives every task's product.
    """
    phi = P.detach(phi, requires_grad=True)
    g = P.grads(loss_fn(phi).sum(), phi, create_graph=True)  # [T, ...]

    def H(u: Params) -> Params:
        return P.grads(P.task_dot(g, u).sum(), phi, retain_graph=True)

    return P.detach(g), H


def hvp_operator(loss_fn: Callable[[Params], Tensor], phi: Params) -> Callable[[Params], Params]:
    """Per-task Hessian-vector products of ``loss_fn`` at ``phi`` (see :func:`grad_and_hvp`)."""
    return grad_and_hvp(loss_fn, phi)[1]


def meta_grad(theta: Params, batch: TaskBatch, inner: InnerConfig,
              cfg: IMAMLConfig = IMAMLConfig()) -> MetaGrad:
    """iMAML meta-gradient by batched CG on Hessian-vector products.

    References: Rajeswaran et al. 2019, eq. 4 (proximal inner problem),
    lemma 1 and eq. 7 (implicit Jacobian, CG solve), algorithm 2.
    """
    T = batch.n_tasks
    theta_T = P.expand(P.detach(theta), T)
    ad = adapt(theta_T, batch, inner, create_graph=False, prox=(cfg.lam, theta_T))
    phi = P.detach(ad.phi, requires_grad=True)  # phi* ~ argmin L_in + lam/2 |phi - theta|^2
    out_data = batch.outer_data(phi)
    L_out = check_task_losses(batch.outer_loss(phi, out_data), T, "outer_loss")  # [T]
    v = P.grads(L_out.sum(), phi)  # grad L_out(phi*) per task
    inner_data = ad.data[-1] if ad.data else batch.inner_data(phi)
    H = hvp_operator(lambda p: batch.inner_loss(p, inner_data), phi)
    g_T, indefinite = cg(lambda u: P.add(P.scale(u, 1.0 + cfg.cg_damping), H(u), 1.0 / cfg.lam),
                         v, cfg.cg_iters)  # ((1+d) I + H/lam) g = v
    if bool(indefinite.any()):
        log.debug("iMAML: (I + H/lam) not positive definite for %d of %d tasks; raise lam or "
                  "cg_damping", int(indefinite.sum()), T)
    return MetaGrad(grad=P.task_mean(g_T), inner_losses=ad.losses, outer_loss=L_out.detach(),
                    phi=P.detach(phi), inner_data=ad.data, outer_data=out_data,
                    extra={"imaml/cg_indefinite": float(indefinite.float().mean())})
