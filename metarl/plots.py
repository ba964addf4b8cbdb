"""Plots written as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from metarl.checkpoint import atomic_write


def _axes():
    """A fresh 6 x 4 inch figure on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6, 4), dpi=120)


def _save(fig, ax, path: str | Path, title: str) -> Path:
    """Title, grid and legend, then write the PNG atomically and free the figure."""
    import matplotlib.pyplot as plt

    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


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
    fig, ax = _axes()
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
    return _save(fig, ax, path, title)


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start); NaNs are skipped."""
    out, buf = [], []
    for v in values:
        buf.append(v)
        recent = [x for x in buf[-window:] if x == x]
        out.append(sum(recent) / len(recent) if recent else float("nan"))
    return out


def training_curves(runs: Sequence[tuple[str, Sequence[dict[str, float]]]], keys: Sequence[str],
                    path: str | Path, *, x: str = "iteration", smooth: int = 1,
                    title: str = "") -> Path:
    """Logged metrics (``metrics.jsonl`` rows) versus meta-iteration or training time.

    Args:
        runs: (label, rows) per run; a run's rows may lack some keys (drawn as gaps).
        keys: the metrics to draw, one line per run and key.
        x: ``"iteration"`` or ``"seconds"`` (drawn in minutes).
        smooth: trailing moving-average window in logged rows; above 1 the raw
            values stay as a faint line behind the smoothed one.
    """
    fig, ax = _axes()
    for label, rows in runs:
        xs = [r[x] / 60 if x == "seconds" else r[x] for r in rows]
        for k in keys:
            ys = [float(r.get(k, float("nan"))) for r in rows]
            name = f"{label}: {k}" if len(runs) > 1 else k
            if smooth > 1:
                (line,) = ax.plot(xs, moving_average(ys, smooth), label=f"{name} (mean of {smooth})")
                ax.plot(xs, ys, color=line.get_color(), alpha=0.25, lw=0.8)
            else:
                ax.plot(xs, ys, label=name)
    ax.set_xlabel("training time (min)" if x == "seconds" else "meta-iteration")
    return _save(fig, ax, path, title)
