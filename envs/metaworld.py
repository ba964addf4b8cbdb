"""Meta-World's ML1 and ML10 meta-RL benchmarks (Yu et al. 2019) as metarl task families.

Two families on Meta-World's own benchmark classes and task lists (the ``metaworld``
extra, pinned to 3.1.1, which pins MuJoCo 3.3.0 as metarl does):

==================  ===============================  ==========================================
family              Gymnasium id                     tasks
==================  ===============================  ==========================================
``metaworld-ml1``   ``metarl/MetaWorldML1-v0``       one environment (option ``env_name``,
                                                     e.g. reach-v3); train: its 50 training
                                                     goals, test: its 50 held-out goals
``metaworld-ml10``  ``metarl/MetaWorldML10-v0``      train: 10 environments x 50 goals, test:
                                                     5 other environments x 50 goals
==================  ===============================  ==========================================

The task lists are Meta-World's: ``metaworld.ML1(env_name, seed)`` and
``metaworld.ML10(seed)`` with ``seed`` the family's ``benchmark_seed`` (default 0; ML1
draws its test goals with ``seed + 1``, as Meta-World does). Training samples from
``train_tasks``, evaluation from ``test_tasks``. A task spec is JSON:
``{"env_name": "reach-v3", "index": 7, "split": "test"}`` is the 8th task of reach-v3 in
Meta-World's test list, the same Meta-World ``Task`` for the same ``benchmark_seed``.

Observations are Meta-World's (39 dims: hand, gripper, objects, the previous frame, and
the goal, zeroed in the ML benchmarks); actions are Meta-World's 4-dim box [-1, 1];
rewards are Meta-World's v2 rewards (0..10 per step); episodes run 500 steps (Meta-World's
``max_path_length``) and never terminate. An episode **succeeds** if ``info["success"]``
is 1 at any of its steps: the families report the success rate beside the return, after
0..K adaptation steps in ``metarl evaluate`` and before and after adaptation in training.

Meta-World is imported only when an environment is built: listing the families and
``metarl families show`` work without it, and anything else fails with one line naming
the install command (:data:`INSTALL_HINT`).

Example::

    import gymnasium
    import metarl.envs  # registers the ids

    env = gymnasium.make("metarl/MetaWorldML1-v0", env_name="reach-v3")
    obs, info = env.reset(seed=0, options={"task": {"env_name": "reach-v3", "index": 0,
                                                    "split": "test"}})
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    info["success"]  # 1.0 once the hand is within 5 cm of the hidden goal
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import inspect
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import gymnasium
import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

from metarl.options import require
from metarl.rl.family import RL_DEFAULTS, RLFamily
from metarl.rl.workers import WorkerBatchEnv
from metarl.types import ConfigError

__all__ = [
    "HORIZON",
    "INSTALL_HINT",
    "ML10_TEST",
    "ML10_TRAIN",
    "N_GOALS",
    "PAPER_SETTINGS",
    "MetaWorldBatchEnv",
    "MetaWorldEnv",
    "MetaWorldFamily",
    "MetaWorldML1Family",
    "MetaWorldML10Family",
    "MetaWorldSlots",
    "Suite",
    "require_metaworld",
]

HORIZON = 500
"""Meta-World's ``max_path_length``: steps per episode of every v3 environment."""
N_GOALS = 50
"""Tasks (object and goal positions) per environment and split in Meta-World's ML benchmarks."""
INSTALL_HINT = 'pip install "metarl-toolkit[metaworld]" (from a checkout: make install)'
"""The fix printed when Meta-World is missing."""
SPLITS = ("train", "test")

ML10_TRAIN = ("reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-close-v3",
              "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "sweep-v3",
              "basketball-v3")
"""ML10's meta-training environments, in Meta-World's order (``env_dict.ML10_V3["train"]``;
the tests check it against the installed package)."""
ML10_TEST = ("drawer-open-v3", "door-close-v3", "shelf-place-v3", "sweep-into-v3",
             "lever-pull-v3")
"""ML10's meta-test environments, in Meta-World's order."""

Benchmark = Literal["ML1", "ML10"]
TaskTable = dict[tuple[str, str], list[Any]]
"""(split, env_name) -> Meta-World's 50 ``Task`` objects, in Meta-World's order."""

