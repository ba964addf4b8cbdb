"""Stable-Baselines3 interop: metarl policies as SB3 PPO models, PPO oracles, PPO from scratch.

A metarl Gaussian MLP policy (:class:`~metarl.rl.policies.GaussianMLPPolicy`: mean =
MLP(obs), state-independent log-std) is exactly SB3's ``MlpPolicy`` with the same
hidden sizes and activation, one shared (identity) feature extractor and
``log_std_init``: the policy head of :class:`stable_baselines3.PPO` is
``mlp_extractor.policy_net`` (Linear, activation, ...), then ``action_net``
(Linear) for the mean and the parameter ``log_std``. Weights map one to one
(metarl stores ``l{i}.w [in, out]``, torch ``Linear`` ``weight [out, in]``).

Action units. With ``normalize_actions`` a metarl policy acts in ``[-1, 1]`` units
that the sampler maps affinely onto the action Box (``a = low + (u + 1) (high - low)
/ 2``, :class:`~metarl.rl.sampler.NormalizedActions`). SB3 acts in the Box's own
units, so :func:`to_sb3` folds the map into the last layer and the log-std
(mean ``scale * mu + offset``, std ``scale * sigma`` with ``scale = (high - low) / 2``,
``offset = (high + low) / 2``): the exported distribution is metarl's pushed through
the map, exactly. Both clip samples to the Box before the environment sees them.

The value network has no metarl counterpart (metarl's baseline is a linear fit
per batch): an exported model's starts at SB3's own initialisation, and
``PPO.learn`` trains it from there.

Also here: :func:`train_oracle` (``metarl oracle``: PPO on a locomotion family's
oracle variant, written as a run folder that ``oracle_run`` reads) and
:func:`ppo_from_scratch` (``metarl evaluate --baseline ppo``: environment steps PPO
needs on one task to reach a return).

References: Schulman et al. 2017 (PPO); Raffin et al. 2021 (Stable-Baselines3);
Duan et al. 2016 (rllab's normalised actions and Gaussian MLP policy).
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import gymnasium
import numpy as np
import torch
from torch import Tensor

from metarl import checkpoint, families
from metarl import params as P
from metarl.checkpoint import Run
from metarl.config import OuterConfig, TrainConfig
from metarl.inner import InnerConfig
from metarl.rl.family import RLFamily
from metarl.rl.policies import GaussianMLPPolicy
from metarl.types import ConfigError, Params

if TYPE_CHECKING:  # pragma: no cover
    from stable_baselines3 import PPO

    from metarl.envs.locomotion import LocomotionFamily

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "ORACLE_MODEL",
    "PPO_DEFAULTS",
    "SB3_HINT",
    "Exported",
    "OracleResult",
    "PPOCurve",
    "action_map",
    "export_sb3",
    "from_sb3",
    "load_policy",
    "metarl_action_dist",
    "ppo_from_scratch",
    "require_sb3",
    "sb3_action_dist",
    "evaluation_tasks",
    "to_sb3",
    "train_oracle",
]

SB3_HINT = 'pip install -c constraints.txt -e ".[sb3]"'
"""The fix printed when Stable-Baselines3 is missing."""
FORMAT = "metarl-sb3-v1"
"""Format tag of the ``metarl`` record an exported model carries."""
ORACLE_MODEL = "oracle.zip"
"""The SB3 model in a ``metarl oracle`` run folder (beside its ``checkpoint.pt``)."""

PPO_DEFAULTS: dict[str, Any] = {
    "n_steps": 512, "batch_size": 256, "n_epochs": 10, "learning_rate": 3e-4, "gamma": 0.99,
    "gae_lambda": 0.95, "clip_range": 0.2, "ent_coef": 0.0, "vf_coef": 0.5, "max_grad_norm": 0.5,
}
"""PPO settings of ``metarl oracle`` and ``metarl evaluate --baseline ppo`` (SB3's defaults
except ``n_steps`` 512 per environment and ``batch_size`` 256): with 8 environments an
update uses 4096 steps, 41 episodes of 100 steps."""
N_ENVS = 8
"""Environments PPO steps together (``DummyVecEnv``, in this process)."""


def require_sb3() -> Any:
    """Import ``stable_baselines3`` or raise :class:`ConfigError` naming the extra."""
    try:
        import stable_baselines3
    except ImportError as e:
        raise ConfigError(f"this needs stable-baselines3, which is missing ({e}): run "
                          f"{SB3_HINT}") from None
    return stable_baselines3


def _gaussian(family: RLFamily) -> GaussianMLPPolicy:
    policy = family.policy()
    if not isinstance(policy, GaussianMLPPolicy):
        raise ConfigError(f"family {family.name!r} has a {type(policy).__name__}: SB3 export "
                          "and PPO baselines support Gaussian policies (Box actions) only")
    return policy


def _rl(family: Any) -> RLFamily:
    if not isinstance(family, RLFamily):
        raise ConfigError(f"family {family.name!r} is {family.kind}, not RL: SB3 policies and "
                          "PPO baselines are for RL families (navigation2d, halfcheetah-vel, ...)")
    return family


def action_map(family: RLFamily) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, offset)``, each ``[act]``: the policy's action ``u`` reaches the environment
    as ``scale * u + offset`` (ones and zeros unless ``normalize_actions``)."""
    act = family._spaces()[1]
    if not isinstance(act, gymnasium.spaces.Box):
        raise ConfigError(f"family {family.name!r} acts in {act}, not a Box: SB3 export and PPO "
                          "baselines support Gaussian policies (Box actions) only")
    n = int(np.prod(act.shape))
    if not family.normalize_actions:
        return np.ones(n), np.zeros(n)
    low = np.asarray(act.low, dtype=np.float64).reshape(-1)
    high = np.asarray(act.high, dtype=np.float64).reshape(-1)
    return (high - low) / 2.0, (high + low) / 2.0


