"""Goal-velocity and goal-direction locomotion on MuJoCo (MAML, Finn et al. 2017, section 5.3).

Four families on Gymnasium's MuJoCo v5 models, each a registered Gymnasium id
(and an oracle id whose observation ends with the task parameter):

==================  ==============================  ==================================
family              id                              task
==================  ==============================  ==================================
``halfcheetah-vel`` ``metarl/HalfCheetahVel-v0``    target velocity ~ U[0, 2]
``halfcheetah-dir`` ``metarl/HalfCheetahDir-v0``    direction +1 or -1
``ant-vel``         ``metarl/AntVel-v0``            target velocity ~ U[0, 3]
``ant-dir``         ``metarl/AntDir-v0``            direction +1 or -1
==================  ==============================  ==================================

Oracle ids: ``metarl/HalfCheetahVelOracle-v0``, ``metarl/HalfCheetahDirOracle-v0``,
``metarl/AntVelOracle-v0``, ``metarl/AntDirOracle-v0``.

MuJoCo comes from the ``mujoco`` extra. Importing this module (which registers
the ids) does not need it; building an environment or a family without it
raises :class:`~metarl.types.ConfigError` naming the install command.

Example::

    import gymnasium
    import metarl.envs  # registers the ids

    env = gymnasium.make("metarl/HalfCheetahVel-v0")
    obs, info = env.reset(seed=0, options={"task": {"velocity": 1.5}})
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    info["reward_forward"] + info["reward_ctrl"] == reward
"""

from __future__ import annotations

import functools
import importlib
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import gymnasium
import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

from metarl import checkpoint
from metarl import params as P
from metarl.rl.family import RL_DEFAULTS, RLFamily
from metarl.rl.workers import WorkerBatchEnv
from metarl.types import ConfigError

__all__ = [
    "ANT",
    "HALF_CHEETAH",
    "HORIZON",
    "INSTALL_HINT",
    "AntDirEnv",
    "AntDirFamily",
    "AntVelEnv",
    "AntVelFamily",
    "HalfCheetahDirEnv",
    "HalfCheetahDirFamily",
    "HalfCheetahVelEnv",
    "HalfCheetahVelFamily",
    "LocomotionEnv",
    "LocomotionFamily",
    "LocomotionSlots",
    "Robot",
    "outcome",
    "require_mujoco",
]

HORIZON = 100
"""Truncation horizon of the registered ids (``max_episode_steps``), as the PyTorch ports."""
INSTALL_HINT = 'pip install -c constraints.txt -e ".[mujoco]"'
"""The fix printed when MuJoCo is missing or broken."""


@dataclass(frozen=True)
class Robot:
    """A Gymnasium MuJoCo v5 model and the cost weights of the MAML-RL reward on it."""

    module: str
    """Gymnasium module that defines the model's environment class."""
    cls: str
    """Name of that class (its default v5 constructor arguments are used)."""
    skip_qpos: int
    """Leading qpos entries left out of the observation (the root's x, or x and y)."""
    ctrl_cost_weight: float
    """``reward_ctrl = -ctrl_cost_weight * sum(a^2)`` on the clipped action."""
    contact_cost_weight: float = 0.0
    """``reward_contact = -w * sum(clip(cfrc_ext, -1, 1)^2)``, and the clipped contact
    forces of every body but the world end the observation (as Ant-v5); 0: neither."""
    cfrc_in_obs: bool = True
    """With a contact cost: whether the contact forces end the observation (Gymnasium's
    ``include_cfrc_ext_in_observation``)."""
    healthy_z: tuple[float, float] | None = None
    """The episode terminates when the root's z (``qpos[2]``) leaves this range or the
    state is not finite; None: never terminates."""
    survive_reward: float = 0.0
    """``reward_survive`` per step while healthy (0 on the terminating step)."""
    velocity_bonus: float = 0.0
    """Constant added to the velocity tasks' forward term (Ant's ``+ 1``)."""
    velocity_range: tuple[float, float] = (0.0, 2.0)
    """Target velocities of the velocity family ~ U[low, high]."""
    frame_skip: int = 5
    """MuJoCo steps per action (Gymnasium's ``frame_skip``; v5's 5 with the models' 0.01 s
    timestep: 0.05 s per action)."""


HALF_CHEETAH = Robot(module="gymnasium.envs.mujoco.half_cheetah_v5", cls="HalfCheetahEnv",
                     skip_qpos=1, ctrl_cost_weight=0.05)
ANT = Robot(module="gymnasium.envs.mujoco.ant_v5", cls="AntEnv", skip_qpos=2,
            ctrl_cost_weight=0.005, contact_cost_weight=5e-4, healthy_z=(0.2, 1.0),
            survive_reward=0.05, velocity_bonus=1.0, velocity_range=(0.0, 3.0))


