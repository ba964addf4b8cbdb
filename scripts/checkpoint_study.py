"""What the checkpoint-study scripts share: their command line (checkpoints, ``--tasks``,
``--seed``, ``--json``) and their loop (one thread, one printed line per measured row, the
rows written as JSON at the end)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable
from typing import Any

import torch

Row = dict[str, Any]


def parser(doc: str, *, tasks: int, seed: int) -> argparse.ArgumentParser:
    """The shared options; a script adds its own before parsing."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--tasks", type=int, default=tasks)
    ap.add_argument("--seed", type=int, default=seed)
    ap.add_argument("--json", type=argparse.FileType("w"), help="write the rows here")
    return ap


def study(args: argparse.Namespace, rows_of: Callable[[str], Iterable[Row]],
          line: Callable[[Row], str]) -> list[Row]:
    """``rows_of(checkpoint)`` for every checkpoint, each row printed with ``line`` as it
    comes; the rows go to ``--json`` when given."""
    torch.set_num_threads(1)
    rows: list[Row] = []
    for path in args.checkpoints:
        for r in rows_of(path):
            rows.append(r)
            print(line(r), flush=True)
    if args.json:
        args.json.write(json.dumps(rows, indent=1) + "\n")
        args.json.close()
    return rows
