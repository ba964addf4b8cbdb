"""Stochastic MLP policies with per-task parameters.

A policy is functional, like :class:`metarl.models.mlp.MLP`: it owns no
tensors. ``init`` returns meta-parameters (no task dimension); every other
call takes a per-task stack ``params_T`` (each leaf ``[T, *shape]``) and
observations ``[T, ..., obs_dim]`` with any number of middle dimensions
(``[T, E, obs]`` while sampling, ``[T, E, H, obs]`` for a loss), and applies
task t's weights to task t's observations in one batched call.

References: Finn et al. 2017 (MAML), section 5.3 and appendix; Duan et al.
2016 (rllab) for the state-independent log-std Gaussian MLP policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from metarl.models.mlp import MLP
from metarl.types import Params

__all__ = [
    "ActionDist",
    "Categorical",
    "CategoricalMLPPolicy",
    "DiagGaussian",
    "GaussianMLPPolicy",
    "Policy",
]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class ActionDist(Protocol):
    """A batch of action distributions, one per leading index ``[T, ...]``."""

    def log_prob(self, actions: Tensor) -> Tensor:
        """Log-density of ``actions``, summed over action dimensions: ``[T, ...]``."""
        ...

    def entropy(self) -> Tensor:
        """``[T, ...]``."""
        ...

    def sample(self, generator: torch.Generator | None = None,
               rows: tuple[int, int] | None = None) -> Tensor:
        """One action per distribution, drawn with ``generator`` (no gradient).

        ``rows = (offset, total)``: these T distributions are rows ``offset ..
        offset + T`` of a batch of ``total``; the noise is drawn for all ``total``
        and this batch's rows kept, so a task's actions do not depend on how the
        batch was split (over processes). None: ``(0, T)``.
        """
        ...

    @property
    def mode(self) -> Tensor:
        """The most likely action (deterministic evaluation)."""
        ...

    def kl(self, other: ActionDist) -> Tensor:
        """``KL(self || other)`` per distribution: ``[T, ...]``."""
        ...

    def detach(self) -> ActionDist:
        """The same distributions, their tensors detached from the graph (same values)."""
        ...


class Policy(Protocol):
    """What the sampler and the RL losses need from a policy."""

    obs_dim: int
    discrete: bool

    def init(self, generator: torch.Generator, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> Params: ...

    def dist(self, params_T: Params, obs: Tensor) -> ActionDist: ...

    def kl(self, params_old_T: Params, params_new_T: Params, obs: Tensor) -> Tensor: ...


class DiagGaussian:
    """Diagonal Gaussian ``N(mean, exp(log_std)^2)``.

    Args:
        mean: ``[T, ..., act]``.
        log_std: broadcastable to ``mean`` (e.g. ``[T, 1, ..., act]``).
    """

    def __init__(self, mean: Tensor, log_std: Tensor) -> None:
        self.mean = mean
        self.log_std = log_std

    @property
    def std(self) -> Tensor:
        return self.log_std.exp()

    @property
    def mode(self) -> Tensor:
        return self.mean

    def log_prob(self, actions: Tensor) -> Tensor:
        """``actions [T, ..., act]`` -> ``[T, ...]``."""
        z = (actions - self.mean) * torch.exp(-self.log_std)  # [T, ..., act]
        return (-0.5 * z * z - self.log_std - _HALF_LOG_2PI).sum(-1)

    def entropy(self) -> Tensor:
        """``[T, ...]``: ``sum(log_std + 0.5 log(2 pi e))`` at every observation."""
        ent = (self.log_std + _HALF_LOG_2PI + 0.5).expand_as(self.mean)
        return ent.sum(-1)

    def sample(self, generator: torch.Generator | None = None,
               rows: tuple[int, int] | None = None) -> Tensor:
        """``[T, ..., act]``, unclipped (the environment clips)."""
        with torch.no_grad():
            eps = _noise(torch.randn, self.mean.shape, rows, generator, self.mean)
            return self.mean + self.std * eps

    def kl(self, other: ActionDist) -> Tensor:
        """``KL(self || other)``, closed form, summed over action dims: ``[T, ...]``."""
        if not isinstance(other, DiagGaussian):
            raise TypeError(f"KL between DiagGaussian and {type(other).__name__} is not defined")
        var_ratio = torch.exp(2.0 * (self.log_std - other.log_std))  # (s0/s1)^2
        t = (self.mean - other.mean) * torch.exp(-other.log_std)  # (m0-m1)/s1
        kl = other.log_std - self.log_std + 0.5 * (var_ratio + t * t) - 0.5
        return kl.sum(-1)

    def detach(self) -> DiagGaussian:
        return DiagGaussian(self.mean.detach(), self.log_std.detach())


def _noise(draw: Callable[..., Tensor], shape: torch.Size, rows: tuple[int, int] | None,
           generator: torch.Generator | None, like: Tensor) -> Tensor:
    """``draw(shape)``, or rows ``offset .. offset + T`` of ``draw((total, *shape[1:]))``."""
    offset, total = rows if rows is not None else (0, shape[0])
    full = draw((total, *shape[1:]), generator=generator, device=like.device, dtype=like.dtype)
    return full[offset:offset + shape[0]] if (offset, total) != (0, shape[0]) else full


class Categorical:
    """Categorical distribution over ``n`` actions from unnormalised ``logits [T, ..., n]``."""

    def __init__(self, logits: Tensor) -> None:
        self.logits = logits - logits.logsumexp(-1, keepdim=True)  # log-probabilities

    @property
    def probs(self) -> Tensor:
        return self.logits.exp()

    @property
    def mode(self) -> Tensor:
        return self.logits.argmax(-1)

    def log_prob(self, actions: Tensor) -> Tensor:
        """``actions [T, ...]`` (integers) -> ``[T, ...]``."""
        return self.logits.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)

    def entropy(self) -> Tensor:
        return -(self.probs * self.logits).sum(-1)

    def sample(self, generator: torch.Generator | None = None,
               rows: tuple[int, int] | None = None) -> Tensor:
        """``[T, ...]`` long, by inverting the CDF at one uniform draw per distribution (so
        that, like the Gaussian's, the noise can be drawn for a larger batch)."""
        with torch.no_grad():
            u = _noise(torch.rand, self.logits.shape[:-1], rows, generator, self.logits)
            cdf = self.probs.cumsum(-1)  # [T, ..., n]
            a = (cdf < u.unsqueeze(-1)).sum(-1)
            return a.clamp_(max=self.logits.shape[-1] - 1)  # round-off: cdf[-1] may be < u

    def kl(self, other: ActionDist) -> Tensor:
        """``KL(self || other)``: ``[T, ...]``."""
        if not isinstance(other, Categorical):
            raise TypeError(f"KL between Categorical and {type(other).__name__} is not defined")
        return (self.probs * (self.logits - other.logits)).sum(-1)

    def detach(self) -> Categorical:
        out = Categorical.__new__(Categorical)  # the logits are normalised already
        out.logits = self.logits.detach()
        return out


def _check_obs(params_T: Params, obs: Tensor, obs_dim: int, key: str = "l0.w") -> int:
    """Raise unless ``obs`` is ``[T, ..., obs_dim]`` with T the params' task count."""
    T = params_T[key].shape[0]
    if obs.dim() < 2 or obs.shape[0] != T or obs.shape[-1] != obs_dim:
        raise ValueError(f"observations have shape {tuple(obs.shape)}, expected "
                         f"[T={T}, ..., obs_dim={obs_dim}]: pass one row of observations per "
                         "task, with the policy's obs_dim last")
    if params_T[key].dim() != 3:
        raise ValueError(f"parameter {key!r} has shape {tuple(params_T[key].shape)}, expected a "
                         "per-task stack [T, in, out]: expand the meta-parameters with "
                         "metarl.params.expand(theta, T)")
    return T


class _MLPPolicyBase:
    """Shared code: obs ``[T, ..., obs]`` -> MLP on ``[T, N, obs]`` -> ``[T, ..., out]``."""

    def __init__(self, obs_dim: int, n_out: int, hidden: Sequence[int], activation: str) -> None:
        if obs_dim < 1 or n_out < 1:
            raise ValueError(f"obs_dim and action size must be >= 1, got {obs_dim} and {n_out}")
        self.obs_dim = obs_dim
        self.mlp = MLP(obs_dim, n_out, hidden=tuple(hidden), activation=activation)

    def _forward(self, params_T: Params, obs: Tensor) -> Tensor:
        T = _check_obs(params_T, obs, self.obs_dim)
        lead = obs.shape[1:-1]
        w = params_T["l0.w"]
        x = obs.to(dtype=w.dtype).reshape(T, -1, self.obs_dim)  # [T, N, obs]
        out = self.mlp(params_T, x)  # [T, N, out]
        return out.reshape(T, *lead, out.shape[-1])  # [T, ..., out]

    def kl(self, params_old_T: Params, params_new_T: Params, obs: Tensor) -> Tensor:
        """``KL(pi_old(.|o) || pi_new(.|o))`` at every observation: ``[T, ...]``.

        The old policy is treated as a constant (its outputs are detached), so
        the result is differentiable w.r.t. ``params_new_T`` only; this is the
        constraint of TRPO (Schulman et al. 2015, eq. 12) and its Hessian at
        ``new == old`` is the Fisher information.
        """
        with torch.no_grad():
            old = self.dist(params_old_T, obs)
        return old.kl(self.dist(params_new_T, obs))

    def dist(self, params_T: Params, obs: Tensor) -> ActionDist:  # pragma: no cover - abstract
        raise NotImplementedError


class GaussianMLPPolicy(_MLPPolicyBase):
    """Gaussian policy: mean = MLP(obs), state-independent learned log-std.

    Parameters: the MLP's ``l{i}.w [in, out]``, ``l{i}.b [out]`` (PyTorch's
    default ``nn.Linear`` initialisation) and ``log_std [act_dim]``
    initialised to ``log(init_std)``. With a floor ``min_std > 0`` the std is
    ``min_std + exp(log_std)`` (smooth, never below the floor; ``log_std`` then starts
    at ``log(init_std - min_std)``), read through :meth:`std_log`.

    Args:
        obs_dim: observation size.
        act_dim: action size.
        hidden: hidden layer widths (MAML-RL PyTorch port: (64, 64); paper: (100, 100)).
        activation: ``"tanh"`` (port) or ``"relu"`` (paper).
        init_std: initial standard deviation of every action dimension (> 0).
        min_std: lower bound of the standard deviation, in ``[0, init_std)``; 0 (the
            default) is no bound, the parameterisation of the papers bit for bit.

    References: Finn et al. 2017, section 5.3; Duan et al. 2016.
    """

    discrete = False

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (64, 64),
                 activation: str = "tanh", init_std: float = 1.0, min_std: float = 0.0) -> None:
        super().__init__(obs_dim, act_dim, hidden, activation)
        if not init_std > 0:
            raise ValueError(f"init_std must be > 0, got {init_std}")
        if not 0.0 <= min_std < init_std:
            raise ValueError(f"min_std must be in [0, init_std={init_std}), got {min_std}")
        self.act_dim = act_dim
        self.init_std = float(init_std)
        self.min_std = float(min_std)

    def std_log(self, log_std: Tensor) -> Tensor:
        """The log of the standard deviation that parameter ``log_std`` gives (any shape):
        ``log_std`` itself, or ``log(min_std + exp(log_std))`` with a floor."""
        if self.min_std == 0.0:
            return log_std
        return torch.logaddexp(log_std, torch.full_like(log_std, math.log(self.min_std)))

    def param_log_std(self, std_log: Tensor) -> Tensor:
        """The inverse of :meth:`std_log`: the parameter that gives log-std ``std_log``.

        Raises:
            ValueError: a std at or below the floor (no parameter gives it).
        """
        if self.min_std == 0.0:
            return std_log
        excess = std_log.exp() - self.min_std
        if not bool((excess > 0).all()):
            raise ValueError(f"a standard deviation of {float(std_log.exp().min()):.4g} is not "
                             f"above the policy's min_std={self.min_std:g}")
        return excess.log()

    def init(self, generator: torch.Generator, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> Params:
        """Fresh meta-parameters (no task dimension): Xavier-uniform weights, zero
        biases (as rllab and the MAML-RL code), log-std ``log(init_std)``."""
        params = self.mlp.init(generator, device=device, dtype=dtype, scheme="xavier")
        params["log_std"] = torch.full((self.act_dim,), math.log(self.init_std - self.min_std),
                                       device=device, dtype=dtype)
        return params

    def dist(self, params_T: Params, obs: Tensor) -> DiagGaussian:
        """``obs [T, ..., obs_dim]`` -> Gaussian with mean ``[T, ..., act_dim]``."""
        mean = self._forward(params_T, obs)  # [T, ..., act]
        log_std = self.std_log(params_T["log_std"])  # [T, act]
        log_std = log_std.reshape(log_std.shape[0], *([1] * (mean.dim() - 2)), self.act_dim)
        return DiagGaussian(mean, log_std)


class CategoricalMLPPolicy(_MLPPolicyBase):
    """Categorical policy over ``n_actions`` discrete actions: logits = MLP(obs).

    Args:
        obs_dim: observation size.
        n_actions: number of actions.
        hidden: hidden layer widths.
        activation: ``"tanh"`` or ``"relu"``.
    """

    discrete = True

    def __init__(self, obs_dim: int, n_actions: int, hidden: Sequence[int] = (64, 64),
                 activation: str = "tanh") -> None:
        super().__init__(obs_dim, n_actions, hidden, activation)
        self.n_actions = n_actions

    def init(self, generator: torch.Generator, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> Params:
        """Fresh meta-parameters (no task dimension): Xavier-uniform weights, zero biases."""
        return self.mlp.init(generator, device=device, dtype=dtype, scheme="xavier")

    def dist(self, params_T: Params, obs: Tensor) -> Categorical:
        """``obs [T, ..., obs_dim]`` -> Categorical with logits ``[T, ..., n_actions]``."""
        return Categorical(self._forward(params_T, obs))
