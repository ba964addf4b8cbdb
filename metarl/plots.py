"""Plots written as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from metarl.checkpoint import atomic_write


def adaptation_curves(curves: Sequence[object], path: str | Path, *, metric: str,
                      title: str = "", hlines: dict[str, float] | None = None,
                      reference: dict[str, Sequence[float]] | None = None) -> Path:
    """Metric versus adaptation steps, one line per curve with its 95% CI band.

    Args:
        curves: objects with ``label``, ``steps``, ``mean``, ``ci95`` (:class:`metarl.evaluate.Curve`).
        metric: y-axis label.
        hlines: horizontal reference lines (e.g. an oracle), label -> value.
        reference: published values to mark, label -> value per step (dashed, no band).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for c in curves:
        steps, mean, ci = c.steps, c.mean, c.ci95  # type: ignore[attr-defined]
        lo = [m - e for m, e in zip(mean, ci)]
        hi = [m + e for m, e in zip(mean, ci)]
        (line,) = ax.plot(steps, mean, marker="o", ms=3, label=c.label)  # type: ignore[attr-defined]
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
    for label, values in (reference or {}).items():
        ax.plot(range(len(values)), values, ls="--", marker="x", color="gray", label=label)
    for label, y in (hlines or {}).items():
        ax.axhline(y, ls=":", color="black", label=label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("adaptation steps")
    ax.set_ylabel(metric)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def training_curve(rows: Sequence[dict[str, float]], keys: Sequence[str], path: str | Path,
                   *, title: str = "") -> Path:
    """Logged metrics (``metrics.jsonl`` rows) versus iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    its = [r["iteration"] for r in rows]
    for k in keys:
        ax.plot(its, [r.get(k, float("nan")) for r in rows], label=k)
    ax.set_xlabel("meta-iteration")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path
