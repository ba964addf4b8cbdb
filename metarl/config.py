"""Training configuration: one typed, nested listing of every setting.

:class:`TrainConfig` is the single source of truth. Its fields (and those of
the sub-configs :class:`~metarl.inner.InnerConfig`, :class:`OuterConfig`,
:class:`~metarl.algorithms.imaml.IMAMLConfig` and
:class:`~metarl.rl.trpo.TRPOConfig`) carry docstrings that the command line
turns into ``--help``, so a setting is written once.

Settings are layered: the family's :class:`Defaults` (a complete TrainConfig
plus typed per-algorithm inner-loop overrides) < a TOML file < command-line
flags. Every layer above the defaults is a partial nested mapping
(``{"inner": {"lr": 0.1}, "trpo": {"max_kl": 0.02}}``) checked against the
dataclasses: an unknown or misspelt key anywhere is refused with the closest
known name, and values are checked for type before anything runs.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import json
import sys
import textwrap
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args, get_origin

from metarl.algorithms import ALGORITHMS, IMAMLConfig
from metarl.inner import InnerConfig
from metarl.rl.trpo import TRPOConfig
from metarl.types import ConfigError

if TYPE_CHECKING:
    from metarl.families import Family

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

Algo = Literal["maml", "fomaml", "reptile", "imaml"]
OuterName = Literal["adam", "sgd", "trpo"]
DeviceName = Literal["auto", "cpu", "cuda"]
DTypeName = Literal["float32", "float64"]

OUTER_OPTIMIZERS: tuple[str, ...] = get_args(OuterName)


@dataclass(frozen=True, kw_only=True)
class OuterConfig:
    """The outer (meta) update of theta."""

    optimizer: OuterName = "adam"
    """Outer optimizer: adam, sgd, or trpo (RL families: a trust region on the KL of the
    adapted policies)."""
    lr: float = 1e-3
    """Outer learning rate (adam and sgd; TRPO's step is set by max_kl)."""
    lr_final: float | None = None
    """Anneal the outer learning rate linearly from outer-lr to this over the iterations
    (Reptile's meta-step, 1 -> 0); None keeps it constant."""

    def __post_init__(self) -> None:
        if self.optimizer not in OUTER_OPTIMIZERS:
            raise ConfigError(f"unknown outer optimizer {self.optimizer!r}: use one of "
                              f"{', '.join(OUTER_OPTIMIZERS)}")
        if not self.lr > 0:
            raise ConfigError(f"outer-lr must be > 0, got {self.lr}")
        if self.lr_final is not None and not self.lr_final >= 0:
            raise ConfigError(f"outer-lr-final must be >= 0, got {self.lr_final}")
        if self.lr_final is not None and self.optimizer == "trpo":
            raise ConfigError("outer-lr-final anneals adam's or sgd's learning rate; TRPO's step "
                              "is set by max_kl: drop --outer-lr-final")


@dataclass(frozen=True, kw_only=True)
class ValidationConfig:
    """Validation while training: every few iterations the meta-parameters adapt to fixed
    held-out tasks, and the best of them are kept as ``best.pt``, so that a run's result
    does not depend on stopping it at the right iteration."""

    every: int = 0
    """Validate every this many iterations (and after the last of each command: a run
    stopped at another iteration and resumed has that one validated too, and it may be
    the best), logging the metric after each adaptation step (validation/METRIC_K in
    metrics.jsonl) and keeping the best meta-parameters by the metric after the last
    step as best.pt; 0: never."""
    tasks: int | None = None
    """Validation tasks: fresh tasks of the training split, the same at every validation
    and never the training stream's or the test split's. None: the family's test count."""
    steps: int | None = None
    """Adaptation steps scored (the metric after the last picks best.pt). None: the
    family's test steps, or the run's inner steps if more."""
    rollouts: int | None = None
    """RL: trajectories per task for each adaptation step and score. None: the run's."""

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError(f"validate-every must be >= 0 (0: never), got {self.every}")
        for name in ("tasks", "rollouts"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"validate-{name} must be >= 1, got {value}")
        if self.steps is not None and self.steps < 0:
            raise ConfigError(f"validate-steps must be >= 0, got {self.steps}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a training run needs; written to the run folder as ``config.json``
    and into every checkpoint."""

    family: str = "sinusoid"
    """Task family: a registered name (see `metarl families`) or package.module:Factory."""
    family_options: dict[str, Any] = field(default_factory=dict)
    """Options of the family's factory (shots, ways, rollouts, ...), as resolved."""
    algo: Algo = "maml"
    """Meta-gradient: maml, fomaml (first order), reptile or imaml (implicit)."""
    iterations: int = 1000
    """Meta-iterations (outer updates)."""
    meta_batch: int = 25
    """Tasks per meta-iteration (T)."""
    inner: InnerConfig = field(default_factory=InnerConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    imaml: IMAMLConfig = field(default_factory=IMAMLConfig)
    trpo: TRPOConfig = field(default_factory=TRPOConfig)
    validate: ValidationConfig = field(default_factory=ValidationConfig)
    task_chunk: int | Literal["auto"] | None = None
    """Process the meta-batch this many tasks at a time and average (supervised families):
    peak memory of one chunk, same gradient up to rounding. None: all tasks at once; auto:
    the fastest of T, T/2, ... 1, timed on the first meta-iteration."""
    seed: int = 0
    """Seed of the initial parameters and of the training tasks."""
    device: DeviceName = "auto"
    """auto (CUDA when present), cpu or cuda."""
    dtype: DTypeName = "float32"
    """float32 or float64."""
    log_every: int = 100
    """Write a metrics.jsonl row every this many iterations (and at the end)."""
    checkpoint_every: int = 1000
    """Write checkpoint.pt every this many iterations (and at the end)."""
    keep_checkpoints: bool = False
    """Also keep each periodic checkpoint as checkpoints/iteration-NNNNNN.pt, to pick an
    iteration on validation tasks (metarl evaluate FILE --seed 1)."""
    tensorboard: bool = False
    """Also write every metrics.jsonl row to TensorBoard event files in the run folder
    (tensorboard --logdir runs); needs the tensorboard extra."""

    def __post_init__(self) -> None:
        if self.algo not in ALGORITHMS:
            raise ConfigError(f"unknown algorithm {self.algo!r}: use one of "
                              f"{', '.join(ALGORITHMS)}")
        for name in ("iterations", "meta_batch", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                flag = name.replace("_", "-")
                raise ConfigError(f"{flag} must be >= 1, got {getattr(self, name)}")
        if self.task_chunk not in (None, "auto") and (
                not isinstance(self.task_chunk, int) or self.task_chunk < 1):
            raise ConfigError(f"task-chunk must be an integer >= 1 or auto, got "
                              f"{self.task_chunk!r}")
        if self.device not in get_args(DeviceName) and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"unknown device {self.device!r}: use auto, cpu or cuda")
        if self.dtype not in get_args(DTypeName):
            raise ConfigError(f"unknown dtype {self.dtype!r}: use float32 or float64")
        if self.inner.optimizer == "adam" and self.algo in ("maml", "imaml"):
            how = "differentiates through" if self.algo == "maml" else "solves"
            raise ConfigError(f"--inner-optimizer adam is first order; --algo {self.algo} {how} "
                              "its SGD inner steps: use --algo reptile or fomaml, or "
                              "--inner-optimizer sgd")
        if self.inner.learn_lr and self.algo != "maml":
            raise ConfigError(f"--inner-learn-lr differentiates the inner steps with respect to "
                              f"their rates: use --algo maml (got {self.algo})")
        if self.inner.learn_lr and self.inner.steps < 1:
            raise ConfigError("--inner-learn-lr needs --inner-steps >= 1")
        if self.inner.kl_penalty and self.algo != "maml":
            raise ConfigError(f"--inner-kl-penalty differentiates the adaptation's KL through the "
                              f"inner steps: use --algo maml (got {self.algo})")
        if self.inner.optimizer == "adam" and self.outer.optimizer == "trpo":
            raise ConfigError("--inner-optimizer adam does not run with --outer trpo (TRPO "
                              "differentiates through the inner steps): use --outer adam or sgd")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready nested dict (what ``config.json`` and checkpoints hold)."""
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "config") -> TrainConfig:
        """Rebuild from :meth:`to_dict` output, or from the flat layout of checkpoints
        written before the configuration was nested (``inner_steps``, ``extra``, ...)."""
        return build(cls, upgrade(d, where=where), where=where)

    def replace(self, changes: Mapping[str, Any]) -> TrainConfig:
        """A copy with a partial nested mapping applied (checked like a config file)."""
        tree = dataclasses.asdict(self)
        _merge(tree, check_layer(changes, where="settings"))
        return build(TrainConfig, tree, where="settings")


@dataclass(frozen=True, kw_only=True)
class InnerOverride:
    """A family's inner loop for one algorithm, where it differs from the default
    (iMAML solves its proximal problem with more steps than MAML takes; Reptile needs
    k > 1 to meta-learn). None keeps the family's default."""

    steps: int | None = None
    lr: float | None = None


@dataclass(frozen=True, kw_only=True)
class EvalDefaults:
    """How ``metarl evaluate`` meta-tests a family unless told otherwise."""

    steps: int = 10
    """Adaptation steps reported (a model trained with more is tested with its own)."""
    tasks: int = 600
    """Test tasks."""
    lr: tuple[float, ...] | None = None
    """Test-time inner learning rates, the last repeated; None: the training inner lr."""
    pretrain_iterations: int = 100
    """RL: iterations of the "pretrained on all tasks jointly" baseline."""


@dataclass(frozen=True, kw_only=True)
class Defaults:
    """A family's defaults: what ``metarl train`` and ``metarl evaluate`` use unless told
    otherwise (the published hyperparameters)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """Training settings (``family`` and ``family_options`` are filled in by resolve)."""
    per_algo: Mapping[str, InnerOverride] = field(default_factory=dict)
    """Inner loop per algorithm, where it differs from ``train.inner``."""
    eval: EvalDefaults = field(default_factory=EvalDefaults)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.per_algo) - set(ALGORITHMS))
        if unknown:
            raise ConfigError(f"per-algorithm defaults for unknown algorithms {unknown}: use "
                              f"{', '.join(ALGORITHMS)}")

    def with_(self, train: Mapping[str, Any] | None = None,
              per_algo: Mapping[str, InnerOverride] | None = None,
              **eval_changes: Any) -> Defaults:
        """A copy with training settings changed by a partial nested mapping, per-algorithm
        overrides replaced or extended, and evaluation defaults changed."""
        return Defaults(train=self.train.replace(train or {}),
                        per_algo={**self.per_algo, **(per_algo or {})},
                        eval=dataclasses.replace(self.eval, **eval_changes))

    def for_algo(self, algo: str) -> InnerConfig:
        """The family's inner loop for ``algo``."""
        ov = self.per_algo.get(algo)
        if ov is None:
            return self.train.inner
        base = self.train.inner
        return base.with_steps(base.steps if ov.steps is None else ov.steps,
                               base.lr if ov.lr is None else ov.lr)


# --- field docs, types and checking ---------------------------------------------


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstrings written under each field of dataclass ``cls`` (one line each)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (frozen app): help without field docs
        return {}
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    docs: dict[str, str] = {}
    for node, nxt in zip(body.body, body.body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of dataclass ``cls``'s fields."""
    module = sys.modules[cls.__module__]
    return typing.get_type_hints(cls, vars(module))


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _choices(tp: Any) -> tuple[Any, ...] | None:
    return get_args(tp) if get_origin(tp) is Literal else None


def coerce(value: Any, tp: Any, name: str) -> Any:
    """``value`` checked against annotation ``tp`` (int, float, bool, str, Literal,
    ``X | None``, ``tuple[float, ...]``, dict); ints are accepted for floats and lists
    for tuples. Raises :class:`ConfigError` naming ``name``."""
    if tp is Any:
        return value
    origin, args = get_origin(tp), get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arm, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if len(errors) == 1 else
                          f"{name} = {value!r} is not {_describe(tp)}")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{name} = {value!r} is not one of {', '.join(map(str, args))}{hint}")
        return value
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} = {value!r} is not a list")
        item = args[0] if args else Any
        return tuple(coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name} = {value!r} is not a table of settings")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} = {value!r} is not true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} = {value!r} is not an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} = {value!r} is not a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} = {value!r} is not a string")
        return value
    return value


def _describe(tp: Any) -> str:
    """``tp`` in words: ``an integer, auto or none`` for ``int | Literal["auto"] | None``."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in args]
        return ", ".join(parts[:-1]) + " or " + parts[-1] if len(parts) > 1 else parts[0]
    if origin is Literal:
        return " or ".join(map(str, args))
    words = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             type(None): "none"}
    return words.get(tp, str(tp).replace("typing.", ""))


def _unknown(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ConfigError(f"unknown setting {key!r} in {where}: {hint}known: {', '.join(known)}")


def check_layer(layer: Mapping[str, Any], *, where: str, cls: type = TrainConfig,
                prefix: str = "") -> dict[str, Any]:
    """A partial nested mapping of ``cls`` settings with every key checked (close-name
    hint for a typo, type checks for values) and ``None`` values dropped."""
    hints, out = field_types(cls), {}
    for key, value in layer.items():
        name = f"{prefix}{key}"
        if key not in hints:
            raise _unknown(name, [f"{prefix}{k}" for k in hints], where)
        if value is None:
            continue
        tp = hints[key]
        if _is_config(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{name} in {where} is a table of settings "
                                  f"({', '.join(field_types(tp))}), got {value!r}")
            out[key] = check_layer(value, where=where, cls=tp, prefix=f"{name}.")
        else:
            out[key] = coerce(value, tp, f"{name} in {where}")
    return out


_Config = TypeVar("_Config")


def build(cls: type[_Config], tree: Mapping[str, Any], *, where: str) -> _Config:
    """Instantiate dataclass ``cls`` from a (checked) nested mapping; range errors from the
    dataclasses' own checks come out as :class:`ConfigError`."""
    klass: type = cls  # the cached lookups take any class
    hints = field_types(klass)
    kwargs = {}
    for key, value in check_layer(tree, where=where, cls=klass).items():
        tp = hints[key]
        kwargs[key] = build(tp, value, where=where) if _is_config(tp) else value
    return cls(**kwargs)


def _merge(into: dict[str, Any], layer: Mapping[str, Any]) -> None:
    for key, value in layer.items():
        nested = key != "family_options"
        if isinstance(value, Mapping) and isinstance(into.get(key), dict) and nested:
            _merge(into[key], value)
        elif key == "family_options" and isinstance(into.get(key), dict):
            into[key] = {**into[key], **value}
        else:
            into[key] = value


def _paths(layer: Mapping[str, Any], prefix: str = "") -> set[str]:
    """Dotted names of the settings a layer sets (family options count as one)."""
    names: set[str] = set()
    for key, value in layer.items():
        if isinstance(value, Mapping) and key != "family_options":
            names |= _paths(value, f"{prefix}{key}.")
        else:
            names.add(f"{prefix}{key}")
    return names


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# --- the flat layout of older checkpoints and config files --------------------------

_LEGACY = {"inner_steps": ("inner", "steps"), "inner_lr": ("inner", "lr"),
           "outer_lr": ("outer", "lr"), "imaml_lam": ("imaml", "lam"),
           "imaml_cg_iters": ("imaml", "cg_iters"), "imaml_cg_damping": ("imaml", "cg_damping")}
_DROPPED_EXTRA = {"pretrain_iterations"}
"""Settings once kept in ``extra`` that are not training settings (evaluate's own)."""


def upgrade(d: Mapping[str, Any], *, where: str) -> dict[str, Any]:
    """The nested layout of a mapping that may use the flat one of metarl 0.1 checkpoints
    and TOML files: ``inner_steps`` -> ``inner.steps``, ``outer = "trpo"`` ->
    ``outer.optimizer``, ``[extra] max_kl`` -> ``trpo.max_kl``. Unknown keys in ``extra``
    are refused with the closest TRPO setting's name."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if key in _LEGACY:
            table, sub = _LEGACY[key]
            out.setdefault(table, {})[sub] = value
        elif key == "outer" and isinstance(value, str):
            out.setdefault("outer", {})["optimizer"] = value
        elif key == "extra":
            if not isinstance(value, Mapping):
                raise ConfigError(f"extra in {where} must be a table of settings, got {value!r}")
            known = list(field_types(TRPOConfig))
            for k, v in value.items():
                if k in _DROPPED_EXTRA:
                    continue
                if k not in known:
                    raise _unknown(k, known, f"[extra] of {where} (TRPO settings; write them "
                                   "under [trpo])")
                out.setdefault("trpo", {})[k] = v
        elif isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


# --- layering ------------------------------------------------------------------------


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML config (or a run's ``config.json``): top-level keys are TrainConfig fields
    (``family``,
    ``iterations``, ``algo``, ...), tables ``[inner]``, ``[outer]``, ``[imaml]``,
    ``[trpo]`` and ``[family_options]`` hold the nested settings. Every key is checked."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist: give the path of a TOML file")
    try:
        if p.suffix == ".json":  # a run's own config.json: rerun or continue it as it was
            values = json.loads(p.read_text())
        else:
            values = tomllib.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid JSON: {e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {str(p)!r} does not hold a table of settings")
    where = f"config file {str(p)!r}"
    return check_layer(upgrade(values, where=where), where=where)


def resolve(family: Family, *layers: Mapping[str, Any]) -> TrainConfig:
    """The family's defaults with later layers applied in order (a config file, then
    flags); ``None`` values are skipped. The family's inner loop for the chosen
    algorithm applies to every inner setting no layer gives."""
    d = family.defaults
    tree = dataclasses.asdict(d.train)
    tree["family"] = family.name
    given: set[str] = set()
    for layer in layers:
        checked = check_layer(upgrade(layer, where="settings"), where="settings")
        _merge(tree, checked)
        given |= _paths(checked)
    own = d.for_algo(tree["algo"]) if tree.get("algo") in ALGORITHMS else d.train.inner
    for key in ("steps", "lr"):
        if f"inner.{key}" not in given:
            tree["inner"][key] = getattr(own, key)
    return build(TrainConfig, tree, where="settings")
