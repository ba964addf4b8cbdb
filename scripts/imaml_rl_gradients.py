"""How far iMAML's implicit meta-gradient is from the gradient of the adaptation it runs, on RL.

For each checkpoint and lambda: sample ``--tasks`` training tasks, run iMAML's k proximal
inner steps (trajectories resampled after each, as training does) and its CG solve, and
record every trajectory. On exactly those trajectories, differentiate the outer loss
through the k proximal steps that were taken (float64, autograd: the exact derivative of
the objective iMAML's adaptation defines). Printed: the cosine of iMAML's meta-gradient and
of the first-order one (grad L_out at phi_k alone, lambda -> infinity) with that exact
gradient, their norm ratios, the relative residual of CG's solve, the fraction of tasks
whose CG met negative curvature and how far phi_k is from a proximal minimiser (the norm
of the proximal objective's gradient at phi_k relative to that of the first step)::

    .venv/bin/python scripts/imaml_rl_gradients.py runs/nav-imaml/checkpoint.pt --lam 1 10 30
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import torch  # noqa: E402
from checkpoint_study import parser, study  # noqa: E402

from metarl import checkpoint  # noqa: E402
from metarl import params as P  # noqa: E402
from metarl.algorithms import exact, imaml  # noqa: E402

F64 = torch.float64


def cosine(a: dict, b: dict) -> float:
    return float(P.dot(a, b) / (P.dot(a, a).sqrt() * P.dot(b, b).sqrt()))


def ratio(a: dict, b: dict) -> float:
    return float(P.dot(a, a).sqrt() / P.dot(b, b).sqrt())


def measure(path: str, lam: float, tasks: int, seed: int) -> dict[str, object]:
    run = checkpoint.load(path)
    cfg = run.config
    family = run.family()
    inner, icfg = cfg.inner, dataclasses.replace(cfg.imaml, lam=lam)
    theta = {k: v.to(F64) for k, v in run.theta.items()}
    batch = exact.Recorder(family.sample_batch(tasks, torch.Generator().manual_seed(seed),
                                               dtype=F64))
    mg = imaml.meta_grad(theta, batch, inner, icfg)
    T = batch.n_tasks
    # the exact derivative of L_out(phi_k(theta)) through the proximal steps, same data
    th = P.detach(theta, requires_grad=True)
    th_T = P.expand(th, T)
    phi, prox_grads = th_T, []
    for j, d in enumerate(batch.inner):
        diff = P.sub(phi, th_T)
        loss = batch.inner_loss(phi, d) + 0.5 * lam * P.task_dot(diff, diff)
        g = P.grads(loss.sum(), phi, create_graph=True)
        prox_grads.append(float(P.dot(g, g).sqrt().detach()))
        phi = P.add(phi, g, -inner.lr_at(j))
    assert mg.phi is not None
    taken = float(P.dot(P.sub(P.detach(phi), mg.phi), P.sub(P.detach(phi), mg.phi)).sqrt())
    outer = batch.outer_loss(phi, batch.outer).mean()
    exact_g = P.grads(outer, th)
    phi_k = P.detach(mg.phi, requires_grad=True)
    v = P.grads(batch.outer_loss(phi_k, batch.outer).sum(), phi_k)  # grad L_out(phi_k) per task
    first_order = P.task_mean(v)
    # CG's residual: ((1 + d) I + H/lam) g_t - v_t, relative to v_t, on the last step's data
    _, H = P.grad_and_hvp(lambda p: batch.inner_loss(p, batch.inner[-1]), mg.phi)
    g_T = mg.task_grads
    Ag = P.add(P.scale(g_T, 1.0 + icfg.cg_damping), H(g_T), 1.0 / lam)
    res = P.sub(Ag, v)
    # the proximal objective's gradient at phi_k on the last data: 0 at the minimiser
    d_last = P.sub(mg.phi, P.expand(theta, T))
    grad_in = P.grads(batch.inner_loss(phi_k, batch.inner[-1]).sum(), phi_k)
    grad_last = P.add(grad_in, d_last, lam)
    return {
        "checkpoint": str(path), "iteration": run.iteration, "lam": lam,
        "inner_steps": inner.steps, "inner_lr": inner.lr,
        "cos_imaml_exact": cosine(mg.grad, exact_g),
        "cos_first_order_exact": cosine(first_order, exact_g),
        "norm_imaml_over_exact": ratio(mg.grad, exact_g),
        "cg_relative_residual": float(P.dot(res, res).sqrt() / P.dot(v, v).sqrt()),
        "cg_indefinite": float(mg.extra["imaml/cg_indefinite"]),
        "prox_gradient_first_step": prox_grads[0],
        "prox_gradient_at_phi_k": float(P.dot(grad_last, grad_last).sqrt()),
        "replayed_phi_error": taken,
    }


def main() -> None:
    ap = parser(__doc__, tasks=20, seed=0)
    ap.add_argument("--lam", type=float, nargs="+", default=[1.0, 10.0])
    args = ap.parse_args()

    def line(r: dict) -> str:
        return (f"it {r['iteration']:4d} lam {r['lam']:g}: cos(iMAML, exact) "
                f"{r['cos_imaml_exact']:.3f} (norm x{r['norm_imaml_over_exact']:.2f}), "
                f"cos(first order, exact) {r['cos_first_order_exact']:.3f}, CG residual "
                f"{r['cg_relative_residual']:.2f}, indefinite {r['cg_indefinite']:.2f}, "
                f"prox gradient {r['prox_gradient_first_step']:.3g} -> "
                f"{r['prox_gradient_at_phi_k']:.3g}, replay error "
                f"{r['replayed_phi_error']:.1e}")

    study(args, lambda p: [measure(p, lam, args.tasks, args.seed) for lam in args.lam], line)


if __name__ == "__main__":
    main()
