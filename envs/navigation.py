"""2D point navigation to a goal (MAML, Finn et al. 2017, section 5.3).

Two implementations of the same task that agree step for step:

- :class:`Navigation2DEnv`, a plain Gymnasium environment, registered as
  ``metarl/Navigation2D-v0`` (and ``metarl/Navigation2DOracle-v0``, whose
  observation carries the goal) when this module is imported;
- :class:`Navigation2DTensorEnv`, which steps ``T x E`` copies at once as
  tensors on any device, wrapped by :class:`Navigation2DBatchEnv` for the
  sampler (:mod:`metarl.rl.sampler`).

Example::

    import gymnasium
    import metarl.envs.navigation  # registers the ids

    env = gymnasium.make("metarl/Navigation2D-v0")
    obs, info = env.reset(seed=0, options={"task": {"goal": [0.3, -0.2]}})
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium
import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

from metarl.rl.family import RLFamily

__all__ = [
    "ENV_ID",
    "GOAL_HIGH",
    "GOAL_LOW",
    "GOAL_TOLERANCE",
    "HORIZON",
    "MAX_SPEED",
    "ORACLE_ENV_ID",
    "Navigation2DBatchEnv",
    "Navigation2DEnv",
    "Navigation2DTensorEnv",
    "make_env",
    "parse_task",
    "sample_tasks",
]

ENV_ID = "metarl/Navigation2D-v0"
ORACLE_ENV_ID = "metarl/Navigation2DOracle-v0"

MAX_SPEED = 0.1
"""Each action coordinate is clipped to ``[-MAX_SPEED, MAX_SPEED]``."""
GOAL_TOLERANCE = 0.01
"""An episode terminates when ``|pos - goal| < GOAL_TOLERANCE`` on both axes."""
HORIZON = 100
"""Truncation horizon of the registered ids (``max_episode_steps``)."""
GOAL_LOW, GOAL_HIGH = -0.5, 0.5
"""Task distribution: goal ~ U[GOAL_LOW, GOAL_HIGH]^2."""

_TASK_KEYS = ("goal",)


def parse_task(task: Mapping[str, Any]) -> np.ndarray:
    """Validate a task spec ``{"goal": [x, y]}`` and return the goal as ``float32 [2]``.

    Raises:
        ValueError: the spec is not a mapping with exactly a ``"goal"`` of two
            finite numbers.
    """
    if not isinstance(task, Mapping):
        raise ValueError(f"a navigation task must be a dict like {{'goal': [x, y]}}, "
                         f"got {type(task).__name__}: {task!r}")
    unknown = sorted(set(task) - set(_TASK_KEYS))
    if unknown or "goal" not in task:
        raise ValueError(f"navigation task {task!r} has keys {sorted(task)}, expected exactly "
                         f"{list(_TASK_KEYS)}: pass {{'goal': [x, y]}}")
    try:
        goal = np.asarray(task["goal"], dtype=np.float64)
    except (TypeError, ValueError):
        goal = np.empty(0)
    if goal.shape != (2,) or not np.all(np.isfinite(goal)):
        raise ValueError(f"navigation task goal {task['goal']!r} is not two finite numbers: "
                         "pass {'goal': [x, y]}")
    return goal.astype(np.float32)


def sample_tasks(n: int, rng: np.random.Generator, low: float = GOAL_LOW,
                 high: float = GOAL_HIGH) -> list[dict[str, list[float]]]:
    """Sample ``n`` tasks, goals ~ U[low, high]^2 (the MAML task distribution).

    Args:
        n: number of tasks (>= 0).
        rng: the numpy Generator to draw from.
        low, high: bounds of the goal square.

    Returns:
        ``n`` JSON-serialisable specs ``{"goal": [x, y]}`` (plain Python floats).
    """
    if n < 0:
        raise ValueError(f"number of tasks must be >= 0, got {n}")
    goals = rng.uniform(low, high, size=(n, 2))
    return [{"goal": [float(x), float(y)]} for x, y in goals]


class Navigation2DEnv(gymnasium.Env[np.ndarray, np.ndarray]):
    """A point moves in the plane towards a goal it cannot see.

    ## Description
    The 2D navigation family of MAML (Finn et al. 2017, section 5.3): the agent
    controls the velocity of a point that starts at the origin and must reach a
    goal; each task is one goal position. Without the goal in the observation,
    the agent has to find it from rewards, which is what meta-learning is for.
    The oracle variant (``oracle=True``, id ``metarl/Navigation2DOracle-v0``)
    appends the goal to the observation and gives the "oracle" reference line.

    ## Action Space
    ``Box(-0.1, 0.1, (2,), float32)``: the velocity ``(vx, vy)``. Actions outside
    the box are accepted and clipped to it coordinate-wise (as in the MAML code),
    so a Gaussian policy's unclipped samples can be passed as they are.

    ## Observation Space
    ``Box(-inf, inf, (2,), float32)``: the position ``(x, y)``. Oracle variant:
    ``Box(-inf, inf, (4,), float32)``: ``(x, y, goal_x, goal_y)``.

    ## Transition
    ``pos <- pos + clip(action, -0.1, 0.1)``, in float32.

    ## Rewards
    ``reward = -||pos - goal||_2`` with ``pos`` the position **after** the move
    (as every MAML code base; the paper text says squared distance, the code and
    the published numbers use the plain L2 distance). ``info`` has
    ``"distance"`` (``||pos - goal||``) and ``"reward_distance"`` (``-distance``).

    ## Starting State
    ``pos = (0, 0)``, always.

    ## Episode End
    - Termination: ``|x - goal_x| < 0.01`` and ``|y - goal_y| < 0.01`` (strict,
      after the move).
    - Truncation: 100 steps, by the ``TimeLimit`` wrapper that
      ``gymnasium.make`` adds (registered ``max_episode_steps=100``). The class
      itself has no horizon.

    ## Tasks
    A task is ``{"goal": [x, y]}``, set by ``reset(options={"task": spec})`` or
    by ``set_task(spec)`` (effective at the next ``reset``), never mid-episode.
    A task once set stays until another is set. If no task was ever set, every
    ``reset`` draws a fresh goal ~ U[-0.5, 0.5]^2 from the env's ``np_random``
    (so ``reset(seed=s)`` is reproducible). :func:`sample_tasks` draws task specs.

    ## Arguments
    - ``task``: an initial task spec, or ``None`` (goals drawn at reset).
    - ``oracle``: append the goal to the observation.
    - ``render_mode``: only ``None`` (no rendering).

    ## Version History
    - v0: initial version (MAML 2D navigation, L2 reward after the move).
    """

    metadata = {"render_modes": []}

    def __init__(self, task: Mapping[str, Any] | None = None, oracle: bool = False,
                 render_mode: str | None = None) -> None:
        if render_mode is not None:
            raise ValueError(f"Navigation2D has no render modes, got render_mode={render_mode!r}: "
                             "pass render_mode=None")
        self.render_mode = render_mode
        self.oracle = bool(oracle)
        self.action_space = spaces.Box(-MAX_SPEED, MAX_SPEED, shape=(2,), dtype=np.float32)
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(4 if self.oracle else 2,),
                                            dtype=np.float32)
        self._task: np.ndarray | None = None if task is None else parse_task(task)
        self._goal = np.zeros(2, dtype=np.float32) if self._task is None else self._task.copy()
        self._pos = np.zeros(2, dtype=np.float32)

    @property
    def goal(self) -> np.ndarray:
        """The current episode's goal, ``float32 [2]`` (a copy)."""
        return self._goal.copy()

    @property
    def task(self) -> dict[str, list[float]] | None:
        """The task set by the user (``None`` while goals are drawn at each reset)."""
        return None if self._task is None else {"goal": [float(g) for g in self._task]}

    def set_task(self, task: Mapping[str, Any]) -> None:
        """Fix the goal for the following episodes (takes effect at the next ``reset``)."""
        self._task = parse_task(task)

    def _obs(self) -> np.ndarray:
        if self.oracle:
            return np.concatenate([self._pos, self._goal])
        return self._pos.copy()

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Start at the origin. ``options={"task": {"goal": [x, y]}}`` sets the task."""
        super().reset(seed=seed)
        if options is not None and "task" in options:
            self._task = parse_task(options["task"])
        if self._task is None:
            self._goal = self.np_random.uniform(GOAL_LOW, GOAL_HIGH, size=2).astype(np.float32)
        else:
            self._goal = self._task.copy()
        self._pos = np.zeros(2, dtype=np.float32)
        return self._obs(), {"goal": self.goal}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        a = np.asarray(action, dtype=np.float32)
        if a.shape != (2,):
            raise ValueError(f"Navigation2D action has shape {a.shape}, expected (2,): "
                             "pass one (vx, vy) velocity")
        self._pos = self._pos + np.clip(a, -MAX_SPEED, MAX_SPEED)  # float32
        d = self._pos - self._goal  # [2] float32
        distance = float(np.sqrt(d[0] * d[0] + d[1] * d[1]))
        terminated = bool(np.all(np.abs(d) < GOAL_TOLERANCE))
        info = {"distance": distance, "reward_distance": -distance}
        return self._obs(), -distance, terminated, False, info


def make_env(task: Mapping[str, Any] | None = None, oracle: bool = False) -> gymnasium.Env:
    """``gymnasium.make`` the registered id (with the 100-step ``TimeLimit``) for ``task``."""
    return gymnasium.make(ORACLE_ENV_ID if oracle else ENV_ID, task=task)


class Navigation2DTensorEnv:
    """``T`` tasks x ``E`` episodes of :class:`Navigation2DEnv`, stepped as tensors.

    Same dynamics, reward and termination as the Gymnasium env, computed with
    the same float operations: in float32, positions and termination flags are
    bit-identical to it; rewards may differ in the last bit, as torch's CPU
    ``sqrt`` is not always correctly rounded (numpy's is). Episodes that
    have terminated stay terminated: their position is frozen and their reward
    is 0 (the sampler masks them as well). There is no horizon here; the
    sampler truncates.

    Args:
        device: where the state lives and the arithmetic runs.
        dtype: float dtype of observations and rewards.
        oracle: append the goal to the observation (``[T, E, 4]``).
    """

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 oracle: bool = False) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.oracle = bool(oracle)
        self.obs_dim = 4 if self.oracle else 2
        self._goal: Tensor | None = None  # [T, E, 2]
        self._pos: Tensor | None = None  # [T, E, 2]
        self._done: Tensor | None = None  # [T, E] bool

    def _obs(self, pos: Tensor, goal: Tensor) -> Tensor:
        return torch.cat([pos, goal], dim=-1) if self.oracle else pos.clone()

    def reset(self, goals: Tensor | np.ndarray | Sequence[Sequence[float]],
              n_episodes: int) -> Tensor:
        """Start ``n_episodes`` episodes per goal at the origin.

        Args:
            goals: ``[T, 2]`` goal positions.
            n_episodes: episodes per task ``E`` (>= 1).

        Returns:
            obs ``[T, E, obs_dim]``.
        """
        if isinstance(goals, Tensor):
            g = goals.to(device=self.device, dtype=self.dtype)
        else:  # rounded to float32 first, as the Gymnasium env stores its goal (widening
            # to float64 is exact, so no float32 tensor is made for a float64 env)
            g = torch.as_tensor(np.asarray(goals, dtype=np.float32).astype(np.float64)).to(
                device=self.device, dtype=self.dtype)
        if g.dim() != 2 or g.shape[1] != 2:
            raise ValueError(f"goals have shape {tuple(g.shape)}, expected [T, 2]: "
                             "pass one (x, y) goal per task")
        if n_episodes < 1:
            raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
        T = g.shape[0]
        self._goal = g.unsqueeze(1).expand(T, n_episodes, 2)  # [T, E, 2]
        self._pos = torch.zeros(T, n_episodes, 2, device=self.device, dtype=self.dtype)
        self._done = torch.zeros(T, n_episodes, device=self.device, dtype=torch.bool)
        return self._obs(self._pos, self._goal)

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Move every live point by its clipped action.

        Args:
            actions: ``[T, E, 2]`` velocities (any values: clipped to [-0.1, 0.1]).

        Returns:
            obs ``[T, E, obs_dim]``, reward ``[T, E]`` (0 for episodes that had
            already terminated), terminated ``[T, E]`` bool (stays True).
        """
        if self._pos is None or self._goal is None or self._done is None:
            raise RuntimeError("Navigation2DTensorEnv.step called before reset: call reset first")
        if actions.shape != self._pos.shape:
            raise ValueError(f"actions have shape {tuple(actions.shape)}, expected "
                             f"{tuple(self._pos.shape)} ([T, E, 2])")
        a = actions.to(device=self.device, dtype=self.dtype).clamp(-MAX_SPEED, MAX_SPEED)
        was_done = self._done  # [T, E]
        pos = torch.where(was_done.unsqueeze(-1), self._pos, self._pos + a)  # [T, E, 2]
        d = pos - self._goal  # [T, E, 2]
        distance = torch.sqrt(d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1])  # [T, E]
        reward = torch.where(was_done, torch.zeros_like(distance), -distance)  # [T, E]
        done = was_done | (d.abs() < GOAL_TOLERANCE).all(-1)  # [T, E]
        self._pos, self._done = pos, done
        return self._obs(pos, self._goal), reward, done.clone()


