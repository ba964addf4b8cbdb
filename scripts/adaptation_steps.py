"""How long each test-time adaptation step is, checkpoint by checkpoint (RL families).

For each checkpoint: sample ``--tasks`` test-split tasks (drawn with ``--seed``), adapt
``--steps`` plain gradient steps at the family's test-time rates (trajectories resampled
after each step, as ``metarl evaluate`` does), and print per step j the mean
KL(pi_{j-1} || pi_j) on the states step j's trajectories visited, the length of the step
(per-task parameter norm, mean over tasks) and the return before each step and after the
last. A step whose KL grows over the checkpoints while its return falls overshoots::

    .venv/bin/python scripts/adaptation_steps.py runs/nav/checkpoints/iteration-*.pt
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
from metarl.evaluate import eval_rates  # noqa: E402
from metarl.inner import adapt, model_params  # noqa: E402


def measure(path: str, tasks: int, steps: int, seed: int, rollouts: int) -> dict[str, object]:
    run = checkpoint.load(path).with_family_options({"rollouts": rollouts})
    family = run.family()
    rates = eval_rates(run, family, None)
    batch = family.sample_batch(tasks, torch.Generator().manual_seed(seed), split="test")
    phi = P.expand(run.theta, tasks)
    state = None
    kls, grads, returns = [], [], []
    for j in range(steps):
        model = model_params(phi)
        data = batch.inner_data(model)
        returns.append(float(batch.metric(model, data).mean()))
        ad = adapt(phi, batch, run.config.inner.with_steps(1, rates[min(j, len(rates) - 1)]),
                   create_graph=False, data=[data], state=state)
        with torch.no_grad():
            kls.append(float(batch.kl(model, ad.phi, data).mean()))
            step = P.sub(ad.phi, model)
            grads.append(float(P.task_dot(step, step).sqrt().mean()))
        phi, state = ad.phi, ad.state
    model = model_params(phi)
    returns.append(float(batch.metric(model, batch.inner_data(model)).mean()))
    return {"checkpoint": str(path), "iteration": run.iteration, "step_kl": kls,
            "step_norm": grads, "return": returns, "rates": list(rates)}


def main() -> None:
    ap = parser(__doc__, tasks=40, seed=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rollouts", type=int, default=40)
    args = ap.parse_args()

    def line(r: dict) -> str:
        kl = " ".join(f"{x:.3f}" for x in r["step_kl"])
        nm = " ".join(f"{x:.3f}" for x in r["step_norm"])
        ret = " ".join(f"{x:.1f}" for x in r["return"])
        return f"it {r['iteration']:4d}  step KL {kl}  step norm {nm}  return {ret}"

    study(args, lambda p: [measure(p, args.tasks, args.steps, args.seed, args.rollouts)], line)


if __name__ == "__main__":
    main()
