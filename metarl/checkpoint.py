"""Checkpoints: plain dicts of tensors and JSON-like values, written atomically.

A checkpoint loads with ``torch.load(path, weights_only=True)``. It holds the
meta-parameters ``theta``, the resolved training configuration (family name and
options included, so the family can be rebuilt), the iteration and the outer
optimizer's state.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from metarl.types import ConfigError, Params

FORMAT = "metarl-checkpoint-v1"
CHECKPOINT = "checkpoint.pt"


def atomic_write(path: str | Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make results private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(path: str | Path, *, theta: Params, config: dict[str, Any], iteration: int,
         optimizer: dict[str, Any] | None = None, **extra: Any) -> None:
    state = {"format": FORMAT, "theta": {k: v.detach().cpu() for k, v in theta.items()},
             "config": config, "iteration": iteration, "optimizer": optimizer, **extra}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def resolve_path(run_or_checkpoint: str | Path) -> Path:
    """A run folder (its ``checkpoint.pt``) or a checkpoint file."""
    p = Path(run_or_checkpoint)
    if p.is_dir():
        p = p / CHECKPOINT
        if not p.is_file():
            raise ConfigError(f"run folder {str(p.parent)!r} has no {CHECKPOINT}: "
                              "train first (metarl train --out DIR) or give a checkpoint file")
    elif not p.is_file():
        raise ConfigError(f"{str(p)!r} does not exist: give a run folder or a checkpoint file")
    return p


def load(run_or_checkpoint: str | Path) -> dict[str, Any]:
    """Load a checkpoint (safely: ``weights_only=True``) and check its format."""
    p = resolve_path(run_or_checkpoint)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"cannot read checkpoint {str(p)!r} ({type(e).__name__}): the file is "
                          "corrupt or not a metarl checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"{str(p)!r} is not a metarl checkpoint (expected format {FORMAT})")
    return state
