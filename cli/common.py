"""Shared pieces of the command line: error handling, consoles, option parsing."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any

import typer
from rich.console import Console

from metarl import distributed
from metarl.types import MetarlError, UsageError

# without a terminal (pipes, CI, CliRunner) tables get room instead of 80 columns
err = Console(stderr=True, highlight=False, soft_wrap=True,
              width=None if sys.stderr.isatty() else 200)
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)


class UserError(UsageError):
    """Raised by CLI code for bad usage; printed as one line, exit code 2."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn metarl's errors into ``error: ...`` (one line) on stderr and their exit code
    (2 for bad usage, 1 for a run that failed); Ctrl-C into exit 130."""
    try:
        yield
    except MetarlError as e:
        report(" ".join(str(e).split()))  # one line
        raise typer.Exit(code=e.exit_code) from None
    except KeyboardInterrupt:
        if distributed.env_rank() == 0 and not distributed.launched():
            err.print("interrupted", markup=False)
        raise typer.Exit(code=130) from None


def report(message: str) -> None:
    """Print ``error: message``; a launched rank leaves it for the launcher instead, which
    prints one line for the whole run."""
    if not distributed.record_error(message):
        err.print(f"error: {message}", markup=False)


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


THREADS_HELP = ("Torch CPU threads. Without it: as many as the CPUs other processes leave "
                "idle, re-measured as the run goes (pass a number for bit-reproducible runs). "
                "\\[default: $METARL_THREADS, else automatic]")


def set_threads(n: int | None) -> None:
    """Apply ``--threads`` (or ``$METARL_THREADS``); None: the automatic policy of
    ``metarl.threads``."""
    import os

    from metarl import threads

    if n is None and os.environ.get("METARL_THREADS", "").strip():
        try:
            n = int(os.environ["METARL_THREADS"])
        except ValueError:
            raise UserError(f"METARL_THREADS={os.environ['METARL_THREADS']!r} is not an integer") from None
    if n is not None and n < 1:
        raise UserError(f"--threads must be >= 1, got {n}")
    threads.use(n)


def is_tty() -> bool:
    return err.is_terminal and sys.stderr.isatty()
