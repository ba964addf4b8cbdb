"""Training diagnostics RL users expect, from what a meta-iteration already holds.

Computed once per logged iteration, after the update, on the trajectories the
iteration sampled: no extra sampling, a few reductions and one transfer to the
host for all of them together (nothing per time step).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from metarl.rl.batch import Trajectories, masked_task_mean
from metarl.rl.returns import discounted_returns
from metarl.types import Params

__all__ = ["rl_diagnostics"]

_HALF_LOG_2PI_E = 0.5 * math.log(2.0 * math.pi * math.e)


def explained_variance(returns: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """Per task ``[T]``: ``1 - Var[R - V] / Var[R]`` over its valid steps (1: the baseline
    predicts the returns exactly, 0: no better than their mean, < 0: worse).

    Args:
        returns, values, mask: ``[T, E, H]`` discounted returns, baseline predictions, and
            1.0 on valid steps.
    """
    n = mask.sum((1, 2)).clamp_min(1.0)  # [T]

    def var(x: Tensor) -> Tensor:  # [T]
        mean = (x * mask).sum((1, 2)) / n
        return (((x - mean[:, None, None]) * mask) ** 2).sum((1, 2)) / n

    return 1.0 - var(returns - values) / var(returns).clamp_min(1e-12)


def rl_diagnostics(batch: Any, theta: Params, inner_data: list[Any], outer_data: Any,
                   sample_seconds: float, phi: Params | None = None) -> dict[str, float]:
    """``policy/std``, ``policy/entropy``, ``baseline/explained_variance``,
    ``rollout/episode_length``, ``time/env_steps_per_s`` and ``adapt/kl`` of one RL
    meta-iteration.

    Args:
        batch: the iteration's :class:`~metarl.rl.batch.RLBatch` (its ``cfg.gamma``).
        theta: the meta-parameters; a Gaussian policy's ``log_std [act]`` gives the std (mean
            over action dimensions) and the entropy per step (nats, state-independent),
            through the batch policy's ``std_log`` where it has one (a std floor).
        inner_data, outer_data: the iteration's :class:`~metarl.rl.batch.Trajectories`
            (pre-adaptation first). The explained variance is that of the linear baseline
            fitted on the pre-adaptation trajectories (in-sample, averaged over tasks);
            the episode length is their mean number of steps.
        sample_seconds: wall time the iteration spent sampling (``time/sample``); the
            rate counts every environment step sampled (before and after adaptation).
        phi: the adapted parameters ``[T, ...]``; ``adapt/kl`` is then the mean over tasks
            of KL(pi_theta || pi_phi) per step on the pre-adaptation trajectories (the
            Monte Carlo estimate from their sampled actions and recorded log-probabilities,
            theta being the parameters they were sampled with): how far adaptation moves
            the policy. A length that grows over training makes untrained extra test
            steps overshoot.

    Returns:
        The metrics that apply (a categorical policy has no ``policy/std``).
    """
    sampled = [d for d in (*inner_data, outer_data) if d is not None]
    if not sampled:
        return {}
    names: list[str] = []
    values: list[Tensor] = []
    log_std = theta.get("log_std")
    if log_std is not None:
        std_log = getattr(getattr(batch, "policy", None), "std_log", None)
        ls = (log_std if std_log is None else std_log(log_std)).detach().double()
        names += ["policy/std", "policy/entropy"]
        values += [ls.exp().mean(), ls.sum() + _HALF_LOG_2PI_E * ls.numel()]
    first = sampled[0]
    if not all(isinstance(d, Trajectories) for d in sampled):  # another batch type: std only
        return {k: float(v) for k, v in zip(names, values)}
    roll = first.rollouts
    gamma = float(getattr(getattr(batch, "cfg", None), "gamma", 1.0))
    disc = gamma ** torch.arange(roll.horizon, device=roll.rewards.device,
                                 dtype=roll.rewards.dtype)  # [H]
    ret = discounted_returns(roll.rewards, roll.mask, gamma)  # [T, E, H]
    base = first.values / disc  # [T, E, H] Trajectories store gamma^h V_h
    names += ["baseline/explained_variance", "rollout/episode_length", "_steps"]
    values += [explained_variance(ret, base, roll.mask).mean(), roll.lengths().mean(),
               sum(d.rollouts.mask.sum() for d in sampled)]
    if phi is not None and inner_data and hasattr(batch, "log_probs"):
        with torch.no_grad():  # E_{a ~ pi_theta}[log pi_theta(a) - log pi_phi(a)], per step
            gap = roll.log_probs - batch.log_probs(phi, first)  # [T, E, H]
            names.append("adapt/kl")
            values.append(masked_task_mean(gap, roll.mask).mean())
    dev = roll.rewards.device
    host = torch.stack([v.detach().to(dev, torch.float64) for v in values]).tolist()  # one sync
    m = dict(zip(names, host))
    steps = m.pop("_steps")
    if sample_seconds > 0:
        m["time/env_steps_per_s"] = steps / sample_seconds
    return m