def outcome(robot: Robot, task_key: str, param: np.ndarray, x_before: np.ndarray,
            dt: float, qpos: np.ndarray, qvel: np.ndarray, cfrc_ext: np.ndarray,
            action: np.ndarray, oracle: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                       np.ndarray, dict[str, np.ndarray]]:
    """Observation, reward and termination of ``n`` robots after a step, from their state.

    The one place where the families' rewards are computed: :class:`LocomotionEnv`
    calls it with ``n = 1``, :class:`LocomotionSlots` with all its environments.

    Args:
        robot, task_key: the family (``task_key`` "velocity" or "direction").
        param: ``[n]`` target velocity v or direction d of each environment.
        x_before: ``[n]`` the root's x before the step.
        dt: seconds per step (model timestep x frame skip).
        qpos, qvel: ``[n, nq]``, ``[n, nv]`` after the step.
        cfrc_ext: ``[n, nbody, 6]`` external contact forces after the step (Ant).
        action: ``[n, act]`` the clipped actions.
        oracle: append ``param`` to the observation.

    Returns:
        obs ``[n, obs]``, reward ``[n]``, terminated ``[n]`` bool, v_x ``[n]``, and the
        reward terms (``reward_forward``, ``reward_ctrl``, Ant: ``reward_contact``,
        ``reward_survive``; each ``[n]``) whose sum is the reward.
    """
    n = qpos.shape[0]
    x_velocity = (qpos[:, 0] - x_before) / dt  # [n]
    if task_key == "velocity":
        forward = -np.abs(x_velocity - param) + robot.velocity_bonus  # [n]
    else:
        forward = param * x_velocity  # [n]
    a = action.astype(np.float64)  # [n, act]
    terms = {"reward_forward": forward,
             "reward_ctrl": -robot.ctrl_cost_weight * np.sum(np.square(a), axis=1)}
    parts = [qpos[:, robot.skip_qpos:], qvel]
    if robot.contact_cost_weight:
        forces = np.clip(cfrc_ext, -1.0, 1.0)  # [n, nbody, 6]
        terms["reward_contact"] = -robot.contact_cost_weight * np.sum(
            np.square(forces).reshape(n, -1), axis=1)
        if robot.cfrc_in_obs:
            parts.append(forces[:, 1:].reshape(n, -1))
    terminated = np.zeros(n, dtype=bool)  # [n]
    if robot.healthy_z is not None:
        low, high = robot.healthy_z
        z = qpos[:, 2]  # [n]
        healthy = (np.isfinite(qpos).all(1) & np.isfinite(qvel).all(1) & (low <= z)
                   & (z <= high))  # [n]
        terms["reward_survive"] = robot.survive_reward * healthy
        terminated = ~healthy
    if oracle:
        parts.append(param[:, None])
    reward = sum(terms.values())  # [n], in the order of the terms
    return np.concatenate(parts, axis=1), reward, terminated, x_velocity, terms


def require_mujoco(what: str, module: str) -> Any:
    """Import Gymnasium's MuJoCo ``module``, or raise :class:`ConfigError` naming the extra.

    Args:
        what: what needs MuJoCo (named in the message), e.g. ``"family 'ant-vel'"``.
        module: the Gymnasium module to import.

    Returns:
        The imported module.
    """
    try:
        return importlib.import_module(module)
    except (ImportError, gymnasium.error.DependencyNotInstalled) as e:
        raise ConfigError(f"{what} needs MuJoCo, which is missing or broken ({e}): run "
                          f"{INSTALL_HINT}") from None


def healthy_range(robot: Robot, value: Any) -> tuple[float, float]:
    """``value`` as the ``[low, high]`` range of the root's z outside which ``robot``'s
    episodes terminate; ValueError naming the expected form.

    Raises:
        ValueError: ``robot`` never terminates (no range to set), or ``value`` is not two
            numbers ``low < high`` (``high`` may be ``Infinity``: only a fall ends it).
    """
    if robot.healthy_z is None:
        raise ValueError(f"{robot.cls} never terminates, so it has no healthy_z_range: "
                         "drop the option")
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2 \
            or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value) \
            or math.isnan(value[0]) or math.isnan(value[1]) or not value[0] < value[1]:
        shown = list(value) if isinstance(value, tuple) else value
        raise ValueError(f"healthy_z_range {shown!r} is not [low, high] with low < high "
                         f"(the default is {list(robot.healthy_z)}; [0.2, Infinity] ends an "
                         "episode only when the torso falls)")
    return float(value[0]), float(value[1])


def configured(robot: Robot, healthy_z_range: Sequence[float] | None = None,
               include_cfrc_ext_in_observation: bool | None = None,
               frame_skip: int | None = None) -> Robot:
    """``robot`` with Gymnasium's options of these names set (None: as it is).

    Raises:
        ValueError: a bad range (:func:`healthy_range`), a ``frame_skip`` that is not a
            positive integer, or an option ``robot`` lacks (it never terminates; it has
            no contact forces).
    """
    if frame_skip is not None:
        if isinstance(frame_skip, bool) or not isinstance(frame_skip, numbers.Integral) \
                or frame_skip < 1:
            raise ValueError(f"frame_skip {frame_skip!r} is not a positive integer (MuJoCo "
                             f"steps of 0.01 s per action; the default is {robot.frame_skip}, "
                             "2 is rllab's Ant control rate)")
        robot = replace(robot, frame_skip=int(frame_skip))
    if healthy_z_range is not None:
        robot = replace(robot, healthy_z=healthy_range(robot, healthy_z_range))
    if include_cfrc_ext_in_observation is not None:
        if not robot.contact_cost_weight:
            raise ValueError(f"{robot.cls} observes no contact forces, so it has no "
                             "include_cfrc_ext_in_observation: drop the option")
        robot = replace(robot, cfrc_in_obs=bool(include_cfrc_ext_in_observation))
    return robot


