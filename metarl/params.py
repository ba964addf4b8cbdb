"""Operations on parameter trees (dicts of tensors), batched over tasks."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from metarl.types import Params


def expand(theta: Params, n_tasks: int) -> Params:
    """Stack ``theta`` ``n_tasks`` times without copying: each leaf ``[T, *shape]``.

    The backward of ``expand`` sums over tasks, so a gradient of the summed
    per-task losses w.r.t. ``theta`` flows through it with no extra work.
    """
    return {k: v.unsqueeze(0).expand(n_tasks, *v.shape) for k, v in theta.items()}


def detach(params: Params, requires_grad: bool = False) -> Params:
    return {k: v.detach().requires_grad_(requires_grad) for k, v in params.items()}


def clone_leaf(params: Params) -> Params:
    """Fresh leaf tensors with ``requires_grad=True`` (meta-parameters to optimise)."""
    return {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}


def grads(loss: Tensor, params: Params, *, create_graph: bool = False,
          retain_graph: bool | None = None, allow_unused: bool = False) -> Params:
    """``d loss / d params`` as a tree.

    A parameter the loss does not depend on is an error unless ``allow_unused``
    (then its gradient is zeros): silently zero gradients hide a loss computed
    on other tensors than the ones differentiated.
    """
    keys = list(params)
    gs = torch.autograd.grad(loss, [params[k] for k in keys], create_graph=create_graph,
                             retain_graph=retain_graph, allow_unused=allow_unused)
    return {k: (torch.zeros_like(params[k]) if g is None else g) for k, g in zip(keys, gs)}


def grad_and_hvp(loss_fn: Callable[[Params], Tensor],
                 phi: Params) -> tuple[Params, Callable[[Params], Params]]:
    """Per-task gradient and Hessian-vector products of ``loss_fn`` at ``phi``, from one graph.

    ``loss_fn`` maps a stack ``[T, ...]`` to per-task losses ``[T]``. Tasks are
    independent, so the Hessian of the summed losses is block diagonal: one
    backward pass of ``g . u`` gives every task's ``H_t u_t``.

    Returns:
        ``(g, H)``: the detached gradients ``g [T, ...]`` and ``H: u -> [H_t u_t]_t``
        (``u`` and the result ``[T, ...]``), callable any number of times.
    """
    phi = detach(phi, requires_grad=True)
    g = grads(loss_fn(phi).sum(), phi, create_graph=True)  # [T, ...]

    def H(u: Params) -> Params:
        return grads(task_dot(g, u).sum(), phi, retain_graph=True)

    return detach(g), H


def add(a: Params, b: Params, alpha: float | Tensor = 1.0) -> Params:
    """``a + alpha * b``; a tensor ``alpha`` of shape ``[T]`` scales each task."""
    if isinstance(alpha, Tensor) and alpha.dim() == 1:
        return {k: a[k] + per_task(alpha, b[k]) * b[k] for k in a}
    return {k: a[k] + alpha * b[k] for k in a}


def sub(a: Params, b: Params) -> Params:
    return {k: a[k] - b[k] for k in a}


def scale(a: Params, s: float | Tensor) -> Params:
    if isinstance(s, Tensor) and s.dim() == 1:
        return {k: per_task(s, v) * v for k, v in a.items()}
    return {k: s * v for k, v in a.items()}


def per_task(s: Tensor, like: Tensor) -> Tensor:
    """Reshape a ``[T]`` vector to broadcast against a ``[T, *shape]`` leaf."""
    return s.reshape(s.shape[0], *([1] * (like.dim() - 1)))


def task_dot(a: Params, b: Params) -> Tensor:
    """Per-task inner product of two stacks: ``[T]``."""
    return sum((a[k] * b[k]).flatten(1).sum(1) for k in a)  # type: ignore[return-value]


def dot(a: Params, b: Params) -> Tensor:
    """Inner product over every element of every leaf (no task dimension): a 0-dim tensor."""
    return sum((a[k] * b[k]).sum() for k in a)  # type: ignore[return-value]


def task_mean(a: Params) -> Params:
    """Average a per-task stack over tasks: leaves ``[*shape]``."""
    return {k: v.mean(0) for k, v in a.items()}


def zeros_like(a: Params) -> Params:
    return {k: torch.zeros_like(v) for k, v in a.items()}


def flatten(params: Params) -> Tensor:
    """Concatenate the leaves (no task dimension) into one vector."""
    return torch.cat([v.reshape(-1) for v in params.values()])


def flatten_tasks(params: Params) -> Tensor:
    """Concatenate per-task leaves into ``[T, n_params]``."""
    return torch.cat([v.flatten(1) for v in params.values()], dim=1)


def unflatten(vec: Tensor, like: Params) -> Params:
    """Inverse of :func:`flatten` (shapes taken from ``like``)."""
    out, i = {}, 0
    for k, v in like.items():
        n = v.numel()
        out[k] = vec[i:i + n].view_as(v)
        i += n
    return out


def to(params: Params, device: torch.device | str | None = None,
       dtype: torch.dtype | None = None) -> Params:
    return {k: v.to(device=device, dtype=dtype) for k, v in params.items()}


def shapes(params: Params) -> dict[str, tuple[int, ...]]:
    """Name -> shape: two parameter sets fit the same model when these are equal."""
    return {k: tuple(v.shape) for k, v in params.items()}


def n_params(params: Params) -> int:
    return sum(v.numel() for v in params.values())


def unflatten_tasks(mat: Tensor, like: Params) -> Params:
    """Inverse of :func:`flatten_tasks`: ``[T, n_params]`` -> per-task leaves ``[T, *shape]``."""
    out, i = {}, 0
    T = mat.shape[0]
    for k, v in like.items():
        n = v[0].numel()
        out[k] = mat[:, i:i + n].reshape(T, *v.shape[1:])
        i += n
    return out