def policy_kwargs(family: RLFamily) -> dict[str, Any]:
    """SB3 ``policy_kwargs`` of the family's policy: hidden sizes, activation, log-std init."""
    from torch import nn

    hidden = list(family.hidden)
    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[family.activation]
    return {"net_arch": {"pi": hidden, "vf": hidden}, "activation_fn": act,
            "log_std_init": math.log(family.init_std)}  # the std itself (no floor in SB3)


def _linears(model: PPO) -> list[torch.nn.Linear]:
    """The policy's Linear layers, input to output (hidden layers, then ``action_net``)."""
    policy = cast(Any, model.policy)
    hidden = [m for m in policy.mlp_extractor.policy_net if isinstance(m, torch.nn.Linear)]
    return [*hidden, policy.action_net]


def _check_shapes(model: PPO, family: RLFamily) -> None:
    policy = _gaussian(family)
    sizes = [policy.obs_dim, *family.hidden, policy.act_dim]
    layers = _linears(model)
    got = [layers[0].in_features, *(m.out_features for m in layers)] if layers else []
    act = model.policy_kwargs.get("activation_fn")
    want_act = policy_kwargs(family)["activation_fn"]
    if got != sizes or (act is not None and act is not want_act) \
            or not hasattr(model.policy, "log_std") or model.policy.features_dim != policy.obs_dim:
        raise ConfigError(
            f"the SB3 model's policy ({'-'.join(map(str, got))}, {getattr(act, '__name__', act)}) "
            f"is not family {family.name!r}'s ({'-'.join(map(str, sizes))}, "
            f"{want_act.__name__}, state-independent log-std): give a model written by metarl "
            "export or metarl oracle, or family options that match it")


def set_policy_params(model: PPO, family: RLFamily, theta: Params) -> None:
    """Write metarl parameters ``theta`` (no task dimension) into ``model``'s policy head,
    folding the action map of :func:`action_map` into the last layer and the log-std."""
    _check_shapes(model, family)
    scale, offset = action_map(family)
    layers = _linears(model)
    n = len(layers)
    with torch.no_grad():
        for i, lin in enumerate(layers):
            w = theta[f"l{i}.w"].detach().double().cpu()  # [in, out]
            b = theta[f"l{i}.b"].detach().double().cpu()  # [out]
            if i == n - 1:
                s = torch.as_tensor(scale)
                w, b = w * s, b * s + torch.as_tensor(offset)
            lin.weight.copy_(w.T.to(lin.weight.dtype))
            lin.bias.copy_(b.to(lin.bias.dtype))
        std_log = _gaussian(family).std_log(theta["log_std"].detach().double().cpu())
        log_std = std_log + torch.as_tensor(np.log(scale))
        model.policy.log_std.copy_(log_std.to(model.policy.log_std.dtype))


def from_sb3(model: PPO, family: RLFamily) -> Params:
    """The metarl parameters (no task dimension, CPU float32) of ``model``'s policy: the
    inverse of :func:`set_policy_params`.

    Raises:
        ConfigError: the model's policy is not the family's architecture.
    """
    _check_shapes(model, family)
    scale, offset = action_map(family)
    layers = _linears(model)
    n = len(layers)
    theta: Params = {}
    with torch.no_grad():
        for i, lin in enumerate(layers):
            w = lin.weight.detach().double().cpu().T  # [in, out]
            b = lin.bias.detach().double().cpu()
            if i == n - 1:
                s = torch.as_tensor(scale)
                w, b = w / s, (b - torch.as_tensor(offset)) / s
            theta[f"l{i}.w"], theta[f"l{i}.b"] = w.float().contiguous(), b.float()
        log_std = model.policy.log_std.detach().double().cpu() - torch.as_tensor(np.log(scale))
        try:
            theta["log_std"] = _gaussian(family).param_log_std(log_std).float()
        except ValueError as e:
            raise ConfigError(f"the SB3 model's policy: {e} of family {family.name!r}: give "
                              "family options without min_std (or a lower one)") from None
    return theta


def _spaces_env(family: RLFamily, task: Mapping[str, Any] | None) -> gymnasium.Env:
    """An environment of ``task`` (None: the family's env with tasks drawn at each reset,
    where it has one, else of a fixed task drawn with seed 0)."""
    if task is not None:
        return family.make_env(task)
    env_id = getattr(family, "env_id", None)
    if env_id is not None:
        return gymnasium.make(env_id, max_episode_steps=family.rl.horizon)
    return family.make_env(family.sample_tasks(1, np.random.default_rng(0))[0])


