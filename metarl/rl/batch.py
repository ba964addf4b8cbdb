"""The RL task batch: trajectories sampled with the current parameters are the data.

``inner_data(phi_j)`` samples E trajectories per task with phi_j (no gradient
through the simulator), so every inner step adapts on trajectories of the
current policy; ``outer_data(phi_k)`` samples new ones with the adapted policy.
Losses are pure functions of the parameters on given trajectories, so TRPO's
line search, iMAML's Hessian-vector products and gradient tests re-evaluate them
on the same data without resampling.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metarl import params as P
from metarl.rl.baseline import LinearFeatureBaseline
from metarl.rl.policies import ActionDist, Policy
from metarl.rl.returns import discounted_returns, gae, normalize
from metarl.rl.sampler import BatchEnv, Rollouts, sample
from metarl.types import ConfigError, Params

ESTIMATORS = ("reinforce", "lvc", "dice")
SUBSAMPLE_BY = ("steps", "trajectories")
"""Units of :meth:`RLBatch.subsample`: every s-th step of every trajectory, or whole
trajectories."""


@dataclass(frozen=True, kw_only=True)
class RLConfig:
    """How trajectories are sampled and turned into advantages."""

    rollouts: int = 20
    """Trajectories per task per sampling (E)."""
    horizon: int = 100
    """Steps per trajectory (H)."""
    gamma: float = 0.99
    """Discount."""
    gae_lambda: float = 1.0
    """GAE lambda (1.0: discounted returns minus the baseline)."""
    normalize_advantages: bool = True
    """Normalise advantages per task (mean 0, std 1 over valid steps)."""
    estimator: str = "reinforce"
    """Inner-loss estimator: "reinforce" (the plain surrogate of the MAML paper),
    "lvc" (ProMP's low-variance curvature) or "dice" (unbiased derivatives of any
    order). All three have the same value and first derivative; they differ in
    the second derivative, i.e. in the MAML meta-gradient."""

    def __post_init__(self) -> None:
        if self.rollouts < 1 or self.horizon < 1:
            raise ConfigError(f"rollouts and horizon must be >= 1, got {self.rollouts}, "
                              f"{self.horizon}")
        if not 0 < self.gamma <= 1 or not 0 <= self.gae_lambda <= 1:
            raise ConfigError(f"need 0 < gamma <= 1 and 0 <= gae_lambda <= 1, got {self.gamma}, "
                              f"{self.gae_lambda}")
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"unknown estimator {self.estimator!r}: use one of "
                              f"{', '.join(ESTIMATORS)}")


@dataclass(frozen=True)
class Trajectories:
    """Sampled rollouts with their advantages (the data of an RL loss)."""

    rollouts: Rollouts
    advantages: Tensor
    """``[T, E, H]`` (0 where the mask is 0)."""
    discounted_rewards: Tensor
    """``[T, E, H]``: gamma^h r_h (for DiCE)."""
    values: Tensor
    """``[T, E, H]`` baseline predictions."""


def masked_task_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x [T, E, H]`` over each task's valid steps: ``[T]``."""
    return (x * mask).sum((1, 2)) / mask.sum((1, 2)).clamp_min(1.0)


def _map_fields(obj: Any, lead: tuple[int, ...], f: Callable[[Tensor], Tensor]) -> Any:
    """``obj`` (a dataclass, nested ones included) with ``f`` applied to every tensor field
    whose leading dimensions are ``lead``."""
    changed: dict[str, Any] = {}
    for fld in dataclasses.fields(obj):
        v = getattr(obj, fld.name)
        if dataclasses.is_dataclass(v):
            changed[fld.name] = _map_fields(v, lead, f)
        elif isinstance(v, Tensor) and tuple(v.shape[:len(lead)]) == lead:
            changed[fld.name] = f(v)
    return dataclasses.replace(obj, **changed)


