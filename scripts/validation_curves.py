"""Validation curves of checkpoint studies: the metric after K adaptation steps against the
meta-iteration, one line per folder of ``metarl evaluate --json`` files.

Each folder holds one JSON file per kept checkpoint, named after it
(``iteration-000130.json``, as ``metarl evaluate RUN/checkpoints/iteration-000130.pt --seed
1 --json VAL/iteration-000130.json`` writes them). Prints the curve of every folder and
draws them with :func:`metarl.plots.training_curves`:

    python scripts/validation_curves.py exact=VAL_A fast=VAL_B --steps 2 --out curves.png
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from metarl.plots import training_curves


def curve(folder: Path, steps: int) -> list[dict[str, float]]:
    """``[{"iteration": n, "mean": m, "ci95": c}]`` from the folder's evaluation files."""
    rows = []
    for f in folder.glob("iteration-*.json"):
        m = re.fullmatch(r"iteration-(\d+)\.json", f.name)
        if not m:
            continue
        d = json.loads(f.read_text())
        k = d["steps"].index(steps)
        rows.append({"iteration": int(m.group(1)), "mean": d["mean"][k], "ci95": d["ci95"][k]})
    return sorted(rows, key=lambda r: r["iteration"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="LABEL=FOLDER of evaluation JSON files")
    ap.add_argument("--steps", type=int, default=2, help="adaptation steps to draw")
    ap.add_argument("--out", help="write the plot here (PNG)")
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    runs = []
    for spec in args.runs:
        label, _, folder = spec.rpartition("=")
        rows = curve(Path(folder), args.steps)
        if not rows:
            raise SystemExit(f"{folder}: no iteration-*.json evaluation files")
        print(f"{label or folder}: " + " ".join(f"{r['iteration']}:{r['mean']:.1f}" for r in rows))
        runs.append((label or folder, rows))
    if args.out:
        key = f"return after {args.steps} steps"
        renamed = [(lab, [{"iteration": r["iteration"], key: r["mean"]} for r in rows])
                   for lab, rows in runs]
        print(f"wrote {training_curves(renamed, [key], args.out, title=args.title)}")


if __name__ == "__main__":
    main()
