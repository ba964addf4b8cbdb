"""Exact meta-gradients for small problems: the references every estimator is checked against.

These form per-task Hessians and Jacobians explicitly (cost O(P^2) memory and
P Hessian-vector products per inner step), so they are for tiny models in
float64 only: tests and ``metarl gradcheck``. Sampled data (RL trajectories)
are held fixed: record them with :class:`Recorder` while the estimator runs,
then pass them here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from metarl import params as P
from metarl.inner import InnerConfig, adapt
from metarl.types import Data, Params, TaskBatch


class Recorder:
    """Wraps a task batch; records the data it hands out, then can replay them.

    While recording, ``inner_data``/``outer_data`` ask the wrapped batch and
    keep what it returned. After :meth:`replay`, the same calls return the
    recorded data in the same order, so an objective can be re-evaluated on the
    exact trajectories an estimator saw (common random numbers).
    """

    def __init__(self, batch: TaskBatch) -> None:
        self.batch = batch
        self.n_tasks = batch.n_tasks
        self.inner: list[Data] = []
        self.outer: Data = None
        self._replay = False
        self._i = 0

    def inner_data(self, params: Params) -> Data:
        if not self._replay:
            d = self.batch.inner_data(params)
            self.inner.append(d)
            return d
        d = self.inner[self._i]
        self._i += 1
        return d

    def outer_data(self, params: Params) -> Data:
        if not self._replay:
            self.outer = self.batch.outer_data(params)
            return self.outer
        return self.outer

    def replay(self) -> Recorder:
        """Switch to replay mode and rewind."""
        self._replay, self._i = True, 0
        return self

    def inner_loss(self, params: Params, data: Data) -> Tensor:
        return self.batch.inner_loss(params, data)

    def outer_loss(self, params: Params, data: Data) -> Tensor:
        return self.batch.outer_loss(params, data)

    def metric(self, params: Params, data: Data) -> Tensor:
        return self.batch.metric(params, data)


def _inner_loss(batch: TaskBatch, data: Data, params: Params) -> Tensor:
    return batch.inner_loss(params, data)


def hessians(loss_fn: Callable[[Params], Tensor], phi: Params) -> Tensor:
    """Per-task Hessians ``[T, P, P]`` of ``loss_fn`` (returning ``[T]``) at ``phi`` ``[T, ...]``.

    Tasks are independent, so one Hessian-vector product with the i-th basis
    vector in every task gives column i of every task's Hessian: P products in all.
    """
    flat = P.flatten_tasks(P.detach(phi)).requires_grad_(True)  # [T, P]
    T, n = flat.shape
    g = torch.autograd.grad(loss_fn(P.unflatten_tasks(flat, phi)).sum(), flat,
                            create_graph=True)[0]  # [T, P]
    eye = torch.eye(n, dtype=flat.dtype, device=flat.device)
    basis = eye.unsqueeze(1).expand(n, T, n)  # [P, T, P]: basis vector i in every task
    try:
        cols = torch.autograd.grad(g, flat, grad_outputs=basis, is_grads_batched=True)[0]
    except RuntimeError:  # an op without a batching rule: one product at a time
        cols = torch.stack([torch.autograd.grad(g, flat, grad_outputs=basis[i],
                                                retain_graph=True)[0] for i in range(n)])
    H = cols.permute(1, 2, 0)  # [T, P(row), P(col)]
    return 0.5 * (H + H.transpose(1, 2))


def task_grads(loss_fn: Callable[[Params], Tensor], phi: Params) -> Tensor:
    """Per-task gradients ``[T, P]``."""
    phi = P.detach(phi, requires_grad=True)
    return P.flatten_tasks(P.grads(loss_fn(phi).sum(), phi))


def maml(theta: Params, batch: TaskBatch, inner: InnerConfig, inner_data: list[Data],
         outer_data: Data) -> Params:
    """Exact MAML meta-gradient by the explicit Jacobian ``prod_j (I - alpha_j H_j)``.

    ``grad_t = J_t^T grad L_out,t(phi_k)`` with ``J_t = (I - a_{k-1} H_{k-1}) ... (I - a_0 H_0)``;
    the result is the mean over tasks, in theta's shapes.
    """
    T = batch.n_tasks
    phi = P.expand(P.detach(theta), T)
    n = sum(v.numel() for v in theta.values())
    J = torch.eye(n, dtype=next(iter(theta.values())).dtype).expand(T, n, n)  # [T, P, P]
    for j in range(inner.steps):
        d = inner_data[j]
        H = hessians(functools.partial(_inner_loss, batch, d), phi)  # [T, P, P]
        J = (torch.eye(n, dtype=H.dtype) - inner.lr_at(j) * H) @ J
        phi = adapt(phi, batch, InnerConfig(steps=1, lr=inner.lr_at(j)), create_graph=False,
                    data=[d]).phi
    v = task_grads(lambda p: batch.outer_loss(p, outer_data), phi)  # [T, P]
    g = (J.transpose(1, 2) @ v.unsqueeze(-1)).squeeze(-1)  # [T, P]
    return P.unflatten(g.mean(0), theta)


@dataclass(frozen=True, kw_only=True)
class ImplicitSolve:
    """The dense iMAML solve, with the spectrum that says whether CG can converge on it."""

    grad: Params
    """Implicit meta-gradient, mean over tasks, in phi's per-task shapes (no task dimension)."""
    min_eig_T: Tensor
    """``[T]`` smallest eigenvalue of each task's ``(1 + damping) I + H_t/lam``. Where it is
    <= 0 the system is not positive definite (indefinite or singular) and CG cannot converge."""
    hessian_min_eig_T: Tensor
    """``[T]`` smallest eigenvalue of each task's inner-loss Hessian ``H_t`` at ``phi_star``;
    the system is positive definite iff ``lam (1 + damping) > -hessian_min_eig_T``."""


