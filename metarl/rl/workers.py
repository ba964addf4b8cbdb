"""Environment slots stepped in this process or in worker processes, for machines with many cores.

The ``T * E`` environments of a sampling call are *slots*: slot ``i = t * E + e``
runs task ``t`` with the environment seed ``SeedSequence(seed).generate_state(T * E)[i]``,
as in :class:`~metarl.rl.sampler.GymBatchEnv`. An :class:`EnvSlots` steps a
share of them in numpy; :class:`WorkerBatchEnv` is the
:class:`~metarl.rl.sampler.BatchEnv` that runs one share in this process
(``workers=0``) or splits the slots into contiguous shares, one per worker
process of Gymnasium's :class:`gymnasium.vector.AsyncVectorEnv` (whose
sub-environments are :class:`EnvSlice` objects, each holding an
:class:`EnvSlots`). One message per worker and time step carries all its
environments. The policy is never in the workers: the sampler computes the
actions of every slot in one batched call on the learner's device.

On a small machine one process is faster (inter-process traffic costs more
than it saves: ``metarl bench --section locomotion`` measures both); use
workers when there are spare cores. Workers start with the ``spawn`` method,
safe when the parent holds a CUDA context (``fork`` is not). Actions are cast
and clipped in the parent and every share steps the same code, so the same
seed gives the same trajectories whatever the number of workers. An
environment that raises, or a worker that dies, stops the call with a
:class:`WorkerError` that names the task and seed.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing.connection
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import gymnasium
import numpy as np
import torch
from gymnasium.vector import AsyncVectorEnv
from torch import Tensor

from metarl.types import ConfigError

__all__ = ["EnvSlice", "EnvSlots", "GymSlots", "SlotError", "WorkerBatchEnv", "WorkerError",
           "split_slots"]

log = logging.getLogger(__name__)

Task = Mapping[str, Any]


class EnvSlots(Protocol):
    """``n`` environments stepped together in numpy (one worker's share of the slots).

    Once an episode is done it is not stepped again: its observation stays
    frozen and its reward is 0, until the next :meth:`reset`.
    """

    action_space: gymnasium.Space
    """The environments' action space (valid after a reset with at least one slot)."""

    def reset(self, tasks: Sequence[Task], seeds: Sequence[int]) -> np.ndarray:
        """Start slot ``k`` on ``tasks[k]`` with seed ``seeds[k]``: obs ``[n, obs]`` float64."""
        ...

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``actions [n, ...]`` -> obs ``[n, obs]`` float64, reward ``[n]``, done ``[n]`` bool."""
        ...

    def close(self) -> None:
        ...


class SlotError(Exception):
    """Raised by an :class:`EnvSlots` when the environment of local slot ``k`` raised."""

    def __init__(self, k: int, error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.k = k


class GymSlots:
    """Plain Gymnasium environments as :class:`EnvSlots`, stepped one after the other
    (what :class:`~metarl.rl.sampler.GymBatchEnv` does, in numpy).

    Args:
        make_env: builds the environment of one task; environments are kept between
            resets and rebuilt when a slot's task changes.
    """

    def __init__(self, make_env: Callable[[Task], gymnasium.Env]) -> None:
        self.make_env = make_env
        self.envs: list[gymnasium.Env] = []
        self.specs: list[Task] = []
        self.obs = np.zeros((0, 0))  # [n, obs] float64
        self.done = np.zeros(0, dtype=bool)  # [n]

    @property
    def action_space(self) -> gymnasium.Space:
        return self.envs[0].action_space

    def _env_for(self, k: int, task: Task) -> gymnasium.Env:
        if k < len(self.envs):
            if self.specs[k] == task:
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
            try:
                obs, _ = self._env_for(k, task).reset(seed=int(seed))
            except Exception as e:
                raise SlotError(k, e) from e
            first.append(np.asarray(obs, dtype=np.float64).reshape(-1))
        self.obs = np.stack(first) if first else np.zeros((0, 0))
        self.done = np.zeros(n, dtype=bool)
        return self.obs.copy()

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


class WorkerError(ConfigError):
    """An environment raised in a worker, or a worker process died.

    A :class:`~metarl.types.ConfigError`, so that the command line prints it as
    one line; the message names the slot's task, episode and seed.
    """


@dataclass(frozen=True)
class SlotFailure:
    """What a worker sends back instead of a result when its environments raised."""

    slot: int | None
    """Global slot index ``t * E + e`` of the environment that raised; None: unknown."""
    error: str
    """``ExceptionType: message``."""
    traceback: str


def split_slots(n: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` ranges of ``n`` slots, one per worker, sizes differing by
    at most one."""
    return [(w * n // workers, (w + 1) * n // workers) for w in range(workers)]


class EnvSlice(gymnasium.Env):
    """One worker's share of the slots: a sub-environment of ``AsyncVectorEnv`` driven
    through ``call("slots_reset", ...)`` and ``call("slots_step", ...)``.

    Its own ``reset`` and ``step`` are not used; the spaces are placeholders that
    ``AsyncVectorEnv`` compares between workers. Exceptions are sent back as a
    :class:`SlotFailure` (the worker stays up) instead of ending the worker.

    Args:
        make_slots: builds this worker's :class:`EnvSlots` (pickled to the worker).
        index: this worker's index in the vector env.
    """

    observation_space = gymnasium.spaces.Box(0.0, 1.0, shape=(1,))
    action_space = gymnasium.spaces.Box(0.0, 1.0, shape=(1,))

    def __init__(self, make_slots: Callable[[], EnvSlots], index: int) -> None:
        self.make_slots, self.index = make_slots, index
        self.slots: EnvSlots | None = None
        self.start = self.end = 0

    def slots_reset(self, tasks: Sequence[Task], n_episodes: int, seeds: np.ndarray,
                    bounds: Sequence[tuple[int, int]]
                    ) -> tuple[np.ndarray, gymnasium.Space | None] | SlotFailure:
        """Reset this worker's slots ``bounds[index]`` (slot ``i`` runs ``tasks[i // E]``
        with ``seeds[i]``): obs ``[n_w, obs]`` and the action space (None without slots)."""
        start, end = bounds[self.index]
        self.start, self.end = start, end
        try:
            if self.slots is None:
                self.slots = self.make_slots()
            obs = self.slots.reset([tasks[i // n_episodes] for i in range(start, end)],
                                   [int(s) for s in seeds[start:end]])
        except Exception as e:
            return self._failure(e)
        return obs, (self.slots.action_space if end > start else None)

    def slots_step(self, actions: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | SlotFailure:
        """Step this worker's slots with their rows of ``actions [n, ...]`` (all slots'
        actions, already cast and clipped)."""
        assert self.slots is not None  # the parent resets before it steps
        if self.end == self.start:  # fewer slots than workers
            return np.zeros((0, 0)), np.zeros(0), np.zeros(0, dtype=bool)
        try:
            return self.slots.step(actions[self.start:self.end])
        except Exception as e:
            return self._failure(e)

    def _failure(self, e: Exception) -> SlotFailure:
        slot = self.start + e.k if isinstance(e, SlotError) else None
        cause = e.__cause__ if isinstance(e, SlotError) and e.__cause__ is not None else e
        return SlotFailure(slot, f"{type(cause).__name__}: {cause}", traceback.format_exc())

    def close(self) -> None:
        if self.slots is not None:
            self.slots.close()


class WorkerBatchEnv:
    """``T x E`` environment slots behind the :class:`~metarl.rl.sampler.BatchEnv`
    interface, stepped in this process (``workers=0``) or in ``workers`` processes.

    Same contract and, for :class:`GymSlots`, the same trajectories as
    :class:`~metarl.rl.sampler.GymBatchEnv`. The worker processes start at the
    first :meth:`reset` (``spawn`` method) and live until :meth:`close`;
    ``make_slots`` is pickled to them, so it must be importable there (e.g.
    ``functools.partial`` of a module-level class, or a family's
    :meth:`~metarl.rl.family.RLFamily.slots_factory`).

    Args:
        make_slots: builds an :class:`EnvSlots` (called once per worker, or once here).
        workers: 0 steps every slot in this process; N > 0 in N worker processes.
        device: where observations, rewards and done flags are returned.
        dtype: float dtype of observations and rewards.
        clip_actions: clip ``Box`` actions to the action space bounds before stepping.
        context: multiprocessing start method, ``"spawn"`` or ``"forkserver"``
            (both safe with a CUDA learner in the parent).

    Raises:
        WorkerError: from :meth:`reset` and :meth:`step` with workers, when an
            environment raises or a worker dies. After a death every worker is
            stopped, and the next :meth:`reset` starts new ones.
    """

    def __init__(self, make_slots: Callable[[], EnvSlots], workers: int = 0, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 clip_actions: bool = True, context: str = "spawn") -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if context not in ("spawn", "forkserver"):
            raise ValueError(f"context {context!r} is not safe with a CUDA parent: use 'spawn' "
                             "or 'forkserver'")
        self.make_slots, self.workers, self.context = make_slots, workers, context
        self.device, self.dtype = torch.device(device), dtype
        self.clip_actions = clip_actions
        self._local: EnvSlots | None = None
        self._vec: AsyncVectorEnv | None = None
        self._space: gymnasium.Space | None = None
        self._tasks: list[dict[str, Any]] = []
        self._shape = (0, 0)
        self._seed = 0
        self._seeds = np.zeros(0, dtype=np.uint32)
        self._bounds: list[tuple[int, int]] = []
        self._step = 0

    # --- workers ---------------------------------------------------------------
    def _start(self) -> AsyncVectorEnv:
        if self._vec is None:
            fns = [functools.partial(EnvSlice, self.make_slots, w) for w in range(self.workers)]
            try:
                self._vec = AsyncVectorEnv(fns, shared_memory=False, context=self.context,
                                           daemon=True)
            except (EOFError, OSError) as e:
                raise WorkerError(f"{self.workers} worker processes failed to start "
                                  f"({type(e).__name__}): make_slots must be picklable and "
                                  "importable in a fresh process, and a script that samples "
                                  "with workers needs an `if __name__ == '__main__':` guard"
                                  ) from e
        return self._vec

    def _call(self, name: str, *args: Any, what: str) -> list[Any]:
        """``call`` every worker; WorkerError on a failure or a dead worker."""
        vec = self._start()
        try:
            results = list(vec.call(name, *args))
        except (EOFError, OSError) as e:
            ended = multiprocessing.connection.wait([p.sentinel for p in vec.processes],
                                                    timeout=10)  # the one that closed its pipe
            dead = [w for w, p in enumerate(vec.processes) if p.sentinel in ended]
            for w in dead:
                vec.processes[w].join(timeout=5)  # reap it: its exit code
            dead_codes = [(w, vec.processes[w].exitcode) for w in dead]
            self._shutdown()
            w, code = dead_codes[0] if dead_codes else (None, None)
            raise WorkerError(f"worker {w} died (exit code {code}, {type(e).__name__}) {what}"
                              f"{self._describe_share(w)}: run with workers=0 to debug the "
                              "environment in this process") from None
        except Exception as e:
            self._shutdown()
            raise WorkerError(f"a worker failed {what}: {type(e).__name__}: {e}") from e
        for w, r in enumerate(results):
            if isinstance(r, SlotFailure):
                log.debug("traceback from worker %d:\n%s", w, r.traceback)
                raise WorkerError(f"{self._describe_slot(r.slot, w)} raised {r.error} {what} in "
                                  f"worker {w}: run with workers=0 to debug it in this process")
        return results

    def _describe_slot(self, slot: int | None, w: int) -> str:
        if slot is None:
            return f"an environment{self._describe_share(w)}"
        t, e = divmod(slot, self._shape[1])
        return (f"the environment of task {self._tasks[t]} (episode {e}, env seed "
                f"{int(self._seeds[slot])}, sampler seed {self._seed})")

    def _describe_share(self, w: int | None) -> str:
        if w is None or not self._bounds or self._bounds[w][1] <= self._bounds[w][0]:
            return ""
        start, end = self._bounds[w]
        E = self._shape[1]
        tasks = self._tasks[start // E:(end - 1) // E + 1]
        shown = ", ".join(map(str, tasks[:3])) + (f" and {len(tasks) - 3} more" if len(tasks) > 3
                                                  else "")
        return (f" while running slots {start}..{end - 1} (tasks {shown}; env seeds from "
                f"SeedSequence({self._seed}))")

    def _shutdown(self) -> None:
        """Stop every worker now (no handshake: one may be dead) and forget the vector env."""
        vec, self._vec = self._vec, None
        if vec is None:
            return
        for p in vec.processes:
            if p.is_alive():
                p.terminate()
        for p in vec.processes:
            p.join(timeout=10)
        vec.closed = True  # its processes are gone: nothing left for close() or __del__

    # --- BatchEnv --------------------------------------------------------------
    def reset(self, tasks: Sequence[Task], n_episodes: int, seed: int) -> Tensor:
        """Reset ``len(tasks) * n_episodes`` slots (seeds as :class:`GymBatchEnv`): obs
        ``[T, E, obs]``."""
        if n_episodes < 1:
            raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        T, E = len(tasks), n_episodes
        n = T * E
        self._tasks, self._shape, self._seed = [dict(t) for t in tasks], (T, E), int(seed)
        self._seeds = np.random.SeedSequence(int(seed)).generate_state(n)  # [n] uint32
        self._step = 0
        if self.workers == 0:
            if self._local is None:
                self._local = self.make_slots()
            obs = self._local.reset([self._tasks[i // E] for i in range(n)],
                                    [int(s) for s in self._seeds])  # [n, obs]
            self._space = self._local.action_space if n else None
        else:
            self._bounds = split_slots(n, self.workers)
            results = self._call("slots_reset", self._tasks, E, self._seeds, self._bounds,
                                 what="at reset")
            spaces = [space for _, space in results if space is not None]
            if any(s != spaces[0] for s in spaces):
                raise ValueError(f"all environments must share their action space, got "
                                 f"{sorted(set(map(str, spaces)))}: build one family's envs")
            self._space = spaces[0] if spaces else None
            obs = np.concatenate([o for o, _ in results if len(o)]) if n else np.zeros((0, 0))
        if self._space is not None and not isinstance(
                self._space, (gymnasium.spaces.Box, gymnasium.spaces.Discrete)):
            raise TypeError(f"WorkerBatchEnv supports Box and Discrete action spaces, got "
                            f"{self._space}")
        return self._to_torch(obs).reshape(T, E, -1)

    def _to_torch(self, x: np.ndarray) -> Tensor:
        return torch.from_numpy(x).to(device=self.device, dtype=self.dtype)

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Step every slot whose episode is still running (see
        :class:`~metarl.rl.sampler.BatchEnv`)."""
        T, E = self._shape
        space = self._space
        if space is None:
            raise RuntimeError("WorkerBatchEnv.step called before reset: call reset first")
        a = actions.detach().reshape(T * E, *actions.shape[2:]).cpu().numpy()  # [n, ...]
        if isinstance(space, gymnasium.spaces.Box):
            a = a.astype(space.dtype, copy=False)
            if self.clip_actions:
                a = np.clip(a, space.low, space.high)
        self._step += 1
        if self._local is not None and self.workers == 0:
            obs, reward, done = self._local.step(a)
        else:
            parts = [r for r, (start, end) in
                     zip(self._call("slots_step", a, what=f"at step {self._step}"), self._bounds)
                     if end > start]
            obs = np.concatenate([o for o, _, _ in parts])  # [n, obs]
            reward = np.concatenate([r for _, r, _ in parts])  # [n]
            done = np.concatenate([d for _, _, d in parts])  # [n]
        return (self._to_torch(obs).reshape(T, E, -1), self._to_torch(reward).reshape(T, E),
                torch.from_numpy(done).to(self.device).reshape(T, E))

    def close(self) -> None:
        """Close the environments and stop the workers."""
        local, self._local = self._local, None
        if local is not None:
            local.close()
        vec, self._vec = self._vec, None
        if vec is not None:
            vec.close()
