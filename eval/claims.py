"""The claims table: each claim of the SAICL paper, what this run measured, and a verdict computed from it.

Every verdict comes from a stated rule applied to the run's numbers (never written by hand):

- quality, ``saicl`` vs ``full`` ("matches or beats"): holds if ``mean(saicl) - mean(full) >= -pooled std``;
- quality, ``saicl`` vs ``fid`` ("beats"): holds if ``mean(saicl) - mean(fid) > pooled std``;
- gains with more demonstrations: holds if the metric at the largest k exceeds the metric at the reference k
  (the smallest k, or the largest training k) by more than the pooled std;
- order invariance: holds if no option score moved by more than the tolerance under any reordering;
- speed-up: holds if full's encoder time per episode is at least ``SPEEDUP_MARGIN`` times saicl's.

"pooled std" is ``sqrt((std_a^2 + std_b^2) / 2)`` of the two compared means (the caller says which spread:
over evaluation seeds or over training seeds). A comparison is *not measurable here* when a structure it
involves did not leave the in-context-learning plateau (its metric is chance, whatever its structure), when
a number is missing (not evaluated at that k), or when it has no spread to compare against.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

HOLDS = "holds"
FAILS = "does not hold"
NOT_MEASURABLE = "not measurable here"
VERDICTS = (HOLDS, FAILS, NOT_MEASURABLE)

SPEEDUP_MARGIN = 1.1  # full must be >= 10% slower than saicl: below that, timing noise on a shared CPU decides
PLATEAU_FACTOR = 2.0  # a structure "left the plateau" when its held-out accuracy is >= 2x chance


@dataclass(frozen=True)
class Stat:
    """One measured metric: mean and spread (std) over ``n`` values (seeds)."""

    mean: float
    std: float
    n: int = 1


@dataclass(frozen=True)
class Claim:
    """One row of the claims table."""

    claim: str
    k: int | None
    measured: str
    rule: str
    verdict: str

    def to_dict(self) -> dict:
        return asdict(self)


def _finite(*values: float | None) -> bool:
    return all(v is not None and not math.isnan(v) for v in values)


def pooled_std(a: Stat, b: Stat) -> float:
    """``sqrt((a.std^2 + b.std^2) / 2)``."""
    return math.sqrt((a.std ** 2 + b.std ** 2) / 2)


def left_plateau(accuracy: float | None, chance: float | None, factor: float = PLATEAU_FACTOR) -> bool | None:
    """Whether held-out ``accuracy >= factor * chance``; ``None`` if either is unknown."""
    if not _finite(accuracy, chance):
        return None
    return accuracy >= factor * chance


def _missing(stats: Mapping[tuple[str, int], Stat], structures: Sequence[str], k: int,
             plateau: Mapping[str, str | None]) -> str | None:
    """Why a comparison of ``structures`` at ``k`` cannot be made (``None``: it can)."""
    for structure in structures:
        if plateau.get(structure):
            return f"`{structure}` did not leave the plateau"
    for structure in structures:
        stat = stats.get((structure, k))
        if stat is None or not _finite(stat.mean):
            return f"`{structure}` was not evaluated at k={k}"
        if not _finite(stat.std) or stat.n < 2:
            return f"`{structure}` at k={k} has no spread (fewer than 2 seeds)"
    return None


def _fmt(stat: Stat) -> str:
    return f"{stat.mean:.3f} ± {stat.std:.3f}"


def compare_quality(a: str, b: str, stats: Mapping[tuple[str, int], Stat], k: int,
                    plateau: Mapping[str, str | None], at_least_equal: bool, spread: str) -> Claim:
    """``a`` matches or beats ``b`` (``at_least_equal``) or beats it, at ``k``.

    Args:
        stats: ``(structure, k) -> Stat``.
        plateau: ``structure -> reason`` for structures that did not leave the plateau (``None``/absent: left).
        spread: what the std is over (shown in the rule).
    """
    if at_least_equal:
        claim = f"quality: `{a}` matches or beats `{b}`"
        rule = f"holds if mean({a}) - mean({b}) >= -pooled std ({spread})"
    else:
        claim = f"quality: `{a}` beats `{b}`"
        rule = f"holds if mean({a}) - mean({b}) > pooled std ({spread})"
    why = _missing(stats, (a, b), k, plateau)
    if why:
        sa, sb = stats.get((a, k)), stats.get((b, k))
        measured = "; ".join(f"{s}: {_fmt(v)}" for s, v in ((a, sa), (b, sb)) if v is not None and _finite(v.mean))
        return Claim(claim, k, (measured + "; " if measured else "") + why, rule, NOT_MEASURABLE)
    sa, sb = stats[(a, k)], stats[(b, k)]
    diff, pooled = sa.mean - sb.mean, pooled_std(sa, sb)
    ok = diff >= -pooled if at_least_equal else diff > pooled
    measured = f"{a} {_fmt(sa)}, {b} {_fmt(sb)}: difference {diff:+.3f}, pooled std {pooled:.3f}"
    return Claim(claim, k, measured, rule, HOLDS if ok else FAILS)


def gains_with_k(structure: str, stats: Mapping[tuple[str, int], Stat], ks: Sequence[int], reference_k: int,
                 plateau: Mapping[str, str | None], spread: str, reference: str = "the smallest k") -> Claim:
    """The metric at the largest evaluated k exceeds the metric at ``reference_k`` by more than the pooled std."""
    evaluated = sorted(k for k in ks if (structure, k) in stats and _finite(stats[(structure, k)].mean))
    claim = f"gains continue with more demonstrations (`{structure}`, largest k vs {reference})"
    rule = f"holds if metric(largest k) - metric(k={reference_k}) > pooled std ({spread})"
    if not evaluated:
        return Claim(claim, None, f"`{structure}` was not evaluated", rule, NOT_MEASURABLE)
    top = evaluated[-1]
    if top <= reference_k:
        return Claim(claim, top, f"the largest evaluated k ({top}) is not above k={reference_k}", rule,
                     NOT_MEASURABLE)
    stat_top = stats[(structure, top)]
    why = _missing(stats, (structure,), reference_k, plateau) or _missing(stats, (structure,), top, plateau)
    if why:
        return Claim(claim, top, why, rule, NOT_MEASURABLE)
    stat_ref = stats[(structure, reference_k)]
    gain, pooled = stat_top.mean - stat_ref.mean, pooled_std(stat_top, stat_ref)
    measured = (f"k={reference_k}: {_fmt(stat_ref)}; k={top}: {_fmt(stat_top)}: gain {gain:+.3f}, "
                f"pooled std {pooled:.3f}")
    return Claim(claim, top, measured, rule, HOLDS if gain > pooled else FAILS)


def order_invariance(structure: str, max_nll_diff: Mapping[int, float], orders: int, tolerance: float) -> Claim:
    """No option score of ``structure`` moves by more than ``tolerance`` nats under any reordering (every k)."""
    claim = f"order invariance (`{structure}`)"
    rule = f"holds if the largest change of any option's mean NLL over {orders} orders is <= {tolerance:g} at every k"
    measured_k = {k: v for k, v in sorted(max_nll_diff.items()) if _finite(v)}
    if orders < 2 or not measured_k:
        return Claim(claim, None, "one demonstration order per seed: nothing to compare", rule, NOT_MEASURABLE)
    worst_k = max(measured_k, key=measured_k.get)
    measured = (f"largest change {measured_k[worst_k]:.1e} (k={worst_k}) over k = "
                f"{', '.join(map(str, measured_k))}")
    return Claim(claim, None, measured, rule, HOLDS if measured_k[worst_k] <= tolerance else FAILS)


def speedup(k: int, encoder_s: Mapping[tuple[str, int], float], margin: float = SPEEDUP_MARGIN,
            skipped: Mapping[tuple[str, int], str] | None = None) -> Claim:
    """``full``'s encoder time per episode is at least ``margin`` times ``saicl``'s at ``k``.

    Speed is a property of the structure, not of training: no plateau condition applies.
    """
    claim = "speed-up of `saicl` over `full` (encoder)"
    rule = f"holds if encoder time per episode of full / saicl >= {margin:g}"
    skipped = skipped or {}
    times = {s: encoder_s.get((s, k)) for s in ("saicl", "full")}
    missing = [s for s, t in times.items() if not _finite(t) or t <= 0]
    if missing:
        why = "; ".join(f"`{s}` not timed at k={k}" + (f" ({skipped[(s, k)]})" if (s, k) in skipped else "")
                        for s in missing)
        return Claim(claim, k, why, rule, NOT_MEASURABLE)
    ratio = times["full"] / times["saicl"]
    measured = f"full {times['full'] * 1e3:.1f} ms, saicl {times['saicl'] * 1e3:.1f} ms per episode: {ratio:.2f}x"
    return Claim(claim, k, measured, rule, HOLDS if ratio >= margin else FAILS)


def claims_table(stats: Mapping[tuple[str, int], Stat], ks: Sequence[int], plateau: Mapping[str, str | None],
                 order_diffs: Mapping[str, Mapping[int, float]], orders: int, tolerance: float,
                 encoder_s: Mapping[tuple[str, int], float], spread: str, train_k_max: int | None = None,
                 skipped: Mapping[tuple[str, int], str] | None = None) -> list[Claim]:
    """Every claim the run can speak to, in a fixed order (quality, gains, order invariance, speed-up).

    Args:
        stats: ``(structure, k) -> Stat`` of the held-out metric.
        ks: the evaluated demonstration counts.
        plateau: ``structure -> reason`` for structures that did not leave the plateau.
        order_diffs: ``structure -> {k: largest option-NLL change over orders}``.
        encoder_s: ``(structure, k) -> encoder seconds per episode``.
        spread: what the std in ``stats`` is over ("std over 5 evaluation seeds", ...).
        train_k_max: the largest k seen in training (adds a "beyond the training k" gains row).
        skipped: ``(structure, k) -> reason`` for evaluations that were not run.
    """
    ks = sorted(set(ks))
    rows: list[Claim] = []
    for k in ks:
        rows.append(compare_quality("saicl", "full", stats, k, plateau, True, spread))
    for k in ks:
        rows.append(compare_quality("saicl", "fid", stats, k, plateau, False, spread))
    structures = sorted({s for s, _ in stats})
    for structure in ("saicl", "full", "fid"):
        if structure not in structures or not ks:
            continue
        rows.append(gains_with_k(structure, stats, ks, ks[0], plateau, spread))
        if train_k_max is not None and train_k_max in ks and train_k_max < ks[-1]:
            rows.append(gains_with_k(structure, stats, ks, train_k_max, plateau, spread,
                                     reference=f"the largest training k ({train_k_max})"))
    if "saicl" in order_diffs:
        rows.append(order_invariance("saicl", order_diffs["saicl"], orders, tolerance))
    for k in ks:
        rows.append(speedup(k, encoder_s, skipped=skipped))
    return rows


def markdown(claims: Sequence[Claim]) -> str:
    """The claims table as markdown."""
    lines = ["| claim | k | measured | rule | verdict |", "|---|---|---|---|---|"]
    for c in claims:
        lines.append(f"| {c.claim} | {'all' if c.k is None else c.k} | {c.measured} | {c.rule} | **{c.verdict}** |")
    return "\n".join(lines)


__all__ = ["FAILS", "HOLDS", "NOT_MEASURABLE", "PLATEAU_FACTOR", "SPEEDUP_MARGIN", "VERDICTS", "Claim", "Stat",
           "claims_table", "compare_quality", "gains_with_k", "left_plateau", "markdown", "order_invariance",
           "pooled_std", "speedup"]
