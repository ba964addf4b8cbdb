"""Batched trajectory sampling: all T tasks x E episodes step together.

:func:`sample` runs one loop over time steps; at each step the policy is
called once on ``[T, E, obs]`` with per-task parameters and the whole batch
of environments steps once. A :class:`BatchEnv` hides how the environments
step: :class:`metarl.envs.navigation.Navigation2DBatchEnv` as tensors on the
device, :class:`GymBatchEnv` as a list of plain Gymnasium environments on CPU.

Storage layout is ``[T, E, H, ...]`` (tasks, episodes, time steps).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import gymnasium
import numpy as np
import torch
from torch import Tensor

from metarl.rl.policies import Policy
from metarl.types import Params

__all__ = ["BatchEnv", "GymBatchEnv", "Rollouts", "sample"]

Task = Mapping[str, Any]


@dataclass
class Rollouts:
    """Trajectories of ``E`` episodes for each of ``T`` tasks, ``H`` steps long.

    Steps after an episode ended (``mask == 0``) hold whatever the env returned
    (a frozen observation) and the action the policy sampled there; their
    reward is 0. If every episode ended before ``H``, the remaining steps are
    all zeros. Use these fields only under ``mask``. Everything is detached.
    """

    obs: Tensor
    """``[T, E, H, obs]`` the observation each action was taken in."""
    actions: Tensor
    """``[T, E, H, act]`` float (unclipped samples) or ``[T, E, H]`` long (discrete)."""
    rewards: Tensor
    """``[T, E, H]``, 0 where ``mask`` is 0."""
    mask: Tensor
    """``[T, E, H]`` float: 1.0 for steps taken while the episode was alive, else 0.0."""
    log_probs: Tensor
    """``[T, E, H]`` log pi(a|o) under the sampling parameters."""

    @property
    def n_tasks(self) -> int:
        return self.rewards.shape[0]

    @property
    def n_episodes(self) -> int:
        return self.rewards.shape[1]

    @property
    def horizon(self) -> int:
        return self.rewards.shape[2]

    def returns(self) -> Tensor:
        """Undiscounted return of each episode: ``[T, E]``."""
        return (self.rewards * self.mask).sum(-1)

    def mean_return(self) -> Tensor:
        """Average episode return of each task: ``[T]``."""
        return self.returns().mean(-1)

    def lengths(self) -> Tensor:
        """Number of valid steps of each episode: ``[T, E]``."""
        return self.mask.sum(-1)

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> Rollouts:
        """Move to ``device``; ``dtype`` converts the float fields (not long actions)."""
        def conv(x: Tensor) -> Tensor:
            return x.to(device=device, dtype=dtype if x.is_floating_point() else None)
        return Rollouts(conv(self.obs), conv(self.actions), conv(self.rewards), conv(self.mask),
                        conv(self.log_probs))


@runtime_checkable
class BatchEnv(Protocol):
    """``T x E`` environments that reset and step as one batch.

    Observations, rewards and done flags are torch tensors on the sampler's
    device. Once an episode is done it stays done until the next ``reset``
    (not stepped again, or stepped and ignored); the sampler masks it.
    Actions are passed unclipped; clipping to the action bounds happens in
    the env.
    """

    def reset(self, tasks: Sequence[Task], n_episodes: int, seed: int) -> Tensor:
        """Start ``n_episodes`` episodes of each task: obs ``[T, E, obs]``.
        ``seed`` makes random start states reproducible."""
        ...

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``actions [T, E, act]`` (or ``[T, E]`` long) -> obs ``[T, E, obs]``,
        reward ``[T, E]``, done ``[T, E]`` bool (terminated or truncated)."""
        ...


