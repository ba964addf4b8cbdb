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
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

import torch

from metarl.types import ConfigError, Params, TaskBatch

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "metarl.families"


@dataclass(frozen=True, kw_only=True)
class Defaults:
    """A family's default hyperparameters (what ``metarl train`` uses unless told otherwise)."""

    algo: str = "maml"
    iterations: int = 1000
    meta_batch: int = 25
    inner_steps: int = 1
    inner_lr: float = 0.01
    outer_lr: float = 1e-3
    outer: str = "adam"
    eval_steps: int = 10
    eval_tasks: int = 600
    eval_lr: tuple[float, ...] | None = None
    """Inner learning rates at test time; None: the training inner lr."""
    log_every: int = 100
    checkpoint_every: int = 1000
    imaml_lam: float = 1.0
    imaml_cg_iters: int = 5
    extra: dict[str, Any] = field(default_factory=dict)
    """Family-specific defaults (e.g. shots, ways, trajectories per task)."""


@runtime_checkable
class Family(Protocol):
    """What training, evaluation and the CLI need of a task family."""

    name: str
    description: str
    """One line for ``metarl families``."""
    metric: str
    """Name of the evaluation metric: "mse", "accuracy", "return"."""
    higher_is_better: bool
    defaults: Defaults

    def describe(self) -> str:
        """The task distribution, model and protocol, several lines (``families show``)."""
        ...

    def options(self) -> dict[str, Any]:
        """The family's constructor options, JSON-serialisable, so a checkpoint can rebuild it."""
        ...

    def init_params(self, generator: torch.Generator, device: torch.device,
                    dtype: torch.dtype) -> Params:
        """Fresh meta-parameters theta."""
        ...

    def sample_batch(self, n_tasks: int, generator: torch.Generator, *, split: str,
                     device: torch.device, dtype: torch.dtype,
                     **overrides: Any) -> TaskBatch:
        """T new tasks from the ``split`` ("train" or "test") distribution.
        ``overrides`` are evaluation-time settings (e.g. ``shots``)."""
        ...


Factory = Callable[..., Family]

_registry: dict[str, Factory] = {}
_loaded_entry_points = False


def fits(family: Family, theta: Params) -> bool:
    """Whether parameters ``theta`` (e.g. a checkpoint's) have the names and shapes of
    ``family``'s model."""
    from metarl import params as P

    fresh = family.init_params(torch.Generator().manual_seed(0), torch.device("cpu"),
                               torch.float32)
    return P.shapes(fresh) == P.shapes(theta)


def register(name: str, factory: Factory, *, overwrite: bool = False) -> None:
    """Register a family factory under ``name`` (``factory(**options)`` builds it)."""
    if not callable(factory):
        raise TypeError(f"family factory for {name!r} must be callable, got {type(factory).__name__}")
    _load_entry_points()
    if name in _registry and not overwrite and _registry[name] is not factory:
        raise ValueError(f"family {name!r} is already registered: pass overwrite=True to replace it")
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
            raise ConfigError(f"family {self.ep.name!r} failed to load from {self.ep.value}: {e}") from e
        return factory(**options)


def names() -> list[str]:
    """Registered family names, sorted."""
    _load_entry_points()
    return sorted(_registry)


def _import_module(name: str) -> Any:
    """Import ``name``; like ``python -m``, fall back to the current directory."""
    import os
    import sys

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
        raise ConfigError(f"module {module_name!r} has no attribute {attr!r} (family {spec!r})") from None


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
    try:
        family = factory(**options)
    except TypeError as e:
        raise ConfigError(f"family {name!r} does not take options {sorted(options)}: {e}") from e
    missing = [a for a in ("name", "defaults", "init_params", "sample_batch") if not hasattr(family, a)]
    if missing:
        raise ConfigError(f"{name!r} built a {type(family).__name__}, which lacks {missing}: "
                          "a family must implement the metarl.families.Family protocol")
    return family