class LocomotionEnv(gymnasium.Env[np.ndarray, np.ndarray]):
    """A Gymnasium MuJoCo v5 robot whose task sets what "forward" is rewarded.

    The simulation is Gymnasium's own v5 environment (``self.sim``: its model,
    ``frame_skip`` 5 unless set, ``dt`` 0.05 s, start state with reset noise 0.1), driven by
    this class, which computes the observation (v5's), reward and termination of
    the task with :func:`outcome`. Subclasses set ``robot`` and ``task_key`` and
    document the family.

    Common to all four: actions outside the ``[-1, 1]`` box are clipped to it,
    and the control cost is charged on the clipped action (what the robot
    receives). ``v_x = (x_after - x_before) / dt`` with ``x`` the root's
    ``qpos[0]`` (exact after the step). ``info`` holds ``x_position``,
    ``x_velocity``, the task parameter and every reward term (``reward_*``),
    whose sum is the reward. A task is set with ``reset(options={"task":
    spec})`` or ``set_task(spec)`` (effective at the next reset), never
    mid-episode, and stays until another is set; if none was ever set, each
    reset draws one from the task distribution with the env's ``np_random``.
    The oracle variant (``oracle=True``) appends the task parameter to the
    observation. No rendering (``render_mode=None`` only). No horizon here:
    ``gymnasium.make`` adds the 100-step ``TimeLimit``. Every robot takes Gymnasium's
    ``frame_skip`` (MuJoCo steps of 0.01 s per action, default 5; ``dt`` and ``v_x``
    follow it). Ant takes two more of Gymnasium's options:
    ``healthy_z_range=[low, high]``, the range of the torso's z outside which an
    episode ends (default ``robot.healthy_z``), and
    ``include_cfrc_ext_in_observation`` (default True: the 78 clipped contact forces
    end the observation; False: 27 dims, the contact cost still charged).
    """

    robot: Robot = HALF_CHEETAH
    task_key = "velocity"
    """``"velocity"`` (``{"velocity": v}``) or ``"direction"`` (``{"direction": +1 or -1}``)."""
    metadata: dict[str, Any] = {"render_modes": []}
    action_space: spaces.Box
    """The simulation's torque box (v5's, ``[-1, 1]`` per actuator)."""

    def __init__(self, task: Mapping[str, Any] | None = None, oracle: bool = False,
                 render_mode: str | None = None,
                 healthy_z_range: Sequence[float] | None = None,
                 include_cfrc_ext_in_observation: bool | None = None,
                 frame_skip: int | None = None) -> None:
        if render_mode is not None:
            raise ValueError(f"{type(self).__name__} has no render modes, got "
                             f"render_mode={render_mode!r}: pass render_mode=None")
        # this instance's robot; the class's is left as it is
        self.robot = configured(self.robot, healthy_z_range, include_cfrc_ext_in_observation,
                                frame_skip)
        module = require_mujoco(f"environment {type(self).__name__}", self.robot.module)
        sim_options: dict[str, Any] = {"frame_skip": self.robot.frame_skip}
        if self.robot.contact_cost_weight and not self.robot.cfrc_in_obs:
            sim_options["include_cfrc_ext_in_observation"] = False
        self.sim = getattr(module, self.robot.cls)(**sim_options)
        self.render_mode = render_mode
        self.dt = float(self.sim.dt)
        self.oracle = bool(oracle)
        self.action_space = self.sim.action_space
        n_obs = self.sim.observation_space.shape[0] + (1 if self.oracle else 0)
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(n_obs,), dtype=np.float64)
        self._task: float | None = None if task is None else self.parse_task(task)
        self._param = 0.0 if self._task is None else self._task

    # --- tasks ---------------------------------------------------------------
    @classmethod
    def parse_task(cls, task: Any) -> float:
        """The task parameter of a spec; ValueError naming the expected form."""
        key = cls.task_key
        form = "{'velocity': v}" if key == "velocity" else "{'direction': 1} or {'direction': -1}"
        if not isinstance(task, Mapping) or set(task) != {key}:
            raise ValueError(f"a {cls.__name__} task is {form}, got {task!r}")
        value = task[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                or not math.isfinite(value):
            raise ValueError(f"{key} {value!r} is not a finite number: pass {form}")
        if key == "direction" and value not in (1, -1):
            raise ValueError(f"direction {value!r} is neither 1 nor -1: pass {form}")
        return float(value)

    @classmethod
    def sample_tasks(cls, n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
        """``n`` task specs: ``{"velocity": v}`` with v ~ U[robot.velocity_range], or
        ``{"direction": d}`` with d = +1 or -1 with probability 1/2 each."""
        if n < 0:
            raise ValueError(f"number of tasks must be >= 0, got {n}")
        if cls.task_key == "velocity":
            low, high = cls.robot.velocity_range
            return [{"velocity": float(v)} for v in rng.uniform(low, high, size=n)]
        return [{"direction": int(d)} for d in rng.choice((-1, 1), size=n)]

    @property
    def param(self) -> float:
        """The current episode's target velocity or direction."""
        return self._param

    @property
    def task(self) -> dict[str, float] | None:
        """The task set by the user (``None`` while tasks are drawn at each reset)."""
        return None if self._task is None else {self.task_key: self._task}

    def set_task(self, task: Mapping[str, Any]) -> None:
        """Fix the task for the following episodes (takes effect at the next ``reset``)."""
        self._task = self.parse_task(task)

    # --- the MDP --------------------------------------------------------------
    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Gymnasium's v5 start state (seeded by ``seed``); ``options={"task": spec}`` sets
        the task."""
        super().reset(seed=seed)
        if options is not None and "task" in options:
            self._task = self.parse_task(options["task"])
        self.sim.np_random = self.np_random  # the start state is drawn from this env's seed
        sim_obs, _ = self.sim.reset()
        if self._task is None:
            self._param = float(self.sample_tasks(1, self.np_random)[0][self.task_key])
        else:
            self._param = self._task
        info = {"x_position": float(self.sim.data.qpos[0]), self.task_key: self._param}
        return (np.concatenate([sim_obs, [self._param]]) if self.oracle else sim_obs), info

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        box = self.action_space
        a = np.asarray(action, dtype=box.dtype)
        if a.shape != box.shape:
            raise ValueError(f"{type(self).__name__} action has shape {a.shape}, expected "
                             f"{box.shape}: pass one torque per actuator")
        a = np.clip(a, box.low, box.high)
        data = self.sim.data
        x_before = np.array([data.qpos[0]])  # [1]
        self.sim.do_simulation(a, self.sim.frame_skip)
        obs, reward, terminated, x_velocity, terms = outcome(
            self.robot, self.task_key, np.array([self._param]), x_before, self.dt,
            data.qpos[None], data.qvel[None], data.cfrc_ext[None], a[None], self.oracle)
        info = {"x_position": float(data.qpos[0]), "x_velocity": float(x_velocity[0]),
                self.task_key: self._param, **{k: float(v[0]) for k, v in terms.items()}}
        return obs[0], float(reward[0]), bool(terminated[0]), False, info

    def close(self) -> None:
        self.sim.close()


class HalfCheetahVelEnv(LocomotionEnv):
    """HalfCheetah running at a target velocity (``metarl/HalfCheetahVel-v0``).

    ## Tasks
    ``{"velocity": v}``; distribution v ~ U[0, 2].

    ## Action Space
    ``Box(-1, 1, (6,), float32)``: torques of the six joints (clipped to the box).

    ## Observation Space
    Gymnasium's HalfCheetah-v5: ``Box(-inf, inf, (17,), float64)``, qpos without
    the x position (8) and qvel (9). Oracle: 18 dims, v last.

    ## Rewards
    ``reward = -|v_x - v| - 0.05 * sum(a^2)``; ``info["reward_forward"] =
    -|v_x - v|``, ``info["reward_ctrl"] = -0.05 * sum(a^2)``.

    ## Episode End
    Never terminates; truncated after 100 steps (``max_episode_steps``).

    ## Version History
    - v0: initial version (MAML's goal velocity on HalfCheetah-v5 physics).
    """

    robot = HALF_CHEETAH
    task_key = "velocity"


class HalfCheetahDirEnv(LocomotionEnv):
    """HalfCheetah running forward or backward (``metarl/HalfCheetahDir-v0``).

    ## Tasks
    ``{"direction": d}``, d = +1 (forward) or -1 (backward), each with probability 1/2.

    ## Action Space
    ``Box(-1, 1, (6,), float32)`` (clipped to the box).

    ## Observation Space
    Gymnasium's HalfCheetah-v5, 17 dims. Oracle: 18 dims, d last.

    ## Rewards
    ``reward = d * v_x - 0.05 * sum(a^2)``; ``info["reward_forward"] = d * v_x``,
    ``info["reward_ctrl"] = -0.05 * sum(a^2)``.

    ## Episode End
    Never terminates; truncated after 100 steps.

    ## Version History
    - v0: initial version.
    """

    robot = HALF_CHEETAH
    task_key = "direction"


class AntVelEnv(LocomotionEnv):
    """Ant walking at a target velocity along x (``metarl/AntVel-v0``).

    ## Tasks
    ``{"velocity": v}``; distribution v ~ U[0, 3].

    ## Action Space
    ``Box(-1, 1, (8,), float32)``: torques of the eight hip and ankle joints.

    ## Observation Space
    Gymnasium's Ant-v5: ``Box(-inf, inf, (105,), float64)``, qpos without x, y (13),
    qvel (14) and the clipped external contact forces of the 13 bodies (78).
    Oracle: 106 dims, v last.

    ## Rewards
    ``reward = (-|v_x - v| + 1) - 0.005 * sum(a^2) - 5e-4 * sum(clip(cfrc_ext, -1, 1)^2)
    + 0.05 * healthy``, with the terms ``reward_forward``, ``reward_ctrl``,
    ``reward_contact`` and ``reward_survive`` in ``info``.

    ## Episode End
    Terminates when the torso's z leaves [0.2, 1.0] (or the state is not
    finite): that step's ``reward_survive`` is 0. Truncated after 100 steps.

    ## Version History
    - v0: initial version.
    """

    robot = ANT
    task_key = "velocity"


class AntDirEnv(LocomotionEnv):
    """Ant walking forward or backward along x (``metarl/AntDir-v0``).

    ## Tasks
    ``{"direction": d}``, d = +1 or -1, each with probability 1/2.

    ## Action Space
    ``Box(-1, 1, (8,), float32)``.

    ## Observation Space
    Gymnasium's Ant-v5, 105 dims. Oracle: 106 dims, d last.

    ## Rewards
    ``reward = d * v_x - 0.005 * sum(a^2) - 5e-4 * sum(clip(cfrc_ext, -1, 1)^2)
    + 0.05 * healthy`` (terms in ``info`` as AntVel).

    ## Episode End
    As AntVel: terminates when the torso's z leaves [0.2, 1.0]; truncated after 100 steps.

    ## Version History
    - v0: initial version.
    """

    robot = ANT
    task_key = "direction"


ENV_CLASSES: dict[str, type[LocomotionEnv]] = {
    "HalfCheetahVel": HalfCheetahVelEnv,
    "HalfCheetahDir": HalfCheetahDirEnv,
    "AntVel": AntVelEnv,
    "AntDir": AntDirEnv,
}
"""Id stem -> environment class: ids ``metarl/{stem}-v0`` and ``metarl/{stem}Oracle-v0``."""


def _register() -> None:
    """Register the ids once (importing this module twice must not fail)."""
    for stem, cls in ENV_CLASSES.items():
        for suffix, kwargs in (("", {}), ("Oracle", {"oracle": True})):
            env_id = f"metarl/{stem}{suffix}-v0"
            if env_id not in gymnasium.registry:
                gymnasium.register(id=env_id, entry_point=f"metarl.envs.locomotion:{cls.__name__}",
                                   max_episode_steps=HORIZON, kwargs=kwargs)


_register()


class LocomotionSlots:
    """``n`` environments of one :class:`LocomotionEnv` class stepped together: an
    :class:`~metarl.rl.sampler.EnvSlots`, what the sampler runs in this process or in
    each worker.

    Resets go through each environment's own ``reset`` (the same start states as
    ``gymnasium.make``); a step sets the controls and calls ``mujoco.mj_step`` for
    each live environment, then computes every observation and reward at once with
    :func:`outcome`, so the per-environment Python work is a few calls. The
    transitions, rewards and terminations are those of the Gymnasium environments;
    episodes are truncated after ``horizon`` steps, as the registered ids.

    Args:
        env_cls: the environment class (e.g. :class:`HalfCheetahVelEnv`).
        oracle: append the task parameter to the observation.
        horizon: truncation horizon (steps).
        robot_options: the environments' ``healthy_z_range``,
            ``include_cfrc_ext_in_observation`` and ``frame_skip`` (:class:`LocomotionEnv`;
            absent: the robot's).
    """

    def __init__(self, env_cls: type[LocomotionEnv], oracle: bool = False,
                 horizon: int = HORIZON, **robot_options: Any) -> None:
        require_mujoco(f"environment {env_cls.__name__}", env_cls.robot.module)
        import mujoco

        self.env_cls, self.oracle, self.horizon = env_cls, bool(oracle), int(horizon)
        self.robot_options = robot_options
        self.robot = configured(env_cls.robot, **robot_options)
        self._mj_step, self._rne = mujoco.mj_step, mujoco.mj_rnePostConstraint
        self.envs: list[LocomotionEnv] = []
        self._obs = np.zeros((0, 0))  # [n, obs]
        self._done = np.zeros(0, dtype=bool)  # [n]
        self._param = np.zeros(0)  # [n]
        self._t = 0

    @property
    def action_space(self) -> spaces.Box:
        return self.envs[0].action_space

    def reset(self, tasks: Sequence[Mapping[str, Any]], seeds: Sequence[int]) -> np.ndarray:
        """Start environment ``k`` on ``tasks[k]`` with seed ``seeds[k]``: obs ``[n, obs]``."""
        n = len(tasks)
        for env in self.envs[n:]:
            env.close()
        del self.envs[n:]
        while len(self.envs) < n:
            self.envs.append(self.env_cls(oracle=self.oracle, **self.robot_options))
        first = [env.reset(seed=int(seed), options={"task": dict(task)})[0]
                 for env, task, seed in zip(self.envs, tasks, seeds)]
        self._obs = np.stack(first) if n else np.zeros((0, 0))
        self._done = np.zeros(n, dtype=bool)
        self._param = np.array([env.param for env in self.envs])
        self._t = 0
        # per environment: the model, its data and views into that data (no copies)
        sims = [env.sim for env in self.envs]
        self._models = [sim.model for sim in sims]
        self._datas = [sim.data for sim in sims]
        self._ctrl = [d.ctrl for d in self._datas]
        self._qpos = [d.qpos for d in self._datas]
        self._qvel = [d.qvel for d in self._datas]
        self._cfrc = [d.cfrc_ext for d in self._datas]
        self._x = np.array([q[0] for q in self._qpos])  # [n] the root's x
        return self._obs.copy()

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``actions [n, act]`` -> obs ``[n, obs]``, reward ``[n]``, done ``[n]``; finished
        episodes are not stepped (frozen observation, reward 0)."""
        box = self.action_space
        a = np.clip(np.asarray(actions, dtype=box.dtype), box.low, box.high)  # [n, act]
        live = np.flatnonzero(~self._done)  # [n_live]
        idx = live.tolist()
        rewards = np.zeros(len(self.envs))  # [n]
        if not idx:
            return self._obs.copy(), rewards, self._done.copy()
        contact = bool(self.robot.contact_cost_weight)
        models, datas, ctrl = self._models, self._datas, self._ctrl
        mj_step, rne, frame_skip = self._mj_step, self._rne, self.envs[0].sim.frame_skip
        for k in idx:
            ctrl[k][:] = a[k]
            mj_step(models[k], datas[k], nstep=frame_skip)
            if contact:  # fills cfrc_ext, as Gymnasium's do_simulation
                rne(models[k], datas[k])
        n_live = len(idx)

        def gather(views: list[np.ndarray]) -> np.ndarray:  # [n_live, *view.shape]
            return np.concatenate([views[k] for k in idx]).reshape(n_live, *views[0].shape)

        qpos = gather(self._qpos)  # [n_live, nq]
        obs, reward, terminated, _, _ = outcome(
            self.robot, self.env_cls.task_key, self._param[live], self._x[live],
            self.envs[0].dt, qpos, gather(self._qvel),
            gather(self._cfrc) if contact else np.zeros((n_live, 0, 6)), a[live], self.oracle)
        self._t += 1
        self._x[live] = qpos[:, 0]
        self._obs[live] = obs
        rewards[live] = reward
        self._done[live] = terminated | (self._t >= self.horizon)
        return self._obs.copy(), rewards, self._done.copy()

    def close(self) -> None:
        for env in self.envs:
            env.close()
        self.envs = []


LOCOMOTION_DEFAULTS = RL_DEFAULTS.with_(train={"meta_batch": 40})
"""REFERENCE.md's MAML-RL settings, with the locomotion meta-batch of 40."""

RLLAB_DIFFERENCES = (
    "Differences from the MAML paper's rllab tasks: Gymnasium's MuJoCo v5 models "
    "(frame skip 5, dt 0.05 s; rllab's cheetah stepped 0.01 s per action, its Ant 0.02 s: "
    "--family-opt frame_skip=1 or 2 sets the same control rate) and their "
    "observations (rllab's held other coordinates); horizon 100 (the PyTorch ports) "
    "instead of 200; v_x from the root's qpos; the control cost charged on the clipped "
    "action; Ant's survival reward is 0 on the terminating step. Returns compare with "
    "the published ones in shape (fraction of the gap to an oracle that adaptation "
    "closes), not in absolute value."
)

ORACLE_SEED = 7_000_003
"""Seed of the oracle's sampling in :meth:`LocomotionFamily.oracle_returns`."""


class LocomotionFamily(RLFamily):
    """Shared by the four MuJoCo families: a Gymnasium id each (:meth:`make_env`), and
    the sampler's :class:`LocomotionSlots` (one MuJoCo model per slot, kept across
    tasks), stepped in this process or in ``workers`` processes.

    Args:
        oracle: the environments append the task parameter to the observation
            (train an oracle policy with ``--family-opt oracle=true --inner-steps 0``).
        oracle_run: a run folder or checkpoint of such an oracle policy; then
            :meth:`oracle_returns` is its average return on the given tasks (the
            oracle line of ``metarl evaluate``). None: no oracle line.
        healthy_z_range: Ant only: ``[low, high]``, the range of the torso's z outside
            which an episode terminates (default ``[0.2, 1.0]``, Gymnasium's and
            rllab's; ``[0.2, Infinity]`` lets a torso that jumps go on).
        include_cfrc_ext_in_observation: Ant only: False leaves the 78 clipped contact
            forces out of the observation (27 dims instead of 105; the contact cost is
            still charged); None: Gymnasium v5's default, True.
        frame_skip: MuJoCo steps of 0.01 s per action (None: v5's 5, 0.05 s per action;
            rllab's Ant acted every 0.02 s, its cheetah every 0.01 s). The horizon counts
            actions, so ``frame_skip=2 horizon=200`` simulates 4 s as ``horizon=100`` 5 s.
        **options: the options of :class:`~metarl.rl.family.RLFamily` (``rollouts``,
            ``horizon`` (default 100), ``workers``, ...).

    Raises:
        ConfigError: MuJoCo is missing (the message names the install command).

    Differences from the MAML paper's rllab tasks (:data:`RLLAB_DIFFERENCES`, also
    printed by ``metarl families show``): Gymnasium's MuJoCo v5 models and
    observations, horizon 100 instead of 200, and the reward computed as described
    in each family; returns compare with the published ones in shape (the fraction
    of the gap to an oracle that adaptation closes), not in absolute value.
    """

    env_stem: str
    """Id stem in :data:`ENV_CLASSES`."""
    default_horizon = HORIZON
    defaults = LOCOMOTION_DEFAULTS

    def __init__(self, oracle: bool = False, oracle_run: str | None = None,
                 healthy_z_range: tuple[float, float] | None = None,
                 include_cfrc_ext_in_observation: bool | None = None,
                 frame_skip: int | None = None, **options: Any) -> None:
        env_cls = ENV_CLASSES[self.env_stem]
        require_mujoco(f"family {self.name!r}", env_cls.robot.module)
        super().__init__(**options)
        self.env_cls = env_cls
        self.oracle = bool(oracle)
        self.oracle_run = None if oracle_run is None else str(oracle_run)
        try:
            robot = configured(env_cls.robot, healthy_z_range, include_cfrc_ext_in_observation,
                               frame_skip)
        except ValueError as e:
            raise ConfigError(f"family {self.name!r}: {e}") from None
        self.robot_options: dict[str, Any] = {}
        """The robot options set (Gymnasium's names), as :class:`LocomotionEnv` takes them."""
        if healthy_z_range is not None:
            self.robot_options["healthy_z_range"] = robot.healthy_z
        if include_cfrc_ext_in_observation is not None:
            self.robot_options["include_cfrc_ext_in_observation"] = robot.cfrc_in_obs
        if frame_skip is not None:
            self.robot_options["frame_skip"] = robot.frame_skip
        self.robot = robot
        """The environments' robot, with these options set."""

    @property
    def env_id(self) -> str:
        """The Gymnasium id this family's environments are made from."""
        return f"metarl/{self.env_stem}{'Oracle' if self.oracle else ''}-v0"

    def sample_tasks(self, n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
        return self.env_cls.sample_tasks(n, rng)

    def make_env(self, task: Mapping[str, Any]) -> gymnasium.Env:
        return gymnasium.make(self.env_id, task=task, max_episode_steps=self.rl.horizon,
                              **self.robot_options)

    def slots_factory(self) -> Callable[[], LocomotionSlots]:
        return functools.partial(LocomotionSlots, self.env_cls, self.oracle, self.rl.horizon,
                                 **self.robot_options)

    def batch_env(self, device: torch.device, dtype: torch.dtype) -> WorkerBatchEnv:
        """:class:`LocomotionSlots` in this process (``workers=0``) or split over ``workers``
        processes; the same trajectories either way."""
        return WorkerBatchEnv(self.slots_factory(), self.workers, device=device, dtype=dtype)

    def check_task(self, task: Any) -> dict[str, Any]:
        value = self.env_cls.parse_task(task)  # raises naming the expected form
        key = self.env_cls.task_key
        return {key: int(value) if key == "direction" else value}

    def options(self) -> dict[str, Any]:
        robot = {k: list(v) if isinstance(v, tuple) else v for k, v in self.robot_options.items()}
        return {**super().options(), "oracle": self.oracle, "oracle_run": self.oracle_run,
                **robot}

    def describe(self) -> str:
        lines = [super().describe(), f"environments: {self.env_id}", RLLAB_DIFFERENCES]
        if "healthy_z_range" in self.robot_options:
            low, high = self.robot_options["healthy_z_range"]
            lines.append(f"episodes end when the torso's z leaves [{low:g}, {high:g}]")
        if self.robot_options.get("include_cfrc_ext_in_observation") is False:
            lines.append("the contact forces are left out of the observation")
        if "frame_skip" in self.robot_options:
            skip = self.robot_options["frame_skip"]
            lines.append(f"frame_skip {skip}: {skip * 0.01:g} s per action")
        if self.oracle_run:
            lines.append(f"oracle line: the policy of {self.oracle_run}")
        return "\n".join(lines)

    def oracle_returns(self, tasks: Sequence[Mapping[str, Any]], device: torch.device,
                       dtype: torch.dtype) -> Tensor | None:
        """Average return ``[T]`` of the oracle policy of ``oracle_run`` on ``tasks``
        (``rollouts`` episodes each, ``horizon`` steps); None without ``oracle_run``.

        ``oracle_run`` is a run folder or checkpoint of ``metarl train --family-opt
        oracle=true --inner-steps 0`` or of ``metarl oracle`` (which writes both a
        checkpoint and ``oracle.zip``), or a Stable-Baselines3 PPO model (``.zip``) of the
        oracle variant with this family's policy architecture.

        Raises:
            ConfigError: ``oracle_run`` is not an oracle policy of this family.
        """
        if self.oracle_run is None:
            return None
        from metarl import sb3

        if sb3.is_sb3_model(self.oracle_run):
            opts, theta = sb3.oracle_policy(self.oracle_run, self)
        else:
            run = checkpoint.load(self.oracle_run)
            opts = dict(run.config.family_options)
            if run.config.family != self.name or not opts.get("oracle"):
                raise ConfigError(
                    f"oracle_run {self.oracle_run!r} was trained on family "
                    f"{run.config.family!r} with oracle={opts.get('oracle', False)}: train one "
                    f"with metarl oracle {self.name} --out RUN (or metarl train --family "
                    f"{self.name} --family-opt oracle=true --inner-steps 0)")
            theta = run.theta
        trained = opts.get("frame_skip") or self.env_cls.robot.frame_skip
        if trained != self.robot.frame_skip:  # its policy acts at another control rate
            raise ConfigError(
                f"oracle_run {self.oracle_run!r} was trained with frame_skip {trained}, this "
                f"family steps with frame_skip {self.robot.frame_skip}: train the oracle with "
                "the same --family-opt frame_skip")
        opts.update(oracle_run=None, rollouts=self.rl.rollouts, horizon=self.rl.horizon,
                    workers=self.workers,  # the oracle observes what it was trained on
                    healthy_z_range=self.robot_options.get("healthy_z_range"))
        oracle = type(self)(**opts)
        batch = oracle.batch_for(tasks, ORACLE_SEED, device=device, dtype=dtype)
        theta_T = P.expand(P.to(theta, device, dtype), len(tasks))
        return batch.metric(theta_T, batch.inner_data(theta_T))


class HalfCheetahVelFamily(LocomotionFamily):
    """HalfCheetah goal velocity (Finn et al. 2017, section 5.3), on HalfCheetah-v5.

    Task: target velocity v ~ U[0, 2]. Observation: Gymnasium's HalfCheetah-v5 (17
    dims: qpos without x, qvel); oracle: v appended. Action: 6 torques in [-1, 1]
    (clipped). Reward: -|v_x - v| - 0.05 * sum(a^2), v_x = dx / 0.05 s. Horizon 100
    (``horizon`` option), no termination. Environments: ``metarl/HalfCheetahVel-v0``.
    Differences from rllab: see :class:`LocomotionFamily`.
    """

    name = "halfcheetah-vel"
    description = "HalfCheetah-v5 running at a target velocity v ~ U[0, 2] (MAML paper 5.3)"
    env_stem = "HalfCheetahVel"


class HalfCheetahDirFamily(LocomotionFamily):
    """HalfCheetah goal direction (Finn et al. 2017, section 5.3), on HalfCheetah-v5.

    Task: direction d = +1 (forward) or -1 (backward), each with probability 1/2.
    Observation: HalfCheetah-v5 (17 dims); oracle: d appended. Action: 6 torques in
    [-1, 1]. Reward: d * v_x - 0.05 * sum(a^2). Horizon 100, no termination.
    Environments: ``metarl/HalfCheetahDir-v0``. Differences from rllab: see
    :class:`LocomotionFamily`.
    """

    name = "halfcheetah-dir"
    description = "HalfCheetah-v5 running forward or backward, d = +1 or -1 (MAML paper 5.3)"
    env_stem = "HalfCheetahDir"


class AntVelFamily(LocomotionFamily):
    """Ant goal velocity (Finn et al. 2017, section 5.3), on Ant-v5.

    Task: target velocity v ~ U[0, 3] along x. Observation: Gymnasium's Ant-v5 (105
    dims: qpos without x, y, qvel, clipped contact forces); oracle: v appended.
    Action: 8 torques in [-1, 1]. Reward: -|v_x - v| + 1 - 0.005 * sum(a^2) - 5e-4 *
    sum(clip(cfrc_ext, -1, 1)^2) + 0.05 while healthy (the PyTorch port's weights).
    Horizon 100; terminates when the torso's z leaves [0.2, 1.0].
    Environments: ``metarl/AntVel-v0``. Differences from rllab: see
    :class:`LocomotionFamily`.
    """

    name = "ant-vel"
    description = "Ant-v5 walking at a target velocity v ~ U[0, 3] (MAML paper 5.3)"
    env_stem = "AntVel"


class AntDirFamily(LocomotionFamily):
    """Ant goal direction (Finn et al. 2017, section 5.3), on Ant-v5.

    Task: direction d = +1 or -1 along x, each with probability 1/2. Observation:
    Ant-v5 (105 dims); oracle: d appended. Action: 8 torques in [-1, 1]. Reward:
    d * v_x - 0.005 * sum(a^2) - 5e-4 * sum(clip(cfrc_ext, -1, 1)^2) + 0.05 while
    healthy. Horizon 100; terminates when the torso's z leaves [0.2, 1.0].
    Environments: ``metarl/AntDir-v0``. Differences from rllab: see
    :class:`LocomotionFamily`.
    """

    name = "ant-dir"
    description = "Ant-v5 walking forward or backward, d = +1 or -1 (MAML paper 5.3)"
    env_stem = "AntDir"