PAPER_SETTINGS = (
    "MAML-TRPO settings: those of the Meta-World paper's MAML baseline (Yu et al. 2019, "
    "arXiv 1910.10897, appendix Table 9, run with garage's MAMLTRPO): meta-batch 20, 10 "
    "trajectories per task, horizon 500, discount 0.99, GAE lambda 1, one inner policy-"
    "gradient step at lr 1e-4 on raw (not normalised) advantages with a linear feature "
    "baseline, TRPO with max KL 0.01, Gaussian MLP policy 128-128 tanh. Differences: "
    "metarl's policy has a state-independent std (initial 1.0) and no tanh on the mean "
    "(garage: std from the shared MLP, clipped to [0.5, 1.5], tanh output) and no entropy "
    "bonus (garage: 5e-5); the success rate is measured on the adaptation trajectories "
    "(stochastic actions), while Meta-World's evaluation scores the adapted policy's mean "
    "action. Published MAML (Table 1, average maximum success rate over 10 seeds): ML10 "
    "44.4% meta-train / 31.6% meta-test; ML1 results are in the paper's figures."
)


def require_metaworld(what: str) -> Any:
    """Import Meta-World, or raise :class:`ConfigError` naming the install command.

    Args:
        what: what needs it (named in the message), e.g. ``"family 'metaworld-ml1'"``.
    """
    try:
        return importlib.import_module("metaworld")
    except ImportError as e:
        raise ConfigError(f"{what} needs Meta-World, which is not installed ({e}): run "
                          f"{INSTALL_HINT}") from None


def _env_names() -> list[str]:
    """The 50 v3 environment names of the installed Meta-World (imports it)."""
    return list(require_metaworld("a Meta-World family").env_dict.ALL_V3_ENVIRONMENTS)


@functools.lru_cache(maxsize=8)
def _build_tasks(benchmark: Benchmark, env_name: str | None, seed: int) -> TaskTable:
    """Meta-World's task lists of one benchmark, built once per process (ML10 takes tens
    of seconds: Meta-World resets every environment 50 times per split).

    The benchmark classes are used directly, never the ``Meta-World/ML1-train`` Gymnasium
    registration: at 3.1.1 that id is built with the *test* split (its lambda reads the
    loop variable ``split`` late; Farama-Foundation/Metaworld PR #573, open), so
    ``gym.make_vec("Meta-World/ML1-train", ...)`` trains on the held-out goals.
    ``tests/envs/test_metaworld.py`` checks both the lists here and that defect.
    """
    mw = require_metaworld(f"Meta-World {benchmark}")
    bench = mw.ML1(env_name, seed=seed) if benchmark == "ML1" else mw.ML10(seed=seed)
    table: TaskTable = {}
    for split, tasks in (("train", bench.train_tasks), ("test", bench.test_tasks)):
        for task in tasks:
            table.setdefault((split, task.env_name), []).append(task)
    return table


