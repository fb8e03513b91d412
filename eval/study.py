"""Statistics of the main job over models: the plateau test and mean ± std over training and evaluation seeds.

A *model* is one (structure, training seed). The evaluation gives, per model and k, the held-out metric for
each of MetaICL's evaluation seeds. Two spreads are reported separately:

- over evaluation seeds: each model's std over its evaluation seeds (which demonstrations are drawn), averaged
  over the models of a structure;
- over training seeds: the std of the models' means (the initialisation and training data), with ``>= 2``
  training seeds only (``saicl-run --study``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

from .claims import PLATEAU_FACTOR, Stat, left_plateau


def plateau_reason(training: Mapping | None) -> str | None:
    """Why a trained model counts as *not* having left the in-context-learning plateau (``None``: it left).

    The test is the last held-out accuracy measured during training (at the trainer's held-out k):
    ``accuracy >= 2 x chance`` leaves the plateau. ``training`` is a ``TrainResult.to_dict()``; ``None`` means
    the model was not trained.
    """
    if training is None:
        return "untrained"
    evals = [e for e in training.get("evals", []) if e.get("accuracy") is not None and e.get("chance") is not None]
    if not evals:
        return "no held-out accuracy was recorded during training, so it cannot be told apart from chance"
    last = evals[-1]
    left = left_plateau(last["accuracy"], last["chance"])
    if left:
        return None
    return (f"held-out accuracy {last['accuracy']:.3f} < {PLATEAU_FACTOR:g} x chance {last['chance']:.3f} at step "
            f"{last['step']}")


def structure_plateau(reasons: Mapping[int, str | None]) -> str | None:
    """One structure's plateau reason over its training seeds (``seed -> reason``): it counts as having left
    the plateau if at least one seed did (the statistics then use those seeds only, and say so)."""
    stuck = {seed: why for seed, why in reasons.items() if why}
    if len(stuck) < len(reasons):
        return None
    return "; ".join(f"seed {seed}: {why}" for seed, why in sorted(stuck.items())) if len(stuck) > 1 \
        else next(iter(stuck.values()))


def aggregate(overall: Mapping[int, Sequence[dict]], include: Mapping[tuple[str, int], bool] | None = None
              ) -> dict[tuple[str, int], dict]:
    """Per (structure, k): the mean over models and both spreads.

    Args:
        overall: ``training seed -> evaluate_model(...)["overall"]`` rows (``structure``, ``k``, ``mean``,
            ``std``, ``per_seed``).
        include: ``(structure, training seed) -> whether to use it`` (default: every model).
    Returns:
        ``(structure, k) -> {"mean", "std_train", "std_eval", "n_train", "n_eval", "train_seeds", "means"}``;
        ``std_train`` is NaN with one training seed (population std, as for evaluation seeds).
    """
    grouped: dict[tuple[str, int], list[tuple[int, dict]]] = {}
    for seed, rows in overall.items():
        for row in rows:
            if include is not None and not include.get((row["structure"], seed), True):
                continue
            grouped.setdefault((row["structure"], row["k"]), []).append((seed, row))
    stats = {}
    for key, items in grouped.items():
        means = [row["mean"] for _, row in items if not _nan(row["mean"])]
        evals = [row["std"] for _, row in items if not _nan(row["std"])]
        stats[key] = {
            "mean": statistics.fmean(means) if means else math.nan,
            "std_train": statistics.pstdev(means) if len(means) >= 2 else math.nan,
            "std_eval": statistics.fmean(evals) if evals else math.nan,
            "n_train": len(means),
            "n_eval": max((len(row["per_seed"]) for _, row in items), default=0),
            "train_seeds": [seed for seed, _ in items],
            "means": means,
        }
    return stats


def _nan(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def claim_stats(stats: Mapping[tuple[str, int], dict], over_training: bool) -> tuple[dict[tuple[str, int], Stat], str]:
    """The ``Stat`` per (structure, k) the claims compare, and what its spread is over."""
    if over_training:
        n = max((s["n_train"] for s in stats.values()), default=0)
        return ({key: Stat(s["mean"], s["std_train"], s["n_train"]) for key, s in stats.items()},
                f"std over {n} training seeds, each the mean over its evaluation seeds")
    n = max((s["n_eval"] for s in stats.values()), default=0)
    return ({key: Stat(s["mean"], s["std_eval"], s["n_eval"]) for key, s in stats.items()},
            f"std over {n} evaluation seeds, one training seed")





def train_k_max(train_config: Mapping | None) -> int | None:
    """The largest k of the training schedule (``"2"`` -> 2, ``"2-64"`` -> 64)."""
    if not train_config:
        return None
    try:
        return max(int(part) for part in str(train_config["k"]).split("-"))
    except (KeyError, ValueError):
        return None


def analyse(summary: Mapping) -> dict:
    """Plateau tests, statistics and the claims table of a main-job summary (JSON-ready).

    Args:
        summary: the main job's summary with ``training`` (``seed -> structure -> TrainResult dict``; empty when
            not trained), ``scaling`` (``seed -> evaluate_scaling result``), ``config`` and ``train_config``.
    """
    from .claims import claims_table

    scaling, training = summary["scaling"], summary.get("training") or {}
    seeds = list(scaling)
    structures = list(summary["config"]["structures"])
    per_seed = {s: {seed: plateau_reason((training.get(seed) or {}).get(s)) if training else "untrained (--no-train)"
                    for seed in seeds} for s in structures}
    plateau = {s: structure_plateau(reasons) for s, reasons in per_seed.items()}
    # a structure that left the plateau with some seeds: its statistics use those seeds (and say so)
    include = {(s, seed): plateau[s] is not None or per_seed[s][seed] is None for s in structures for seed in seeds}
    overall = {seed: scaling[seed]["evaluation"].get("overall", []) for seed in seeds}
    stats = aggregate(overall, include)
    over_training = len(seeds) >= 2
    claim_input, spread = claim_stats(stats, over_training)
    order_diffs: dict[str, dict[int, float]] = {}
    encoder: dict[tuple[str, int], list[float]] = {}
    skipped: dict[tuple[str, int], str] = {}
    for seed in seeds:
        for row in scaling[seed]["evaluation"].get("order", []):
            value = row["max_nll_diff"]
            if value is not None and not _nan(value):
                current = order_diffs.setdefault(row["structure"], {}).get(row["k"], 0.0)
                order_diffs[row["structure"]][row["k"]] = max(current, value)
        for row in scaling[seed]["timing"]:
            encoder.setdefault((row["structure"], row["k"]), []).append(row["encoder_s_per_episode"])
        for row in scaling[seed]["skipped"]:
            skipped.setdefault((row["structure"], row["k"]), row["reason"])
    encoder_s = {key: statistics.fmean(values) for key, values in encoder.items()}
    ks = sorted({k for _, k in stats})
    orders = summary["config"]["eval_orders"]
    tolerance = next((scaling[seed]["evaluation"].get("order_tolerance") for seed in seeds), None) or 1e-4
    claims = claims_table(claim_input, ks, plateau, order_diffs, orders, tolerance, encoder_s, spread,
                          train_k_max(summary.get("train_config")), skipped)
    return {
        "plateau": {s: {"reason": plateau[s], "per_seed": {str(seed): why for seed, why in per_seed[s].items()}}
                    for s in structures},
        "stats": [{"structure": s, "k": k, **v} for (s, k), v in sorted(stats.items())],
        "encoder_s_per_episode": [{"structure": s, "k": k, "seconds": v} for (s, k), v in sorted(encoder_s.items())],
        "skipped": [{"structure": s, "k": k, "reason": why} for (s, k), why in sorted(skipped.items())],
        "claims_spread": spread,
        "claims": [c.to_dict() for c in claims],
        "train_k_max": train_k_max(summary.get("train_config")),
    }
__all__ = ["aggregate", "analyse", "claim_stats", "plateau_reason", "structure_plateau", "train_k_max"]
