"""The spectrum of the RL inner loss's Hessian, which decides whether iMAML's system
``(I + H/lam) g = v`` is positive definite (and so whether its CG can converge).

For each checkpoint: sample ``--tasks`` training tasks, ``rollouts`` trajectories each with
the checkpoint's policy (as the first inner step does), and estimate every task's smallest
and largest eigenvalue of the Hessian of the inner loss (the REINFORCE surrogate) at theta
by Lanczos on Hessian-vector products (:func:`metarl.linalg.lanczos_extremes`, float64).
A task's system is indefinite for every ``lam < -lambda_min``; the Lanczos estimate of
``lambda_min`` is an upper bound, so the fractions printed are lower bounds::

    .venv/bin/python scripts/imaml_rl_spectrum.py runs/nav/checkpoints/iteration-*.pt \\
        --json docs/results/imaml-rl-spectrum.json
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import torch  # noqa: E402
from checkpoint_study import parser, study  # noqa: E402

from metarl import checkpoint  # noqa: E402
from metarl import params as P  # noqa: E402
from metarl.linalg import lanczos_extremes  # noqa: E402

F64 = torch.float64
LAMS = (1.0, 10.0, 100.0)


def spectrum(path: str, tasks: int, iters: int, seed: int) -> dict[str, object]:
    run = checkpoint.load(path)
    family = run.family()
    theta = {k: v.to(F64) for k, v in run.theta.items()}
    batch = family.sample_batch(tasks, torch.Generator().manual_seed(seed), dtype=F64)
    theta_T = P.expand(theta, tasks)
    data = batch.inner_data(theta_T)
    _, H = P.grad_and_hvp(lambda p: batch.inner_loss(p, data), theta_T)
    g = torch.Generator().manual_seed(seed + 1)
    start = {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in theta_T.items()}
    lo, hi = lanczos_extremes(H, start, iters)
    std_log = getattr(family.policy(), "std_log", None)
    log_std = theta.get("log_std")
    std = None if log_std is None or std_log is None else float(std_log(log_std).exp().mean())
    q = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    return {"checkpoint": str(path), "iteration": run.iteration, "policy_std": std,
            "min_std": run.config.family_options.get("min_std", 0.0),
            "lambda_min_quantiles_10_50_90": torch.quantile(lo, q).tolist(),
            "lambda_max_quantiles_10_50_90": torch.quantile(hi, q).tolist(),
            "indefinite_fraction": {str(lam): float((lo < -lam).double().mean())
                                    for lam in LAMS}}


def main() -> None:
    ap = parser(__doc__, tasks=20, seed=0)
    ap.add_argument("--lanczos", type=int, default=30, help="Lanczos steps (HVPs) per task")
    args = ap.parse_args()

    def line(r: dict) -> str:
        fr = " ".join(f"lam {k}: {v:.2f}" for k, v in r["indefinite_fraction"].items())
        lo = ", ".join(f"{x:.3g}" for x in r["lambda_min_quantiles_10_50_90"])
        hi = ", ".join(f"{x:.3g}" for x in r["lambda_max_quantiles_10_50_90"])
        return (f"it {r['iteration']:4d} std {r['policy_std']:.3f}  lambda_min q10/50/90 "
                f"[{lo}]  lambda_max [{hi}]  indefinite {fr}")

    study(args, lambda p: [spectrum(p, args.tasks, args.lanczos, args.seed)], line)


if __name__ == "__main__":
    main()
