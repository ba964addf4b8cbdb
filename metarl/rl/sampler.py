"""Batched trajectory sampling: all T tasks x E episodes step together.

:func:`sample` runs one loop over time steps; at each step the policy is
called once on ``[T, E, obs]`` with per-task parameters and the whole batch
of environments steps once. A :class:`BatchEnv` hides how the environments
step: :class:`metarl.envs.navigation.Navigation2DBatchEnv` as tensors on the
device, :class:`GymBatchEnv` as a list of plain Gymnasium environments on CPU.

Storage layout is ``[T, E, H, ...]`` (tasks, episodes, time steps).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import gymnasium
import numpy as np
import torch
from torch import Tensor

from metarl.rl.policies import Policy
from metarl.types import Params

__all__ = ["BatchEnv", "EnvSlots", "GymBatchEnv", "GymSlots", "ReportsStepFlags", "Rollouts",
           "SlotError", "SlotsBatchEnv", "sample"]

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
    flags: dict[str, Tensor] = field(default_factory=dict)
    """name -> ``[T, E]`` bool: the env (a :class:`ReportsStepFlags`) raised the flag at some
    step while the episode was alive, e.g. Meta-World's ``success``. Empty for other envs."""

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
                        conv(self.log_probs), {k: v.to(device) for k, v in self.flags.items()})


