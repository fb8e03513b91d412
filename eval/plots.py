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


def scaling_panels(metric: dict[str, list[tuple[float, float, float]]], times: Series, path: str | Path,
                   metric_label: str, time_label: str, title: str, dashed: set[str] | None = None) -> Path:
    """Metric against k with error bars (left, log x) beside time against k (right, log-log).

    Args:
        metric: ``name -> [(k, mean, error)]`` (error: one std; NaN draws no bar).
        times: ``name -> [(k, seconds)]``.
        dashed: names drawn dashed (e.g. structures that did not leave the plateau).
    """
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.0, 4.4))
    dashed = dashed or set()
    names = sorted(set(metric) | set(times))
    for i, name in enumerate(names):
        color, style = f"C{i % 10}", "--" if name in dashed else "-"
        points = [(x, y, e) for x, y, e in metric.get(name, []) if y is not None and not math.isnan(y)]
        if points:
            xs, ys, errs = zip(*points)
            errs = [0.0 if e is None or math.isnan(e) else e for e in errs]
            left.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, color=color, linestyle=style, label=name)
        timed = _finite([(x, y) for x, y in times.get(name, []) if y is not None and y > 0])
        if timed:
            right.plot(*zip(*timed), marker="o", color=color, linestyle=style, label=name)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    right.set_yscale("log")
    left.set(xlabel="demonstrations k", ylabel=metric_label)
    right.set(xlabel="demonstrations k", ylabel=time_label)
    fig.suptitle(title)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
    return _save(plt, fig, path)


__all__ = ["bar_chart", "line_plot", "loglog_panels", "scaling_panels"]
