"""Family options checked against the factory's signature before the family is built.

Options reach :func:`metarl.families.make` from ``--family-opt KEY=VALUE`` (JSON, else
a string), from CLI shortcuts (``--shots``, ``--rollouts``, ...), from a TOML
``[family_options]`` table and from checkpoints. :func:`check_options` reads the
factory's parameters and type hints and turns a misspelt key or a value of the
wrong type into one :class:`~metarl.types.ConfigError` line naming the option, the
value and an example, instead of a traceback (or a silent surprise, such as
``hidden="64"`` becoming two layers of 6 and 4) somewhere in training.

Type rules (the annotation of each parameter; hints written as strings, as under
``from __future__ import annotations``, are resolved with :func:`typing.get_type_hints`):

- ``int``: an integer; a float with an integral value (``5.0``, ``1e3``, as JSON and
  TOML writers may produce) becomes that integer; ``true``/``false`` and ``1.5`` are
  rejected.
- ``float``: any real number (an integer becomes a float); not ``true``/``false``.
- ``bool``: ``true`` or ``false`` only (not ``1``, ``"yes"``).
- ``str``: a string (path objects are converted with :func:`os.fspath`).
- ``Literal[...]``: one of the choices, which the message lists.
- ``X | None``, ``Union[...]``: the first arm that accepts the value.
- ``Sequence[X]``, ``list[X]``, ``tuple[X, ...]``, ``tuple[X, Y]``: a list (or tuple),
  never a string, checked item by item; ``dict[K, V]``/``Mapping[K, V]`` likewise.
- Anything else (no annotation, ``Any``, other classes): passed through unchecked.

A parameter whose default is ``None`` also accepts ``None``, whatever its hint says.

Unknown keys are rejected with the closest accepted name, unless the factory takes
``**kwargs``. A class whose ``__init__`` takes ``**kwargs`` is taken to pass them on to
``super().__init__`` (as :class:`~metarl.envs.locomotion.LocomotionFamily` does): the
parameters of the base classes' ``__init__`` are then accepted and checked too, and
only a chain that ends in ``**kwargs`` (nothing rejects them) accepts any key.

Ranges that types cannot express (``rollouts >= 1``, ``0 < gamma <= 1``) are the
constructors' job; :func:`require` raises their errors in a matching form.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import json
import logging
import math
import numbers
import os
import types
import typing
from collections import abc
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple, Union, get_args, get_origin

from metarl.types import ConfigError

log = logging.getLogger(__name__)

_SEQUENCES = (list, tuple, abc.Sequence, abc.MutableSequence)
_MAPPINGS = (dict, abc.Mapping, abc.MutableMapping)


class _Mismatch(Exception):
    """A value does not fit a type hint (turned into a ConfigError by the caller)."""


def check_options(factory: Callable[..., Any], options: Mapping[str, Any], *,
                  family: str) -> dict[str, Any]:
    """Check ``options`` against ``factory``'s parameters before ``factory(**options)``.

    Args:
        factory: what builds the family: a class (its ``__init__`` is read, and for a
            ``**kwargs`` constructor its bases' too), a function, a ``functools.partial``
            or a callable object. A registry entry point is loaded first.
        options: option name -> value, as parsed from the command line, a TOML file or a
            checkpoint.
        family: the family's name as the user gave it, for the messages.

    Returns:
        The options, each value converted to its annotated type (``5.0`` -> ``5`` for an
        ``int``, ``1`` -> ``1.0`` for a ``float``); the same keys in the same order. A
        factory whose signature cannot be read gets the options unchanged.

    Raises:
        ConfigError: an option the factory does not take (with the closest accepted
            name), a required option missing, or a value of the wrong type, e.g.
            ``family 'navigation2d' option rollouts='abc': expected an integer
            (e.g. --family-opt rollouts=20)``.
    """
    sig = _signature(_unwrap(factory))
    if sig is None:
        return dict(options)
    params, hints, examples = sig.params, sig.hints, sig.examples

    unknown = [k for k in options if k not in params]
    if unknown and not sig.open_kwargs:
        accepted = sorted(params)
        named = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), accepted, n=1, cutoff=0.6)
            named.append(f"{k!r} (did you mean {close[0]!r}?)" if close else repr(k))
        takes = f"it takes {', '.join(accepted)}" if accepted else "it takes no options"
        raise ConfigError(f"family {family!r} does not take options named {', '.join(named)}: "
                          f"{takes}")
    missing = [n for n in sig.required if n not in options]
    if missing:
        raise ConfigError(f"family {family!r} needs option{'s' if len(missing) > 1 else ''} "
                          f"{', '.join(missing)}: give "
                          + " ".join(f"--family-opt {n}=..." for n in missing))

    checked: dict[str, Any] = {}
    for key, value in options.items():
        hint = hints.get(key, _NO_HINT)
        param = params.get(key)
        if hint is _NO_HINT or (value is None and param is not None and param.default is None):
            checked[key] = value
            continue
        try:
            checked[key] = _coerce(value, hint)
        except _Mismatch:
            example = _format(examples.get(key, _NO_HINT), hint, key)
            raise ConfigError(f"family {family!r} option {key}={value!r}: expected "
                              f"{_describe(hint)} (e.g. --family-opt {key}={example})") from None
    return checked


def require(ok: bool, family: str, option: str, value: Any, valid: str) -> None:
    """Raise ``ConfigError("family 'F': OPTION must be VALID, got VALUE")`` unless ``ok``.

    For the range checks of family constructors; write ``ok`` so that NaN fails
    (``0 < gamma <= 1``, not ``not (gamma <= 0 or gamma > 1)``).
    """
    if not ok:
        raise ConfigError(f"family {family!r}: {option} must be {valid}, got {value!r}")


# --- reading the factory -------------------------------------------------------

_NO_HINT = object()


def _unwrap(factory: Callable[..., Any]) -> Callable[..., Any]:
    """The factory behind a registry entry point (loaded now; a load failure is left for
    the entry point's own call to report)."""
    from metarl import families

    lazy = getattr(families, "_LazyEntryPoint", None)
    if lazy is not None and isinstance(factory, lazy):
        try:
            return factory.ep.load()
        except Exception:
            return factory
    return factory


class _Signature(NamedTuple):
    params: dict[str, inspect.Parameter]
    """Options the factory takes by keyword (for a class, its bases' too, see the module)."""
    hints: dict[str, Any]
    """Resolved type hints of those that have one."""
    open_kwargs: bool
    """Whether any other key is accepted too (a ``**kwargs`` that nothing checks)."""
    examples: dict[str, Any]
    """A value of each option for the messages (its default)."""
    required: list[str]
    """Parameters without a default of the factory itself (not of the bases a ``**kwargs``
    is passed on to, whose required arguments the subclass may supply)."""


def _signature(factory: Callable[..., Any]) -> _Signature | None:
    """The options ``factory`` takes; None if its signature cannot be read."""
    if inspect.isclass(factory):
        return _class_signature(factory)
    target: Any = factory
    if isinstance(factory, functools.partial):
        target = factory.func
    elif not inspect.isroutine(factory) and callable(factory):
        target = type(factory).__call__
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    params, open_kwargs = _keywords(sig)
    return _Signature(params, _hints(target, params), open_kwargs,
                      {n: p.default for n, p in params.items()},
                      [n for n, p in params.items() if p.default is p.empty])


def _class_signature(cls: type) -> _Signature | None:
    params: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    required: list[str] | None = None
    open_kwargs = True  # the chain of **kwargs constructors ends in object: nothing checks
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if klass is object:
            if required is None:  # no __init__ but object's: the class takes no options
                if any("__new__" in vars(k) for k in cls.__mro__[:-1]):
                    return None  # built by a __new__ of its own (not object's): not read
                open_kwargs, required = False, []
            break
        try:
            sig = inspect.signature(init)
        except (TypeError, ValueError):
            return None
        own, forwards = _keywords(sig, skip_first=True)
        own_hints = _hints(init, own)
        if not own_hints and own and dataclasses.is_dataclass(klass):
            own_hints = _hints(klass, own)
        if required is None:
            required = [n for n, p in own.items() if p.default is p.empty]
        for name, p in own.items():
            if name not in params:  # a subclass's parameter shadows its base's
                params[name] = p
                if name in own_hints:
                    hints[name] = own_hints[name]
        if not forwards:
            open_kwargs = False
            break
    examples = {}
    for name, p in params.items():
        default = p.default
        if default is None or default is p.empty:  # e.g. horizon=None: the class's default_horizon
            default = getattr(cls, f"default_{name}", default)
        examples[name] = default
    return _Signature(params, hints, open_kwargs, examples, required or [])


def _keywords(sig: inspect.Signature, skip_first: bool = False
              ) -> tuple[dict[str, inspect.Parameter], bool]:
    """Parameters that can be passed by keyword, and whether there is a ``**kwargs``."""
    items = list(sig.parameters.values())
    if skip_first and items and items[0].kind in (items[0].POSITIONAL_ONLY,
                                                  items[0].POSITIONAL_OR_KEYWORD):
        items = items[1:]
    params = {p.name: p for p in items
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return params, any(p.kind is p.VAR_KEYWORD for p in items)


def _hints(obj: Any, params: Mapping[str, inspect.Parameter]) -> dict[str, Any]:
    """Resolved annotations of ``params``; unresolvable ones are left unchecked."""
    try:
        resolved = typing.get_type_hints(obj)
    except Exception as e:
        log.debug("cannot resolve the type hints of %r (%s): its options are not checked", obj, e)
        return {}
    return {n: resolved[n] for n in params if n in resolved}


# --- the type rules -------------------------------------------------------------

def _coerce(value: Any, hint: Any) -> Any:
    """``value`` converted to ``hint``; raises :class:`_Mismatch` if it does not fit."""
    if hint is Any or hint is object or isinstance(hint, typing.TypeVar):
        return value
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        for choice in args:
            if value == choice and type(value) is type(choice):
                return choice
        raise _Mismatch
    if origin is Union or origin is types.UnionType:
        for arm in args:
            try:
                return _coerce(value, arm)
            except _Mismatch:
                pass
        raise _Mismatch
    if hint is type(None):
        if value is None:
            return None
        raise _Mismatch
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
            return int(float(value))
        raise _Mismatch
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _Mismatch
        return float(value)
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return str(os.fspath(value))
        raise _Mismatch
    container = origin or hint
    if container in _SEQUENCES:
        if isinstance(value, (str, bytes)) or not isinstance(value, abc.Sequence):
            raise _Mismatch
        if container is tuple and args and args[-1] is not Ellipsis:  # tuple[X, Y]: fixed
            if len(value) != len(args):
                raise _Mismatch
            return tuple(_coerce(v, a) for v, a in zip(value, args, strict=True))
        item = args[0] if args else Any
        items = [_coerce(v, item) for v in value]
        return tuple(items) if container is tuple or isinstance(value, tuple) else items
    if container in _MAPPINGS:
        if not isinstance(value, abc.Mapping):
            raise _Mismatch
        k_hint, v_hint = args if len(args) == 2 else (Any, Any)
        return {_coerce(k, k_hint): _coerce(v, v_hint) for k, v in value.items()}
    return value  # a type these rules do not know: the factory checks it


def _describe(hint: Any) -> str:
    """``hint`` in words: "an integer", "one of 'relu', 'tanh'", "a list of integers or null"."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in args)
    if origin is Union or origin is types.UnionType:
        arms = " or ".join(_describe(a) for a in args if a is not type(None))
        return f"{arms}, or null" if type(None) in args else arms
    words = {type(None): "null", bool: "true or false", int: "an integer", float: "a number",
             str: "a string"}
    if hint in words:
        return words[hint]
    container = origin or hint
    if container in _SEQUENCES:
        if container is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} items ({', '.join(_describe(a) for a in args)})"
        return f"a list of {_plural(args[0])}" if args else "a list"
    if container in _MAPPINGS:
        return f"an object of {_plural(args[1])}" if len(args) == 2 else "an object"
    return getattr(hint, "__name__", str(hint))


def _plural(hint: Any) -> str:
    words = {bool: "true/false", int: "integers", float: "numbers", str: "strings"}
    if hint in words:
        return words[hint]
    if get_origin(hint) is Literal:
        return "items from " + ", ".join(repr(c) for c in get_args(hint))
    return f"items of type {_describe(hint)}"


def _format(example: Any, hint: Any, key: str) -> str:
    """An example ``--family-opt`` value: the default if it fits the hint, else one made up."""
    word = "PATH" if any(w in key for w in ("data", "dir", "path", "file", "run")) else "TEXT"
    if example is _NO_HINT or example is inspect.Parameter.empty or example is None:
        example = _made_up(hint, word)
    else:
        try:
            example = _coerce(example, hint)
        except _Mismatch:
            example = _made_up(hint, word)
    if isinstance(example, str):
        return example
    try:
        return json.dumps(example, separators=(",", ":"))
    except (TypeError, ValueError):
        return str(example)


def _made_up(hint: Any, word: str = "TEXT") -> Any:
    """A value of type ``hint``; ``word`` stands for a string."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return args[0]
    if origin is Union or origin is types.UnionType:
        arms = [a for a in args if a is not type(None)]
        return _made_up(arms[0], word) if arms else None
    made = {bool: True, int: 1, float: 0.5, str: word}
    if hint in made:
        return made[hint]
    container = origin or hint
    if container in _SEQUENCES:
        if container is tuple and args and args[-1] is not Ellipsis:
            items = [_made_up(a, word) for a in args]
        else:
            items = [_made_up(args[0], word)] * 2 if args else []
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
            items = [v + i for i, v in enumerate(items)]  # increasing: a range reads right
        return items
    if container in _MAPPINGS:
        return {}
    return "..."
