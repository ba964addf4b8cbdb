"""Training configuration: family defaults < config file (TOML) < command-line flags."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metarl.algorithms import ALGORITHMS, IMAMLConfig
from metarl.families import Family
from metarl.inner import InnerConfig
from metarl.types import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

OUTER_OPTIMIZERS = ("adam", "sgd", "trpo")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a training run needs; written to the run folder as ``config.json``."""

    family: str = "sinusoid"
    """Family name or ``package.module:Factory``."""
    family_options: dict[str, Any] = field(default_factory=dict)
    """Options passed to the family's factory (shots, ways, ...)."""
    algo: str = "maml"
    """maml, fomaml, reptile or imaml."""
    iterations: int = 1000
    """Meta-iterations (outer updates)."""
    meta_batch: int = 25
    """Tasks per meta-iteration (T)."""
    inner_steps: int = 1
    """Inner gradient steps per task (k)."""
    inner_lr: float = 0.01
    """Inner learning rate alpha."""
    outer: str = "adam"
    """Outer optimizer: adam, sgd, or trpo (RL families)."""
    outer_lr: float = 1e-3
    """Outer learning rate (Adam/SGD)."""
    imaml_lam: float = 1.0
    """iMAML proximal strength lambda."""
    imaml_cg_iters: int = 5
    """iMAML conjugate-gradient iterations."""
    imaml_cg_damping: float = 0.0
    """iMAML CG damping."""
    task_chunk: int | None = None
    """Process the meta-batch this many tasks at a time (bounds memory); None: all at once."""
    seed: int = 0
    """Seed of parameters and training tasks."""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda."""
    dtype: str = "float32"
    """float32 or float64."""
    log_every: int = 100
    """Log metrics every this many iterations (and at the end)."""
    checkpoint_every: int = 1000
    """Write the checkpoint every this many iterations (and at the end)."""
    keep_checkpoints: bool = False
    """Also keep every periodic checkpoint as ``checkpoints/iteration-NNNNNN.pt`` (for
    choosing an iteration on validation tasks)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Outer-optimizer and family-kind settings (TRPO's max_kl, rollouts, ...)."""

    def __post_init__(self) -> None:
        if self.algo not in ALGORITHMS:
            raise ConfigError(f"unknown algorithm {self.algo!r}: use one of {', '.join(ALGORITHMS)}")
        if self.outer not in OUTER_OPTIMIZERS:
            raise ConfigError(f"unknown outer optimizer {self.outer!r}: use one of "
                              f"{', '.join(OUTER_OPTIMIZERS)}")
        for name in ("iterations", "meta_batch", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.task_chunk is not None and self.task_chunk < 1:
            raise ConfigError(f"task-chunk must be >= 1, got {self.task_chunk}")
        if self.outer_lr <= 0:
            raise ConfigError(f"outer-lr must be > 0, got {self.outer_lr}")
        self.inner  # validates steps and lr
        self.imaml  # validates iMAML settings

    @property
    def inner(self) -> InnerConfig:
        return InnerConfig(steps=self.inner_steps, lr=self.inner_lr)

    @property
    def imaml(self) -> IMAMLConfig:
        return IMAMLConfig(lam=self.imaml_lam, cg_iters=self.imaml_cg_iters,
                           cg_damping=self.imaml_cg_damping)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def family_defaults(family: Family) -> dict[str, Any]:
    d = family.defaults
    return {"algo": d.algo, "iterations": d.iterations, "meta_batch": d.meta_batch,
            "inner_steps": d.inner_steps, "inner_lr": d.inner_lr, "outer": d.outer,
            "outer_lr": d.outer_lr, "log_every": d.log_every,
            "checkpoint_every": d.checkpoint_every, "imaml_lam": d.imaml_lam,
            "imaml_cg_iters": d.imaml_cg_iters}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML config: top-level keys are TrainConfig fields (``family = "sinusoid"``,
    ``iterations = 1000``, ...), the ``[family_options]`` table holds the family's options
    and ``[extra]`` outer-optimizer settings (``max_kl``, ...)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist: give the path of a TOML file")
    try:
        values = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from None
    opts = values.pop("family_options", {})
    unknown = sorted(set(values) - FIELDS)
    if unknown:
        raise ConfigError(f"config file {str(p)!r} has unknown keys {unknown}: known keys are "
                          f"{', '.join(sorted(FIELDS - {'family_options', 'extra'}))} and the tables "
                          "[family_options] and [extra]")
    if opts:
        values["family_options"] = opts
    return values


def resolve(family: Family, *layers: dict[str, Any]) -> TrainConfig:
    """Merge family defaults with later layers (config file, then flags); ``None`` values are skipped."""
    merged: dict[str, Any] = {"family": family.name, **family_defaults(family)}
    options: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for layer in layers:
        for k, v in layer.items():
            if v is None:
                continue
            if k not in FIELDS:
                raise ConfigError(f"unknown setting {k!r}")
            if k == "family_options":
                options.update(v)
            elif k == "extra":
                extra.update({kk: vv for kk, vv in v.items() if vv is not None})
            else:
                merged[k] = v
    # a family may give an algorithm its own inner loop (``imaml_inner_steps``,
    # ``reptile_inner_lr``, ... in its defaults' extra): iMAML solves a proximal
    # problem with more steps than MAML takes, Reptile needs k > 1 to meta-learn
    given = {k for layer in layers for k, v in layer.items() if v is not None}
    fx = family.defaults.extra
    for key in ("inner_steps", "inner_lr"):
        own = f"{merged.get('algo')}_{key}"
        if key not in given and own in fx:
            merged[key] = fx[own]
    try:
        return TrainConfig(**merged, family_options=options, extra=extra)
    except TypeError as e:
        raise ConfigError(f"bad configuration: {e}") from None
