"""Meta-train MAML on sinusoid regression with the Python API, then meta-test it.

    python examples/sinusoid_maml.py            # about a minute on one CPU core
"""

from __future__ import annotations

import torch

from metarl import families
from metarl import params as P
from metarl.algorithms import meta_grad
from metarl.evaluate import Curve, adaptation_values
from metarl.inner import InnerConfig
from metarl.outer import GradientOuter


def main(iterations: int = 10_000, seed: int = 0) -> Curve:
    family = families.make("sinusoid")  # K = 10 support, 10 query points per task
    g = torch.Generator().manual_seed(seed)
    theta = P.clone_leaf(family.init_params(g, torch.device("cpu"), torch.float32))
    inner = InnerConfig(steps=1, lr=0.01)  # the paper's inner loop
    outer = GradientOuter(theta, "adam", lr=1e-3)  # the outer optimizer is separate

    for it in range(1, iterations + 1):
        batch = family.sample_batch(25, g)  # 25 tasks, every tensor [T, ...]
        mg = outer.step(theta, batch, lambda th, b: meta_grad("maml", th, b, inner))
        if it % 2000 == 0:
            print(f"iteration {it}: query MSE after adaptation {mg.metrics()['outer/loss']:.3f}")

    # 5-shot meta-test on fresh tasks: MSE after 0..10 steps of lr 0.01
    scores = adaptation_values(theta, family, n_tasks=600, steps=10, lr=0.01, seed=seed,
                               device=torch.device("cpu"), dtype=torch.float32, shots=5)
    curve = Curve.from_values("maml", scores.values)
    for k in (0, 1, 5, 10):
        print(f"MSE after {k:2d} steps: {curve.mean[k]:.3f} +- {curve.ci95[k]:.3f}")
    return curve


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
