"""Plots written as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from metarl.checkpoint import atomic_write

if TYPE_CHECKING:  # matplotlib itself is imported when a plot is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


class CurveLike(Protocol):
    """A curve :func:`adaptation_curves` draws (e.g. :class:`metarl.evaluate.Curve`): the
    metric's ``mean`` and 95% CI half-width ``ci95`` at each of ``steps``, named ``label``."""

    @property
    def label(self) -> str: ...

    @property
    def steps(self) -> Sequence[int]: ...

    @property
    def mean(self) -> Sequence[float]: ...

    @property
    def ci95(self) -> Sequence[float]: ...


def _axes(ncols: int = 1) -> tuple[Figure, list[Axes]]:
    """A fresh figure of ``ncols`` 6 x 4 inch panels side by side on the file-only Agg
    backend: ``(fig, [ax, ...])``, one axes per panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), dpi=120, squeeze=False)
    return fig, list(axes[0])


def _save(fig: Figure, panels: list[Axes], path: str | Path, title: str) -> Path:
    """Grid and legend on each panel, the title on the first, then write the PNG
    atomically and free the figure."""
    import matplotlib.pyplot as plt

    if title:
        panels[0].set_title(title)
    for a in panels:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def adaptation_curves(curves: Sequence[CurveLike], path: str | Path, *, metric: str,
                      title: str = "", hlines: dict[str, float] | None = None,
                      reference: dict[str, Sequence[float]] | None = None,
                      panels: Mapping[str, Sequence[CurveLike]] | None = None) -> Path:
    """Metric versus adaptation steps, one line per curve with its 95% CI band.

    Args:
        curves: the curves (:class:`CurveLike`, e.g. :class:`metarl.evaluate.Curve`).
        metric: y-axis label.
        hlines: horizontal reference lines (e.g. an oracle), label -> value.
        reference: published values to mark, label -> value per step (dashed, no band).
        panels: more metrics of the same runs, each drawn in a panel of its own to the
            right: name (its y-axis label) -> its curves (e.g. ``{"success": [...]}``).
    """
    from matplotlib.ticker import MaxNLocator

    extra = dict(panels or {})
    fig, panel_axes = _axes(1 + len(extra))
    for ax, (name, shown) in zip(panel_axes, [(metric, curves), *extra.items()]):
        for c in shown:
            steps, mean, ci = c.steps, c.mean, c.ci95
            lo = [m - e for m, e in zip(mean, ci)]
            hi = [m + e for m, e in zip(mean, ci)]
            (line,) = ax.plot(steps, mean, marker="o", ms=3, label=c.label)
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("adaptation steps")
        ax.set_ylabel(name)
    ax = panel_axes[0]
    for label, values in (reference or {}).items():
        ax.plot(range(len(values)), values, ls="--", marker="x", color="gray", label=label)
    for label, y in (hlines or {}).items():
        ax.axhline(y, ls=":", color="black", label=label)
    return _save(fig, panel_axes, path, title)


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
        runs: (label, rows) per run; a run's rows may lack some keys (each key's line
            joins the rows that have it: validation metrics logged every N iterations).
        keys: the metrics to draw, one line per run and key.
        x: ``"iteration"`` or ``"seconds"`` (drawn in minutes).
        smooth: trailing moving-average window in logged rows; above 1 the raw
            values stay as a faint line behind the smoothed one.
    """
    fig, (ax,) = _axes()
    for label, rows in runs:
        for k in keys:
            have = [r for r in rows if k in r]
            xs = [r[x] / 60 if x == "seconds" else r[x] for r in have]
            ys = [float(r[k]) for r in have]
            name = f"{label}: {k}" if len(runs) > 1 else k
            if smooth > 1:
                (line,) = ax.plot(xs, moving_average(ys, smooth), label=f"{name} (mean of "
                 f"{smooth})")
                ax.plot(xs, ys, color=line.get_color(), alpha=0.25, lw=0.8)
            else:
                ax.plot(xs, ys, label=name)
    ax.set_xlabel("training time (min)" if x == "seconds" else "meta-iteration")
    return _save(fig, [ax], path, title)