def to_sb3(family: RLFamily, theta: Params, *, task: Mapping[str, Any] | None = None,
           seed: int = 0, env: Any = None, **ppo_kwargs: Any) -> PPO:
    """An SB3 PPO model whose policy is the metarl policy ``theta`` of ``family``.

    Args:
        family: the RL family (its policy must be Gaussian).
        theta: the parameters (no task dimension), e.g. a run's or an adapted policy's.
        task: the task the model is for (its environment gives the spaces); None: the
            family's environment.
        seed: PPO's seed (its value network's initialisation, later training).
        env: the environment (or VecEnv) to attach instead of one built for ``task``.
        **ppo_kwargs: other PPO arguments (learning rate, n_steps, ...).

    Raises:
        ConfigError: stable-baselines3 missing, a non-Gaussian policy, or ``theta`` not the
        family's model.
    """
    require_sb3()
    from stable_baselines3 import PPO

    _gaussian(family)
    if not families.fits(cast(Any, family), theta):
        raise ConfigError(f"the parameters do not fit family {family.name!r}'s policy: give "
                          "the family options the policy was trained with")
    env = env if env is not None else _spaces_env(family, task)
    model = PPO("MlpPolicy", env, policy_kwargs=policy_kwargs(family), seed=seed, device="cpu",
                verbose=0, **ppo_kwargs)
    set_policy_params(model, family, theta)
    return model


