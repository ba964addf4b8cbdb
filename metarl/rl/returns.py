"""Discounted returns, generalised advantage estimation and advantage normalisation.

All functions take ``[T, E, H]`` tensors (tasks, episodes, time steps) and a
``mask [T, E, H]`` that is 1.0 on steps taken while the episode was alive and
0.0 after it ended. Nothing is bootstrapped: the value after the last step,
whether the episode terminated or was truncated at the horizon, is 0 (as in
rllab and the MAML-RL code).

The sums over future steps are one backward recursion over time on whole
``[T, E]`` slices: no loop over tasks or episodes, and every element rounded the
same way whatever the batch holds (a matrix product with a ``[H, H]`` matrix of
discount powers folds the tasks into the product's rows, and its kernel, hence
its rounding, changes with their number; ranks holding different numbers of
tasks must compute each task's values to the same bits).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["discount_cumsum", "discounted_returns", "gae", "normalize"]


def _check(name: str, x: Tensor, like: Tensor) -> None:
    if x.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(like.shape)} "
                         "(the rewards' [T, E, H])")


def discount_cumsum(x: Tensor, factor: float) -> Tensor:
    """``y[..., h] = sum_{k >= h} factor^(k - h) x[..., k]`` along the last dim.

    Args:
        x: ``[..., H]``.
        factor: discount (``gamma``, or ``gamma * lam`` for GAE), in [0, 1].

    Returns:
        ``[..., H]``, same dtype and device as ``x``; differentiable in ``x``.
    """
    H = x.shape[-1]
    if H == 0:
        return x.clone()
    acc = x[..., H - 1]
    out = [acc]
    for h in range(H - 2, -1, -1):  # y_h = x_h + factor * y_{h+1}
        acc = x[..., h] + factor * acc
        out.append(acc)
    return torch.stack(out[::-1], dim=-1)  # [..., H]


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Reward-to-go ``R_h = sum_{k >= h} gamma^(k - h) r_k`` over valid steps.

    Args:
        rewards: ``[T, E, H]``.
        mask: ``[T, E, H]``, 1.0 while alive, 0.0 after the episode ended.
        gamma: discount factor in [0, 1].

    Returns:
        ``[T, E, H]``, 0 where ``mask`` is 0.
    """
    _check("mask", mask, rewards)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    m = mask.to(rewards.dtype)
    return discount_cumsum(rewards * m, gamma) * m


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> Tensor:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16).

    ``delta_h = r_h + gamma * V_{h+1} - V_h`` with ``V_{h+1} = 0`` after the last
    valid step (termination or horizon), and
    ``A_h = sum_{k >= h} (gamma lam)^(k - h) delta_k``. With ``lam = 1`` this is
    ``discounted_returns - values`` on valid steps.

    Args:
        rewards: ``[T, E, H]``.
        values: ``[T, E, H]`` baseline values (entries where ``mask`` is 0 are ignored).
        mask: ``[T, E, H]``.
        gamma: discount factor in [0, 1].
        lam: GAE lambda in [0, 1] (MAML-RL: 1.0).

    Returns:
        advantages ``[T, E, H]``, 0 where ``mask`` is 0.

    References: Schulman et al. 2016, "High-dimensional continuous control
    using generalized advantage estimation", eq. 16.
    """
    _check("values", values, rewards)
    _check("mask", mask, rewards)
    if not 0.0 <= gamma <= 1.0 or not 0.0 <= lam <= 1.0:
        raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
    m = mask.to(rewards.dtype)
    v = values * m  # [T, E, H]
    v_next = torch.nn.functional.pad(v[..., 1:], (0, 1))  # [T, E, H]: V_{h+1}, 0 at the end
    delta = (rewards + gamma * v_next - v) * m  # [T, E, H]
    return discount_cumsum(delta, gamma * lam) * m


def normalize(adv: Tensor, mask: Tensor, eps: float = 1e-8, per_task: bool = True) -> Tensor:
    """Normalise advantages to mean 0, std 1 over valid steps.

    ``(adv - mean) / (std + eps)`` with the population std, and 0 where ``mask``
    is 0. ``per_task=True`` (default) uses each task's own statistics over its
    ``E x H`` valid entries, as rllab and the MAML-RL code do (each task's
    batch is processed separately there); ``per_task=False`` pools all tasks,
    which lets tasks with large rewards dominate the others.

    Args:
        adv: ``[T, E, H]``.
        mask: ``[T, E, H]``.
        eps: added to the std.
        per_task: per-task (default) or global statistics.

    Returns:
        ``[T, E, H]``.
    """
    _check("mask", mask, adv)
    m = mask.to(adv.dtype)
    dims = tuple(range(1 if per_task else 0, adv.dim()))
    n = m.sum(dims, keepdim=True).clamp(min=1.0)
    mean = (adv * m).sum(dims, keepdim=True) / n
    var = (((adv - mean) * m) ** 2).sum(dims, keepdim=True) / n
    return (adv - mean) / (var.sqrt() + eps) * m
