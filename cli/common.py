"""Shared pieces of the command line: error handling, consoles, option parsing."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any

import typer
from rich.console import Console

from metarl.types import ConfigError

# without a terminal (pipes, CI, CliRunner) tables get room instead of 80 columns
err = Console(stderr=True, highlight=False, soft_wrap=True,
              width=None if sys.stderr.isatty() else 200)
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)


class UserError(Exception):
    """Raised by CLI code for bad usage; printed as one line, exit code 2."""


def user_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConfigError, UserError]
    with contextlib.suppress(ImportError):
        from metarl.tasks.omniglot_data import DataError

        types.append(DataError)
    return tuple(types)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn user-facing errors into ``error: ...`` on stderr and exit code 2 (or the error's
    own ``exit_code``: 1 for a failed environment); Ctrl-C into exit 130."""
    try:
        yield
    except user_error_types() as e:
        msg = " ".join(str(e).split())  # one line
        err.print(f"error: {msg}", markup=False)
        raise typer.Exit(code=getattr(e, "exit_code", 2)) from None
    except KeyboardInterrupt:
        err.print("interrupted", markup=False)
        raise typer.Exit(code=130) from None


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` -> dict; values are parsed as JSON when they can be."""
    opts: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--family-opt {pair!r} is not KEY=VALUE (e.g. --family-opt shots=5)")
        try:
            opts[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            opts[key.strip()] = raw
    return opts


FAMILY_OPT_HELP = ("Override a family option of the run as KEY=VALUE (JSON values), repeatable: "
                   "rollouts=40, workers=2, oracle_run=runs/cheetah-oracle. Options that change "
                   "the model's shape are refused.")


def with_family_options(state: dict[str, Any], pairs: list[str] | None) -> dict[str, Any]:
    """The checkpoint ``state`` with ``--family-opt`` pairs merged into its family options.

    The family is rebuilt with the merged options and must still fit the
    checkpoint's parameters (same names and shapes), so a typo in an option or
    one that would change the model gives a one-line error, not a shape error
    deep in a forward pass.
    """
    opts = parse_options(pairs)
    if not opts:
        return state
    from metarl import families

    cfg = dict(state["config"])
    cfg["family_options"] = {**cfg.get("family_options", {}), **opts}
    if not families.fits(families.make(cfg["family"], **cfg["family_options"]), state["theta"]):
        raise UserError(f"--family-opt {' '.join(pairs or [])} changes the model of this run; only "
                        "options that keep its parameters (rollouts, workers, horizon, ...) can change")
    return {**state, "config": cfg}


THREADS_HELP = ("Torch CPU threads (on a small shared machine 1 is often fastest). "
                "\\[default: $METARL_THREADS, else torch's default]")


def set_threads(n: int | None) -> None:
    """Apply ``--threads`` (or ``$METARL_THREADS``); None leaves torch's default."""
    import os

    import torch

    if n is None and os.environ.get("METARL_THREADS", "").strip():
        try:
            n = int(os.environ["METARL_THREADS"])
        except ValueError:
            raise UserError(f"METARL_THREADS={os.environ['METARL_THREADS']!r} is not an integer") from None
    if n is not None:
        if n < 1:
            raise UserError(f"--threads must be >= 1, got {n}")
        torch.set_num_threads(n)


def is_tty() -> bool:
    return err.is_terminal and sys.stderr.isatty()
