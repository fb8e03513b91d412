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


def test_exact_match_on_constructed_predictions():
    from saicl.eval.metrics import exact_match

    golds = ["red", "blue", "green light", "cat"]
    # whitespace is normalised (counts), case and extra words are not (do not count)
    preds = ["  red ", "Blue", "green   light", "cat dog"]
    assert exact_match(preds, golds) == 0.5
    assert exact_match(golds, golds) == 1.0
    assert exact_match(["x"] * 4, golds) == 0.0


def test_generation_task_scores_exact_match_of_the_generated_text(tmp_path, monkeypatch):
    """saicl-eval on a generation task reports, per seed, the exact match of what was generated.

    Generation is replaced by a fixed rule on the query, so the expected score is known without the model:
    queries ``say W`` are answered ``W`` padded with spaces (a match after normalisation), except for two
    words answered with another queried word (no match; also what makes macro-F1 differ from exact match).
    """
    import json

    from transformers import ByT5Tokenizer

    import saicl.eval.eval_runner as eval_runner
    import saicl.eval.evaluate as evaluate
    from saicl import SAICLConfig, SAICLForConditionalGeneration
    from saicl.testing import tiny_t5_config

    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "star"]
    wrong = {"blue", "moon"}
    data = tmp_path / "copy.jsonl"
    data.write_text("".join(json.dumps({"task": "copy", "input": f"say {w}", "output": w, "options": []}) + "\n"
                            for w in words))
    seen: dict[int, list[str]] = {}

    def fake_generate(model, processor, episodes, batch_size=16, max_new_tokens=16, progress=None):
        answers = []
        right = [e["output"] for e in episodes if e["output"] not in wrong]
        for episode in episodes:
            word = episode["query"].removeprefix("say ")
            assert episode["output"] == word  # the gold handed to the metric is the query's word
            answers.append(right[0] if word in wrong else f"  {word} ")
        seen.setdefault(len(seen), [e["query"].removeprefix("say ") for e in episodes])
        return answers

    monkeypatch.setattr(eval_runner, "generate_episodes", fake_generate)
    model = SAICLForConditionalGeneration(SAICLConfig(**tiny_t5_config().to_dict()))
    config = evaluate.EvalConfig(data=str(data), structures=("saicl",), seeds=(100, 13), ks=(2,), orders=1)
    results = evaluate.evaluate_model(model, ByT5Tokenizer(), config, show_progress=False)
    (row,) = results["rows"]
    assert row["kind"] == "generation" and row["metric"] == "exact_match"
    # one generate call per (seed, order): expected score = share of the queried words answered right
    expected = [sum(w not in wrong for w in queried) / len(queried) for queried in seen.values()]
    assert len(expected) == 2 and all(0 < e < 1 for e in expected), (seen, "the draw must mix right and wrong")
    assert [row["per_seed"]["100"], row["per_seed"]["13"]] == pytest.approx(expected)
    assert row["mean"] == pytest.approx(sum(expected) / 2) and row["worst"] == pytest.approx(min(expected))
