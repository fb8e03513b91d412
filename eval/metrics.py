"""Metrics of the MetaICL-style evaluation: option choice, macro-F1, accuracy, exact match, seed summaries.

Definitions (documented in docs/evaluation.md and tested against hand-computed cases):

* **Option choice and ties.** The prediction is the option with the lowest mean per-token NLL. Scores are
  first rounded to ``TIE_DECIMALS`` decimals (1e-5 nats) so that two options whose scores differ only by
  float noise count as tied; among tied options the one listed *first* in the task's option list wins.
  The option list comes from the data file, so the rule does not depend on the demonstrations' order.
* **Macro-F1** (classification tasks): as MetaICL computes it, the mean of per-class F1 over the classes
  present in the *gold* labels. A gold class that is never predicted gets F1 0; a predicted label that is
  never gold is not a class of its own (it only costs the recall of the gold class it replaced);
  precision + recall == 0 gives F1 0.
* **Accuracy**: fraction of predictions equal to the gold output (after :func:`normalize_answer`).
* **Exact match** (generation tasks): accuracy of the generated text after :func:`normalize_answer`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

TIE_DECIMALS = 5


def normalize_answer(text: str) -> str:
    """Strip and collapse whitespace (case is kept: labels are case-sensitive strings in the data)."""
    return " ".join(text.split())


def choose_option(scores: Sequence[float], decimals: int = TIE_DECIMALS) -> int:
    """Index of the best (lowest-NLL) option; ties after rounding go to the earliest option.

    Args:
        scores: one mean NLL per option (lower is better); NaN counts as worst.
        decimals: rounding applied before comparing (``TIE_DECIMALS`` by default).
    """
    if len(scores) == 0:
        raise ValueError("choose_option needs at least one score")
    rounded = [math.inf if math.isnan(s) else round(float(s), decimals) for s in scores]
    best = min(rounded)
    return rounded.index(best)  # list.index returns the first occurrence: the tie rule


def accuracy(predictions: Sequence[str], golds: Sequence[str]) -> float:
    """Fraction of ``predictions`` equal to ``golds`` after :func:`normalize_answer`."""
    _check_lengths(predictions, golds)
    if not golds:
        return math.nan
    return sum(normalize_answer(p) == normalize_answer(g) for p, g in zip(predictions, golds)) / len(golds)


exact_match = accuracy  # the same function, named for generation tasks


def macro_f1(predictions: Sequence[str], golds: Sequence[str]) -> float:
    """Macro-F1 over the classes present in ``golds`` (MetaICL's definition, see the module docstring)."""
    _check_lengths(predictions, golds)
    if not golds:
        return math.nan
    preds = [normalize_answer(p) for p in predictions]
    gold = [normalize_answer(g) for g in golds]
    f1s = []
    for label in sorted(set(gold)):
        true_pos = sum(p == label and g == label for p, g in zip(preds, gold))
        predicted = sum(p == label for p in preds)
        actual = sum(g == label for g in gold)
        precision = true_pos / predicted if predicted else 0.0
        recall = true_pos / actual
        f1s.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
    return sum(f1s) / len(f1s)


def task_metric(predictions: Sequence[str], golds: Sequence[str], is_classification: bool) -> float:
    """Macro-F1 for classification tasks, accuracy (exact match) otherwise."""
    return macro_f1(predictions, golds) if is_classification else accuracy(predictions, golds)


def summarize_seeds(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "worst", "std"}`` of one metric over seeds (worst = minimum; std = population std)."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return {"mean": math.nan, "worst": math.nan, "std": math.nan}
    return {"mean": statistics.fmean(finite), "worst": min(finite), "std": statistics.pstdev(finite)}


def _check_lengths(predictions: Sequence[str], golds: Sequence[str]) -> None:
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions but {len(golds)} gold labels")


__all__ = [
    "TIE_DECIMALS",
    "accuracy",
    "choose_option",
    "exact_match",
    "macro_f1",
    "normalize_answer",
    "summarize_seeds",
    "task_metric",
]
