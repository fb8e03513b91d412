"""``saicl-eval``'s markdown tables: per task and overall (mean / worst over seeds), order sensitivity, notes."""

from __future__ import annotations

import math


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def markdown_tables(results: dict) -> str:
    """Per-task and overall tables (mean / worst over seeds), and the order-sensitivity table."""
    structures = results["config"]["structures"]
    lines = []
    for k in results["config"]["ks"]:
        lines += [f"#### k = {k} (mean / worst over {len(results['config']['seeds'])} seeds)", "",
                  "| task | metric | " + " | ".join(structures) + " |",
                  "|---|---|" + "---|" * len(structures)]
        tasks = sorted({r["task"] for r in results["rows"] if r["k"] == k})
        for task in tasks:
            cells, metric = [], ""
            for s in structures:
                row = next((r for r in results["rows"] if r["k"] == k and r["task"] == task
                            and r["structure"] == s), None)
                cells.append("–" if row is None else f"{_fmt(row['mean'])} / {_fmt(row['worst'])}")
                metric = metric or (row["metric"] if row else "")
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
        cells = []
        for s in structures:
            row = next((r for r in results["overall"] if r["k"] == k and r["structure"] == s), None)
            cells.append("–" if row is None else f"**{_fmt(row['mean'])} / {_fmt(row['worst'])}**")
        lines += ["| **overall** | | " + " | ".join(cells) + " |", ""]
    if results["config"]["orders"] > 1:
        lines += [f"#### Order sensitivity ({results['config']['orders']} demonstration orders per seed)", "",
                  "| structure | k | metric spread (max) | prediction agreement (min) | max abs NLL change "
                  "| invariant |",
                  "|---|---|---|---|---|---|"]
        for row in results["order"]:
            invariant = {True: "yes", False: "no", None: "n/a"}[row["invariant"]]
            diff = "n/a" if math.isnan(row["max_nll_diff"]) else f"{row['max_nll_diff']:.1e}"
            lines.append(f"| {row['structure']} | {row['k']} | {_fmt(row['metric_spread'])} | "
                         f"{_fmt(row['agreement'])} | {diff} | {invariant} |")
        lines.append("")
    same = [f"{i['task']} (k={i['k']})" for i in results.get("identical_seeds", []) if i["k"] > 0]
    if same:
        lines += ["Seeds identical (one demonstration set, no spread over seeds): " + "; ".join(same[:10])
                  + (" ..." if len(same) > 10 else ""), ""]
    if results["skipped"]:
        reasons = sorted({f"{s['task']} (k={s['k']}): {s['reason']}" for s in results["skipped"]})
        lines += ["Skipped: " + "; ".join(reasons[:10]) + (" ..." if len(reasons) > 10 else ""), ""]
    return "\n".join(lines)


__all__ = ["markdown_tables"]
