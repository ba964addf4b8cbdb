"""Conjugate gradient and Lanczos (metarl/linalg.py) against dense solves and
eigendecompositions, float64."""

import pytest
import torch

from metarl import params as P
from metarl.linalg import cg, lanczos_extremes

F64 = torch.float64
SHAPES = {"w": (3, 2), "b": (2,)}  # 8 unknowns per system
N = 8


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def spd(*batch, n=N, seed=0):
    """Random symmetric positive definite matrices ``[*batch, n, n]``, condition ~10."""
    q = torch.randn(*batch, n, n, dtype=F64, generator=gen(seed))
    return q @ q.transpose(-1, -2) / n + 0.5 * torch.eye(n, dtype=F64)


def tree(*batch, seed=1):
    g = gen(seed)
    return {k: torch.randn(*batch, *s, dtype=F64, generator=g) for k, s in SHAPES.items()}


def like(*batch):
    return {k: torch.zeros(*batch, *s, dtype=F64) for k, s in SHAPES.items()}


def task_operator(M, calls=None):
    """``u [T, ...] -> M_t u_t`` for matrices ``M [T, n, n]`` (block diagonal over tasks)."""
    lk = like(M.shape[0])

    def A(u):
        if calls is not None:
            calls.append(1)
        return P.unflatten_tasks((M @ P.flatten_tasks(u).unsqueeze(-1)).squeeze(-1), lk)

    return A


def flat_operator(M, calls=None):
    """``u -> M u`` over all leaves together, ``M [n, n]``."""
    lk = like()

    def A(u):
        if calls is not None:
            calls.append(1)
        return P.unflatten(M @ P.flatten(u), lk)

    return A


def textbook_cg(A, b, iters):
    """Plain CG on flat vectors (no guards), as TRPO used to run it."""
    x, r, p = torch.zeros_like(b), b.clone(), b.clone()
    rs = r @ r
    for _ in range(iters):
        Ap = A(p)
        alpha = rs / (p @ Ap)
        x, r = x + alpha * p, r - alpha * Ap
        rs_new = r @ r
        p, rs = r + (rs_new / rs) * p, rs_new
    return x


def test_per_task_equals_dense_solve():
    T = 5
    M = spd(T)  # [T, n, n]
    b = tree(T)
    x, indefinite = cg(task_operator(M), b, 3 * N, per_task=True)
    ref = torch.linalg.solve(M, P.flatten_tasks(b))  # [T, n]
    assert torch.allclose(P.flatten_tasks(x), ref, rtol=1e-10, atol=1e-12)
    assert indefinite.shape == (T,) and not indefinite.any()
    assert {k: v.shape for k, v in x.items()} == {k: v.shape for k, v in b.items()}


def test_flat_equals_dense_solve():
    M = spd()
    b = tree()
    x, indefinite = cg(flat_operator(M), b, 3 * N, per_task=False)
    ref = torch.linalg.solve(M, P.flatten(b))
    assert torch.allclose(P.flatten(x), ref, rtol=1e-10, atol=1e-12)
    assert indefinite.dim() == 0 and not bool(indefinite)


@pytest.mark.parametrize("iters", [1, 3, 6])
def test_truncated_iterations_match_textbook_cg(iters):
    M = spd(seed=3)
    b = tree(seed=4)
    x, _ = cg(flat_operator(M), b, iters, per_task=False)
    ref = textbook_cg(lambda v: M @ v, P.flatten(b), iters)
    assert torch.allclose(P.flatten(x), ref, rtol=1e-12, atol=1e-14)


def test_batched_tasks_equal_one_system_per_task():
    T = 4
    M = spd(T, seed=5)
    b = tree(T, seed=6)
    x, _ = cg(task_operator(M), b, 4, per_task=True)  # truncated: every task its own alpha, beta
    for t in range(T):
        xt, _ = cg(flat_operator(M[t]), {k: v[t] for k, v in b.items()}, 4, per_task=False)
        assert torch.allclose(P.flatten_tasks(x)[t], P.flatten(xt), rtol=1e-12, atol=1e-14)


