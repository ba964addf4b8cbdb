"""Command-line options generated from :class:`metarl.config.TrainConfig`.

Every training setting is declared once, as a typed field with a docstring in
the configuration dataclasses; this module turns each into a Typer option (the
docstring becomes its ``--help``, a ``Literal`` becomes a closed choice the
parser enforces) and the values a user gave back into a partial nested
mapping for :func:`metarl.config.resolve`.
"""

from __future__ import annotations

import enum
import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Annotated, Any, Literal, Optional, get_args, get_origin

import typer

from metarl.config import TrainConfig, field_docs, field_types

FLAGS = {"outer.optimizer": "outer", "imaml.lam": "lam", "imaml.cg_iters": "cg-iters",
         "imaml.cg_damping": "cg-damping", "trpo.max_kl": "max-kl"}
"""Settings whose flag is not their dotted name with dashes (``inner.steps`` ->
``--inner-steps``): the short names users already type."""

SKIPPED = {"family_options"}
"""Settings given through their own options (``--family-opt``, ``--shots``, ...)."""

PANELS = {"family": "Task", "inner": "Inner loop", "imaml": "iMAML", "trpo": "TRPO (RL families)",
          "seed": "Run", "device": "Run", "dtype": "Run", "log_every": "Output",
          "checkpoint_every": "Output", "keep_checkpoints": "Output",
          "tensorboard": "Output", "validate": "Validation"}
"""Help panel of each top-level setting; the others go under "Outer loop"."""

FAMILY_DEFAULTED = {"algo", "iterations", "meta_batch", "inner", "outer", "imaml", "trpo",
                    "log_every", "checkpoint_every", "task_chunk"}
"""Top-level settings whose default is the family's (its published hyperparameters)."""


@dataclass(frozen=True)
class Setting:
    path: tuple[str, ...]
    """Where it sits in the nested config: ``("inner", "steps")``."""
    flag: str
    tp: Any
    doc: str
    panel: str
    default: str


def settings(cls: type = TrainConfig, prefix: tuple[str, ...] = (),
             base: Any = None) -> Iterator[Setting]:
    """Every leaf setting of ``cls``, in declaration order."""
    base = base if base is not None else cls()
    docs, hints = field_docs(cls), field_types(cls)
    for f in fields(cls):
        path = (*prefix, f.name)
        if path[0] in SKIPPED:
            continue
        tp, value = hints[f.name], getattr(base, f.name)
        if isinstance(tp, type) and hasattr(tp, "__dataclass_fields__"):
            yield from settings(tp, path, value)
            continue
        dotted = ".".join(path)
        top = path[0]
        if top == "family":
            default = "navigation2d"
        elif top in FAMILY_DEFAULTED:
            default = "the family's"
        else:
            default = "none" if value is None else str(value).lower() if isinstance(value, bool) \
                else str(value)
        yield Setting(path=path, flag=FLAGS.get(dotted, dotted.replace("_", "-").replace(".", "-")),
                      tp=tp, doc=docs.get(f.name, ""), panel=PANELS.get(top, "Outer loop"),
                      default=default)


def _option_type(tp: Any) -> tuple[Any, dict[str, Any]]:
    """The Python type Typer parses a setting as, and extra Option arguments."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return choice("".join(str(a).title() for a in args), args), {}
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in args if a is not type(None)]
        scalar = [a for a in arms if a in (int, float, str, bool)]
        words = [w for a in arms if get_origin(a) is Literal for w in get_args(a)]
        if int in scalar and words:  # an integer or a word (--task-chunk 4 / auto)
            return str, {"callback": _int_or(tuple(words)), "metavar": f"<int|{'|'.join(words)}>"}
        return _option_type(scalar[0] if scalar else arms[0])
    return tp, {}


def _int_or(words: tuple[str, ...]) -> Callable[[Optional[str]], Any]:
    """Option callback: an integer as an int, anything else as given (one of ``words``, or a
    value the configuration's check refuses in one line naming the setting)."""

    def parse(value: Optional[str]) -> Any:
        if value is None or value in words:
            return value
        try:
            return int(value)
        except ValueError:
            return value

    return parse


def _parameter(s: Setting) -> inspect.Parameter:
    tp, extra = _option_type(s.tp)
    help_text = f"{s.doc} \\[default: {s.default}]".strip()
    if tp is bool:
        option = typer.Option(f"--{s.flag}", help=help_text, rich_help_panel=s.panel)
    else:
        option = typer.Option(f"--{s.flag}", help=help_text, rich_help_panel=s.panel,
                              show_default=False, **extra)
    return inspect.Parameter("__".join(s.path), inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[tp], option])


def choice(name: str, values: tuple[Any, ...]) -> type[enum.Enum]:
    """A str Enum of ``values``: Typer lists them in ``--help`` and the parser rejects
    anything else (every Typer version supports Enum choices)."""
    return enum.Enum(name, {str(v): str(v) for v in values}, type=str)  # type: ignore[return-value]


class Device(str, enum.Enum):
    """Where tensors live: auto (CUDA when present), cpu or cuda."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


DEVICE_HELP = "auto (CUDA when present), cpu or cuda."


def nested(values: dict[str, Any]) -> dict[str, Any]:
    """``{"inner__steps": 3, "algo": None}`` -> ``{"inner": {"steps": 3}}`` (None dropped)."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, enum.Enum):
            value = value.value
        *parents, leaf = name.split("__")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def with_settings(func: Callable[..., None]) -> Callable[..., None]:
    """Give command ``func`` one option per training setting.

    ``func`` declares its own options and a keyword parameter ``settings``; the
    command's signature is ``func``'s with ``settings`` replaced by the generated
    options, and ``func`` receives the given ones as a partial nested mapping.
    """
    own = inspect.signature(func)
    generated = [_parameter(s) for s in settings()]
    names = {p.name for p in generated}

    @functools.wraps(func)
    def command(**kwargs: Any) -> None:
        given = nested({k: v for k, v in kwargs.items() if k in names})
        func(settings=given, **{k: v for k, v in kwargs.items() if k not in names})

    hints = typing.get_type_hints(func, include_extras=True)
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints[p.name])
              for p in own.parameters.values() if p.name != "settings"]
    command.__signature__ = own.replace(parameters=[*generated, *params])  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in [*generated, *params]}
    return command
