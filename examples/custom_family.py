"""A user's own RL task family: Pendulum with gravity drawn per task.

A family needs two methods: ``sample_tasks`` (JSON-serialisable task specs) and
``make_env`` (a Gymnasium environment for one task). Everything else (batched
sampling over tasks and episodes, MAML/FOMAML/Reptile/iMAML, TRPO, ``metarl
adapt`` and ``metarl evaluate``) comes from :class:`metarl.rl.family.RLFamily`.

Register it in any of three ways:

1. A Python call (then use it from Python, or from a script that registers it
   before calling metarl's API)::

       from metarl import families
       families.register("pendulum-gravity", PendulumGravityFamily)

2. An entry point in your own package's ``pyproject.toml``, found by
   ``metarl families`` and ``metarl train --family pendulum-gravity`` once your
   package is installed::

       [project.entry-points."metarl.families"]
       pendulum-gravity = "mypackage.families:PendulumGravityFamily"

3. No registration: name it on the command line (the current directory is
   searched for the module)::

       metarl train --family examples.custom_family:PendulumGravityFamily \\
           --algo maml --iterations 50 --out runs/pendulum
       metarl adapt runs/pendulum --task '{"g": 12.0}' --steps 1

Run this file to train and adapt at a tiny size: ``python examples/custom_family.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium
import numpy as np

from metarl.rl.family import RLFamily


class PendulumGravityFamily(RLFamily):
    """Pendulum-v1 (swing up and balance) with gravity g ~ U[5, 15] m/s^2 per task.

    Observation (cos th, sin th, th_dot); action: torque in [-2, 2]; reward
    -(th^2 + 0.1 th_dot^2 + 0.001 u^2) (Gymnasium's Pendulum-v1). Horizon 100.
    """

    name = "pendulum-gravity"
    description = "Pendulum-v1 with gravity g ~ U[5, 15] per task (example user family)"
    default_horizon = 100
    g_range = (5.0, 15.0)

    def sample_tasks(self, n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
        return [{"g": float(g)} for g in rng.uniform(*self.g_range, size=n)]

    def make_env(self, task: Mapping[str, Any]) -> gymnasium.Env:
        return gymnasium.make("Pendulum-v1", g=float(task["g"]))

    def check_task(self, task: Any) -> dict[str, Any]:
        if not isinstance(task, Mapping) or not isinstance(task.get("g"), (int, float)):
            raise ValueError(f"a pendulum task is {{\"g\": number}}, got {task!r}")
        if task["g"] <= 0:
            raise ValueError(f"gravity must be positive, got {task['g']}")
        return {"g": float(task["g"])}


def main(iterations: int = 3, out: str = "runs/pendulum-example") -> None:
    """Register the family, meta-train it briefly, adapt to a new task."""
    import torch

    from metarl import checkpoint, config, families
    from metarl.evaluate import adapt_to_task
    from metarl.train import train

    families.register("pendulum-gravity", PendulumGravityFamily, overwrite=True)
    family = families.make("pendulum-gravity", rollouts=4, horizon=50)
    cfg = config.resolve(family, {"algo": "maml", "iterations": iterations, "meta_batch": 4,
                                  "device": "cpu", "log_every": 1,
                                  "family_options": family.options()})
    result = train(cfg, out, overwrite=True)
    print(f"trained {result.iterations} iterations: {result.metrics}")
    run = checkpoint.load(out)  # a typed record: run.theta, run.config, run.iteration, ...
    _, returns = adapt_to_task(family, run.theta, {"g": 12.0}, steps=1, lr=(0.1,), rollouts=4,
                               seed=0, device=torch.device("cpu"), dtype=torch.float32)
    print(f"return before / after one adaptation step on g = 12: {returns[0]:.1f} / "
          f"{returns[1]:.1f}")


if __name__ == "__main__":
    main()