@dataclass(frozen=True)
class Suite:
    """One Meta-World benchmark: the environments of each split and the seed of its task
    lists. Task specs are ``{"env_name": ..., "index": i, "split": "train" | "test"}``
    with ``i`` in ``[0, 50)``, the position in Meta-World's list of that environment's
    tasks of that split."""

    benchmark: Benchmark
    env_name: str | None = None
    """ML1's environment; None for ML10."""
    seed: int = 0
    """Meta-World's benchmark seed (the object and goal positions of every task)."""

    def env_names(self, split: str) -> tuple[str, ...]:
        """The environments of ``split``, in Meta-World's order."""
        if self.benchmark == "ML1":
            assert self.env_name is not None
            return (self.env_name,)
        return ML10_TRAIN if split == "train" else ML10_TEST

    def tasks(self) -> TaskTable:
        """Meta-World's ``Task`` objects, built once per process."""
        return _build_tasks(self.benchmark, self.env_name, self.seed)

    def parse(self, task: Any) -> tuple[str, str, int]:
        """``(split, env_name, index)`` of a spec; ValueError naming the expected form."""
        form = ('{"env_name": "' + self.env_names("train")[0] + '", "index": 0, "split": '
                '"train"} (index in [0, 50), split "train" or "test")')
        if not isinstance(task, Mapping) or set(task) != {"env_name", "index", "split"}:
            raise ValueError(f"a Meta-World {self.benchmark} task is {form}, got {task!r}")
        split, name, index = task["split"], task["env_name"], task["index"]
        if split not in SPLITS:
            raise ValueError(f"task split {split!r} is neither 'train' nor 'test': pass {form}")
        names = self.env_names(split)
        if name not in names:
            other = [n for s in SPLITS if s != split for n in self.env_names(s)]
            hint = f" (it is a {'test' if split == 'train' else 'train'} environment)" \
                if name in other else ""
            close = difflib.get_close_matches(str(name), names, n=1)
            hint += f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"env_name {name!r} is not in {self.benchmark}'s {split} split"
                             f"{hint}: use one of {', '.join(names)}")
        if isinstance(index, bool) or not isinstance(index, numbers.Integral) \
                or not 0 <= int(index) < N_GOALS:
            raise ValueError(f"task index {index!r} must be an integer in [0, {N_GOALS}): "
                             f"pass {form}")
        return str(split), str(name), int(index)

    def draw(self, split: str, n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
        """``n`` specs of ``split``: spread evenly over its environments (the remainder to
        environments drawn without replacement), each environment's goals drawn without
        replacement (reshuffled once all 50 are used), grouped by environment."""
        if n < 0:
            raise ValueError(f"number of tasks must be >= 0, got {n}")
        names = self.env_names(split)
        counts = np.full(len(names), n // len(names))
        counts[rng.choice(len(names), n % len(names), replace=False)] += 1
        specs: list[dict[str, Any]] = []
        for name, count in zip(names, counts.tolist()):
            order: list[int] = []
            while len(order) < count:
                order += rng.permutation(N_GOALS).tolist()
            specs += [{"env_name": name, "index": int(i), "split": split} for i in order[:count]]
        return specs


def _raw_env(name: str, max_path_length: int) -> Any:
    """A bare Meta-World v3 environment of ``name`` (no Gymnasium wrappers)."""
    mw = require_metaworld(f"environment {name!r}")
    env = mw.env_dict.ALL_V3_ENVIRONMENTS[name]()
    env.max_path_length = max_path_length  # its own truncation (and step limit) at our horizon
    return env


class MetaWorldEnv(gymnasium.Env[np.ndarray, np.ndarray]):
    """A task of Meta-World's ML1 or ML10 benchmark (``metarl/MetaWorldML1-v0``,
    ``metarl/MetaWorldML10-v0``), set at reset.

    ## Tasks
    ``{"env_name": name, "index": i, "split": "train" | "test"}``: Meta-World's task
    ``i`` of ``name`` in that split (:class:`Suite`), set with ``reset(options={"task":
    spec})`` or ``set_task(spec)`` (effective at the next reset), never mid-episode. If
    none was ever set, each reset draws a training task with the env's ``np_random``.

    ## Action Space
    ``Box(-1, 1, (4,), float32)``: hand displacement (x, y, z) and gripper effort.

    ## Observation Space
    Meta-World's ``Box((39,), float64)``: hand position, gripper opening, object
    positions and quaternions (padded to 14), the same 18 values of the previous
    frame, and the goal position, zero in the ML benchmarks (the goal is hidden).

    ## Rewards
    Meta-World's v2 reward of the task's environment (0 to 10 per step); ``info`` is
    Meta-World's (``success``, ``near_object``, ``grasp_success``, ...).

    ## Episode End
    Never terminates; ``gymnasium.make`` truncates after 500 steps (Meta-World's
    horizon; ``max_episode_steps=H`` changes it). ``info["success"]`` is 1.0 at the
    steps where the task is solved; an episode succeeds if it is ever 1.

    ## Arguments
    ``benchmark`` ("ML1" or "ML10"), ``env_name`` (ML1), ``seed`` (Meta-World's
    benchmark seed, the task lists), ``task`` (a spec to start with).

    ## Version History
    - v0: initial version (Meta-World 3.1.1, v3 environments, v2 rewards).
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, benchmark: Benchmark = "ML1", env_name: str | None = None,
                 seed: int = 0, task: Mapping[str, Any] | None = None,
                 render_mode: str | None = None) -> None:
        if render_mode is not None:
            raise ValueError(f"MetaWorldEnv has no render modes, got render_mode="
                             f"{render_mode!r}: pass render_mode=None")
        if benchmark not in ("ML1", "ML10"):
            raise ValueError(f"benchmark {benchmark!r} is neither 'ML1' nor 'ML10'")
        if benchmark == "ML1" and env_name is None:
            raise ValueError("an ML1 environment needs env_name, e.g. env_name='reach-v3'")
        require_metaworld(f"environment metarl/MetaWorld{benchmark}-v0")
        self.suite = Suite(benchmark, env_name if benchmark == "ML1" else None, int(seed))
        self.render_mode = render_mode
        self._sims: dict[str, Any] = {}
        first = self._sim(self.suite.env_names("train")[0])
        box = first.observation_space
        self.observation_space = spaces.Box(box.low, box.high, dtype=np.float64)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(4,), dtype=np.float32)
        self._task = None if task is None else self.suite.parse(task)
        self._active: Any = None
        self._active_task: tuple[str, str, int] | None = None

    def _sim(self, name: str) -> Any:
        if name not in self._sims:
            self._sims[name] = _raw_env(name, 2**31 - 1)  # TimeLimit owns the horizon
        return self._sims[name]

    @property
    def task(self) -> dict[str, Any] | None:
        """The task set by the user (None while tasks are drawn at each reset)."""
        if self._task is None:
            return None
        split, name, index = self._task
        return {"env_name": name, "index": index, "split": split}

    def set_task(self, task: Mapping[str, Any]) -> None:
        """Fix the task for the following episodes (takes effect at the next ``reset``)."""
        self._task = self.suite.parse(task)

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        if options is not None and "task" in options:
            self._task = self.suite.parse(options["task"])
        key = self._task
        if key is None:
            spec = self.suite.draw("train", 1, self.np_random)[0]
            key = (spec["split"], spec["env_name"], spec["index"])
        split, name, index = key
        sim = self._sim(name)
        if self._active is not sim or self._active_task != key:
            sim.set_task(self.suite.tasks()[(split, name)][index])
        if seed is not None:
            sim.seed(int(seed))
        obs, _ = sim.reset()
        self._active, self._active_task = sim, key
        return np.asarray(obs, dtype=np.float64), {"task": {"env_name": name, "index": index,
                                                            "split": split}}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._active is None:
            raise RuntimeError("MetaWorldEnv.step called before reset: call reset first")
        a = np.asarray(action, dtype=np.float32)
        if a.shape != (4,):
            raise ValueError(f"MetaWorldEnv action has shape {a.shape}, expected (4,): pass "
                             "the hand's (dx, dy, dz) and the gripper effort")
        obs, reward, _, _, info = self._active.step(np.clip(a, -1.0, 1.0))
        return np.asarray(obs, dtype=np.float64), float(reward), False, False, dict(info)

    def close(self) -> None:
        for sim in self._sims.values():
            sim.close()
        self._sims = {}


def _register() -> None:
    for benchmark in ("ML1", "ML10"):
        env_id = f"metarl/MetaWorld{benchmark}-v0"
        if env_id not in gymnasium.registry:
            gymnasium.register(id=env_id, entry_point="metarl.envs.metaworld:MetaWorldEnv",
                               max_episode_steps=HORIZON, kwargs={"benchmark": benchmark})


_register()


@dataclass
class _Sim:
    name: str
    """The environment's name (e.g. ``reach-v3``)."""
    env: Any
    """A bare Meta-World environment of it."""
    task: tuple[str, str, int] | None = None
    """The task it was last set to."""


class MetaWorldSlots:
    """``n`` bare Meta-World environments stepped in this process: the
    :class:`~metarl.rl.sampler.EnvSlots` of the Meta-World families (in this process or
    in each worker).

    Environments are kept between resets, one pool per environment class, and switch
    tasks with Meta-World's ``set_task`` (no model is rebuilt). A step calls each live
    environment's own ``step`` (no Gymnasium wrappers); episodes end after ``horizon``
    steps. The observation returned has one more column than Meta-World's: 1.0 where
    that step's ``info["success"]`` was 1 (:class:`MetaWorldBatchEnv` takes it off,
    as the ``success`` flag, so it rides through worker processes with the observation).

    Args:
        tasks: Meta-World's task lists (:meth:`Suite.tasks`), sent to the workers.
        suite: the benchmark (parses the specs).
        horizon: steps per episode.
    """

    def __init__(self, tasks: TaskTable, suite: Suite, horizon: int = HORIZON) -> None:
        self.table, self.suite, self.horizon = tasks, suite, int(horizon)
        self._pool: dict[str, list[_Sim]] = {}
        self.sims: list[_Sim] = []
        self._obs = np.zeros((0, 0))  # [n, 39 + 1]
        self._done = np.zeros(0, dtype=bool)  # [n]
        self._t = 0
        self.action_space: gymnasium.Space[Any] = spaces.Box(-1.0, 1.0, shape=(4,),
                                                             dtype=np.float32)

    def reset(self, tasks: Sequence[Mapping[str, Any]], seeds: Sequence[int]) -> np.ndarray:
        """Start slot ``k`` on ``tasks[k]`` with seed ``seeds[k]``: obs ``[n, 40]``."""
        keys = [self.suite.parse(t) for t in tasks]
        for sim in self.sims:  # back to the pools, then taken again by environment
            self._pool.setdefault(sim.name, []).append(sim)
        self.sims = []
        first = []
        for (split, name, index), seed in zip(keys, seeds):
            pool = self._pool.get(name)
            sim = pool.pop() if pool else _Sim(name, _raw_env(name, self.horizon))
            if sim.task != (split, name, index):
                sim.env.set_task(self.table[(split, name)][index])
                sim.task = (split, name, index)
            sim.env.seed(int(seed))
            obs, _ = sim.env.reset()
            first.append(np.asarray(obs, dtype=np.float64))
            self.sims.append(sim)
        n = len(self.sims)
        self._obs = (np.concatenate([np.stack(first), np.zeros((n, 1))], axis=1) if n
                     else np.zeros((0, 0)))
        self._done = np.zeros(n, dtype=bool)
        self._t = 0
        return self._obs.copy()

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``actions [n, 4]`` -> obs ``[n, 40]`` (Meta-World's and the success column),
        reward ``[n]``, done ``[n]``; finished episodes are not stepped (frozen
        observation, reward 0, success 0)."""
        a = np.clip(np.asarray(actions, dtype=np.float32), -1.0, 1.0)  # [n, 4]
        rewards = np.zeros(len(self.sims))  # [n]
        self._obs[:, -1] = 0.0
        live = np.flatnonzero(~self._done).tolist()
        for k in live:
            obs, reward, _, _, info = self.sims[k].env.step(a[k])
            self._obs[k, :-1] = obs
            self._obs[k, -1] = float(info["success"])
            rewards[k] = reward
        self._t += 1
        if self._t >= self.horizon:  # Meta-World never terminates: every episode ends here
            self._done[:] = True
        return self._obs.copy(), rewards, self._done.copy()

    def close(self) -> None:
        for sims in self._pool.values():
            for sim in sims:
                sim.env.close()
        for sim in self.sims:
            sim.env.close()
        self._pool, self.sims = {}, []


class MetaWorldBatchEnv(WorkerBatchEnv):
    """:class:`MetaWorldSlots` behind the :class:`~metarl.rl.sampler.BatchEnv` interface,
    in this process (``workers=0``) or in worker processes, that also reports each step's
    ``success`` flag (:class:`~metarl.rl.sampler.ReportsStepFlags`): the slots' extra
    observation column, taken off here, so observations are Meta-World's 39 values."""

    def __init__(self, make_slots: Callable[[], MetaWorldSlots], workers: int = 0, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        super().__init__(make_slots, workers, device=device, dtype=dtype)
        self._success: Tensor | None = None

    def reset(self, tasks: Sequence[Mapping[str, Any]], n_episodes: int, seed: int, *,
              offset: int = 0) -> Tensor:
        obs = super().reset(tasks, n_episodes, seed, offset=offset)  # [T, E, 39 + 1]
        self._success = None
        return obs[..., :-1]

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        obs, reward, done = super().step(actions)  # obs [T, E, 39 + 1]
        self._success = obs[..., -1] > 0.5  # [T, E] bool, on the device
        return obs[..., :-1], reward, done

    def step_flags(self) -> dict[str, Tensor]:
        """``{"success": [T, E] bool}``: ``info["success"]`` of the last step."""
        if self._success is None:
            raise RuntimeError("MetaWorldBatchEnv.step_flags called before a step")
        return {"success": self._success}


METAWORLD_DEFAULTS = RL_DEFAULTS.with_(
    train={"meta_batch": 20, "iterations": 2000, "inner": {"steps": 1, "lr": 1e-4}},
    steps=1, tasks=50, lr=None, pretrain_iterations=50)
"""The Meta-World paper's MAML-TRPO settings (:data:`PAPER_SETTINGS`; iterations as garage's
examples, 2000). Evaluation: one adaptation step (Meta-World's protocol), 50 test tasks
(ML1: each held-out goal once; ML10: 10 goals of each test environment), at the training lr."""


class MetaWorldFamily(RLFamily):
    """Shared by the Meta-World families: Meta-World's task lists (:class:`Suite`), its
    environments as a Gymnasium id (:meth:`make_env`) and the sampler's
    :class:`MetaWorldSlots`, in this process or in ``workers`` processes, reporting the
    success flag.

    Args:
        benchmark_seed: Meta-World's benchmark seed: which 50 goals each split holds.
        normalize_advantages: normalise advantages per task before the inner step (metarl's
            other RL families do); False (default): raw advantages, as the Meta-World
            paper's MAML (garage, ``center_adv=False``), for which its inner lr 1e-4 is set.
        **options: the options of :class:`~metarl.rl.family.RLFamily` (``rollouts``
            (default 10), ``horizon`` (500), ``workers``, ``hidden`` (128-128), ...).
            ``normalize_actions`` stays false: Meta-World's actions are already in [-1, 1].

    Raises:
        ConfigError: a bad option; Meta-World missing (when an environment is first built).
    """

    benchmark: ClassVar[Benchmark]
    default_horizon = HORIZON
    default_hidden = (128, 128)
    default_activation = "tanh"
    defaults = METAWORLD_DEFAULTS

    def __init__(self, benchmark_seed: int = 0, normalize_advantages: bool = False,
                 **options: Any) -> None:
        options.setdefault("rollouts", 10)
        super().__init__(**options)
        require(not self.normalize_actions, self.name, "normalize_actions",
                self.normalize_actions, "false (Meta-World's actions are already in [-1, 1])")
        self.benchmark_seed = int(benchmark_seed)
        self.normalize_advantages = bool(normalize_advantages)
        self.rl = dataclasses.replace(self.rl, normalize_advantages=self.normalize_advantages)

    @property
    def suite(self) -> Suite:
        """The benchmark this family samples from."""
        return Suite(self.benchmark, self._env_name(), self.benchmark_seed)

    def _env_name(self) -> str | None:
        return None

    def prepare(self) -> None:
        """Check that Meta-World is installed (before a run starts, not at its first step)."""
        require_metaworld(f"family {self.name!r}")

    @property
    def env_id(self) -> str:
        return f"metarl/MetaWorld{self.benchmark}-v0"

    def sample_tasks(self, n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
        """``n`` tasks of Meta-World's training split."""
        return self.suite.draw("train", n, rng)

    def sample_test_tasks(self, n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
        """``n`` tasks of Meta-World's test split (held out from training)."""
        return self.suite.draw("test", n, rng)

    def make_env(self, task: Mapping[str, Any]) -> gymnasium.Env:
        require_metaworld(f"family {self.name!r}")
        kwargs: dict[str, Any] = {"seed": self.benchmark_seed}
        if self._env_name() is not None:
            kwargs["env_name"] = self._env_name()
        with warnings.catch_warnings():  # the hidden goal's 3 dims are Box(0, 0), as intended
            warnings.filterwarnings("ignore", message=".*Box observation space maximum and minimum")
            return gymnasium.make(self.env_id, task=task, max_episode_steps=self.rl.horizon,
                                  **kwargs)

    def slots_factory(self) -> Callable[[], MetaWorldSlots]:
        """:class:`MetaWorldSlots` with Meta-World's task lists, built here once and sent to
        the workers (each would otherwise rebuild them)."""
        require_metaworld(f"family {self.name!r}")
        return functools.partial(MetaWorldSlots, self.suite.tasks(), self.suite, self.rl.horizon)

    def batch_env(self, device: torch.device, dtype: torch.dtype) -> MetaWorldBatchEnv:
        """:class:`MetaWorldSlots` in this process (``workers=0``) or split over ``workers``
        processes; the same trajectories either way."""
        return MetaWorldBatchEnv(self.slots_factory(), self.workers, device=device, dtype=dtype)

    def check_task(self, task: Any) -> dict[str, Any]:
        split, name, index = self.suite.parse(task)  # raises naming the expected form
        return {"env_name": name, "index": index, "split": split}

    def options(self) -> dict[str, Any]:
        return {**super().options(), "benchmark_seed": self.benchmark_seed,
                "normalize_advantages": self.normalize_advantages}

    def describe(self) -> str:
        s, c = self.suite, self.rl
        return "\n".join([  # RLFamily's lines, without building an environment for its spaces
            inspect.cleandoc(type(self).__doc__ or self.description),
            f"sampling: {c.rollouts} trajectories per task, horizon {c.horizon}, gamma "
            f"{c.gamma}, GAE lambda {c.gae_lambda}, inner estimator {c.estimator}",
            f"policy: Gaussian MLP {'-'.join(map(str, self.hidden))} {self.activation} "
            "(39 observations, 4 actions)",
            f"environments: {self.env_id}; train: {', '.join(s.env_names('train'))}; test: "
            f"{', '.join(s.env_names('test'))} ({N_GOALS} tasks each, Meta-World's "
            f"{self.benchmark} lists with benchmark seed {self.benchmark_seed})",
            "metrics: return and success rate (an episode succeeds if info['success'] is ever 1)",
            "advantages: " + ("normalised per task" if self.normalize_advantages else
                              "raw, as the paper's MAML (normalize_advantages=false)"),
            PAPER_SETTINGS,
        ])


class MetaWorldML1Family(MetaWorldFamily):
    """Meta-World ML1 (Yu et al. 2019): one manipulation environment, meta-trained on its
    50 training goals (object and goal positions), meta-tested on 50 held-out ones.

    Task: ``{"env_name": env_name, "index": i, "split": "train" | "test"}`` (Meta-World's
    ``ML1(env_name, seed=benchmark_seed)`` lists). Observation: Meta-World's 39 dims,
    the goal hidden (zero). Action: 4 dims in [-1, 1]. Reward: Meta-World's v2 reward.
    Horizon 500, no termination. Environments: ``metarl/MetaWorldML1-v0``.

    Args:
        env_name: the Meta-World v3 environment, e.g. ``reach-v3``, ``push-v3``,
            ``pick-place-v3``.
        **options: see :class:`MetaWorldFamily`.
    """

    name = "metaworld-ml1"
    description = "Meta-World ML1: one manipulation task, 50 train / 50 held-out goals"
    benchmark = "ML1"

    def __init__(self, env_name: str = "reach-v3", **options: Any) -> None:
        self.env_name = str(env_name)
        try:
            names = _env_names()
        except ConfigError:
            names = None  # no Meta-World: building an environment will say how to install it
        if names is not None and self.env_name not in names:
            close = difflib.get_close_matches(self.env_name, names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"family 'metaworld-ml1': env_name {self.env_name!r} is not a "
                              f"Meta-World v3 environment: {hint}e.g. reach-v3, push-v3, "
                              "pick-place-v3")
        super().__init__(**options)

    def _env_name(self) -> str | None:
        return self.env_name

    def options(self) -> dict[str, Any]:
        return {"env_name": self.env_name, **super().options()}


class MetaWorldML10Family(MetaWorldFamily):
    """Meta-World ML10 (Yu et al. 2019): meta-trained on 10 manipulation environments,
    meta-tested on 5 others (50 goals each).

    Train: reach, push, pick-place, door-open, drawer-close, button-press-topdown,
    peg-insert-side, window-open, sweep, basketball (v3). Test: drawer-open, door-close,
    shelf-place, sweep-into, lever-pull (v3). Task: ``{"env_name": ..., "index": i,
    "split": ...}`` (Meta-World's ``ML10(seed=benchmark_seed)`` lists). Observation: 39
    dims (goal hidden). Action: 4 dims in [-1, 1]. Horizon 500. Environments:
    ``metarl/MetaWorldML10-v0``.

    Args:
        **options: see :class:`MetaWorldFamily`.
    """

    name = "metaworld-ml10"
    description = "Meta-World ML10: 10 train / 5 held-out manipulation tasks, 50 goals each"
    benchmark = "ML10"