def metarl_action_dist(family: RLFamily, theta: Params, obs: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and std ``[N, act]`` of metarl's policy ``theta`` at ``obs [N, obs]``, in the
    environment's action units (after the action map)."""
    policy = _gaussian(family)
    scale, offset = (torch.as_tensor(x) for x in action_map(family))
    th = P.to(P.detach(theta), torch.device("cpu"), torch.float32)
    with torch.no_grad():
        d = policy.dist(P.expand(th, 1), obs.float().unsqueeze(0))
        mean, std = d.mean[0].double(), d.std.expand_as(d.mean)[0].double()  # [N, act]
    return mean * scale + offset, std * scale


def sb3_action_dist(model: PPO, obs: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and std ``[N, act]`` of an SB3 model's Gaussian policy at ``obs [N, obs]``."""
    with torch.no_grad():
        dist = model.policy.get_distribution(obs.to(model.device).float())
        normal = cast(Any, dist).distribution
        return normal.mean.double().cpu(), normal.stddev.double().cpu()


# --- export ------------------------------------------------------------------------


@dataclass(frozen=True)
class Exported:
    """What :func:`export_sb3` wrote."""

    path: Path
    env_id: str | None
    """The Gymnasium id the model acts in (None: the family's env has no registered id)."""
    task: dict[str, Any] | None
    """The task of an adapted policy (None: the meta-parameters)."""
    record: dict[str, Any]
    """The ``metarl`` record stored in the model (family, options, task, source)."""
    max_abs_error: float
    """Largest difference of mean or std between metarl's and the model's policy, measured
    on random and real observations after writing."""


def _save_model(model: PPO, path: Path) -> None:
    buf = io.BytesIO()
    model.save(buf)
    checkpoint.atomic_write(path, lambda tmp: Path(tmp).write_bytes(buf.getvalue()))


def zip_path(out: str | Path) -> Path:
    """``out`` as an SB3 model file: ``.zip`` appended when there is no suffix.

    Raises:
        ConfigError: another suffix (an SB3 model is a zip file).
    """
    p = Path(out)
    if p.suffix == "":
        return p.with_suffix(".zip")
    if p.suffix.lower() != ".zip":
        raise ConfigError(f"--out {str(p)!r}: an SB3 model is a .zip file: use e.g. "
                          f"--out {p.with_suffix('.zip')}")
    return p


def check_observations(family: RLFamily, theta: Params, model: PPO, *, n: int = 64,
                       seed: int = 0, task: Mapping[str, Any] | None = None) -> float:
    """Largest ``|mean - mean'|`` or ``|std - std'|`` between metarl's policy and the SB3
    model on ``n`` random observations (N(0, 3^2)) and on one real episode of the family."""
    obs_dim = _gaussian(family).obs_dim
    rand = torch.randn(n, obs_dim, generator=torch.Generator().manual_seed(seed)) * 3.0
    env = _spaces_env(family, task)
    try:
        o, _ = env.reset(seed=seed)
        real = [np.asarray(o, dtype=np.float64).reshape(-1)]
        for _ in range(family.rl.horizon - 1):
            o, _, term, trunc, _ = env.step(env.action_space.sample())
            real.append(np.asarray(o, dtype=np.float64).reshape(-1))
            if term or trunc:
                break
    finally:
        env.close()
    obs = torch.cat([rand.double(), torch.as_tensor(np.stack(real))])
    m0, s0 = metarl_action_dist(family, theta, obs)
    m1, s1 = sb3_action_dist(model, obs)
    return float(max((m0 - m1).abs().max(), (s0 - s1).abs().max()))


def export_sb3(run: Run, out: str | Path, *, seed: int = 0) -> Exported:
    """Write the policy of ``run`` (meta-parameters, or an adapted policy from ``metarl
    adapt``) as an SB3 PPO model that ``PPO.load`` reads.

    The model carries a ``metarl`` record (``model.metarl`` after loading): the format,
    family and options, the Gymnasium id and task, the source and how it was adapted.

    Raises:
        ConfigError: not an RL run, a non-Gaussian policy, a bad ``out`` or a model whose
        distribution differs from metarl's by more than 1e-5 (a bug).
    """
    family = _rl(run.family())
    path = zip_path(out)
    task = dict(run.adapted[-1].task) if run.adapted else None
    model = to_sb3(family, run.theta, task=task, seed=seed)
    env_id = cast(Any, model.get_env()).envs[0].spec.id if _spec(model) else None
    record = {"format": FORMAT, "family": family.name, "family_options": family.options(),
              "env_id": env_id, "task": task, "max_episode_steps": family.rl.horizon,
              "source": str(run.path) if run.path else None, "iteration": run.iteration,
              "algo": run.config.algo,
              "adapted": [{"task": a.task, "steps": a.steps, "lr": a.lr, "returns": a.returns}
                          for a in run.adapted]}
    model.metarl = record  # type: ignore[attr-defined]  # saved with the model's data
    err = check_observations(family, run.theta, model, seed=seed, task=task)
    if not err <= 1e-5:
        raise ConfigError(f"the exported policy differs from metarl's by {err:.3g}: please "
                          "report this (metarl.sb3 export)")
    _save_model(model, path)
    return Exported(path=path, env_id=env_id, task=task, record=record, max_abs_error=err)


def _spec(model: PPO) -> bool:
    env = cast(Any, model.get_env())
    return env is not None and getattr(env.envs[0], "spec", None) is not None


# --- reading SB3 models back -------------------------------------------------------


def load_model(path: str | Path, **kwargs: Any) -> PPO:
    """``PPO.load`` with a one-line error for a missing or unreadable file."""
    require_sb3()
    from stable_baselines3 import PPO

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{str(p)!r} does not exist: give an SB3 model (.zip)")
    try:
        return PPO.load(p, device="cpu", **kwargs)
    except Exception as e:
        raise ConfigError(f"cannot read {str(p)!r} as an SB3 PPO model ({type(e).__name__}): "
                          "give a .zip written by metarl export, metarl oracle or PPO.save") \
            from None


def load_policy(path: str | Path, family: RLFamily) -> Params:
    """The metarl parameters of the SB3 PPO model at ``path`` (a ``.zip``, or a ``metarl
    oracle`` run folder), read as ``family``'s policy.

    Raises:
        ConfigError: unreadable, or not ``family``'s policy (named, with the fix).
    """
    p = Path(path)
    if p.is_dir():
        p = p / ORACLE_MODEL
    model = load_model(p)
    record = getattr(model, "metarl", None)
    if isinstance(record, Mapping) and record.get("family") not in (None, family.name):
        raise ConfigError(f"{str(p)!r} is a policy of family {record['family']!r}, not "
                          f"{family.name!r}: give one trained on {family.name}")
    return from_sb3(model, family)


def oracle_policy(path: str | Path, family: RLFamily) -> tuple[dict[str, Any], Params]:
    """The family options and metarl parameters of the oracle policy in the SB3 model at
    ``path`` (a ``.zip`` or a ``metarl oracle`` folder), for meta-trained ``family``.

    A model written by ``metarl oracle`` or ``metarl export`` records its family options
    (the architecture); another PPO model is read with ``family``'s options.

    Raises:
        ConfigError: unreadable, not an oracle of ``family``, or another architecture.
    """
    p = Path(path)
    if p.is_dir():
        p = p / ORACLE_MODEL
    model = load_model(p)
    record = getattr(model, "metarl", None)
    opts = dict(record["family_options"]) if isinstance(record, Mapping) \
        and isinstance(record.get("family_options"), Mapping) else family.options()
    if isinstance(record, Mapping) and (record.get("family") != family.name
                                        or not opts.get("oracle")):
        raise ConfigError(f"oracle_run {str(p)!r} is a policy of family {record.get('family')!r} "
                          f"with oracle={opts.get('oracle', False)}: train one with metarl oracle "
                          f"{family.name} --out RUN")
    opts.update(oracle=True, oracle_run=None)
    return opts, from_sb3(model, _rl(families.make(family.name, **opts)))


def is_sb3_model(path: str | Path) -> bool:
    """``path`` is an SB3 model file, or a run folder holding only one (no checkpoint.pt)."""
    p = Path(path)
    if p.is_dir():
        return (p / ORACLE_MODEL).is_file() and not (p / checkpoint.CHECKPOINT).is_file()
    return p.suffix.lower() == ".zip"


# --- test tasks ----------------------------------------------------------------------


def evaluation_tasks(family: RLFamily, n_tasks: int, seed: int = 0) -> list[dict[str, Any]]:
    """The first ``n_tasks`` test tasks ``metarl evaluate --seed SEED`` draws (in its
    default single chunk), without sampling any trajectory."""
    from metarl.evaluate import TEST_SEED_OFFSET

    gen = torch.Generator().manual_seed(seed + TEST_SEED_OFFSET)
    chunk = family.eval_chunk
    tasks: list[dict[str, Any]] = []
    for start in range(0, n_tasks, chunk):
        T = min(chunk, n_tasks - start)
        draw = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))  # as sample_batch
        tasks += family.sample_tasks(T, np.random.default_rng(draw))
    return tasks


