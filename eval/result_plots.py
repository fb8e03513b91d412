"""``saicl-eval``'s PNG plots: the overall metric against k, and per structure (drawn by :mod:`saicl.eval.plots`)."""

from __future__ import annotations

import math
from pathlib import Path


def plot_results(results: dict, out_dir: str | Path, title: str = "") -> list[Path]:
    """PNG plots: the overall metric against k (if several k), and per structure (bar chart)."""
    from .plots import bar_chart, line_plot

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    structures = results["config"]["structures"]
    series = {s: [(r["k"], r["mean"], r["worst"]) for r in results["overall"] if r["structure"] == s]
              for s in structures}
    if len(results["config"]["ks"]) > 1:
        written.append(line_plot(
            {s: [(k, m) for k, m, _ in v] for s, v in series.items()},
            {s: [(k, w) for k, _, w in v] for s, v in series.items()},
            out_dir / "eval_scaling.png", xlabel="demonstrations k", ylabel="metric (solid: mean, dashed: worst)",
            title=title or "Held-out metric against the number of demonstrations", logx=True,
        ))
    k = results["config"]["ks"][-1]
    bars = {s: next((r["mean"] for r in results["overall"] if r["structure"] == s and r["k"] == k), math.nan)
            for s in structures}
    worst = {s: next((r["worst"] for r in results["overall"] if r["structure"] == s and r["k"] == k), math.nan)
             for s in structures}
    written.append(bar_chart(bars, worst, out_dir / "eval_structures.png",
                             ylabel="metric (bar: mean, dot: worst seed)",
                             title=title or f"Held-out metric per structure (k={k})"))
    return written


__all__ = ["plot_results"]
