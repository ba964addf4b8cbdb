"""Linear solves on parameter trees: conjugate gradient for iMAML and TRPO.

Both solve ``A x = b`` with ``A`` known only through products ``u -> A u``
(Hessian- or Fisher-vector products), never formed. iMAML solves one system
per task, ``((1 + damping) I + H_t / lam) g_t = v_t``, on stacks ``[T, ...]``;
TRPO solves one system on the whole parameter vector, ``(F + damping I) s = -g``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from metarl import params as P
from metarl.types import Params


def cg(A: Callable[[Params], Params], b: Params, iters: int, *, per_task: bool,
       rtol: float | None = None) -> tuple[Params, Tensor]:
    """Conjugate gradient for ``A x = b``, ``A`` symmetric positive definite.

    From ``x_0 = 0``, ``r_0 = p_0 = b``, each iteration takes one product ``A p_i``:

        alpha_i = r_i.r_i / p_i.A p_i
        x_{i+1} = x_i + alpha_i p_i
        r_{i+1} = r_i - alpha_i A p_i          (the residual b - A x_{i+1})
        beta_i  = r_{i+1}.r_{i+1} / r_i.r_i
        p_{i+1} = r_{i+1} + beta_i p_i

    A system stops (its alpha and beta become 0, so x stays) once
    ``|r_i| <= rtol |b|``: with the default ``rtol`` that is round-off, and
    ``b = 0`` returns ``x = 0``. A system that meets a direction of non-positive
    curvature, ``p_i.A p_i <= 0`` (``A`` is not positive definite), stops
    before that direction, keeping ``x_i``, and is flagged (the truncated CG of
    Steihaug). No step ever divides by zero. A stopped system is carried along
    unchanged (masked updates), so whether the loop goes on changes nothing.

    The loop ends early once every system has stopped, which is read on the host
    (a device synchronisation on CUDA). With an explicit ``rtol`` it is read
    before every product: stopping early is what ``rtol`` asks for. With the
    default round-off stop, which a truncated solve rarely reaches, it is read
    only before products 0, 1, 2, 4, 8, ... (:func:`stop_checks`):
    ``log2(iters) + 2`` reads per solve instead of one per iteration, and a solve
    that stops early takes at most twice the products it needed (none for
    ``b = 0``). ``A`` is called at most ``iters`` times.

    Args:
        A: the operator ``u -> A u`` on trees shaped like ``b``. With
            ``per_task`` it must be block diagonal over tasks (task t's output
            depends only on task t's input), as per-task Hessians are.
        b: the right-hand side. With ``per_task`` every leaf is ``[T, *shape]``.
        iters: the most iterations (products with ``A``); 0 returns ``x = 0``.
        per_task: ``True``: T independent systems, one per task (inner products
            ``.`` over each task's slice, alpha and beta ``[T]``: iMAML).
            ``False``: one system over all leaves together, no task dimension
            (inner products over the whole tree, alpha and beta scalars: TRPO).
        rtol: stop a system once its residual norm is at most ``rtol`` times
            ``|b|``; ``None`` is the machine epsilon of ``b``'s dtype.

    Returns:
        ``(x, indefinite)``: the solution, shaped like ``b``, and a bool tensor,
        ``[T]`` with ``per_task`` and 0-dim otherwise, true for the systems that
        met non-positive curvature (their ``x`` is the last iterate before it).

    Raises:
        ValueError: ``iters`` or ``rtol`` negative.

    References: Hestenes and Stiefel 1952; Nocedal and Wright 2006, algorithms
    5.2 (CG) and 7.2 (CG stopped at negative curvature, Steihaug 1983).
    """
    if iters < 0:
        raise ValueError(f"CG iterations must be >= 0, got {iters}")
    if rtol is not None and rtol < 0:
        raise ValueError(f"CG rtol must be >= 0 (or None for round-off), got {rtol}")
    dot = P.task_dot if per_task else P.dot  # [T] or []
    x = P.zeros_like(b)
    r = b  # residual b - A x with x = 0
    p = r
    rs = dot(r, r)  # [T] or []
    tol = torch.finfo(rs.dtype).eps if rtol is None else rtol
    floor = rs * tol**2  # |r|^2 <= floor: the system has converged
    indefinite = torch.zeros_like(rs, dtype=torch.bool)
    checks = range(iters) if rtol is not None else stop_checks(iters)
    for i in range(iters):
        if i in checks and not bool(((rs > floor) & ~indefinite).any()):
            break  # every system stopped: no further product can change x
        Ap = A(p)
        pAp = dot(p, Ap)
        indefinite |= (rs > floor) & (pAp <= 0)
        active = (rs > floor) & ~indefinite
        alpha = torch.where(active, rs / torch.where(active, pAp, torch.ones_like(pAp)),
                            torch.zeros_like(rs))
        x = P.add(x, p, alpha)
        r = P.add(r, Ap, -alpha)
        rs_new = dot(r, r)
        beta = torch.where(active, rs_new / torch.where(active, rs, torch.ones_like(rs)),
                           torch.zeros_like(rs))
        p = P.add(r, p, beta)
        rs = torch.where(active, rs_new, rs)
    return x, indefinite


def stop_checks(iters: int) -> frozenset[int]:
    """The iterations before whose product :func:`cg` with the default ``rtol`` reads (on
    the host) whether every system has stopped: 0 (``b = 0``), then 1, 2, 4, 8, ...
    below ``iters``."""
    return frozenset(i for i in range(iters) if i & (i - 1) == 0)  # 0 and the powers of 2


def lanczos_extremes(A: Callable[[Params], Params], start: Params,
                     iters: int) -> tuple[Tensor, Tensor]:
    """Estimates of the smallest and largest eigenvalue of each task's block of a symmetric,
    block-diagonal ``A`` (per-task Hessians), from ``iters`` products, batched over tasks.

    Lanczos from ``q_1 = start / |start|`` (per task), with full reorthogonalisation:

        w = A q_j - beta_{j-1} q_{j-1},  alpha_j = q_j.w,
        w <- w - sum_i (q_i.w) q_i,      beta_j = |w|,  q_{j+1} = w / beta_j

    and the extreme eigenvalues of the tridiagonal ``T_m`` (alphas on the diagonal, betas
    beside it): Ritz values, which lie inside ``[lambda_min, lambda_max]`` and approach
    both ends first (Golub and Van Loan 2013, section 10.1). An indefinite ``A`` shows as
    a negative smallest estimate; since it is an upper bound of lambda_min, a negative
    estimate proves the block indefinite.

    Args:
        A: ``u -> A u`` on trees ``[T, *shape]``, task t's output depending only on task
            t's input.
        start: a start vector per task (e.g. random), leaves ``[T, *shape]``, none zero.
        iters: Lanczos steps m >= 1 (products with ``A``), at most the block size.

    Returns:
        ``(lo, hi)``: ``[T]`` each, the smallest and largest Ritz values.

    Raises:
        ValueError: ``iters`` out of range, a zero start vector, or a Krylov space that
            closes before ``iters`` steps (use fewer: the estimates are then exact).
    """
    n = sum(v[0].numel() for v in start.values())
    if not 1 <= iters <= n:
        raise ValueError(f"Lanczos iterations must be in [1, {n}] (the block size), got {iters}")
    norm = P.task_dot(start, start).sqrt()  # [T]
    if not bool((norm > 0).all()):
        raise ValueError("Lanczos start vector is zero for some task: start from a random one")
    q = P.scale(start, 1.0 / norm)
    basis: list[Params] = []
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    beta = torch.zeros_like(norm)
    for j in range(iters):
        w = A(q)
        if basis:
            w = P.add(w, basis[-1], -beta)
        alpha = P.task_dot(q, w)  # [T]
        w = P.add(w, q, -alpha)
        basis.append(q)
        for qi in basis:  # full reorthogonalisation against round-off
            w = P.add(w, qi, -P.task_dot(qi, w))
        alphas.append(alpha)
        if j == iters - 1:
            break
        beta = P.task_dot(w, w).sqrt()  # [T]
        scale = alpha.abs().max().clamp_min(1.0)
        if not bool((beta > 1e3 * torch.finfo(beta.dtype).eps * scale).all()):
            raise ValueError(f"the Krylov space closed after {j + 1} Lanczos steps: ask for "
                             f"at most {j + 1} (the estimates are then exact)")
        betas.append(beta)
        q = P.scale(w, 1.0 / beta)
    Tm = torch.diag_embed(torch.stack(alphas, -1))  # [T, m, m]
    if betas:
        off = torch.diag_embed(torch.stack(betas, -1), offset=1)
        Tm = Tm + off + off.transpose(1, 2)
    ritz = torch.linalg.eigvalsh(Tm)  # [T, m] ascending
    return ritz[:, 0], ritz[:, -1]
