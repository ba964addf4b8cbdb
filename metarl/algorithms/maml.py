"""MAML and first-order MAML.

Finn, Abbeel and Levine 2017, "Model-Agnostic Meta-Learning for Fast
Adaptation of Deep Networks", eq. 1: the meta-objective is
``mean_t L_out,t(phi_k,t(theta))`` with ``phi_{j+1} = phi_j - alpha grad L_in(phi_j)``
(plus ``eta sum_j KL(pi_phi_j || pi_phi_{j+1})`` with an inner KL penalty eta).
Its gradient is ``prod_j (I - alpha H_j)^T grad L_out(phi_k)``, computed here by
backpropagating through the unrolled inner steps (a chain of Hessian-vector
products; no Hessian is formed). First-order MAML takes
``d phi_k / d theta = I``: the meta-gradient is ``grad L_out(phi_k)``.
"""

from __future__ import annotations

from metarl import params as P
from metarl.algorithms.base import MetaGrad
from metarl.inner import InnerConfig, adapt
from metarl.types import ConfigError, Params, SupportsAdaptationKL, TaskBatch, check_task_losses


def meta_grad(theta: Params, batch: TaskBatch, inner: InnerConfig, *,
              first_order: bool = False) -> MetaGrad:
    """MAML (or, with ``first_order=True``, FOMAML) meta-gradient for one meta-batch.

    Args:
        theta: meta-parameters, leaves without a task dimension.
        batch: T tasks.
        inner: inner steps k and learning rate alpha.
        first_order: drop the second-order terms (FOMAML); memory is then flat in k.

    Returns:
        ``MetaGrad`` whose ``grad`` is ``d/dtheta mean_t L_out,t(phi_k,t)``. With
        ``inner.kl_penalty`` eta (RL batches, second order), the objective is
        ``mean_t [L_out,t(phi_k,t) + eta adaptation_kl_t]`` and ``outer_loss`` its per-task
        values; ``extra["inner/kl"]`` is the mean adaptation KL, and the coefficient is
        returned as ``MetaGrad.kl_penalty`` (and ``extra["inner/kl_penalty"]``) so that
        TRPO's line search scores its candidates with the coefficient this gradient used,
        also when an adaptive schedule has moved it since.

    References: Finn et al. 2017, eq. 1 and section 5.2 (first-order approximation).
    """
    T = batch.n_tasks
    eta = inner.kl_penalty
    moved = batch if isinstance(batch, SupportsAdaptationKL) else None
    if eta and (first_order or moved is None):
        raise ConfigError("the inner KL penalty differentiates the adaptation's KL through its "
                          "steps: it needs --algo maml on an RL family (a batch with "
                          "adaptation_kl); set --inner-kl-penalty 0")
    theta = P.detach(theta, requires_grad=True)
    theta_T = P.expand(theta, T)  # [T, ...], backward sums over tasks
    ad = adapt(theta_T, batch, inner, create_graph=not first_order)
    phi = P.detach(ad.phi, requires_grad=True) if first_order else ad.phi
    out_data = batch.outer_data(phi)
    L_out = check_task_losses(batch.outer_loss(phi, out_data), T, "outer_loss")  # [T]
    extra: dict[str, float] = {}
    if eta and moved is not None:  # the meta-objective penalised by how far adaptation moves
        kl = moved.adaptation_kl(ad.path, phi, ad.data)  # [T]
        L_out = L_out + eta * kl
        extra["inner/kl"] = float(kl.detach().mean())
        extra["inner/kl_penalty"] = eta
    if first_order:
        task_grads = P.grads(L_out.sum(), phi)  # d phi_k / d theta := I
    else:  # through every inner step, one row per task (the rows of theta_T)
        task_grads = P.grads(L_out.sum(), theta_T)
    return MetaGrad(grad=P.task_mean(task_grads), task_grads=task_grads, inner_losses=ad.losses,
                    outer_loss=L_out.detach(), phi=P.detach(phi), inner_data=ad.data,
                    outer_data=out_data, kl_penalty=eta, extra=extra)