def test_hessian_vector_products_of_per_task_quadratics():
    # L_t(phi) = 1/2 phi_t^T M_t phi_t - c_t^T phi_t: the Hessian is M_t, the minimiser M_t^{-1} c_t
    T = 3
    M = spd(T, seed=7)
    c = P.flatten_tasks(tree(T, seed=8))  # [T, n]
    lk = like(T)

    def loss(phi):
        z = P.flatten_tasks(phi)  # [T, n]
        return 0.5 * (z.unsqueeze(1) @ M @ z.unsqueeze(-1)).reshape(T) - (c * z).sum(1)  # [T]

    g, H = P.grad_and_hvp(loss, lk)  # at phi = 0: g = -c
    assert torch.allclose(P.flatten_tasks(g), -c)
    x, indefinite = cg(H, P.scale(g, -1.0), 3 * N, per_task=True)
    assert torch.allclose(P.flatten_tasks(x), torch.linalg.solve(M, c), rtol=1e-10, atol=1e-12)
    assert not indefinite.any()


def test_per_task_flags_only_the_indefinite_tasks():
    T = 4
    M = spd(T, seed=9)
    M[1] = -M[1]  # negative definite: curvature < 0 on the first direction
    evals, evecs = torch.linalg.eigh(M[3])
    M[3] = evecs @ torch.diag(torch.cat([-evals[:1], evals[1:]])) @ evecs.T  # one eigenvalue < 0
    b = tree(T, seed=10)
    bf = P.flatten_tasks(b)
    bf[3] = evecs[:, 0]  # along the negative direction: p^T A p < 0 at once
    b = P.unflatten_tasks(bf, b)
    x, indefinite = cg(task_operator(M), b, 3 * N, per_task=True)
    assert indefinite.tolist() == [False, True, False, True]
    xf = P.flatten_tasks(x)
    assert torch.isfinite(xf).all()
    assert torch.equal(xf[1], torch.zeros(N, dtype=F64))  # stopped before the first direction
    assert torch.equal(xf[3], torch.zeros(N, dtype=F64))
    ok = [0, 2]  # the other tasks are solved as if alone
    assert torch.allclose(xf[ok], torch.linalg.solve(M[ok], bf[ok]), rtol=1e-10, atol=1e-12)


def test_flat_flags_zero_curvature_without_dividing_by_it():
    # p_0 = b = 1 and A = diag(1, ..., 1, -(n - 1)): p^T A p = 0 exactly on the first step
    d = torch.ones(N, dtype=F64)
    d[-1] = -(N - 1)
    b = P.unflatten(torch.ones(N, dtype=F64), like())
    x, indefinite = cg(flat_operator(torch.diag(d)), b, 10, per_task=False)
    assert bool(indefinite)
    assert torch.equal(P.flatten(x), torch.zeros(N, dtype=F64))


def test_flat_flags_negative_curvature_met_after_progress():
    # positive on b's first directions, negative further on: x keeps the progress made
    d = torch.tensor([4.0, 3.0, 2.0, 1.0, -1.0, -2.0, -3.0, -4.0], dtype=F64)
    bf = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.1], dtype=F64)
    calls = []
    x, indefinite = cg(flat_operator(torch.diag(d), calls), P.unflatten(bf, like()), 20,
                       per_task=False)
    assert bool(indefinite)
    xf = P.flatten(x)
    assert torch.isfinite(xf).all() and xf.norm() > 0
    assert len(calls) < 20  # stopped where the curvature turned


def test_zero_right_hand_side_returns_zero():
    T = 3
    M = spd(T)
    b = tree(T)
    b = {k: torch.cat([v[:1], torch.zeros_like(v[1:2]), v[2:]]) for k, v in b.items()}  # task 1: 0
    x, indefinite = cg(task_operator(M), b, 3 * N, per_task=True)
    xf = P.flatten_tasks(x)
    assert torch.isfinite(xf).all() and not indefinite.any()
    assert torch.equal(xf[1], torch.zeros(N, dtype=F64))
    # every system zero: no product is taken at all
    for per_task, A, z in ((True, task_operator, like(T)), (False, flat_operator, like())):
        calls = []
        x, indefinite = cg(A(M if per_task else M[0], calls), z, 5, per_task=per_task)
        assert calls == [] and not bool(indefinite.any())
        assert all(torch.equal(v, torch.zeros_like(v)) for v in x.values())


