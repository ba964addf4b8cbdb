"""Validation while training (``metarl train --validate-every N``).

Every N iterations (and after the last) the meta-parameters adapt to the same held-out
tasks, and the metric after each adaptation step is logged; the meta-parameters with the
best metric after the last step are kept as ``best.pt`` beside ``checkpoint.pt``. A
run's result then does not depend on stopping it at the right iteration: on navigation
the return after two steps peaks and then drifts as training goes on (README, "To 500
iterations"), and ``best.pt`` is the peak.

The validation tasks are fresh tasks of the training split, drawn from their own seed
(:data:`~metarl.evaluate.VALIDATION_SEED_OFFSET`): never a training meta-batch and never
the test tasks ``metarl evaluate`` reports on, so choosing ``best.pt`` on them leaves
the test numbers unbiased. Validation draws from no generator the training uses, so a
run trains the same parameters with and without it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from metarl import distributed
from metarl.config import TrainConfig
from metarl.evaluate import adaptation_values, test_rates
from metarl.families import Family
from metarl.types import ConfigError, Params

BEST = "best.pt"
"""The run folder's checkpoint of the best validated iteration."""


class Validator:
    """Validates the meta-parameters of one run and remembers its best iteration.

    ``best``: ``(iteration, value)`` of the best validation so far (a resumed run's, from
    its checkpoint), or None.
    """

    def __init__(self, cfg: TrainConfig, family: Family, *, group: distributed.Group,
                 device: torch.device, dtype: torch.dtype,
                 best: tuple[int, float] | None = None) -> None:
        v, d = cfg.validate, family.defaults.eval
        self.cfg, self.family, self.group = cfg, family, group
        self.steps = v.steps if v.steps is not None else max(d.steps, cfg.inner.steps)
        self.tasks = v.tasks if v.tasks is not None else d.tasks
        self.device, self.dtype = device, dtype
        self.best = best
        self.key = f"validation/{family.metric}_{self.steps}"
        """The logged metric that picks ``best.pt``."""

    @staticmethod
    def check(cfg: TrainConfig, family: Family, world: int) -> None:
        """Raise :class:`ConfigError` for validation settings the run cannot use."""
        v = cfg.validate
        if not v.every:
            if (v.tasks, v.steps, v.rollouts) != (None, None, None):
                raise ConfigError("--validate-tasks, --validate-steps and --validate-rollouts "
                                  "set how --validate-every N validates: add it")
            return
        if v.rollouts is not None and family.kind != "rl":
            raise ConfigError(f"--validate-rollouts sets the trajectories of RL tasks; family "
                              f"{family.name!r} is supervised: drop it")
        tasks = v.tasks if v.tasks is not None else family.defaults.eval.tasks
        if world > tasks:
            raise ConfigError(f"{world} processes for {tasks} validation tasks: raise "
                              f"--validate-tasks to at least {world}")

    def due(self, iteration: int) -> bool:
        """Whether ``iteration`` validates: every ``validate.every``-th and the last."""
        every = self.cfg.validate.every
        return bool(every) and (iteration % every == 0 or iteration == self.cfg.iterations)

    def __call__(self, theta: Params, iteration: int) -> tuple[dict[str, float], bool]:
        """Validate ``theta`` (the parameters after ``iteration``): the metrics to log and
        whether they are the best so far (the caller then keeps them as ``best.pt``).

        Every rank of a distributed run calls this; each adapts its share of the tasks and
        all return the same metrics.
        """
        cfg, family = self.cfg, self.family
        overrides: dict[str, Any] = {}
        if cfg.validate.rollouts is not None:
            overrides["rollouts"] = cfg.validate.rollouts
        scores = adaptation_values(
            theta, family, n_tasks=self.tasks, steps=self.steps,
            lr=test_rates(cfg.inner, family), seed=cfg.seed, device=self.device,
            dtype=self.dtype, chunk=family.eval_chunk, group=self.group, rule=cfg.inner,
            prox_lam=cfg.imaml.lam if cfg.algo == "imaml" else None, split="train",
            **overrides)
        curve = scores.curve("validation")
        metrics = {f"validation/{family.metric}_{j}": m for j, m in zip(curve.steps, curve.mean)}
        for name, c in curve.extra.items():
            metrics.update({f"validation/{name}_{j}": m for j, m in zip(c.steps, c.mean)})
        metrics[f"{self.key}_ci95"] = curve.ci95[-1]
        value = curve.mean[-1]
        improved = math.isfinite(value) and (
            self.best is None or (value > self.best[1] if family.higher_is_better
                                  else value < self.best[1]))
        if improved:
            self.best = (iteration, value)
        if self.best is not None:
            metrics["validation/best"] = self.best[1]
            metrics["validation/best_iteration"] = float(self.best[0])
        return metrics, improved
