"""Task families and their registry.

A family knows its task distribution, its model and its default
hyperparameters, and turns sampled tasks into a :class:`~metarl.types.TaskBatch`.
Built-in families are registered through this package's own
``metarl.families`` entry points; a user adds one with :func:`register`, with an
entry point in the ``metarl.families`` group of their own package, or by naming
``package.module:Factory`` wherever a family name is accepted.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import os
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from metarl import params as P
from metarl.config import Defaults, TrainConfig
from metarl.distributed import Group
from metarl.inner import model_params
from metarl.outer import OuterOptimizer
from metarl.types import ConfigError, Params, TaskBatch

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "metarl.families"


FamilyKind = Literal["supervised", "rl"]


@runtime_checkable
class Family(Protocol):
    """What training, evaluation and the CLI need of a task family.

    Subclass :class:`FamilyBase` (supervised) or :class:`metarl.rl.family.RLFamily` (RL)
    to get the optional parts with their defaults.
    """

    name: str
    description: str
    """One line for ``metarl families``."""
    kind: FamilyKind
    """"supervised" (fixed support and query sets) or "rl" (trajectories sampled with the
    policy; a TRPO outer step, evaluation baselines, ``metarl adapt``). The one answer to
    "is this RL?"."""
    metric: str
    """Name of the evaluation metric: "mse", "accuracy", "return"."""
    higher_is_better: bool
    eval_chunk: int
    """Test tasks adapted as one batch by ``metarl evaluate`` (bounds its memory)."""

    @property
    def defaults(self) -> Defaults:
        """The family's default settings (a class attribute or a property)."""
        ...

    def describe(self) -> str:
        """The task distribution, model and protocol, several lines (``families show``)."""
        ...

    def options(self) -> dict[str, Any]:
        """The family's constructor options, JSON-serialisable, so a checkpoint can rebuild it."""
        ...

    def prepare(self) -> None:
        """Load and check whatever the family needs (data sets) now, so that a problem is
        reported before training starts, not mid-run."""
        ...

    def init_params(self, generator: torch.Generator, device: torch.device,
                    dtype: torch.dtype) -> Params:
        """Fresh meta-parameters theta."""
        ...

    def sample_batch(self, n_tasks: int, generator: torch.Generator, *, split: str,
                     device: torch.device, dtype: torch.dtype) -> TaskBatch:
        """T new tasks from the ``split`` ("train" or "test") distribution.

        A family may take further keyword settings, with defaults, that only a caller
        who knows the family passes: ``shots`` and ``query`` (the supervised families,
        ``metarl evaluate --shots``), ``rollouts`` and ``share``
        (:class:`~metarl.rl.family.RLFamily`)."""
        ...


@runtime_checkable
class SupportsTRPO(Protocol):
    """A family whose meta-objective TRPO can constrain (``--outer trpo``): RL families."""

    def make_outer(self, cfg: TrainConfig, theta: Params, *, group: Group) -> OuterOptimizer:
        """The TRPO outer optimizer for a run with settings ``cfg``, reducing over the
        ranks of ``group`` (see :mod:`metarl.distributed`)."""
        ...


class FamilyBase:
    """The optional parts of :class:`Family` for a supervised family: subclasses set
    ``name``, ``description``, ``metric``, ``higher_is_better`` and ``defaults`` (a
    :class:`~metarl.config.Defaults`, as a class attribute or a property) and
    implement ``options``, ``init_params`` and ``sample_batch``."""

    kind: FamilyKind = "supervised"
    eval_chunk = 600
    description = ""

    def describe(self) -> str:
        return inspect.cleandoc(type(self).__doc__ or self.description)

    def prepare(self) -> None:
        """Nothing to prepare."""


PROTOCOL_MEMBERS = ("name", "description", "kind", "metric", "higher_is_better", "defaults",
                    "eval_chunk", "describe", "options", "prepare", "init_params", "sample_batch")


