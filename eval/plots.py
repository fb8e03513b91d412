"""PNG plots for the evaluation, the benchmark and the report (matplotlib, headless ``Agg`` backend)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from saicl.outputs import atomic_path

Series = dict[str, list[tuple[float, float]]]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede importing pyplot
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str | Path) -> Path:
    """Save atomically (a crash never leaves a truncated PNG under ``path``) and close the figure."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format=Path(path).suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return Path(path)


def _finite(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(x, y) for x, y in points if y is not None and not math.isnan(y)]


def line_plot(
    series: Series, dashed: Series | None, path: str | Path, xlabel: str, ylabel: str, title: str,
    logx: bool = False, logy: bool = False,
) -> Path:
    """One solid line per series name (and an optional dashed companion in the same colour)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (name, points) in enumerate(sorted(series.items())):
        points = _finite(points)
        if not points:
            continue
        color = f"C{i}"
        ax.plot(*zip(*points), marker="o", color=color, label=name)
        extra = _finite((dashed or {}).get(name, []))
        if extra:
            ax.plot(*zip(*extra), marker=".", linestyle="--", color=color)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(plt, fig, path)


def bar_chart(values: dict[str, float], markers: dict[str, float] | None, path: str | Path, ylabel: str,
              title: str) -> Path:
    """One bar per name; ``markers`` (e.g. the worst seed) drawn as black dots on the bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    names = list(values)
    heights = [0.0 if math.isnan(values[n]) else values[n] for n in names]
    ax.bar(names, heights, color=[f"C{i}" for i in range(len(names))])
    if markers:
        ax.plot(names, [markers.get(n, math.nan) for n in names], "ko", label="worst seed")
        ax.legend(fontsize=8)
    ax.set(ylabel=ylabel, title=title)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(plt, fig, path)


def loglog_panels(panels: dict[str, Series], path: str | Path, xlabel: str, title: str) -> Path:
    """Side-by-side log-log panels (e.g. time and memory against demonstrations), one line per series."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.4), squeeze=False)
    for ax, (ylabel, series) in zip(axes[0], panels.items()):
        for i, (name, points) in enumerate(sorted(series.items())):
            points = _finite([(x, y) for x, y in points if y is not None and y > 0])
            if points:
                ax.plot(*zip(*points), marker="o", color=f"C{i % 10}", label=name,
                        linestyle="-" if i < 10 else "--")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    with warnings.catch_warnings():  # long legends can defeat tight_layout; the plot is still fine
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
    return _save(plt, fig, path)


__all__ = ["bar_chart", "line_plot", "loglog_panels"]
