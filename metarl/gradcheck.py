"""What each meta-gradient estimator gets right: compare with exact references in float64.

On a small problem, the exact MAML meta-gradient comes from the explicit
Jacobian of the inner loop and is cross-checked by central finite differences;
the exact iMAML gradient from a dense solve. Sampled data are held fixed
(recorded from the estimator's own run and replayed).
"""

from __future__ import annotations

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
        inner_lr: alpha (default: the family's).
        lam: iMAML's lambda (must make I + H/lam positive definite for CG to converge).
        cg_iters: CG iteration counts to report for iMAML.
        fd: also compute the full central-difference gradient (2P objective evaluations).

    Returns:
        ``{"dtype", "steps", "n_params", "methods": {name: {"rel_error", "cosine", "seconds", "peak_mb"}}}``:
        ``rel_error`` against the exact gradient of the method's own objective
        (MAML, iMAML) or against exact MAML (FOMAML, Reptile); ``cosine`` always to exact MAML.
    """
    dtype = torch.float64
    family = families.make(family_name, **(family_options or {}))
    g = torch.Generator().manual_seed(seed)
    theta = family.init_params(g, torch.device("cpu"), dtype)
    batch = exact.Recorder(family.sample_batch(n_tasks, g, split="train", device="cpu",
                                               dtype=dtype))
    alpha = inner_lr if inner_lr is not None else family.defaults.inner_lr
    inner = InnerConfig(steps=steps, lr=alpha)
    methods: dict[str, dict[str, float]] = {}

    mg = maml.meta_grad(theta, batch, inner)  # records the data
    batch.replay()
    _, sec, mb = _timed(lambda: maml.meta_grad(theta, batch.replay(), inner))
    ref, ref_sec, ref_mb = _timed(lambda: exact.maml(theta, batch, inner, batch.inner, batch.outer))

    def row(grad: Params | torch.Tensor, target: Params | torch.Tensor, s: float, m: float) -> None:
        return {"rel_error": exact.rel_error(grad, target), "cosine": exact.cosine(grad, ref),
                "seconds": s, "peak_mb": None if m != m else m}  # None: not measured

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
    dense: Params | None = None
    for n in cg_iters:
        cfg = imaml.IMAMLConfig(lam=lam, cg_iters=n)
        im, s, m = _timed(lambda cfg=cfg: imaml.meta_grad(theta, batch.replay(), inner, cfg))
        if dense is None:
            dense = _imaml_dense(im, batch, lam)
        methods[f"imaml_cg{n}"] = row(im.grad, dense, s, m)
    return {"dtype": "float64", "steps": steps, "n_tasks": n_tasks, "n_params": P.n_params(theta),
            "inner_lr": alpha, "lam": lam, "methods": methods}


def _imaml_dense(im: MetaGrad, batch: exact.Recorder, lam: float) -> Params:
    assert im.phi is not None
    inner_data = im.inner_data[-1] if im.inner_data else batch.inner[-1]
    return exact.imaml(im.phi, batch, inner_data, im.outer_data, lam)