Factory = Callable[..., Family]

_registry: dict[str, Factory] = {}
_loaded_entry_points = False


def fits(family: Family, theta: Params) -> bool:
    """Whether parameters ``theta`` (e.g. a checkpoint's) have the names and shapes of
    ``family``'s model (learned inner rates beside them are not the model's)."""
    fresh = family.init_params(torch.Generator().manual_seed(0), torch.device("cpu"),
                               torch.float32)
    return P.shapes(fresh) == P.shapes(model_params(theta))


def register(name: str, factory: Factory, *, overwrite: bool = False) -> None:
    """Register a family factory under ``name`` (``factory(**options)`` builds it)."""
    if not callable(factory):
        raise TypeError(f"family factory for {name!r} must be callable, got "
                        f"{type(factory).__name__}")
    _load_entry_points()
    if name in _registry and not overwrite and _registry[name] is not factory:
        raise ValueError(f"family {name!r} is already registered: pass overwrite=True to "
                         f"replace it")
    _registry[name] = factory


def _load_entry_points() -> None:
    global _loaded_entry_points
    if _loaded_entry_points:
        return
    _loaded_entry_points = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _registry:
            _registry[ep.name] = _LazyEntryPoint(ep)


class _LazyEntryPoint:
    """Imports an entry point's module only when the family is first built."""

    def __init__(self, ep: Any) -> None:
        self.ep = ep

    def __call__(self, **options: Any) -> Family:
        try:
            factory = self.ep.load()
        except Exception as e:  # a broken third-party package must not crash `families`
            raise ConfigError(f"family {self.ep.name!r} failed to load from {self.ep.value}: "
                              f"{e}") from e
        return factory(**options)


def names() -> list[str]:
    """Registered family names, sorted."""
    _load_entry_points()
    return sorted(_registry)


def _import_module(name: str) -> Any:
    """Import ``name``; like ``python -m``, fall back to the current directory."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        top = name.split(".")[0]
        if e.name != top or os.getcwd() in sys.path:
            raise
        sys.path.insert(0, os.getcwd())
        return importlib.import_module(name)


def _import_factory(spec: str) -> Factory:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"family {spec!r} is not of the form package.module:Factory")
    try:
        module = _import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"cannot import module {module_name!r} for family {spec!r}: {e}; "
                          "check the name and that it is on PYTHONPATH") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"module {module_name!r} has no attribute {attr!r} (family "
                          f"{spec!r})") from None


def make(name: str, **options: Any) -> Family:
    """Build the family ``name`` (a registered name or ``package.module:Factory``).

    Raises:
        ConfigError: unknown name (with the closest registered name), bad options.
    """
    if ":" in name:
        factory = _import_factory(name)
    else:
        _load_entry_points()
        if name not in _registry:
            close = difflib.get_close_matches(name, list(_registry), n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"unknown family {name!r}: {hint}registered: {', '.join(names())} "
                              "(or give package.module:Factory)")
        factory = _registry[name]
    from metarl.options import check_options  # unknown keys and wrong types, before building

    options = check_options(factory, options, family=name)
    try:
        family = factory(**options)
    except TypeError as e:
        raise ConfigError(f"family {name!r} does not take options {sorted(options)}: {e}") from e
    missing = [a for a in PROTOCOL_MEMBERS if not hasattr(family, a)]
    if missing:
        raise ConfigError(f"{name!r} built a {type(family).__name__}, which lacks {missing}: "
                          "a family implements the metarl.families.Family protocol (subclass "
                          "metarl.families.FamilyBase or metarl.rl.family.RLFamily)")
    if family.kind not in ("supervised", "rl"):
        raise ConfigError(f"family {name!r} has kind {family.kind!r}: use 'supervised' or 'rl'")
    return family


__all__ = ["Defaults", "Family", "FamilyBase", "SupportsTRPO", "fits", "make", "names", "register"]
