"""Reptile.

Nichol, Achiam and Schulman 2018, "On First-Order Meta-Learning Algorithms",
algorithm 2 (batched): the update direction is ``theta - phi_k`` averaged over
tasks. Scaled by ``1 / sum_j alpha_j`` it is in gradient units (for k = 1 it is
the mean inner gradient at theta), so any outer optimizer can take it.
"""

from __future__ import annotations

import torch

from metarl import params as P
from metarl.algorithms.base import MetaGrad
from metarl.inner import InnerConfig, adapt
from metarl.types import Params, TaskBatch, check_task_losses


def meta_grad(theta: Params, batch: TaskBatch, inner: InnerConfig, *,
              scale: bool = True, score: bool = True) -> MetaGrad:
    """Reptile direction ``mean_t (theta - phi_k,t)`` (divided by ``sum_j alpha_j`` if ``scale``).

    Args:
        score: also evaluate the outer loss of phi_k (for logging only; no graph kept).

    References: Nichol et al. 2018, algorithm 2.
    """
    T = batch.n_tasks
    theta = P.detach(theta)
    theta_T = P.expand(theta, T)
    ad = adapt(theta_T, batch, inner, create_graph=False)
    phi = ad.phi
    rows = P.sub(theta_T, phi)  # theta - phi_k,t per task
    if scale and inner.steps > 0:
        rows = P.scale(rows, 1.0 / inner.lr_sum())
    L_out, out_data = None, None
    if score:
        with torch.no_grad():
            out_data = batch.outer_data(phi)
            L_out = check_task_losses(batch.outer_loss(phi, out_data), T, "outer_loss")
    return MetaGrad(grad=P.task_mean(rows), task_grads=rows, inner_losses=ad.losses,
                    outer_loss=L_out, phi=phi, inner_data=ad.data, outer_data=out_data)
