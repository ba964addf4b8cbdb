"""TensorBoard event files for a run folder (the optional ``tensorboard`` extra).

``metarl train --tensorboard`` writes every ``metrics.jsonl`` row as scalars
(same keys, step = meta-iteration, plus ``seconds``) to
``RUN/events.out.tfevents.*``; ``tensorboard --logdir runs`` then shows each run
by its folder name. TensorBoard is imported only when asked for.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from metarl.types import ConfigError

__all__ = ["EVENTS_GLOB", "TENSORBOARD_HINT", "Writer", "require_tensorboard"]

TENSORBOARD_HINT = 'pip install -c constraints.txt -e ".[tensorboard]"'
"""The fix printed when the extra is missing."""
EVENTS_GLOB = "events.out.tfevents.*"
"""The event files a run folder holds."""


def require_tensorboard() -> Any:
    """``torch.utils.tensorboard.SummaryWriter``, or :class:`ConfigError` naming the extra."""
    try:
        import tensorboard  # noqa: F401  (torch's writer needs the package)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError(f"--tensorboard needs the tensorboard package ({e}): run "
                          f"{TENSORBOARD_HINT}, or train without --tensorboard") from None
    return SummaryWriter


class Writer:
    """Scalars of each logged row into ``folder``'s event files.

    Args:
        folder: the run folder.
        purge_step: on resume, the first iteration this run writes: events at or after
            it in earlier files (an unclean stop past the checkpoint) are hidden, as
            ``metrics.jsonl`` drops those rows.
    """

    def __init__(self, folder: str | Path, purge_step: int | None = None) -> None:
        self._w = require_tensorboard()(log_dir=str(folder), purge_step=purge_step)

    def row(self, row: Mapping[str, Any]) -> None:
        """One ``metrics.jsonl`` row: every number but the iteration, at that step."""
        step = int(row["iteration"])
        for key, value in row.items():
            if key != "iteration" and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                self._w.add_scalar(key, float(value), step)
        self._w.flush()

    def close(self) -> None:
        self._w.close()


def clear(folder: str | Path) -> None:
    """Delete a run folder's event files (``--overwrite``)."""
    for f in Path(folder).glob(EVENTS_GLOB):
        f.unlink()
