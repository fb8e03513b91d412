"""From raw per-(structure, k, task, seed) runs to ``saicl-eval``'s rows, overall table and order-sensitivity table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from saicl import TruncationReport

from . import metrics
from .eval_config import EvalConfig
from .eval_tasks import METRIC_NAME

# fp32 scores of saicl/fid under a permutation differ only by summation order; 1e-4 nats is far above
# that noise and far below any real order effect (full's changes are typically 1e-2 or more).
ORDER_TOLERANCE = 1e-4
TRUNCATION_COUNTED = "every distinct episode once (first demonstration order), summed over k, seeds and tasks"
TIE_RULE = f"lowest mean NLL after rounding to {metrics.TIE_DECIMALS} decimals; ties -> first listed option"


@dataclass
class TaskRun:
    """Raw results of one (structure, k, task, seed): per order, the predictions (and option scores)."""

    predictions: list[list[str]] = field(default_factory=list)  # [order][query]
    scores: list[list[list[float]]] = field(default_factory=list)  # [order][query][option]; empty for generation
    truncation: TruncationReport = field(default_factory=TruncationReport)  # order 0's episodes, every batch


# {(structure, k, task): {seed: (run, golds, kind)}}, in canonical unit order
RawResults = dict[tuple[str, int, str], dict[int, tuple[TaskRun, list[str], str]]]


def order_stats(run: TaskRun, golds: list[str], kind: str) -> dict[str, float]:
    """Spread of the metric over orders, lowest agreement with order 0, largest change of any option NLL."""
    values = [metrics.task_metric(p, golds, kind == "classification") for p in run.predictions]
    agree = [sum(a == b for a, b in zip(run.predictions[0], p)) / len(golds) for p in run.predictions[1:]]
    nll_diff = 0.0
    for scores in run.scores[1:]:
        for a, b in zip(run.scores[0], scores):
            nll_diff = max(nll_diff, max(abs(x - y) for x, y in zip(a, b)))
    return {
        "spread": max(values) - min(values),
        "agreement": min(agree) if agree else 1.0,
        "max_nll_diff": nll_diff if run.scores else math.nan,
    }


def summarize(raw: RawResults, config: EvalConfig) -> tuple[list[dict], list[dict], list[dict]]:
    """``(rows, overall, order)``: per task, per (structure, k) over tasks, and the order sensitivity."""
    rows = []
    for (structure, k, name), per_seed in raw.items():
        seed_values, spreads, agreements, nll_diffs = {}, [], [], []
        for seed, (run, golds, kind) in per_seed.items():
            seed_values[seed] = metrics.task_metric(run.predictions[0], golds, kind == "classification")
            stats = order_stats(run, golds, kind)
            spreads.append(stats["spread"])
            agreements.append(stats["agreement"])
            nll_diffs.append(stats["max_nll_diff"])
        kind = next(iter(per_seed.values()))[2]
        summary = metrics.summarize_seeds(list(seed_values.values()))
        rows.append({
            "structure": structure, "k": k, "task": name, "kind": kind, "metric": METRIC_NAME[kind],
            "per_seed": {str(s): v for s, v in seed_values.items()}, **summary,
            "n_queries": len(next(iter(per_seed.values()))[1]),
            "order_spread": max(spreads), "order_agreement": min(agreements),
            "order_max_nll_diff": nanmax(nll_diffs),
        })
    overall, order = [], []
    for structure in config.structures:
        for k in config.ks:
            mine = [r for r in rows if r["structure"] == structure and r["k"] == k]
            if not mine:
                continue
            per_seed = {}
            for seed in config.seeds:
                values = [r["per_seed"][str(seed)] for r in mine if str(seed) in r["per_seed"]]
                if values:
                    per_seed[str(seed)] = sum(values) / len(values)
            overall.append({"structure": structure, "k": k, "n_tasks": len(mine), "per_seed": per_seed,
                            **metrics.summarize_seeds(list(per_seed.values()))})
            max_diff = nanmax([r["order_max_nll_diff"] for r in mine])
            order.append({
                "structure": structure, "k": k, "orders": config.orders,
                "metric_spread": max(r["order_spread"] for r in mine),
                "agreement": min(r["order_agreement"] for r in mine),
                "max_nll_diff": max_diff,
                "invariant": None if config.orders < 2 or math.isnan(max_diff) else bool(max_diff <= ORDER_TOLERANCE),
            })
    return rows, overall, order


def nanmax(values: Sequence[float]) -> float:
    """The largest non-NaN value (NaN if there is none)."""
    finite = [v for v in values if not math.isnan(v)]
    return max(finite) if finite else math.nan


__all__ = ["ORDER_TOLERANCE", "TIE_RULE", "TRUNCATION_COUNTED", "RawResults", "TaskRun", "nanmax", "order_stats",
           "summarize"]
