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
from typing import Any

import gymnasium
import numpy as np
import torch
from gymnasium.vector import AsyncVectorEnv

from metarl.rl.sampler import EnvSlots, GymSlots, SlotError, SlotsBatchEnv
from metarl.types import SamplingError

__all__ = ["EnvSlice", "EnvSlots", "GymSlots", "SlotError", "WorkerBatchEnv", "WorkerError",
           "split_slots"]

log = logging.getLogger(__name__)

Task = Mapping[str, Any]


class WorkerError(SamplingError):
    """An environment raised in a worker, or a worker process died.

    A :class:`~metarl.types.SamplingError`: the command line prints it as one
    line and exits with 1, and training checkpoints the last finished
    iteration; the message names the slot's task, episode and seed.
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
                    ) -> tuple[np.ndarray, gymnasium.Space[Any] | None] | SlotFailure:
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


class WorkerBatchEnv(SlotsBatchEnv):
    """``T x E`` environment slots behind the :class:`~metarl.rl.sampler.BatchEnv`
    interface, stepped in this process (``workers=0``, as
    :class:`~metarl.rl.sampler.SlotsBatchEnv`) or in ``workers`` processes.

    Same contract, seeds and trajectories whatever the number of workers. The
    worker processes start at the first :meth:`reset` (``spawn`` method) and
    live until :meth:`close`; ``make_slots`` is pickled to them, so it must be
    importable there (e.g. ``functools.partial`` of a module-level class, or a
    family's :meth:`~metarl.rl.family.RLFamily.slots_factory`).

    Args:
        make_slots: builds an :class:`EnvSlots` (called once per worker, or once here).
        workers: 0 steps every slot in this process; N > 0 in N worker processes.
        device, dtype, clip_actions: as :class:`~metarl.rl.sampler.SlotsBatchEnv`.
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
        super().__init__(make_slots, device=device, dtype=dtype, clip_actions=clip_actions)
        self.workers, self.context = workers, context
        self._vec: AsyncVectorEnv | None = None
        self._bounds: list[tuple[int, int]] = []

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
            first = dead[0] if dead else None  # None: no worker's pipe is known to have closed
            code = vec.processes[first].exitcode if first is not None else None
            self._shutdown()
            raise WorkerError(f"worker {first} died (exit code {code}, {type(e).__name__}) "
                              f"{what}{self._describe_share(first)}: run with workers=0 to debug "
                              "the environment in this process") from None
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

    # --- SlotsBatchEnv ----------------------------------------------------------
    def _reset_slots(self) -> tuple[np.ndarray, gymnasium.Space[Any] | None]:
        if self.workers == 0:
            return super()._reset_slots()
        n, E = len(self._seeds), self._shape[1]
        self._bounds = split_slots(n, self.workers)
        results = self._call("slots_reset", self._tasks, E, self._seeds, self._bounds,
                             what="at reset")
        spaces = [space for _, space in results if space is not None]
        if any(s != spaces[0] for s in spaces):
            raise ValueError(f"all environments must share their action space, got "
                             f"{sorted(set(map(str, spaces)))}: build one family's envs")
        obs = np.concatenate([o for o, _ in results if len(o)]) if n else np.zeros((0, 0))
        return obs, (spaces[0] if spaces else None)

    def _step_slots(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.workers == 0:
            return super()._step_slots(a)
        parts = [r for r, (start, end) in
                 zip(self._call("slots_step", a, what=f"at step {self._step}"), self._bounds)
                 if end > start]
        obs = np.concatenate([o for o, _, _ in parts])  # [n, obs]
        reward = np.concatenate([r for _, r, _ in parts])  # [n]
        done = np.concatenate([d for _, _, d in parts])  # [n]
        return obs, reward, done

    def close(self) -> None:
        """Close the environments and stop the workers."""
        super().close()
        vec, self._vec = self._vec, None
        if vec is not None:
            vec.close()
