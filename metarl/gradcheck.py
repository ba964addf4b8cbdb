"""What each meta-gradient estimator gets right: compare with exact references in float64.

On a small problem, the exact MAML meta-gradient comes from the explicit
Jacobian of the inner loop and is cross-checked by central finite differences;
the exact iMAML gradient from a dense solve. Sampled data are held fixed
(recorded from the estimator's own run and replayed).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from metarl import families
from metarl import params as P
from metarl.algorithms import exact, imaml, maml, reptile
from metarl.algorithms.base import MetaGrad
from metarl.inner import InnerConfig
from metarl.memory import peak_memory
from metarl.types import Params


def _timed(fn: Callable[[], Any], memory: bool = True) -> tuple[Any, float, float]:
    """Run ``fn`` once timed, then (if ``memory``) once more under the memory meter,
    which slows what it measures."""
    t0 = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - t0
    mb = float("nan")
    if memory:
        with peak_memory() as peak:
            fn()
        mb = peak.mb
    return value, seconds, mb


def gradcheck(family_name: str = "sinusoid", *, steps: int = 2, n_tasks: int = 4,
              inner_lr: float | None = None, lam: float = 10.0,
              cg_iters: Sequence[int] = (1, 2, 5, 10, 50), seed: int = 0, fd: bool = True,
              family_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Relative error and cosine of every estimator against the exact references.

    Args:
        steps: inner steps k.
        n_tasks: tasks in the meta-batch.
        inner_lr: alpha (None: the family's training inner lr).
        lam: iMAML's lambda. CG converges only where I + H/lam is positive definite
            (lam > -lambda_min(H)); the dense solve reports its smallest eigenvalue.
        cg_iters: CG iteration counts to report for iMAML.
        fd: also compute the full central-difference gradient (2P objective evaluations).

    Returns:
        ``{"dtype", "steps", "n_tasks", "n_params", "inner_lr", "lam", "methods", "imaml"}``.
        ``methods`` maps each name to ``{"rel_error", "cosine", "seconds", "peak_mb"}``:
        ``rel_error`` against the exact gradient of the method's own objective
        (MAML, iMAML) or against exact MAML (FOMAML, Reptile); ``cosine`` always to exact MAML;
        ``peak_mb`` None where not measured. The ``imaml_cg{n}`` rows add ``min_eig`` (the
        smallest eigenvalue of I + H/lam, min over tasks) and ``indefinite`` (``min_eig <= 0``:
        CG cannot converge to the dense solve). ``imaml`` (None without ``cg_iters``) holds
        ``min_eig_T`` (per task), ``min_eig``, ``indefinite_tasks``, ``hessian_min_eig``
        (lambda_min(H), min over tasks) and ``lam_pd``: the system is positive definite at
        this phi* for every task iff ``lam > lam_pd`` (0 where H is positive semidefinite).
        phi* itself moves with lam, so a new lam is a guide to rerun with, not a guarantee.
    """
    dtype = torch.float64
    family = families.make(family_name, **(family_options or {}))
    g = torch.Generator().manual_seed(seed)
    theta = family.init_params(g, torch.device("cpu"), dtype)
    batch = exact.Recorder(family.sample_batch(n_tasks, g, split="train",
                                               device=torch.device("cpu"), dtype=dtype))
    alpha = inner_lr if inner_lr is not None else family.defaults.train.inner.lr
    inner = InnerConfig(steps=steps, lr=alpha)
    methods: dict[str, dict[str, float]] = {}

    mg = maml.meta_grad(theta, batch, inner)  # records the data
    batch.replay()
    _, sec, mb = _timed(lambda: maml.meta_grad(theta, batch.replay(), inner))
    ref, ref_sec, ref_mb = _timed(lambda: exact.maml(theta, batch, inner, batch.inner, batch.outer))

    def row(grad: Params | torch.Tensor, target: Params | torch.Tensor, s: float,
            m: float) -> dict[str, Any]:
        return {"rel_error": exact.rel_error(grad, target), "cosine": exact.cosine(grad, ref),
                "seconds": s, "peak_mb": None if math.isnan(m) else m}

    methods["exact_jacobian"] = row(ref, ref, ref_sec, ref_mb)
    if fd:
        def objective(th: Params) -> torch.Tensor:
            return exact.meta_objective(th, batch.replay(), inner, batch.inner, batch.outer)

        g_fd, s, m = _timed(lambda: exact.central_diff(objective, theta, eps=1e-6), memory=False)
        methods["finite_diff"] = row(g_fd, P.flatten(ref), s, m)
    methods["maml"] = row(mg.grad, ref, sec, mb)
    fo, s, m = _timed(lambda: maml.meta_grad(theta, batch.replay(), inner, first_order=True))
    methods["fomaml"] = row(fo.grad, ref, s, m)
    rep, s, m = _timed(lambda: reptile.meta_grad(theta, batch.replay(), inner))
    methods["reptile"] = row(rep.grad, ref, s, m)
    dense: exact.ImplicitSolve | None = None
    for n in cg_iters:
        cfg = imaml.IMAMLConfig(lam=lam, cg_iters=n)

        def run_imaml(cfg: imaml.IMAMLConfig = cfg) -> MetaGrad:  # replays the data each run
            return imaml.meta_grad(theta, batch.replay(), inner, cfg)

        im, s, m = _timed(run_imaml)
        if dense is None:  # phi* does not depend on the CG iterations: one dense solve serves
            dense = _imaml_dense(im, batch, lam)
        min_eig = float(dense.min_eig_T.min())
        methods[f"imaml_cg{n}"] = {**row(im.grad, dense.grad, s, m), "min_eig": min_eig,
                                   "indefinite": min_eig <= 0}
    return {"dtype": "float64", "steps": steps, "n_tasks": n_tasks, "n_params": P.n_params(theta),
            "inner_lr": alpha, "lam": lam, "methods": methods,
            "imaml": None if dense is None else _spectrum(dense)}


def _imaml_dense(im: MetaGrad, batch: exact.Recorder, lam: float) -> exact.ImplicitSolve:
    if im.phi is None:
        raise RuntimeError("imaml.meta_grad returned no phi*; the dense solve needs it")
    inner_data = im.inner_data[-1] if im.inner_data else batch.inner[-1]
    return exact.imaml_solve(im.phi, batch, inner_data, im.outer_data, lam)


def _spectrum(dense: exact.ImplicitSolve) -> dict[str, Any]:
    """JSON summary of where I + H/lam is positive definite (see :func:`gradcheck`)."""
    mu = float(dense.hessian_min_eig_T.min())  # lambda_min(H), min over tasks
    return {"min_eig_T": dense.min_eig_T.tolist(), "min_eig": float(dense.min_eig_T.min()),
            "indefinite_tasks": int((dense.min_eig_T <= 0).sum()),
            "hessian_min_eig": mu, "lam_pd": max(0.0, -mu)}