class Navigation2DBatchEnv:
    """The :class:`metarl.rl.sampler.BatchEnv` of the navigation family: task
    specs in, tensors out, everything on ``device``.

    The start state is deterministic, so ``seed`` in :meth:`reset` is unused.
    """

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 oracle: bool = False) -> None:
        self.env = Navigation2DTensorEnv(device=device, dtype=dtype, oracle=oracle)

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def obs_dim(self) -> int:
        return self.env.obs_dim

    def reset(self, tasks: Sequence[Mapping[str, Any]], n_episodes: int, seed: int = 0, *,
              offset: int = 0) -> Tensor:
        """``obs [T, E, obs_dim]`` for tasks ``[{"goal": [x, y]}, ...]`` (every episode
        starts at the origin: ``seed`` and ``offset`` change nothing)."""
        goals = np.stack([parse_task(t) for t in tasks]) if len(tasks) else np.zeros((0, 2))
        return self.env.reset(goals, n_episodes)

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``actions [T, E, 2]`` -> obs ``[T, E, obs_dim]``, reward ``[T, E]``, done ``[T, E]``."""
        return self.env.step(actions)

    def close(self) -> None:
        pass


def _register() -> None:
    """Register the ids once (importing this module twice must not fail)."""
    for env_id, kwargs in ((ENV_ID, {}), (ORACLE_ENV_ID, {"oracle": True})):
        if env_id not in gymnasium.registry:
            gymnasium.register(id=env_id, entry_point="metarl.envs.navigation:Navigation2DEnv",
                               max_episode_steps=HORIZON, kwargs=kwargs)


_register()


class Navigation2DFamily(RLFamily):
    """2D navigation (Finn et al. 2017, section 5.3): a point moves to a goal.

    Task: goal ~ U[-0.5, 0.5]^2. Start (0, 0). Observation: position (2-D).
    Action: velocity, clipped to [-0.1, 0.1]^2; s <- s + a. Reward: -L2 distance
    to the goal after the move (the paper's text says squared; every code base
    and the published numbers use plain L2). Episode: 100 steps, done when within
    0.01 of the goal on both axes. The sampler steps all T x E environments as
    tensors on the learner's device. The policy acts in [-1, 1] units mapped
    onto the [-0.1, 0.1] box, as the paper's rllab code did (``normalize``);
    with ``normalize_actions=False`` it outputs velocities directly, as the
    PyTorch port does. With raw velocities an initial std of 1 is ten times the
    box and every action saturates; meta-training then needs many more
    iterations (README has both). Oracle: the
    policy that is given the goal and moves straight to it at full speed
    (deterministic, an upper bound).
    """

    name = "navigation2d"
    description = "2D point navigation to a goal in [-0.5, 0.5]^2 (MAML paper 5.3)"
    default_horizon = HORIZON
    default_normalize_actions = True  # rllab's convention, which the published numbers used

    def sample_tasks(self, n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
        return sample_tasks(n, rng)

    def make_env(self, task: Mapping[str, Any]) -> gymnasium.Env:
        return make_env(task)

    def batch_env(self, device: torch.device, dtype: torch.dtype) -> Navigation2DBatchEnv:
        return Navigation2DBatchEnv(device=device, dtype=dtype)

    def check_task(self, task: Any) -> dict[str, Any]:
        parse_task(task)  # raises with the fix
        return {"goal": [float(v) for v in task["goal"]]}

    def oracle_returns(self, tasks: Sequence[Mapping[str, Any]], device: torch.device,
                       dtype: torch.dtype) -> Tensor:
        env = Navigation2DTensorEnv(device=device, dtype=dtype)
        goals = np.stack([parse_task(t) for t in tasks])
        obs = env.reset(goals, 1)  # [T, 1, 2]
        goal = torch.as_tensor(goals, device=device, dtype=dtype).unsqueeze(1)  # [T, 1, 2]
        total = torch.zeros(len(tasks), 1, device=device, dtype=dtype)
        for _ in range(self.rl.horizon):
            obs, reward, _ = env.step((goal - obs).clamp(-MAX_SPEED, MAX_SPEED))
            total += reward
        return total[:, 0]