# --- PPO training ------------------------------------------------------------------------


def _ppo_settings(ppo_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """:data:`PPO_DEFAULTS` with the user's changes; unknown names refused with the list."""
    require_sb3()
    import inspect

    from stable_baselines3 import PPO

    known = set(inspect.signature(PPO.__init__).parameters) - {
        "self", "policy", "env", "policy_kwargs", "seed", "device", "verbose",
        "_init_setup_model", "tensorboard_log"}
    given = dict(ppo_kwargs or {})
    unknown = sorted(set(given) - known)
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown PPO setting {unknown[0]!r}{hint}: use one of "
                          f"{', '.join(sorted(known))}")
    return {**PPO_DEFAULTS, **given}


def _vec_env(make: Callable[[], gymnasium.Env], n_envs: int, seed: int) -> Any:
    from stable_baselines3.common.env_util import make_vec_env

    return make_vec_env(make, n_envs=n_envs, seed=seed)


Progress = Callable[[int, dict[str, float] | None], None]
"""Called with the timesteps done and, after each PPO update, its metrics."""


def _callback(on_step: Callable[[Any], bool],
              on_rollout_end: Callable[[], None] | None = None) -> Any:
    """An SB3 callback calling ``on_step(callback)`` after every vectorised step (False
    stops training) and ``on_rollout_end()`` after each rollout, before its update."""
    from stable_baselines3.common.callbacks import BaseCallback

    class _Hook(BaseCallback):
        def _on_step(self) -> bool:
            return on_step(self)

        def _on_rollout_end(self) -> None:
            if on_rollout_end is not None:
                on_rollout_end()

    return _Hook()


@dataclass
class OracleResult:
    """What :func:`train_oracle` produced."""

    out: Path
    timesteps: int
    seconds: float
    train_return: float | None
    """Mean return of the last 100 training episodes (stochastic policy, tasks drawn per
    episode)."""
    test_return: float | None = None
    """Mean return on the first ``eval_tasks`` test tasks of ``metarl evaluate``, measured
    as its oracle line (``oracle_returns``); None when not evaluated."""
    n_test_tasks: int = 0


def _episode_returns(model: PPO) -> list[float]:
    return [float(e["r"]) for e in model.ep_info_buffer or ()]


def oracle_family(name: str, options: Mapping[str, Any] | None = None) -> LocomotionFamily:
    """The oracle variant (``oracle=True``) of locomotion family ``name``.

    Raises:
        ConfigError: not a locomotion family (only those have an oracle to train).
    """
    from metarl.envs.locomotion import LocomotionFamily

    fam = families.make(name, **(options or {}))
    if not isinstance(fam, LocomotionFamily):
        what = ("its oracle is the built-in straight-line policy" if fam.name == "navigation2d"
                else "it has no oracle variant")
        raise ConfigError(f"metarl oracle trains the oracle of a locomotion family "
                          f"(halfcheetah-vel, halfcheetah-dir, ant-vel, ant-dir); family "
                          f"{fam.name!r}: {what}")
    oracle = families.make(name, **{**(options or {}), "oracle": True, "oracle_run": None})
    assert isinstance(oracle, LocomotionFamily)  # the same factory as above
    return oracle