def _imaml_system(phi_star: Params, batch: TaskBatch, inner_data: Data, outer_data: Data,
                  lam: float, damping: float) -> tuple[Tensor, Tensor]:
    """Per-task ``A_t = (1 + damping) I + H_t/lam`` ``[T, P, P]`` and ``v_t = grad L_out,t``
    ``[T, P]`` at ``phi_star``."""
    H = hessians(lambda p: batch.inner_loss(p, inner_data), phi_star)  # [T, P, P]
    v = task_grads(lambda p: batch.outer_loss(p, outer_data), phi_star)  # [T, P]
    n = H.shape[-1]
    return (1.0 + damping) * torch.eye(n, dtype=H.dtype) + H / lam, v


def imaml(phi_star: Params, batch: TaskBatch, inner_data: Data, outer_data: Data, lam: float,
          damping: float = 0.0) -> Params:
    """Exact implicit meta-gradient at ``phi_star`` by a dense solve of
    ``((1 + damping) I + H/lam) g = grad L_out(phi_star)`` for every task."""
    A, v = _imaml_system(phi_star, batch, inner_data, outer_data, lam, damping)
    g = torch.linalg.solve(A, v.unsqueeze(-1)).squeeze(-1)  # [T, P]
    return P.unflatten(g.mean(0), {k: x[0] for k, x in phi_star.items()})


def imaml_solve(phi_star: Params, batch: TaskBatch, inner_data: Data, outer_data: Data,
                lam: float, damping: float = 0.0) -> ImplicitSolve:
    """:func:`imaml` and the smallest eigenvalue of every task's matrix (one symmetric
    eigendecomposition per task, O(P^3): small models only).

    References: Rajeswaran et al. 2019, lemma 1 and eq. 7; CG needs the matrix positive
    definite (Nocedal and Wright 2006, ch. 5).
    """
    A, v = _imaml_system(phi_star, batch, inner_data, outer_data, lam, damping)  # [T, P, P]
    g = torch.linalg.solve(A, v.unsqueeze(-1)).squeeze(-1)  # [T, P]
    min_eig_T = torch.linalg.eigvalsh(A)[:, 0]  # [T] (eigenvalues come ascending)
    return ImplicitSolve(grad=P.unflatten(g.mean(0), {k: x[0] for k, x in phi_star.items()}),
                         min_eig_T=min_eig_T,
                         hessian_min_eig_T=lam * (min_eig_T - (1.0 + damping)))


def meta_objective(theta: Params, batch: TaskBatch, inner: InnerConfig, inner_data: list[Data],
                   outer_data: Data) -> Tensor:
    """``mean_t L_out,t(phi_k,t(theta))`` on fixed data (a scalar)."""
    ad = adapt(P.expand(theta, batch.n_tasks), batch, inner, create_graph=False, data=inner_data)
    with torch.no_grad():
        return batch.outer_loss(ad.phi, outer_data).mean()


def central_diff(f: Callable[[Params], Tensor], theta: Params, eps: float = 1e-6,
                 directions: Tensor | None = None) -> Tensor:
    """Central differences of the scalar ``f`` at ``theta``.

    Returns the full gradient (flattened, 2P evaluations) when ``directions`` is
    None, else the directional derivatives along each row of ``directions [D, P]``.
    """
    x = P.flatten(P.detach(theta))

    def at(v: Tensor) -> float:
        return float(f(P.unflatten(v, theta)))

    if directions is None:
        out = torch.empty_like(x)
        for i in range(x.numel()):
            e = torch.zeros_like(x)
            e[i] = eps
            out[i] = (at(x + e) - at(x - e)) / (2 * eps)
        return out
    return torch.tensor([(at(x + eps * d) - at(x - eps * d)) / (2 * eps) for d in directions],
                        dtype=x.dtype)


def rel_error(a: Params | Tensor, b: Params | Tensor) -> float:
    """``|a - b| / |b|`` on the flattened trees."""
    va = a if isinstance(a, Tensor) else P.flatten(a)
    vb = b if isinstance(b, Tensor) else P.flatten(b)
    return float((va - vb).norm() / vb.norm().clamp_min(torch.finfo(vb.dtype).tiny))


def cosine(a: Params | Tensor, b: Params | Tensor) -> float:
    va = a if isinstance(a, Tensor) else P.flatten(a)
    vb = b if isinstance(b, Tensor) else P.flatten(b)
    return float(torch.nn.functional.cosine_similarity(va, vb, dim=0))


