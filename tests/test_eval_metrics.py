"""Metric functions of saicl-eval against hand-computed cases (docs/evaluation.md defines them)."""

import math

import pytest

from saicl.eval.metrics import accuracy, choose_option, macro_f1, normalize_answer, summarize_seeds, task_metric


def test_macro_f1_with_a_gold_class_never_predicted():
    golds = ["A", "A", "B", "B", "C"]
    preds = ["A", "B", "B", "B", "A"]
    # A: P = 1/2, R = 1/2 -> 0.5;  B: P = 2/3, R = 1 -> 0.8;  C: never predicted -> 0
    assert macro_f1(preds, golds) == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_macro_f1_predicted_label_outside_gold_is_not_a_class():
    # D is never gold: it is not averaged, it only costs B its recall (B: P = 0, R = 0 -> 0).
    assert macro_f1(["A", "D"], ["A", "B"]) == pytest.approx(0.5)


def test_macro_f1_perfect_and_constant_predictor():
    assert macro_f1(["x", "y", "x"], ["x", "y", "x"]) == 1.0
    # always "x" on a balanced pair: x: P = 1/2, R = 1 -> 2/3; y: 0
    assert macro_f1(["x", "x"], ["x", "y"]) == pytest.approx(1 / 3)


def test_accuracy_normalizes_whitespace_only():
    assert normalize_answer("  a   b ") == "a b"
    assert accuracy(["a b", "Yes"], [" a  b", "yes"]) == 0.5  # case is kept


def test_task_metric_picks_macro_f1_or_accuracy():
    preds, golds = ["A", "A"], ["A", "B"]
    assert task_metric(preds, golds, is_classification=True) == pytest.approx(1 / 3)
    assert task_metric(preds, golds, is_classification=False) == 0.5


@pytest.mark.parametrize(
    "scores, expected",
    [
        pytest.param([1.0, 0.5, 0.7], 1, id="lowest-nll"),
        pytest.param([1.0, 0.5, 0.5], 1, id="exact-tie-first-listed"),
        pytest.param([0.3, 0.3 + 1e-7], 0, id="float-noise-tie-first"),
        pytest.param([0.3 + 1e-7, 0.3], 0, id="float-noise-tie-first-reversed"),
        pytest.param([0.3, 0.3 - 1e-4], 1, id="real-difference"),
        pytest.param([math.nan, 2.0], 1, id="nan-is-worst"),
    ],
)
def test_choose_option_tie_rule(scores, expected):
    assert choose_option(scores) == expected


def test_choose_option_rejects_empty():
    with pytest.raises(ValueError):
        choose_option([])


def test_summarize_seeds_mean_worst_std():
    summary = summarize_seeds([0.5, 0.7, 0.6])
    assert summary["mean"] == pytest.approx(0.6)
    assert summary["worst"] == 0.5
    assert summary["std"] == pytest.approx(math.sqrt(((0.1**2) * 2) / 3))
    assert math.isnan(summarize_seeds([])["mean"])


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="2 predictions but 1 gold"):
        macro_f1(["a", "b"], ["a"])
