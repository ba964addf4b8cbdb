"""RL task families: the public protocol a user implements, and everything built on it.

A user's family subclasses :class:`RLFamily` and implements two methods:

    class PendulumGravity(RLFamily):
        name = "pendulum-gravity"
        description = "Pendulum-v1 with gravity g ~ U[5, 15]"

        def sample_tasks(self, n, rng):            # rng: numpy Generator
            return [{"g": float(g)} for g in rng.uniform(5, 15, n)]

        def make_env(self, task):                  # a plain Gymnasium env for one task
            return gymnasium.make("Pendulum-v1", g=task["g"])

Training, adaptation, evaluation, TRPO and the sampler then work unchanged:
the family's environments are stepped together (T tasks x E episodes) through
:class:`~metarl.rl.sampler.GymBatchEnv`, with one batched policy call per
time step. A family whose physics is simple may also provide a tensor
implementation by overriding :meth:`RLFamily.batch_env`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import gymnasium
import numpy as np
import torch
from torch import Tensor

from metarl.algorithms.imaml import IMAMLConfig
from metarl.config import Defaults, EvalDefaults, InnerOverride, OuterConfig, TrainConfig
from metarl.distributed import LOCAL, Group
from metarl.families import FamilyBase, FamilyKind
from metarl.inner import InnerConfig
from metarl.models.mlp import ACTIVATIONS
from metarl.options import require
from metarl.rl.batch import ESTIMATORS, RLBatch, RLConfig
from metarl.rl.policies import CategoricalMLPPolicy, GaussianMLPPolicy, Policy
from metarl.rl.sampler import BatchEnv, GymBatchEnv, NormalizedActions
from metarl.rl.trpo import TRPO, TRPOConfig, make_readapt
from metarl.rl.workers import EnvSlots, GymSlots, WorkerBatchEnv
from metarl.types import ConfigError, Params

Task = dict[str, Any]

RL_DEFAULTS = Defaults(
    train=TrainConfig(algo="maml", iterations=500, meta_batch=20,
                      inner=InnerConfig(steps=1, lr=0.1),
                      outer=OuterConfig(optimizer="trpo", lr=1e-3),
                      imaml=IMAMLConfig(lam=1.0, cg_iters=5),
                      trpo=TRPOConfig(max_kl=0.01, cg_iters=10, damping=1e-5, ls_steps=15,
                                      ls_backtrack=0.8),
                      log_every=10, checkpoint_every=25),
    per_algo={"reptile": InnerOverride(steps=3), "imaml": InnerOverride(steps=3)},
    eval=EvalDefaults(steps=3, tasks=40, lr=(0.1, 0.05), pretrain_iterations=100),
)
"""The MAML-RL hyperparameters of REFERENCE.md (paper and its PyTorch port). Reptile and
iMAML, which the paper did not run, take 3 inner steps (trajectories resampled after each):
with one step Reptile's direction is the joint policy gradient (pretraining), and iMAML's
proximal problem is not solved at all."""


class RLFamily(FamilyBase):
    """Base class of RL task families.

    Subclasses set ``name`` and ``description`` and implement
    :meth:`sample_tasks` and :meth:`make_env`; they may override
    :meth:`batch_env` (tensor physics), :meth:`check_task`,
    :meth:`sample_test_tasks` (held-out test tasks), :meth:`oracle_returns` and
    ``defaults``.

    Args:
        rollouts: trajectories per task per sampling (E).
        horizon: steps per trajectory (H); None: ``default_horizon``.
        gamma, gae_lambda: discount and GAE lambda.
        estimator: inner-loss estimator, "reinforce", "lvc" or "dice".
        hidden, activation: the policy MLP.
        init_std: initial standard deviation of a Gaussian policy.
        min_std: lower bound of a Gaussian policy's standard deviation (0: none, as the
            papers): the std is ``min_std + exp(log_std)``, so it cannot collapse and make
            later adaptation steps overshoot.
        normalize_actions: the policy acts in ``[-1, 1]`` units mapped onto the
            action Box (rllab's convention); None: the family's ``default_normalize_actions``.
        workers: 0 steps the environments in this process (:class:`GymBatchEnv`); N > 0
            steps them in N worker processes (:class:`~metarl.rl.workers.WorkerBatchEnv`),
            for machines with many cores. Trajectories are the same for every value.
            A family whose :meth:`batch_env` ignores workers (tensor physics) rejects N > 0.
    """

    name = "rl-family"
    description = "an RL task family"
    kind: FamilyKind = "rl"
    metric = "return"
    higher_is_better = True
    defaults = RL_DEFAULTS
    default_horizon = 100
    default_hidden: tuple[int, ...] = (64, 64)
    """The PyTorch port's policy (the paper used 2 x 100 ReLU: hidden=[100,100],
    activation=relu)."""
    default_activation = "tanh"
    default_normalize_actions = False

    def __init__(self, rollouts: int = 20, horizon: int | None = None, gamma: float = 0.99,
                 gae_lambda: float = 1.0,
                 estimator: Literal["reinforce", "lvc", "dice"] = "reinforce",
                 hidden: Sequence[int] | None = None,
                 activation: Literal["relu", "tanh"] | None = None,
                 init_std: float = 1.0, min_std: float = 0.0,
                 normalize_actions: bool | None = None, workers: int = 0) -> None:
        name = self.name
        E, H = int(rollouts), self.default_horizon if horizon is None else int(horizon)
        require(E >= 1, name, "rollouts", rollouts, ">= 1 (trajectories per task)")
        require(H >= 1, name, "horizon", horizon, ">= 1 (steps per trajectory)")
        require(0 < float(gamma) <= 1, name, "gamma", gamma, "in (0, 1] (the discount)")
        require(0 <= float(gae_lambda) <= 1, name, "gae_lambda", gae_lambda, "in [0, 1]")
        require(estimator in ESTIMATORS, name, "estimator", estimator,
                f"one of {', '.join(ESTIMATORS)}")
        self.rl = RLConfig(rollouts=E, horizon=H, gamma=float(gamma),
                           gae_lambda=float(gae_lambda), estimator=estimator)
        self.hidden = tuple(int(h) for h in (self.default_hidden if hidden is None else hidden))
        require(len(self.hidden) > 0 and all(h >= 1 for h in self.hidden), name, "hidden", hidden,
                "a list of one or more layer sizes >= 1 (e.g. [64, 64]; omit it for the "
                f"default {list(self.default_hidden)})")
        self.activation = activation or self.default_activation
        require(self.activation in ACTIVATIONS, name, "activation", self.activation,
                f"one of {', '.join(ACTIVATIONS)}")
        self.init_std = float(init_std)
        require(0 < self.init_std < float("inf"), name, "init_std", init_std,
                "a finite number > 0 (the initial standard deviation of the Gaussian policy)")
        self.min_std = float(min_std)
        require(0 <= self.min_std < self.init_std, name, "min_std", min_std,
                f"in [0, init_std={self.init_std:g}) (the floor of the Gaussian policy's std; "
                "0 is none)")
        self.normalize_actions = (self.default_normalize_actions if normalize_actions is None
                                  else bool(normalize_actions))
        require(not isinstance(workers, bool) and isinstance(workers, int) and workers >= 0,
                name, "workers", workers, "an integer >= 0 (0 steps the environments in this "
                "process, N > 0 in N worker processes)")
        self.workers = workers
        self._policy: Policy | None = None
        self._envs: dict[tuple[str, str, int], BatchEnv] = {}

    # --- what a user implements ---------------------------------------------
    def sample_tasks(self, n: int, rng: np.random.Generator) -> list[Task]:
        """``n`` JSON-serialisable task specs drawn with ``rng``."""
        raise NotImplementedError(f"{type(self).__name__} must implement sample_tasks(n, rng)")

    def make_env(self, task: Mapping[str, Any]) -> gymnasium.Env:
        """A Gymnasium environment for one task."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_env(task)")

    # --- optional overrides ---------------------------------------------------
    def sample_test_tasks(self, n: int, rng: np.random.Generator) -> list[Task]:
        """``n`` meta-test task specs (``metarl evaluate``) drawn with ``rng``. Default: the
        distribution of :meth:`sample_tasks` (evaluation draws with a seed that training
        never uses); a benchmark with held-out test tasks (Meta-World) returns those."""
        return self.sample_tasks(n, rng)

    def batch_env(self, device: torch.device, dtype: torch.dtype) -> BatchEnv:
        """The T x E environments the sampler steps (default: plain Gymnasium envs on CPU,
        in this process or in ``workers`` processes)."""
        if self.workers:
            return WorkerBatchEnv(self.slots_factory(), self.workers, device=device, dtype=dtype)
        return GymBatchEnv(self.make_env, device=device, dtype=dtype)

    def slots_factory(self) -> Callable[[], EnvSlots]:
        """Builds, in each worker process, the environments of its share of the slots
        (default: ``make_env``'s environments stepped one by one, :class:`GymSlots`). It is
        pickled to the workers; a family with faster batched physics returns its own."""
        return functools.partial(GymSlots, self.make_env)

    def check_task(self, task: Any) -> Task:
        """Validate a user's task spec (``metarl adapt --task``); raise ValueError naming the
        fix."""
        if not isinstance(task, Mapping):
            raise ValueError(f"a task spec is a JSON object, got {type(task).__name__}")
        return dict(task)

    def oracle_returns(self, tasks: Sequence[Task], device: torch.device,
                       dtype: torch.dtype) -> Tensor | None:
        """Average return ``[T]`` of a policy given the task, if the family defines one."""
        return None

    # --- built on the protocol ------------------------------------------------
    def options(self) -> dict[str, Any]:
        c = self.rl
        return {"rollouts": c.rollouts, "horizon": c.horizon, "gamma": c.gamma,
                "gae_lambda": c.gae_lambda, "estimator": c.estimator, "hidden": list(self.hidden),
                "activation": self.activation, "init_std": self.init_std,
                "min_std": self.min_std, "normalize_actions": self.normalize_actions,
                "workers": self.workers}

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (e.g. ``make_env`` sent to worker processes) without the cached batch
        environments, which hold processes."""
        return {**self.__dict__, "_envs": {}}

    def describe(self) -> str:
        return "\n".join([
            inspect.cleandoc(type(self).__doc__ or self.description),
            f"sampling: {self.rl.rollouts} trajectories per task, horizon {self.rl.horizon}, "
            f"gamma {self.rl.gamma}, GAE lambda {self.rl.gae_lambda}, inner estimator "
            f"{self.rl.estimator}",
            f"policy: {'Gaussian' if self._continuous() else 'categorical'} MLP "
            f"{'-'.join(map(str, self.hidden))} {self.activation}"
            + (", actions in [-1, 1] mapped onto the action box" if self.normalize_actions else "")
            + (f", std {self.init_std:g} at start" if self._continuous() else "")
            + (f", never below {self.min_std:g}" if self._continuous() and self.min_std else ""),
        ])

    def _spaces(self) -> tuple[gymnasium.Space[Any], gymnasium.Space[Any]]:
        if not hasattr(self, "_space_cache"):
            env = self.make_env(self.sample_tasks(1, np.random.default_rng(0))[0])
            self._space_cache = (env.observation_space, env.action_space)
            env.close()
        return self._space_cache

    def _continuous(self) -> bool:
        return isinstance(self._spaces()[1], gymnasium.spaces.Box)

    def policy(self) -> Policy:
        if self._policy is None:
            obs_space, act_space = self._spaces()
            if obs_space.shape is None:
                raise ConfigError(f"family {self.name!r}: observation space {obs_space} has no "
                                  "shape (the policy is an MLP on flat observations): wrap "
                                  "make_env's env in gymnasium.wrappers.FlattenObservation")
            obs_dim = int(np.prod(obs_space.shape))
            if isinstance(act_space, gymnasium.spaces.Box):
                self._policy = GaussianMLPPolicy(obs_dim, int(np.prod(act_space.shape)),
                                                 self.hidden, self.activation, self.init_std,
                                                 self.min_std)
            elif isinstance(act_space, gymnasium.spaces.Discrete):
                self._policy = CategoricalMLPPolicy(obs_dim, int(act_space.n), self.hidden,
                                                    self.activation)
            else:
                raise ConfigError(f"family {self.name!r}: action space {act_space} is neither Box "
                                  "nor Discrete")
        return self._policy

    def init_params(self, generator: torch.Generator, device: torch.device,
                    dtype: torch.dtype) -> Params:
        return self.policy().init(generator, device, dtype)

    def _env(self, device: torch.device, dtype: torch.dtype, n: int) -> BatchEnv:
        key = (str(device), str(dtype), n)
        if key not in self._envs:
            env = self.batch_env(device, dtype)
            if self.workers and not isinstance(env, WorkerBatchEnv):
                raise ConfigError(f"family {self.name!r} steps its environments with "
                                  f"{type(env).__name__}, not in worker processes: drop the "
                                  "workers option")
            act = self._spaces()[1]
            if self.normalize_actions and isinstance(act, gymnasium.spaces.Box):
                env = NormalizedActions(env, act.low, act.high)
            self._envs[key] = env
        return self._envs[key]

    def batch_for(self, tasks: Sequence[Mapping[str, Any]], seed: int, *,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  rollouts: int | None = None, rows: tuple[int, int] | None = None) -> RLBatch:
        """An :class:`RLBatch` for given task specs (``rows``: they are rows ``offset ..``
        of a batch of ``total`` tasks, see :class:`RLBatch`)."""
        cfg = self.rl if rollouts is None else dataclasses.replace(self.rl, rollouts=rollouts)
        device = torch.device(device)
        return RLBatch(self.policy(), self._env(device, dtype, len(tasks)), tasks, cfg, seed,
                       rows=rows)

    def sample_batch(self, n_tasks: int, generator: torch.Generator, *, split: str = "train",
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                     rollouts: int | None = None, share: slice | None = None) -> RLBatch:
        """T tasks: :meth:`sample_tasks` for ``split="train"``, :meth:`sample_test_tasks` for
        ``"test"`` (by default the same distribution, drawn with other seeds).

        ``share``: keep only these of the ``n_tasks`` tasks (a rank's share of the
        meta-batch); their trajectories are those they would have in the whole batch.
        """
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        draw = self.sample_test_tasks if split == "test" else self.sample_tasks
        tasks = draw(n_tasks, np.random.default_rng(seed))
        rows = share.indices(n_tasks) if share is not None else (0, n_tasks, 1)
        return self.batch_for(tasks[rows[0]:rows[1]], seed * 1000, device=device, dtype=dtype,
                              rollouts=rollouts, rows=(rows[0], n_tasks))

    def make_outer(self, cfg: TrainConfig, theta: Params, *, group: Group = LOCAL) -> TRPO:
        """TRPO for ``metarl train --outer trpo``, with the run's ``cfg.trpo`` settings, its
        reductions over the ranks of ``group``."""
        t = cfg.trpo
        if t.fisher_subsample < 1 and t.fisher_unit == "steps" and self.rl.estimator == "dice":
            raise ConfigError("--trpo-fisher-subsample takes a share of the steps by default, "
                              "and DiCE's inner loss couples the steps of an episode: add "
                              "--trpo-fisher-unit trajectories")
        readapt = make_readapt(cfg.algo, cfg.inner, cfg.imaml.lam)
        return TRPO(cfg.trpo, readapt, through_adaptation=cfg.algo == "maml", inner=cfg.inner,
                    group=group)