@runtime_checkable
class BatchEnv(Protocol):
    """``T x E`` environments that reset and step as one batch.

    Observations, rewards and done flags are torch tensors on the sampler's
    device. Once an episode is done it stays done until the next ``reset``
    (not stepped again, or stepped and ignored); the sampler masks it.
    Actions are passed unclipped; clipping to the action bounds happens in
    the env.

    An env that steps on the host may also define ``all_done() -> bool``: True
    once every episode has ended, known without reading a tensor. The sampler
    then stops early; for an env on the device it runs all ``H`` steps, since
    asking whether every episode ended would wait for the device at every step.
    """

    def reset(self, tasks: Sequence[Task], n_episodes: int, seed: int, *,
              offset: int = 0) -> Tensor:
        """Start ``n_episodes`` episodes of each task: obs ``[T, E, obs]``.
        ``seed`` makes random start states reproducible.

        ``offset``: the tasks are rows ``offset ..`` of a larger batch (a rank's share of
        a meta-batch), and each slot starts as it would in the whole batch; an env whose
        start states are deterministic ignores it. The sampler passes it only when it is
        not 0, so an env without it samples whole batches (one process) but not shares."""
        ...

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``actions [T, E, act]`` (or ``[T, E]`` long) -> obs ``[T, E, obs]``,
        reward ``[T, E]``, done ``[T, E]`` bool (terminated or truncated)."""
        ...


@runtime_checkable
class ReportsStepFlags(Protocol):
    """A :class:`BatchEnv` that also reports per-step event flags, such as Meta-World's
    ``info["success"]``. The sampler ORs each flag over the steps an episode was alive
    (:attr:`Rollouts.flags`), on the device: no host read per step."""

    def step_flags(self) -> dict[str, Tensor]:
        """The flags of the last :meth:`BatchEnv.step`: name -> ``[T, E]`` bool."""
        ...


class EnvSlots(Protocol):
    """``n`` environments stepped together in numpy: the *slots* of a sampling call.

    Slot ``i = t * E + e`` runs task ``t``. Once an episode is done it is not
    stepped again: its observation stays frozen and its reward is 0, until the
    next :meth:`reset`. :class:`GymSlots` steps plain Gymnasium environments one
    after the other; a family with batched physics provides its own (see
    :class:`metarl.envs.locomotion.LocomotionSlots`).
    """

    @property
    def action_space(self) -> gymnasium.Space[Any]:
        """The environments' action space (valid after a reset with at least one slot)."""
        ...

    def reset(self, tasks: Sequence[Task], seeds: Sequence[int]) -> np.ndarray:
        """Start slot ``k`` on ``tasks[k]`` with seed ``seeds[k]``: obs ``[n, obs]`` float64."""
        ...

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``actions [n, ...]`` -> obs ``[n, obs]`` float64, reward ``[n]``, done ``[n]`` bool."""
        ...

    def close(self) -> None:
        ...


class SlotError(Exception):
    """Raised by an :class:`EnvSlots` when the environment of local slot ``k`` raised;
    the environment's own exception is its ``__cause__``."""

    def __init__(self, k: int, error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.k = k


class GymSlots:
    """Plain Gymnasium environments as :class:`EnvSlots`, stepped one after the other.

    Environments are built lazily by ``make_env(task)`` and kept between
    resets. A slot whose task changed is rebuilt, unless ``task_option=True``:
    then the env is kept and the new task is passed as
    ``env.reset(options={"task": spec})`` (metarl's own families support this
    and it avoids rebuilding MuJoCo models).

    Args:
        make_env: builds the environment of one task, e.g.
            ``lambda task: gymnasium.make("Pendulum-v1", g=task["g"])``.
        task_option: switch tasks with ``reset(options={"task": spec})``.
    """

    def __init__(self, make_env: Callable[[Task], gymnasium.Env],
                 task_option: bool = False) -> None:
        self.make_env, self.task_option = make_env, task_option
        self.envs: list[gymnasium.Env] = []
        self.specs: list[Task] = []
        self.obs = np.zeros((0, 0))  # [n, obs] float64
        self.done = np.zeros(0, dtype=bool)  # [n]

    @property
    def action_space(self) -> gymnasium.Space[Any]:
        return self.envs[0].action_space

    def _env_for(self, k: int, task: Task) -> gymnasium.Env:
        """The env of slot ``k`` for ``task``: reused when possible, else (re)built."""
        if k < len(self.envs):
            if self.task_option or self.specs[k] == task:
                self.specs[k] = task
                return self.envs[k]
            self.envs[k].close()
            self.envs[k], self.specs[k] = self.make_env(task), task
        else:
            self.envs.append(self.make_env(task))
            self.specs.append(task)
        return self.envs[k]

    def reset(self, tasks: Sequence[Task], seeds: Sequence[int]) -> np.ndarray:
        n = len(tasks)
        for env in self.envs[n:]:
            env.close()
        del self.envs[n:], self.specs[n:]
        first = []
        for k, (task, seed) in enumerate(zip(tasks, seeds)):
            options = {"task": dict(task)} if self.task_option else None
            try:
                obs, _ = self._env_for(k, task).reset(seed=int(seed), options=options)
            except Exception as e:
                raise SlotError(k, e) from e
            first.append(np.asarray(obs, dtype=np.float64).reshape(-1))
        self._check_spaces()
        self.obs = np.stack(first) if first else np.zeros((0, 0))
        self.done = np.zeros(n, dtype=bool)
        return self.obs.copy()

    def _check_spaces(self) -> None:
        if not self.envs:
            return
        space0, obs0 = self.envs[0].action_space, self.envs[0].observation_space
        for env in self.envs[1:]:
            if env.action_space != space0 or env.observation_space.shape != obs0.shape:
                raise ValueError(
                    f"all environments must share their spaces; got action spaces {space0} and "
                    f"{env.action_space}, observation shapes {obs0.shape} and "
                    f"{env.observation_space.shape}: make_env must build one family")

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        discrete = isinstance(self.action_space, gymnasium.spaces.Discrete)
        reward = np.zeros(len(self.envs))  # [n]
        for k in np.flatnonzero(~self.done):
            try:
                obs, r, terminated, truncated, _ = self.envs[k].step(
                    int(actions[k]) if discrete else actions[k])
            except Exception as e:
                raise SlotError(int(k), e) from e
            self.obs[k] = np.asarray(obs, dtype=np.float64).reshape(-1)
            reward[k] = float(r)
            self.done[k] = bool(terminated or truncated)
        return self.obs.copy(), reward, self.done.copy()

    def close(self) -> None:
        for env in self.envs:
            env.close()
        self.envs, self.specs = [], []


_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


class SlotsBatchEnv:
    """``T x E`` :class:`EnvSlots` stepped in this process, behind the :class:`BatchEnv`
    interface.

    Slot ``i = t * E + e`` runs task ``t`` with the environment seed
    ``SeedSequence(seed).generate_state(T * E)[i]``. Each time step crosses
    between host and device once each way: the actions come to numpy in one
    copy (then cast to the action space's dtype and, for ``Box`` spaces,
    clipped to its bounds), and the observations, rewards and
    done flags go back in one copy, side by side in one ``[T * E, obs + 2]``
    array of the learner's dtype (from a pinned buffer, without waiting, on
    CUDA), split into three tensors on the device. An environment's exception
    reaches the caller as it was raised.
    :class:`metarl.rl.workers.WorkerBatchEnv` runs the same slots in worker
    processes.

    Args:
        make_slots: builds the :class:`EnvSlots` (once, at the first reset).
        device: where observations, rewards and done flags are returned.
        dtype: float dtype of observations and rewards.
        clip_actions: clip ``Box`` actions to the action space bounds before stepping
            (the sampler stores the unclipped ones).
    """

    def __init__(self, make_slots: Callable[[], EnvSlots], *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, clip_actions: bool = True) -> None:
        if dtype not in _NUMPY_DTYPES:
            raise TypeError(f"dtype {dtype} is not a float dtype: use torch.float32 or float64")
        self.make_slots = make_slots
        self.device, self.dtype = torch.device(device), dtype
        self.clip_actions = clip_actions
        self._local: EnvSlots | None = None
        self._space: gymnasium.Space[Any] | None = None
        self._tasks: list[dict[str, Any]] = []
        self._shape = (0, 0)
        self._seed = 0
        self._seeds: np.ndarray = np.zeros(0, dtype=np.uint32)  # [n] the slots' env seeds
        self._step = 0
        self._done = np.zeros(0, dtype=bool)  # [n] the slots' done flags, on the host
        self._pinned: Tensor | None = None  # CUDA: the staging buffer of the uploads
        self._pinned_np = np.zeros((0, 0))  # its numpy view
        self._copied: Any = None  # CUDA: event of the last upload from it, until waited for

    def reset(self, tasks: Sequence[Task], n_episodes: int, seed: int, *,
              offset: int = 0) -> Tensor:
        """Reset ``len(tasks) * n_episodes`` slots, each with its own seed derived from
        ``seed`` (``numpy.random.SeedSequence``): obs ``[T, E, obs]``. With ``offset``
        the tasks are rows ``offset ..`` of a larger batch and slot ``i`` takes the seed
        of slot ``offset * E + i`` of that batch."""
        if n_episodes < 1:
            raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        T, E = len(tasks), n_episodes
        self._tasks, self._shape, self._seed = [dict(t) for t in tasks], (T, E), int(seed)
        self._seeds = np.random.SeedSequence(int(seed)).generate_state(
            (offset + T) * E)[offset * E:]  # [n] uint32: a prefix of the whole batch's
        self._step = 0
        obs, self._space = self._reset_slots()  # [n, obs]
        if self._space is not None and not isinstance(
                self._space, (gymnasium.spaces.Box, gymnasium.spaces.Discrete)):
            raise TypeError(f"{type(self).__name__} supports Box and Discrete action spaces, got "
                            f"{self._space}")
        self._done = np.zeros(T * E, dtype=bool)
        return self._send(obs, np.zeros(T * E), self._done)[0]

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Step every slot whose episode is still running (see :class:`BatchEnv`)."""
        T, E = self._shape
        space = self._space
        if space is None:
            raise RuntimeError(f"{type(self).__name__}.step called before reset: call reset first")
        a = actions.detach().reshape(T * E, *actions.shape[2:]).cpu().numpy()  # [n, ...]: the
        # one device -> host copy of the step, in the learner's dtype (cast here, on the host);
        # it waits for the stream, so the last upload from the pinned buffer is done too
        self._copied = None
        if isinstance(space, gymnasium.spaces.Box):
            a = a.astype(space.dtype, copy=False)
            if self.clip_actions:
                a = np.clip(a, space.low, space.high)
        self._step += 1
        obs, reward, done = self._step_slots(a)
        self._done = np.asarray(done, dtype=bool)
        return self._send(obs, reward, self._done)

    def _send(self, obs: np.ndarray, reward: np.ndarray,
              done: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
        """``obs [n, obs]``, ``reward [n]`` and ``done [n]`` to the device in one copy, side
        by side in ``[n, obs + 2]``: obs ``[T, E, obs]``, reward ``[T, E]``, done ``[T, E]``."""
        T, E = self._shape
        n = T * E
        width = obs.shape[1] if obs.ndim == 2 else 0
        host = self._host_buffer(n, width + 2)  # [n, obs + 2] in the learner's dtype
        host[:, :width] = obs.reshape(n, width)
        host[:, width] = reward
        host[:, width + 1] = done
        out = self._upload(host)  # the one host -> device copy
        return (out[:, :width].reshape(T, E, width), out[:, width].reshape(T, E),
                (out[:, width + 1] > 0.5).reshape(T, E))

    def all_done(self) -> bool:
        """True once every slot's episode has ended (read from the host's flags: no
        device synchronisation). The sampler stops early on it."""
        return bool(self._done.all())

    def _slot_tasks(self) -> list[dict[str, Any]]:
        E = self._shape[1]
        return [self._tasks[i // E] for i in range(len(self._seeds))]

    def _reset_slots(self) -> tuple[np.ndarray, gymnasium.Space[Any] | None]:
        """Reset every slot: obs ``[n, obs]`` and the action space (None without slots)."""
        if self._local is None:
            self._local = self.make_slots()
        try:
            obs = self._local.reset(self._slot_tasks(), [int(s) for s in self._seeds])
        except SlotError as e:
            raise (e.__cause__ or e) from None
        return obs, (self._local.action_space if len(self._seeds) else None)

    def _step_slots(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        assert self._local is not None
        try:
            return self._local.step(a)
        except SlotError as e:
            raise (e.__cause__ or e) from None

    def _host_buffer(self, n: int, width: int) -> np.ndarray:
        """The host array ``[n, width]`` (learner dtype) that the next :meth:`_upload` sends.

        On CPU a fresh array each time (the tensors returned share its memory). On
        CUDA one pinned buffer, reused once the copy out of it has finished.
        """
        if self.device.type != "cuda":
            return np.empty((n, width), dtype=_NUMPY_DTYPES[self.dtype])
        if self._pinned is None or self._pinned.shape != (n, width):
            self._pinned = torch.empty((n, width), dtype=self.dtype, pin_memory=True)
            self._pinned_np = self._pinned.numpy()
            self._copied = None
        if self._copied is not None:  # an upload not yet waited for (a reset after a step)
            self._copied.synchronize()
            self._copied = None
        return self._pinned_np

    def _upload(self, host: np.ndarray) -> Tensor:
        """``host`` (from :meth:`_host_buffer`) as a tensor on the device, in one copy."""
        if self.device.type != "cuda":
            return torch.from_numpy(host).to(device=self.device)
        assert self._pinned is not None and host is self._pinned_np
        out = self._pinned.to(self.device, non_blocking=True)
        self._copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
        self._copied.record()
        return out

    def close(self) -> None:
        """Close the environments."""
        local, self._local = self._local, None
        if local is not None:
            local.close()


class GymBatchEnv(SlotsBatchEnv):
    """``T x E`` plain Gymnasium environments behind the :class:`BatchEnv` interface:
    :class:`GymSlots` stepped in this process by :class:`SlotsBatchEnv`.

    The environments step one after the other (the step call itself is a Python
    loop; everything around it is batched). Finished episodes are not stepped
    again. ``gymnasium.vector.SyncVectorEnv`` is not used: in every autoreset
    mode of Gymnasium 1.4 it steps (or resets) all sub-environments at every
    step, and it passes one ``options`` dict to all of them, not one task each.

    Args:
        make_env: builds an environment for one task spec (see :class:`GymSlots`).
        device, dtype, clip_actions: as :class:`SlotsBatchEnv`.
        task_option: switch tasks with ``reset(options={"task": spec})`` instead of
            rebuilding the environment.
    """

    def __init__(self, make_env: Callable[[Task], gymnasium.Env], *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 task_option: bool = False, clip_actions: bool = True) -> None:
        self.make_env = make_env
        super().__init__(functools.partial(GymSlots, make_env, task_option), device=device,
                         dtype=dtype, clip_actions=clip_actions)

    @property
    def envs(self) -> list[gymnasium.Env]:
        """The environments of the slots (empty before the first reset)."""
        return self._local.envs if isinstance(self._local, GymSlots) else []


def sample(policy: Policy, params_T: Params, env: BatchEnv, tasks: Sequence[Task],
           n_episodes: int, horizon: int, seed: int,
           rows: tuple[int, int] | None = None) -> Rollouts:
    """Sample ``n_episodes`` episodes of ``horizon`` steps for each task.

    One loop over time steps, nothing else: at each step one policy call on
    ``[T, E, obs]`` with task t's parameters for task t's episodes, one batched
    draw of actions from a ``torch.Generator`` seeded with ``seed`` on the
    parameters' device, one batched env step. Nothing is read back to the host
    (an env on the device runs without a synchronisation per step). Runs under
    ``torch.no_grad``; stops early once every episode has ended if the env
    knows that on the host (``all_done``, see :class:`BatchEnv`), and otherwise
    runs all ``H`` steps, with the same result. The same ``seed`` (with the
    same parameters and env) gives identical trajectories.

    Args:
        policy: the policy (e.g. :class:`metarl.rl.policies.GaussianMLPPolicy`).
        params_T: per-task parameters, every leaf ``[T, *shape]``.
        env: the batch of environments.
        tasks: ``T`` task specs, one per row of ``params_T``.
        n_episodes: episodes per task ``E`` (>= 1).
        horizon: steps per episode ``H`` (>= 1); episodes still running are truncated.
        seed: seeds the action noise and the environments' resets.
        rows: ``(offset, total)``: these tasks are rows ``offset ..`` of a batch of
            ``total`` (a rank's share of a meta-batch); the action noise and the start
            states are those of these rows in the whole batch, so a task's trajectories do
            not depend on how the batch is split. None: the whole batch.

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
        offset, total = rows if rows is not None else (0, T)
        whole = (offset, total) == (0, T)  # else a share: noise and starts as in the whole batch
        obs = (env.reset(tasks, E, seed) if whole else
               # [T, E, obs]
               _reset_share(env, tasks, E, seed, offset)).to(device=device, dtype=dtype)
        alive = torch.ones(T, E, dtype=torch.bool, device=device)  # [T, E]
        obs_buf = torch.zeros(T, E, H, obs.shape[-1], dtype=dtype, device=device)  # [T, E, H, obs]
        rew_buf = torch.zeros(T, E, H, dtype=dtype, device=device)  # [T, E, H]
        mask_buf = torch.zeros(T, E, H, dtype=dtype, device=device)  # [T, E, H]
        logp_buf = torch.zeros(T, E, H, dtype=dtype, device=device)  # [T, E, H]
        act_buf: Tensor | None = None  # [T, E, H, act] or [T, E, H], allocated at the first step
        flag_env = env if isinstance(env, ReportsStepFlags) else None
        flags: dict[str, Tensor] = {}  # name -> [T, E] bool, see Rollouts.flags
        all_done = getattr(env, "all_done", None)  # host envs: stop early without a device read
        for h in range(H):
            dist = policy.dist(params_T, obs)
            # [T, E, ...]
            act = dist.sample(gen) if whole else dist.sample(gen, rows=(offset, total))
            if act_buf is None:
                act_buf = torch.zeros(T, E, H, *act.shape[2:], dtype=act.dtype, device=device)
            obs_buf[:, :, h] = obs
            act_buf[:, :, h] = act
            logp_buf[:, :, h] = dist.log_prob(act)
            mask_buf[:, :, h] = alive
            obs, reward, done = env.step(act)
            step_flags = flag_env.step_flags() if flag_env is not None else {}
            for name, flag in step_flags.items():  # [T, E] bool each
                hit = flag.to(device) & alive
                flags[name] = flags[name] | hit if name in flags else hit
            obs = obs.to(device=device, dtype=dtype)
            rew_buf[:, :, h] = reward.to(device=device, dtype=dtype) * alive
            alive = alive & ~done.to(device)
            if all_done is not None and all_done():
                break
        assert act_buf is not None  # internal invariant: H >= 1 was checked above
        # steps after every episode ended are all zeros, as if the loop had stopped there
        live = mask_buf.flatten(0, 1).amax(0) > 0  # [H]
        obs_buf *= live.view(1, 1, H, 1)
        logp_buf *= live
        act_buf = torch.where(live.view(1, 1, H, *([1] * (act_buf.dim() - 3))), act_buf,
                              torch.zeros((), dtype=act_buf.dtype, device=device))
    return Rollouts(obs=obs_buf, actions=act_buf, rewards=rew_buf, mask=mask_buf,
                    log_probs=logp_buf, flags=flags)


def _reset_share(env: BatchEnv, tasks: Sequence[Task], n_episodes: int, seed: int,
                offset: int) -> Tensor:
    """``env.reset(..., offset=offset)``: the tasks are rows ``offset ..`` of a larger batch.

    Raises:
        TypeError: ``env.reset`` takes no ``offset`` (an env written for one process).
    """
    try:
        params = inspect.signature(env.reset).parameters.values()
    except (TypeError, ValueError):  # not introspectable: the call itself will tell
        return env.reset(tasks, n_episodes, seed, offset=offset)
    if not any(p.name == "offset" or p.kind is p.VAR_KEYWORD for p in params):
        raise TypeError(f"{type(env).__name__}.reset takes no keyword offset, which sampling "
                        f"a share of a batch (tasks from row {offset}) needs: add "
                        "`*, offset: int = 0` to reset (an env with deterministic start "
                        "states ignores it), or sample with one process")
    return env.reset(tasks, n_episodes, seed, offset=offset)


class NormalizedActions:
    """A :class:`BatchEnv` whose actions are in ``[-1, 1]`` units, mapped linearly onto the
    wrapped env's Box ``[low, high]`` (rllab's ``normalize`` convention, used by the MAML
    paper's experiments): a policy with std 1 then explores the whole box instead of
    saturating its bounds. The env still clips what lands outside."""

    def __init__(self, env: BatchEnv, low: Tensor | np.ndarray, high: Tensor | np.ndarray) -> None:
        self.env = env
        # kept in float64 on the host (exact for a float32 Box); bounds() converts once
        self.low = torch.as_tensor(np.asarray(low, dtype=np.float64))
        self.high = torch.as_tensor(np.asarray(high, dtype=np.float64))
        self._bounds: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def reset(self, tasks: Sequence[Task], n_episodes: int, seed: int, *,
              offset: int = 0) -> Tensor:
        if offset:
            return _reset_share(self.env, tasks, n_episodes, seed, offset)
        return self.env.reset(tasks, n_episodes, seed)

    def bounds(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(low, 0.5 * (high - low))`` on ``device`` in ``dtype``, copied there once."""
        key = (device, dtype)
        if key not in self._bounds:
            low = self.low.to(device=device, dtype=dtype)
            self._bounds[key] = (low, 0.5 * (self.high.to(device=device, dtype=dtype) - low))
        return self._bounds[key]

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        low, half_range = self.bounds(actions.device, actions.dtype)
        return self.env.step(low + (actions + 1.0) * half_range)

    def all_done(self) -> bool:
        """The wrapped env's :meth:`SlotsBatchEnv.all_done`; False if it has none."""
        all_done = getattr(self.env, "all_done", None)
        return bool(all_done()) if all_done is not None else False

    def close(self) -> None:
        close = getattr(self.env, "close", None)
        if close is not None:
            close()
