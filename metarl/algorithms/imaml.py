"""Implicit MAML.

Rajeswaran, Finn, Kakade and Levine 2019, "Meta-Learning with Implicit
Gradients". The inner problem is proximal,
``phi* = argmin_phi L_in(phi) + lam/2 |phi - theta|^2``, solved approximately by
k gradient steps. Its Jacobian is ``d phi*/d theta = (I + H/lam)^{-1}`` with H
the Hessian of L_in at phi*, so the meta-gradient g solves (eq. 7)

    ((1 + damping) I + H / lam) g = grad L_out(phi*)

by conjugate gradient (:func:`metarl.linalg.cg`), one Hessian-vector product per
iteration, batched over tasks (each task runs its own CG on its own block). H is
never formed, and no graph of the inner steps is kept: memory is flat in k.

CG needs ``I + H/lam`` positive definite, i.e. the proximal inner problem must
be strongly convex: ``lam > -lambda_min(H)``. Where it is not, CG stops at the
first direction of negative curvature and the fraction of such tasks is
reported as ``imaml/cg_indefinite``: raise ``lam`` or ``cg_damping``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from metarl import params as P
from metarl.algorithms.base import MetaGrad
from metarl.inner import InnerConfig, adapt
from metarl.linalg import cg
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
    _, H = P.grad_and_hvp(lambda p: batch.inner_loss(p, inner_data), phi)  # u -> H u per task
    g_T, indefinite = cg(lambda u: P.add(P.scale(u, 1.0 + cfg.cg_damping), H(u), 1.0 / cfg.lam),
                         v, cfg.cg_iters, per_task=True)  # ((1+d) I + H/lam) g = v, [T] systems
    frac = int(indefinite.sum()) / T  # the one host read of the indefinite flags
    if frac > 0:
        log.debug("iMAML: (I + H/lam) not positive definite for %d of %d tasks; raise lam or "
                  "cg_damping", round(frac * T), T)
    return MetaGrad(grad=P.task_mean(g_T), task_grads=g_T, inner_losses=ad.losses,
                    outer_loss=L_out.detach(), phi=P.detach(phi), inner_data=ad.data,
                    outer_data=out_data, extra={"imaml/cg_indefinite": frac})