def train_oracle(name: str, out: str | Path, *, timesteps: int, seed: int = 0,
                 n_envs: int = N_ENVS, options: Mapping[str, Any] | None = None,
                 ppo_kwargs: Mapping[str, Any] | None = None, checkpoint_every: int = 100_000,
                 resume: bool = False, overwrite: bool = False, eval_tasks: int = 0,
                 progress: Progress | None = None,
                 notify: Callable[[str], None] | None = None) -> OracleResult:
    """Train the oracle of locomotion family ``name`` with SB3 PPO and write a run folder.

    PPO trains the family's policy architecture (hidden sizes, activation, initial std) on
    the oracle variant (the task parameter ends the observation), a task drawn for every
    episode, in ``n_envs`` environments, for ``timesteps`` environment steps. The folder
    holds ``oracle.zip`` (the SB3 model), ``checkpoint.pt`` (its policy as a metarl
    checkpoint of the oracle family, which ``--family-opt oracle_run=OUT`` reads like an
    oracle trained with ``metarl train``), ``metrics.jsonl`` (a row per PPO update) and
    ``oracle.json`` (settings and results). Both files are rewritten every
    ``checkpoint_every`` steps; ``resume`` continues from ``oracle.zip`` up to ``timesteps``.

    Args:
        eval_tasks: after training, measure the oracle line on the first this many test
            tasks of ``metarl evaluate`` (seed 0), as ``oracle_returns`` does; 0: skip.
        notify: receives a line once every setting is checked, before training starts.

    Raises:
        ConfigError: not a locomotion family, unknown PPO settings, an occupied ``out``
        without ``overwrite``/``resume``, or nothing to resume.
    """
    require_sb3()
    from stable_baselines3 import PPO

    out = Path(out)
    fam = oracle_family(name, options)
    _gaussian(fam)
    if timesteps < 1 or n_envs < 1 or checkpoint_every < 1:
        raise ConfigError(f"timesteps, n_envs and checkpoint_every must be >= 1, got "
                          f"{timesteps}, {n_envs}, {checkpoint_every}")
    settings = _ppo_settings(ppo_kwargs)
    zip_file = out / ORACLE_MODEL
    if zip_file.exists() and not (overwrite or resume):
        raise ConfigError(f"{str(out)!r} already holds an oracle: pass --resume to continue it, "
                          "--overwrite to replace it, or choose another --out")
    if resume and not zip_file.exists():
        raise ConfigError(f"--resume: {str(out)!r} has no {ORACLE_MODEL} to continue")
    from metarl.train import METRICS, check_writable

    check_writable(out)
    if notify is not None:
        notify(f"training the PPO oracle of {fam.name} on {fam.env_id} for {timesteps} "
               f"environment steps ({n_envs} environments) -> {out}")
    env_id, horizon = fam.env_id, fam.rl.horizon
    env = _vec_env(lambda: gymnasium.make(env_id, max_episode_steps=horizon), n_envs, seed)
    logged = 0.0
    if resume:
        model = load_model(zip_file, env=env)
        from_sb3(model, fam)  # the architecture check
        info = json.loads((out / "oracle.json").read_text()) if (out / "oracle.json").is_file() \
            else {}
        logged = float(info.get("seconds", 0.0))
        if model.num_timesteps >= timesteps:
            raise ConfigError(f"the oracle in {str(out)!r} already has {model.num_timesteps} "
                              "timesteps: raise --timesteps to continue it")
        rows = [r for r in _read_rows(out / METRICS) if r["timesteps"] <= model.num_timesteps]
    else:
        for name_ in (ORACLE_MODEL, checkpoint.CHECKPOINT, METRICS, "oracle.json"):
            (out / name_).unlink(missing_ok=True)
        model = PPO("MlpPolicy", env, policy_kwargs=policy_kwargs(fam), seed=seed, device="cpu",
                    verbose=0, **settings)
        rows = []
    model.metarl = {"format": FORMAT, "family": fam.name,  # type: ignore[attr-defined]
                    "family_options": fam.options(), "env_id": env_id, "task": None,
                    "max_episode_steps": horizon, "role": "oracle"}
    t0 = time.perf_counter()
    state: dict[str, Any] = {"last_save": model.num_timesteps, "updates": len(rows)}

    def seconds() -> float:
        return logged + time.perf_counter() - t0

    def save() -> None:
        _save_model(model, zip_file)
        theta = from_sb3(model, fam)
        # a policy record in metarl's checkpoint format (how it was trained: oracle.json)
        cfg = TrainConfig(family=fam.name, family_options=fam.options(), algo="maml",
                          iterations=max(1, state["updates"]), meta_batch=n_envs,
                          inner=InnerConfig(steps=0, lr=0.1), outer=OuterConfig(), seed=seed)
        checkpoint.save(out / checkpoint.CHECKPOINT,
                        Run(theta=theta, config=cfg, iteration=max(1, state["updates"])))
        text = "".join(json.dumps(r) + "\n" for r in rows)
        checkpoint.atomic_write(out / METRICS, lambda tmp: Path(tmp).write_text(text))
        summary = {"format": "metarl-oracle-v1", "trainer": "stable-baselines3 PPO",
                   "family": fam.name, "env_id": env_id, "timesteps": int(model.num_timesteps),
                   "seconds": round(seconds(), 3), "n_envs": n_envs, "seed": seed,
                   "ppo": {k: v for k, v in settings.items() if not callable(v)},
                   "policy": {"hidden": list(fam.hidden), "activation": fam.activation,
                              "init_std": fam.init_std},
                   "train_return": rows[-1]["return/train"] if rows else None}
        old = out / "oracle.json"
        if old.is_file():
            prev = json.loads(old.read_text())
            for key in ("test_return", "n_test_tasks"):
                if key in prev and prev.get("timesteps") == summary["timesteps"]:
                    summary[key] = prev[key]
        checkpoint.atomic_write(old, lambda tmp: Path(tmp).write_text(
            json.dumps(summary, indent=2) + "\n"))
        state["last_save"] = model.num_timesteps

    def on_step(cb: Any) -> bool:
        if progress is not None and cb.num_timesteps % (n_envs * 64) == 0:
            progress(int(cb.num_timesteps), None)
        return True

    def rollout_end() -> None:  # after each rollout, before the update that uses it
        rets = _episode_returns(model)
        if not rets:
            return
        std = float(model.policy.log_std.detach().exp().mean())
        row = {"iteration": state["updates"] + 1, "seconds": round(seconds(), 3),
               "timesteps": int(model.num_timesteps),
               "return/train": float(np.mean(rets)),
               "rollout/episode_length": float(np.mean(
                   [e["l"] for e in model.ep_info_buffer or ()])),
               "policy/std": std,
               "time/env_steps_per_s": float(model.num_timesteps - state.get("t_steps", 0))
               / max(time.perf_counter() - state.get("t_wall", t0), 1e-9)}
        state["t_steps"], state["t_wall"] = model.num_timesteps, time.perf_counter()
        state["updates"] += 1
        rows.append(row)
        if progress is not None:
            progress(int(model.num_timesteps), row)
        if model.num_timesteps - state["last_save"] >= checkpoint_every:
            save()

    hook = _callback(on_step, rollout_end)
    state["t_steps"], state["t_wall"] = model.num_timesteps, time.perf_counter()
    try:
        model.learn(total_timesteps=timesteps - model.num_timesteps, callback=hook,
                    reset_num_timesteps=False)
    except KeyboardInterrupt:
        save()
        raise
    finally:
        env.close()
    save()
    result = OracleResult(out=out, timesteps=int(model.num_timesteps), seconds=seconds(),
                          train_return=rows[-1]["return/train"] if rows else None)
    if eval_tasks:
        meta = cast("LocomotionFamily", families.make(fam.name, **{**fam.options(), "oracle": False,
                                                                 "oracle_run": str(out)}))
        tasks = evaluation_tasks(meta, eval_tasks)
        ret = meta.oracle_returns(tasks, torch.device("cpu"), torch.float32)
        assert ret is not None
        result.test_return, result.n_test_tasks = float(ret.double().mean()), eval_tasks
        summary = json.loads((out / "oracle.json").read_text())
        summary.update(test_return=result.test_return, n_test_tasks=eval_tasks,
                       test_protocol="metarl evaluate's oracle line: oracle_returns on the "
                       "first n_test_tasks test tasks of seed 0, rollouts episodes each, "
                       "actions sampled")
        checkpoint.atomic_write(out / "oracle.json", lambda tmp: Path(tmp).write_text(
            json.dumps(summary, indent=2) + "\n"))
    return result


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- PPO from scratch: sample efficiency -------------------------------------------------