@dataclass(frozen=True)
class _Scored:
    """One :meth:`RLBatch.outer_loss` forward: on which data, at which parameters (a
    copy), and the action distribution it gave (detached)."""

    data: Trajectories
    params: Params
    dist: ActionDist


def magic_box(x: Tensor) -> Tensor:
    """DiCE's operator: evaluates to 1, differentiates as d/dx exp(x)."""
    return torch.exp(x - x.detach())


class RLBatch:
    """A :class:`~metarl.types.TaskBatch` of T RL tasks.

    Args:
        policy: the policy, evaluated with per-task parameters.
        env: the batch of environments (T x E).
        tasks: T task specs.
        cfg: sampling and advantage settings.
        seed: seeds every sampling call; call i uses ``seed + i``, so a batch is
            reproducible and no two calls share action noise.
    """

    def __init__(self, policy: Policy, env: BatchEnv, tasks: Sequence[Mapping[str, Any]],
                 cfg: RLConfig, seed: int, baseline: LinearFeatureBaseline | None = None, *,
                 rows: tuple[int, int] | None = None) -> None:
        self.policy, self.env, self.tasks, self.cfg = policy, env, list(tasks), cfg
        self.n_tasks = len(self.tasks)
        self.rows = rows
        """``(offset, total)``: the tasks are rows ``offset ..`` of a meta-batch of ``total``
        split over processes; sampling gives them the trajectories they have in it."""
        self.seed = int(seed)
        self.calls = 0
        self.sample_seconds = 0.0  # wall time spent in the sampler, all calls together
        self.baseline = baseline or LinearFeatureBaseline()
        self._scored: _Scored | None = None  # the last outer_loss forward

    # data -----------------------------------------------------------------
    def sample(self, params: Params) -> Trajectories:
        """Sample with ``params`` (detached) and compute advantages."""
        t0 = time.perf_counter()
        roll = sample(self.policy, P.detach(params), self.env, self.tasks, self.cfg.rollouts,
                      self.cfg.horizon, self.seed + self.calls, rows=self.rows)
        self.sample_seconds += time.perf_counter() - t0
        self.calls += 1
        return self.process(roll)

    def process(self, roll: Rollouts) -> Trajectories:
        c = self.cfg
        ret = discounted_returns(roll.rewards, roll.mask, c.gamma)  # [T, E, H]
        values = self.baseline.fit_predict(roll.obs, ret, roll.mask).to(ret.dtype)  # [T, E, H]
        adv = gae(roll.rewards, values, roll.mask, c.gamma, c.gae_lambda)  # [T, E, H]
        if c.normalize_advantages:
            adv = normalize(adv, roll.mask)
        H = roll.rewards.shape[-1]
        disc = c.gamma ** torch.arange(H, device=ret.device, dtype=ret.dtype)  # [H]
        return Trajectories(roll, adv * roll.mask, roll.rewards * disc, values * disc * roll.mask)

    inner_data = sample
    outer_data = sample

    # losses ---------------------------------------------------------------
    def log_probs(self, params: Params, data: Trajectories) -> Tensor:
        r = data.rollouts
        return self.policy.dist(params, r.obs).log_prob(r.actions)  # [T, E, H]

    def inner_loss(self, params: Params, data: Trajectories) -> Tensor:
        """Per-task adaptation loss ``[T]``: minus the chosen policy-gradient surrogate.

        reinforce: ``-mean(log pi * A)``; lvc: ``-mean(pi / sg(pi) * A)``;
        dice (Foerster et al. 2018, with the baseline of Mao et al. 2019):
        ``-(sum_h box(sum_{h'<=h} log pi_h') g^h r_h + (1 - box(log pi_h)) g^h b_h) / n``.
        """
        r = data.rollouts
        logp = self.log_probs(params, data) * r.mask  # [T, E, H]
        est = self.cfg.estimator
        if est == "reinforce":
            return -masked_task_mean(logp * data.advantages, r.mask)
        if est == "lvc":
            return -masked_task_mean(magic_box(logp) * data.advantages, r.mask)
        # dice: returns are summed over time, so divide by the valid steps per task as the others
        deps = magic_box(logp.cumsum(-1))  # [T, E, H]
        base = (1.0 - magic_box(logp)) * data.values  # [T, E, H]
        total = (deps * data.discounted_rewards + base) * r.mask
        return -total.sum((1, 2)) / r.mask.sum((1, 2)).clamp_min(1.0)

    def outer_loss(self, params: Params, data: Trajectories) -> Tensor:
        """Per-task meta-objective ``[T]``: ``-mean(pi / pi_old * A)`` on post-adaptation
        trajectories (the importance-weighted surrogate of TRPO; its gradient at the
        sampling parameters is the policy gradient).

        The batch remembers this forward's distribution (detached, with a copy of
        ``params``): TRPO's line search scores its candidates against the distribution
        of the very parameters the meta-gradient scored, and :meth:`line_search_score`
        takes it from here instead of a second forward."""
        dist = self.policy.dist(params, data.rollouts.obs)
        self._scored = _Scored(data, {k: v.detach().clone() for k, v in params.items()},
                               dist.detach())
        return self._surrogate(dist.log_prob(data.rollouts.actions), data)

    def _remembered_dist(self, params: Params, data: Trajectories) -> ActionDist | None:
        """The distribution :meth:`outer_loss` computed last, if it was for ``data`` (the
        same object) and parameters equal to ``params`` in every element; else None."""
        m = self._scored
        if m is None or m.data is not data or m.params.keys() != params.keys():
            return None
        same = all(m.params[k].shape == v.shape and torch.equal(m.params[k], v)
                   for k, v in params.items())
        return m.dist if same else None

    @staticmethod
    def _surrogate(logp: Tensor, data: Trajectories) -> Tensor:
        r = data.rollouts
        ratio = torch.exp(logp - r.log_probs)  # [T, E, H]
        return -masked_task_mean(ratio * data.advantages, r.mask)

    def line_search_score(self, old: Params,
                          data: Trajectories) -> Callable[[Params], tuple[Tensor, Tensor]]:
        """``new -> (outer_loss(new, data), kl(old, new, data))``, each ``[T]``, with one
        policy forward per call: the old policy's distribution on ``data`` is computed
        here, once (TRPO's line search scores several candidates against the same old
        policy; after a meta-gradient it is the one its :meth:`outer_loss` computed at
        ``old``, so no forward at all). The numbers are those of the two separate calls,
        bit for bit."""
        r = data.rollouts
        old_dist = self._remembered_dist(old, data)
        if old_dist is None:
            with torch.no_grad():
                old_dist = self.policy.dist(old, r.obs)  # [T, E, H, ...]

        def score(new: Params) -> tuple[Tensor, Tensor]:
            dist = self.policy.dist(new, r.obs)
            kl = masked_task_mean(old_dist.kl(dist), r.mask)  # [T]
            return self._surrogate(dist.log_prob(r.actions), data), kl

        return score

    def subsample(self, data: Trajectories, share: float, by: str = "steps") -> Trajectories:
        """A share of the batch on which a loss, its Hessian or the KL estimates the full
        batch's (TRPO's Fisher-vector products), advantages kept as computed (baseline
        and normalisation) on the full batch.

        ``by="trajectories"``: the first ``n = max(1, ceil(share * E))`` trajectories of
        every task, every ``[T, E, ...]`` field sliced to ``[T, n, ...]`` (episodes of a
        task are exchangeable draws). ``by="steps"``: every trajectory, each on every
        s-th of its steps, ``s = floor(1 / share)``, trajectory e from step ``e mod s``
        on (staggered, so the kept steps cover every phase of an episode and no
        periodic gait aliases with the stride); ``[T, E, H, ...]`` fields become ``[T,
        E, ceil(H / s), ...]`` and the mask is 0 on the padding past H. A step-wise
        mean (the REINFORCE and LVC losses, the KL) then sums the same number of terms
        as the first ``share * E`` trajectories, but drawn from all E episodes rather
        than 10% of them, which is the variance that matters when steps within an
        episode are strongly correlated. DiCE's loss couples the steps of an
        episode (a cumulative sum over time) and takes ``by="trajectories"`` only.

        Raises:
            ValueError: ``share`` outside ``(0, 1]``, an unknown ``by``, or ``by="steps"``
                with the DiCE estimator.
        """
        if not 0 < share <= 1:
            raise ValueError(f"share of trajectories must be in (0, 1], got {share}")
        if by not in SUBSAMPLE_BY:
            raise ValueError(f"unknown subsample unit {by!r}: use one of {', '.join(SUBSAMPLE_BY)}")
        r = data.rollouts
        T, E, H = r.n_tasks, r.n_episodes, r.horizon
        if by == "trajectories":
            n = max(1, math.ceil(share * E - 1e-9))  # 1e-9: 0.1 * 20 is 2, not 3
            if n == E:
                return data
            return _map_fields(data, (T, E), lambda v: v[:, :n])
        if self.cfg.estimator == "dice":
            raise ValueError("DiCE's inner loss couples the steps of an episode: subsample it "
                             "by trajectories, not steps")
        s = max(1, math.floor(1 / share + 1e-9))  # 1e-9: 1 / 0.1 is 10, not 9
        if s == 1:
            return data
        dev = r.rewards.device
        es = torch.arange(E, device=dev)[:, None]  # [E, 1]
        hs = es % s + s * torch.arange(math.ceil(H / s), device=dev)  # [E, m]: step e mod s + s j
        valid = hs < H
        hs = hs.clamp_max(H - 1)
        out = _map_fields(data, (T, E, H), lambda v: v[:, es, hs])
        roll = dataclasses.replace(out.rollouts, mask=out.rollouts.mask * valid)
        return dataclasses.replace(out, rollouts=roll)

    def adaptation_kl(self, path: list[Params], phi: Params,
                      data: list[Trajectories]) -> Tensor:
        """``[T]``: sum over inner steps j of the mean KL(pi_path[j] || pi_path[j+1]) over the
        valid states of step j's trajectories ``data[j]`` (the last step ends at ``phi``),
        closed form and differentiable in both policies (the ``--inner-kl-penalty`` term;
        :meth:`kl` holds its old policy constant instead)."""
        if len(path) != len(data):
            raise ValueError(f"an adaptation of {len(path)} steps came with data for "
                             f"{len(data)}")
        terms = []
        for start, end, d in zip(path, [*path[1:], phi], data):  # over the k inner steps
            r = d.rollouts
            step = self.policy.dist(start, r.obs).kl(self.policy.dist(end, r.obs))  # [T, E, H]
            terms.append(masked_task_mean(step, r.mask))
        if not terms:  # no inner step: no move
            return next(iter(phi.values())).new_zeros(self.n_tasks)
        return torch.stack(terms).sum(0)

    def kl(self, old: Params, new: Params, data: Trajectories) -> Tensor:
        """Mean KL(pi_old || pi_new) over each task's valid steps: ``[T]``."""
        r = data.rollouts
        return masked_task_mean(self.policy.kl(old, new, r.obs), r.mask)

    def metric(self, params: Params, data: Trajectories) -> Tensor:
        """Average undiscounted return of the trajectories: ``[T]``."""
        return data.rollouts.mean_return()

    def extra_metrics(self, params: Params, data: Trajectories) -> dict[str, Tensor]:
        """Per-task rate ``[T]`` of episodes that raised each flag the environments report
        (:attr:`~metarl.rl.sampler.Rollouts.flags`, e.g. Meta-World's ``success``: the
        success rate); empty for environments that report none."""
        r = data.rollouts
        return {name: hit.to(r.rewards.dtype).mean(-1) for name, hit in r.flags.items()}