def test_iteration_bound_and_early_stop():
    T = 2
    M = spd(T)
    b = tree(T)
    for iters in (0, 1, 3):
        calls = []
        x, _ = cg(task_operator(M, calls), b, iters, per_task=True)
        assert len(calls) == iters
    assert all(torch.equal(v, torch.zeros_like(v)) for v in cg(task_operator(M), b, 0,
                                                               per_task=True)[0].values())
    # the identity is solved in one step (the residual is then exactly 0): no more products
    calls = []
    x, _ = cg(lambda u: (calls.append(1), u)[1], b, 10, per_task=True)
    assert len(calls) == 1 and all(torch.equal(x[k], b[k]) for k in b)


def test_rtol_stops_at_the_requested_residual():
    M = spd(seed=11) + 20 * torch.diag(torch.linspace(0, 1, N, dtype=F64))  # slower to converge
    b = tree(seed=12)
    A = flat_operator(M)
    full, loose = [], []
    cg(flat_operator(M, full), b, 50, per_task=False)
    x, _ = cg(flat_operator(M, loose), b, 50, per_task=False, rtol=1e-3)
    resid = P.flatten(b) - P.flatten(A(x))
    assert float(resid.norm()) <= 1e-3 * float(P.flatten(b).norm()) * (1 + 1e-6)
    assert len(loose) < len(full)


def test_bad_arguments_raise():
    b = tree()
    with pytest.raises(ValueError, match="CG iterations must be >= 0, got -1"):
        cg(lambda u: u, b, -1, per_task=False)
    with pytest.raises(ValueError, match="CG rtol must be >= 0"):
        cg(lambda u: u, b, 3, per_task=False, rtol=-1e-3)


def symmetric(T, n=N, seed=0, shift=0.0):
    q = torch.randn(T, n, n, dtype=F64, generator=gen(seed))
    return 0.5 * (q + q.transpose(-1, -2)) + shift * torch.eye(n, dtype=F64)


def test_lanczos_full_space_gives_the_exact_extreme_eigenvalues():
    """m = n steps span the whole space: the Ritz values are the eigenvalues, per task,
    for indefinite and for positive definite blocks alike."""
    M = torch.cat([symmetric(2), spd(1, seed=3)])  # two indefinite tasks, one SPD
    eig = torch.linalg.eigvalsh(M)  # [T, n]
    lo, hi = lanczos_extremes(task_operator(M), tree(3, seed=4), N)
    torch.testing.assert_close(lo, eig[:, 0])
    torch.testing.assert_close(hi, eig[:, -1])
    assert bool(lo[:2].lt(0).all()) and float(lo[2]) > 0


def test_lanczos_few_steps_bound_the_spectrum_from_inside():
    """Fewer steps than unknowns: Ritz values lie inside [lambda_min, lambda_max] and the
    extremes converge first (on a 60-unknown block, 25 steps come within 5%)."""
    n = 60
    M = symmetric(3, n=n, seed=5)
    A = lambda u: {"x": (M @ u["x"].unsqueeze(-1)).squeeze(-1)}  # noqa: E731
    start = {"x": torch.randn(3, n, dtype=F64, generator=gen(6))}
    eig = torch.linalg.eigvalsh(M)
    lo, hi = lanczos_extremes(A, start, 25)
    assert bool((lo >= eig[:, 0] - 1e-10).all() and (hi <= eig[:, -1] + 1e-10).all())
    span = eig[:, -1] - eig[:, 0]
    assert bool(((lo - eig[:, 0]) < 0.05 * span).all() and ((eig[:, -1] - hi) < 0.05 * span).all())


def test_lanczos_bad_input():
    A = task_operator(spd(2))
    with pytest.raises(ValueError, match=r"Lanczos iterations must be in \[1, 8\]"):
        lanczos_extremes(A, tree(2), 9)
    zero = like(2)
    with pytest.raises(ValueError, match="start vector is zero"):
        lanczos_extremes(A, zero, 3)
    eye = torch.eye(N, dtype=F64).expand(2, N, N).clone()  # Krylov space of dimension 1
    with pytest.raises(ValueError, match="closed after 1 Lanczos steps"):
        lanczos_extremes(task_operator(eye), tree(2), 3)