@dataclass
class PPOCurve:
    """PPO trained from scratch on one task: its learning curve and when it reached the
    meta-policy's returns."""

    task: dict[str, Any]
    thresholds: dict[int, float]
    """Adaptation step k -> the meta-policy's return on this task after k steps."""
    reached: dict[int, int | None]
    """k -> environment steps PPO took until the mean return of its last ``window``
    episodes reached ``thresholds[k]`` (None: not within the budget)."""
    timesteps: list[int] = field(default_factory=list)
    """Environment steps at each finished episode."""
    returns: list[float] = field(default_factory=list)
    """Mean return of the last ``window`` episodes at each of those points."""
    total_steps: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "thresholds": {str(k): v for k, v in self.thresholds.items()},
                "steps_to_reach": {str(k): v for k, v in self.reached.items()},
                "total_steps": self.total_steps, "seconds": round(self.seconds, 1),
                "curve": {"timesteps": self.timesteps[::max(1, len(self.timesteps) // 200)],
                          "returns": [round(r, 3) for r in
                                      self.returns[::max(1, len(self.returns) // 200)]]}}


def ppo_from_scratch(family: RLFamily, task: Mapping[str, Any], thresholds: Mapping[int, float],
                     *, max_steps: int, seed: int = 0, window: int | None = None,
                     n_envs: int = N_ENVS, ppo_kwargs: Mapping[str, Any] | None = None,
                     stop_when_reached: bool = True,
                     progress: Callable[[int], None] | None = None) -> PPOCurve:
    """Train SB3 PPO from a fresh initialisation on one task, with the family's policy
    architecture, and record how many environment steps it needs to reach each return.

    PPO's return at a point is the mean return of its last ``window`` finished episodes
    (default: the family's ``rollouts``, the trajectories metarl scores an adapted
    policy with), actions sampled as in metarl's evaluation. Training stops at
    ``max_steps`` or, with ``stop_when_reached``, once every threshold is reached.
    """
    require_sb3()
    from stable_baselines3 import PPO

    _gaussian(family)
    settings = _ppo_settings(ppo_kwargs)
    window = window or family.rl.rollouts
    env = _vec_env(lambda: family.make_env(dict(task)), n_envs, seed)
    model = PPO("MlpPolicy", env, policy_kwargs=policy_kwargs(family), seed=seed, device="cpu",
                verbose=0, **settings)
    curve = PPOCurve(task=dict(task), thresholds=dict(thresholds),
                     reached={k: None for k in thresholds})
    recent: list[float] = []

    def on_step(cb: Any) -> bool:
        for info in cb.locals.get("infos", ()):
            ep = info.get("episode")
            if ep is None:
                continue
            recent.append(float(ep["r"]))
            del recent[:-window]
            if len(recent) < window:
                continue
            mean = float(np.mean(recent))
            curve.timesteps.append(int(cb.num_timesteps))
            curve.returns.append(mean)
            for k, thr in curve.thresholds.items():
                if curve.reached[k] is None and mean >= thr:
                    curve.reached[k] = int(cb.num_timesteps)
        if progress is not None and cb.num_timesteps % (n_envs * 64) == 0:
            progress(int(cb.num_timesteps))
        return not (stop_when_reached and all(v is not None for v in curve.reached.values()))

    t0 = time.perf_counter()
    try:
        model.learn(total_timesteps=max_steps, callback=_callback(on_step))
    finally:
        env.close()
    curve.total_steps, curve.seconds = int(model.num_timesteps), time.perf_counter() - t0
    return curve


@dataclass
class SampleEfficiency:
    """PPO from scratch against a meta-policy's adaptation on the same test tasks."""

    family: str
    rollouts: int
    """Trajectories per adaptation step (E)."""
    horizon: int
    """Steps per trajectory (H): one adaptation step samples at most E * H environment steps."""
    max_steps: int
    """PPO's budget per task."""
    curves: list[PPOCurve]

    @property
    def ks(self) -> list[int]:
        return sorted(self.curves[0].thresholds) if self.curves else []

    def meta_steps(self, k: int) -> int:
        """Environment steps the meta-policy samples to adapt k steps (at most)."""
        return k * self.rollouts * self.horizon

    def to_json(self) -> dict[str, Any]:
        return {"family": self.family, "trainer": "stable-baselines3 PPO from scratch",
                "ppo": {k: v for k, v in PPO_DEFAULTS.items()}, "n_envs": N_ENVS,
                "max_steps": self.max_steps, "rollouts": self.rollouts, "horizon": self.horizon,
                "meta_steps": {str(k): self.meta_steps(k) for k in self.ks},
                "tasks": [c.to_json() for c in self.curves]}


def ppo_sample_efficiency(family: RLFamily, per_task: Tensor, tasks: Sequence[Mapping[str, Any]],
                          *, ks: Sequence[int], max_steps: int, seed: int = 0,
                          ppo_kwargs: Mapping[str, Any] | None = None,
                          progress: Callable[[int, int], None] | None = None) -> SampleEfficiency:
    """For each task, the environment steps PPO from scratch needs to reach the return the
    meta-policy reached after each of ``ks`` adaptation steps (``per_task[i, k]``).

    Args:
        per_task: ``[n, K+1]`` the meta-policy's return on ``tasks[i]`` after k steps (what
            ``metarl evaluate`` measured; ``Curve.per_task``).
        tasks: the n tasks (:func:`evaluation_tasks`: those ``metarl evaluate`` drew).
        progress: called with (task index, PPO steps done on it).
    """
    _rl(family)
    curves = []
    for i, task in enumerate(tasks):
        thresholds = {int(k): float(per_task[i, k]) for k in ks}
        log.info("PPO from scratch on task %s (thresholds %s)", task, thresholds)
        curves.append(ppo_from_scratch(
            family, task, thresholds, max_steps=max_steps, seed=seed + i, ppo_kwargs=ppo_kwargs,
            progress=_for_task(progress, i)))
    return SampleEfficiency(family=family.name, rollouts=family.rl.rollouts,
                            horizon=family.rl.horizon, max_steps=max_steps, curves=curves)


def _for_task(progress: Callable[[int, int], None] | None,
              i: int) -> Callable[[int], None] | None:
    if progress is None:
        return None
    report = progress
    return lambda n: report(i, n)


def _task_label(task: Mapping[str, Any]) -> str:
    """``velocity 1.51`` for ``{"velocity": 1.5084}``: a legend entry, not the full spec."""
    def short(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.2f}"
        if isinstance(v, list | tuple):
            return "(" + ", ".join(short(x) for x in v) + ")"
        return str(v)

    return ", ".join(f"{k} {short(v)}" for k, v in task.items())


def plot_sample_efficiency(se: SampleEfficiency, path: str | Path, *, title: str = "") -> Path:
    """PPO's learning curve on each task (return versus environment steps, log scale), the
    meta-policy's returns after k steps as dashed levels, and the steps it used as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.5), dpi=120)
    markers = {k: m for k, m in zip(se.ks, "osD^v<>p*h", strict=False)}
    for c in se.curves:
        (line,) = ax.plot(c.timesteps, c.returns, lw=1.2, label=f"PPO, {_task_label(c.task)}")
        for k, thr in c.thresholds.items():
            ax.axhline(thr, color=line.get_color(), ls="--", lw=0.8, alpha=0.7)
            ax.plot([se.meta_steps(k)], [thr], marker=markers.get(k, "o"), ls="none",
                    color=line.get_color(), ms=6, mec="black", mew=0.6)
    for k in se.ks:  # one legend entry per adaptation step, in black
        ax.plot([], [], marker=markers.get(k, "o"), ls="none", color="white", mec="black",
                label=f"meta-policy after {k} step{'s' if k > 1 else ''} "
                      f"({se.meta_steps(k)} steps)")
    ax.set_xscale("log")
    ax.set_xlabel("environment steps on the task")
    ax.set_ylabel("return (mean of the last trajectories)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    checkpoint.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path