class GymBatchEnv:
    """``T x E`` plain Gymnasium environments behind the :class:`BatchEnv` interface.

    The environments step one after the other in this process (the step call
    itself is a Python loop; everything around it is batched): actions go
    device -> numpy once per time step, observations, rewards and done flags
    come back as one array each. Finished episodes are not stepped again.
    ``gymnasium.vector.SyncVectorEnv`` is not used: in every autoreset mode of
    Gymnasium 1.4 it steps (or resets) all sub-environments at every step, and
    it passes one ``options`` dict to all of them, not one task each.

    Environments are built lazily by ``make_env(task)`` and kept between
    resets; slot ``i = t * E + e`` runs task ``t``. A slot whose task changed
    is rebuilt, unless ``task_option=True``: then the env is kept and the new
    task is passed as ``env.reset(options={"task": spec})`` (metarl's own
    families support this and it avoids rebuilding MuJoCo models).

    Args:
        make_env: builds an environment for one task spec, e.g.
            ``lambda task: gymnasium.make("Pendulum-v1", g=task["g"])``.
        device: where observations, rewards and done flags are returned.
        dtype: float dtype of observations and rewards.
        task_option: switch tasks with ``reset(options={"task": spec})``.
        clip_actions: clip ``Box`` actions to the action space bounds before
            ``env.step`` (the sampler stores the unclipped ones).
    """

    def __init__(self, make_env: Callable[[Task], gymnasium.Env], *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 task_option: bool = False, clip_actions: bool = True) -> None:
        self.make_env = make_env
        self.device = torch.device(device)
        self.dtype = dtype
        self.task_option = task_option
        self.clip_actions = clip_actions
        self.envs: list[gymnasium.Env] = []
        self._specs: list[Task] = []
        self._shape: tuple[int, int] = (0, 0)
        self._obs = np.zeros((0, 0))  # [T*E, obs] float64
        self._done = np.zeros(0, dtype=bool)  # [T*E]

    def _env_for(self, i: int, task: Task) -> gymnasium.Env:
        """The env of slot ``i`` for ``task``: reused when possible, else (re)built."""
        if i < len(self.envs):
            if self.task_option or self._specs[i] == task:
                self._specs[i] = task
                return self.envs[i]
            self.envs[i].close()
            self.envs[i], self._specs[i] = self.make_env(task), task
        else:
            self.envs.append(self.make_env(task))
            self._specs.append(task)
        return self.envs[i]

    def reset(self, tasks: Sequence[Task], n_episodes: int, seed: int) -> Tensor:
        """Reset ``len(tasks) * n_episodes`` envs, env ``i`` with its own seed
        derived from ``seed`` (``numpy.random.SeedSequence``): obs ``[T, E, obs]``."""
        if n_episodes < 1:
            raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        T, E = len(tasks), n_episodes
        n = T * E
        for env in self.envs[n:]:
            env.close()
        del self.envs[n:], self._specs[n:]
        seeds = np.random.SeedSequence(int(seed)).generate_state(n)  # [n] uint32
        first: list[np.ndarray] = []
        for i in range(n):
            env = self._env_for(i, tasks[i // E])
            options = {"task": dict(tasks[i // E])} if self.task_option else None
            obs, _ = env.reset(seed=int(seeds[i]), options=options)
            first.append(np.asarray(obs, dtype=np.float64).reshape(-1))
        self._check_spaces()
        self._shape = (T, E)
        self._obs = np.stack(first) if n else np.zeros((0, 0))  # [n, obs]
        self._done = np.zeros(n, dtype=bool)
        return self._to_torch(self._obs).reshape(T, E, -1)

    def _check_spaces(self) -> None:
        if not self.envs:
            return
        space0 = self.envs[0].action_space
        if not isinstance(space0, (gymnasium.spaces.Box, gymnasium.spaces.Discrete)):
            raise TypeError(f"GymBatchEnv supports Box and Discrete action spaces, got {space0}")
        obs0 = self.envs[0].observation_space
        for env in self.envs[1:]:
            if env.action_space != space0 or env.observation_space.shape != obs0.shape:
                raise ValueError(
                    f"all environments must share their spaces; got action spaces {space0} and "
                    f"{env.action_space}, observation shapes {obs0.shape} and "
                    f"{env.observation_space.shape}: make_env must build one family")

    def _to_torch(self, x: np.ndarray) -> Tensor:
        return torch.from_numpy(x).to(device=self.device, dtype=self.dtype)

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Step every env whose episode is still running (see :class:`BatchEnv`)."""
        T, E = self._shape
        if not self.envs:
            raise RuntimeError("GymBatchEnv.step called before reset: call reset first")
        space = self.envs[0].action_space
        a = actions.detach().reshape(T * E, *actions.shape[2:]).cpu().numpy()  # [n, ...]
        if isinstance(space, gymnasium.spaces.Box):
            a = a.astype(space.dtype, copy=False)
            if self.clip_actions:
                a = np.clip(a, space.low, space.high)
        reward = np.zeros(T * E)  # [n]
        for i in np.flatnonzero(~self._done):
            act = int(a[i]) if isinstance(space, gymnasium.spaces.Discrete) else a[i]
            obs, r, terminated, truncated, _ = self.envs[i].step(act)
            self._obs[i] = np.asarray(obs, dtype=np.float64).reshape(-1)
            reward[i] = float(r)
            self._done[i] = bool(terminated or truncated)
        obs_t = self._to_torch(self._obs).reshape(T, E, -1)  # [T, E, obs]
        reward_t = self._to_torch(reward).reshape(T, E)  # [T, E]
        done_t = torch.from_numpy(self._done.copy()).to(self.device).reshape(T, E)  # [T, E]
        return obs_t, reward_t, done_t

    def close(self) -> None:
        for env in self.envs:
            env.close()
        self.envs, self._specs = [], []


def sample(policy: Policy, params_T: Params, env: BatchEnv, tasks: Sequence[Task],
           n_episodes: int, horizon: int, seed: int) -> Rollouts:
    """Sample ``n_episodes`` episodes of ``horizon`` steps for each task.

    One loop over time steps, nothing else: at each step one policy call on
    ``[T, E, obs]`` with task t's parameters for task t's episodes, one batched
    draw of actions from a ``torch.Generator`` seeded with ``seed`` on the
    parameters' device, one batched env step. Runs under ``torch.no_grad``;
    stops early once every episode has ended. The same ``seed`` (with the same
    parameters and env) gives identical trajectories.

    Args:
        policy: the policy (e.g. :class:`metarl.rl.policies.GaussianMLPPolicy`).
        params_T: per-task parameters, every leaf ``[T, *shape]``.
        env: the batch of environments.
        tasks: ``T`` task specs, one per row of ``params_T``.
        n_episodes: episodes per task ``E`` (>= 1).
        horizon: steps per episode ``H`` (>= 1); episodes still running are truncated.
        seed: seeds the action noise and the environments' resets.

    Returns:
        :class:`Rollouts` with ``[T, E, H, ...]`` tensors on the parameters' device.
    """
    T, E, H = len(tasks), n_episodes, horizon
    first = next(iter(params_T.values()))
    if first.shape[0] != T:
        raise ValueError(f"params_T has {first.shape[0]} tasks but {T} task specs were given: "
                         "expand the parameters to one row per task")
    if E < 1 or H < 1:
        raise ValueError(f"n_episodes and horizon must be >= 1, got {E} and {H}")
    device, dtype = first.device, first.dtype
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    with torch.no_grad():
        obs = env.reset(tasks, E, seed).to(device=device, dtype=dtype)  # [T, E, obs]
        alive = torch.ones(T, E, dtype=torch.bool, device=device)  # [T, E]
        obs_buf = torch.zeros(T, E, H, obs.shape[-1], dtype=dtype, device=device)  # [T, E, H, obs]
        rew_buf = torch.zeros(T, E, H, dtype=dtype, device=device)  # [T, E, H]
        mask_buf = torch.zeros(T, E, H, dtype=dtype, device=device)  # [T, E, H]
        logp_buf = torch.zeros(T, E, H, dtype=dtype, device=device)  # [T, E, H]
        act_buf: Tensor | None = None  # [T, E, H, act] or [T, E, H], allocated at the first step
        for h in range(H):
            dist = policy.dist(params_T, obs)
            act = dist.sample(gen)  # [T, E, act] or [T, E]
            if act_buf is None:
                act_buf = torch.zeros(T, E, H, *act.shape[2:], dtype=act.dtype, device=device)
            obs_buf[:, :, h] = obs
            act_buf[:, :, h] = act
            logp_buf[:, :, h] = dist.log_prob(act)
            mask_buf[:, :, h] = alive
            obs, reward, done = env.step(act)
            obs = obs.to(device=device, dtype=dtype)
            rew_buf[:, :, h] = reward.to(device=device, dtype=dtype) * alive
            alive = alive & ~done.to(device)
            if not bool(alive.any()):
                break
    assert act_buf is not None  # internal invariant: H >= 1 was checked above
    return Rollouts(obs=obs_buf, actions=act_buf, rewards=rew_buf, mask=mask_buf,
                    log_probs=logp_buf)


class NormalizedActions:
    """A :class:`BatchEnv` whose actions are in ``[-1, 1]`` units, mapped linearly onto the
    wrapped env's Box ``[low, high]`` (rllab's ``normalize`` convention, used by the MAML
    paper's experiments): a policy with std 1 then explores the whole box instead of
    saturating its bounds. The env still clips what lands outside."""

    def __init__(self, env: BatchEnv, low: Tensor, high: Tensor) -> None:
        self.env, self.low, self.high = env, low, high

    def reset(self, tasks: Sequence[Task], n_episodes: int, seed: int) -> Tensor:
        return self.env.reset(tasks, n_episodes, seed)

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        low = self.low.to(actions.device, actions.dtype)
        high = self.high.to(actions.device, actions.dtype)
        return self.env.step(low + (actions + 1.0) * 0.5 * (high - low))

    def close(self) -> None:
        close = getattr(self.env, "close", None)
        if close is not None:
            close()
