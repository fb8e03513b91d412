"""The claims table's rules on synthetic numbers: every verdict of every rule is reachable, at the boundary."""

from __future__ import annotations

import math

import pytest

from saicl.eval.claims import (
    FAILS,
    HOLDS,
    NOT_MEASURABLE,
    Stat,
    claims_table,
    compare_quality,
    gains_with_k,
    left_plateau,
    markdown,
    order_invariance,
    pooled_std,
    speedup,
)

SPREAD = "std over 5 evaluation seeds"


def stats(**values: tuple[float, float]) -> dict:
    """``saicl_4=(mean, std)`` -> ``{("saicl", 4): Stat(mean, std, 5)}``."""
    out = {}
    for key, (mean, std) in values.items():
        structure, k = key.rsplit("_", 1)
        out[(structure, int(k))] = Stat(mean, std, 5)
    return out


def test_pooled_std():
    assert pooled_std(Stat(0, 0.3), Stat(0, 0.4)) == pytest.approx(math.sqrt(0.125))


@pytest.mark.parametrize("saicl, full, verdict", [
    (0.60, 0.60, HOLDS),  # equal
    (0.55, 0.60, HOLDS),  # worse, but within one pooled std (0.1)
    (0.70, 0.60, HOLDS),  # better
    (0.49, 0.60, FAILS),  # worse by more than the pooled std
])
def test_saicl_matches_or_beats_full(saicl, full, verdict):
    s = stats(saicl_16=(saicl, 0.1), full_16=(full, 0.1))
    assert compare_quality("saicl", "full", s, 16, {}, True, SPREAD).verdict == verdict


@pytest.mark.parametrize("saicl, fid, verdict", [
    (0.71, 0.60, HOLDS),  # better by more than the pooled std
    (0.69, 0.60, FAILS),  # better, but within noise: "beats" is not shown
    (0.50, 0.60, FAILS),
])
def test_saicl_beats_fid(saicl, fid, verdict):
    s = stats(saicl_16=(saicl, 0.1), fid_16=(fid, 0.1))
    assert compare_quality("saicl", "fid", s, 16, {}, False, SPREAD).verdict == verdict


def test_quality_not_measurable_when_a_structure_stayed_on_the_plateau_or_is_missing():
    s = stats(saicl_16=(0.9, 0.1), full_16=(0.25, 0.01))
    claim = compare_quality("saicl", "full", s, 16, {"full": "accuracy 0.26 < 2 x chance 0.25"}, True, SPREAD)
    assert claim.verdict == NOT_MEASURABLE and "did not leave the plateau" in claim.measured
    assert compare_quality("saicl", "full", s, 64, {}, True, SPREAD).verdict == NOT_MEASURABLE  # not evaluated
    one_seed = {("saicl", 16): Stat(0.9, 0.0, 1), ("full", 16): Stat(0.5, 0.0, 1)}
    assert compare_quality("saicl", "full", one_seed, 16, {}, True, SPREAD).verdict == NOT_MEASURABLE


@pytest.mark.parametrize("top, verdict", [(0.71, HOLDS), (0.69, FAILS), (0.40, FAILS)])
def test_gains_with_k(top, verdict):
    s = stats(saicl_4=(0.6, 0.1), saicl_64=(0.65, 0.1), saicl_256=(top, 0.1))
    claim = gains_with_k("saicl", s, [4, 64, 256], 4, {}, SPREAD)
    assert claim.verdict == verdict and claim.k == 256


def test_gains_not_measurable():
    s = stats(fid_4=(0.3, 0.1), fid_256=(0.9, 0.1))
    assert gains_with_k("fid", s, [4, 256], 4, {"fid": "untrained"}, SPREAD).verdict == NOT_MEASURABLE
    assert gains_with_k("fid", s, [4, 256], 256, {}, SPREAD).verdict == NOT_MEASURABLE  # no larger k
    assert gains_with_k("saicl", s, [4, 256], 4, {}, SPREAD).verdict == NOT_MEASURABLE  # not evaluated


@pytest.mark.parametrize("diffs, orders, verdict", [
    ({4: 1e-6, 256: 5e-5}, 2, HOLDS),
    ({4: 1e-6, 256: 2e-4}, 2, FAILS),  # one k above the tolerance is enough
    ({4: 1e-6}, 1, NOT_MEASURABLE),
    ({4: math.nan}, 2, NOT_MEASURABLE),
])
def test_order_invariance(diffs, orders, verdict):
    assert order_invariance("saicl", diffs, orders, 1e-4).verdict == verdict


@pytest.mark.parametrize("full_s, verdict", [(0.0111, HOLDS), (0.0109, FAILS), (0.005, FAILS), (None, NOT_MEASURABLE)])
def test_speedup(full_s, verdict):
    times = {("saicl", 64): 0.010}
    if full_s is not None:
        times[("full", 64)] = full_s
    claim = speedup(64, times, skipped={("full", 64): "over the memory budget"})
    assert claim.verdict == verdict
    if full_s is None:
        assert "over the memory budget" in claim.measured


def test_left_plateau_is_two_times_chance():
    assert left_plateau(0.5, 0.25) is True
    assert left_plateau(0.49, 0.25) is False
    assert left_plateau(None, 0.25) is None


def test_claims_table_is_computed_from_the_numbers():
    s = stats(saicl_4=(0.5, 0.05), saicl_16=(0.7, 0.05), full_4=(0.5, 0.05), full_16=(0.5, 0.05),
              fid_4=(0.4, 0.05), fid_16=(0.5, 0.05))
    rows = claims_table(s, [4, 16], {}, {"saicl": {4: 0.0, 16: 1e-6}}, 2, 1e-4,
                        {("saicl", 4): 0.01, ("full", 4): 0.01, ("saicl", 16): 0.01, ("full", 16): 0.03},
                        SPREAD, train_k_max=4)
    verdicts = {(r.claim, r.k): r.verdict for r in rows}
    assert verdicts[("quality: `saicl` beats `fid`", 16)] == HOLDS
    assert verdicts[("gains continue with more demonstrations (`full`, largest k vs the smallest k)", 16)] == FAILS
    assert verdicts[("speed-up of `saicl` over `full` (encoder)", 4)] == FAILS
    assert verdicts[("speed-up of `saicl` over `full` (encoder)", 16)] == HOLDS
    assert verdicts[("order invariance (`saicl`)", None)] == HOLDS
    # the same table with full stuck on the plateau: its comparisons become not measurable, the rest stay
    rows = claims_table(s, [4, 16], {"full": "accuracy 0.25 < 2 x chance"}, {}, 2, 1e-4, {}, SPREAD)
    assert all(r.verdict == NOT_MEASURABLE for r in rows if "`full`" in r.claim)
    assert any(r.verdict == HOLDS for r in rows)
    assert "| **not measurable here** |" in markdown(rows)
