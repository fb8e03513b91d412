"""The main job's statistics (plateau test, spreads over training and evaluation seeds) and the rule that decides
where ``full`` stops, on synthetic numbers."""

from __future__ import annotations

import math
import statistics

import pytest

from saicl.eval.scaling import EncoderTimer, full_decision
from saicl.eval.study import aggregate, claim_stats, plateau_reason, structure_plateau, train_k_max


def training(*points: tuple[int, float]) -> dict:
    return {"evals": [{"step": step, "accuracy": acc, "chance": 0.25} for step, acc in points]}


def test_plateau_uses_the_last_heldout_accuracy_against_two_times_chance():
    assert plateau_reason(training((100, 0.2), (200, 0.5))) is None  # 0.5 = 2 x 0.25: left
    assert "0.490 < 2 x chance 0.250 at step 200" in plateau_reason(training((100, 0.9), (200, 0.49)))
    assert plateau_reason(None) == "untrained"
    assert "cannot be told apart" in plateau_reason({"evals": []})


def test_a_structure_left_the_plateau_if_any_seed_did():
    assert structure_plateau({0: "stuck", 1: None}) is None
    assert structure_plateau({0: "stuck"}) == "stuck"
    assert structure_plateau({0: "a", 1: "b"}) == "seed 0: a; seed 1: b"


def overall(structure: str, k: int, per_seed: list[float]) -> dict:
    return {"structure": structure, "k": k, "mean": statistics.fmean(per_seed), "std": statistics.pstdev(per_seed),
            "per_seed": {str(i): v for i, v in enumerate(per_seed)}}


def test_spreads_over_training_and_evaluation_seeds_are_separate():
    rows = {0: [overall("saicl", 4, [0.5, 0.7])], 1: [overall("saicl", 4, [0.8, 0.8])],
            2: [overall("saicl", 4, [0.1, 0.1])]}
    stats = aggregate(rows, include={("saicl", 2): False})  # seed 2 stayed on the plateau
    row = stats[("saicl", 4)]
    assert row["train_seeds"] == [0, 1] and row["n_train"] == 2 and row["n_eval"] == 2
    assert row["mean"] == pytest.approx(0.7)
    assert row["std_train"] == pytest.approx(0.1)  # means 0.6 and 0.8
    assert row["std_eval"] == pytest.approx(0.05)  # 0.1 and 0.0, averaged
    over_training, spread = claim_stats(stats, over_training=True)
    assert over_training[("saicl", 4)].std == pytest.approx(0.1) and "2 training seeds" in spread
    over_eval, spread = claim_stats(stats, over_training=False)
    assert over_eval[("saicl", 4)].std == pytest.approx(0.05) and "2 evaluation seeds" in spread
    assert math.isnan(aggregate({0: [overall("fid", 4, [0.5, 0.6])]})[("fid", 4)]["std_train"])


def test_train_k_max():
    assert train_k_max({"k": "2"}) == 2 and train_k_max({"k": "4-64"}) == 64 and train_k_max(None) is None


GIB = 2**30


@pytest.mark.parametrize("estimate, previous, budget, run, why", [
    (5 * GIB, None, 60, False, "exceeds the memory budget"),
    (1 * GIB, None, 60, True, "first k"),
    # 0.01 s/episode at 1e9 FLOPs per batch -> x16 at 1.6e10 -> 0.16 s x 100 episodes = 16 s
    (1 * GIB, {"k": 64, "flops_per_batch": 1e9, "eval_s_per_episode": 0.01}, 20, True, "predicted 16 s within"),
    (1 * GIB, {"k": 64, "flops_per_batch": 1e9, "eval_s_per_episode": 0.01}, 15, False, "predicted 16 s for 100"),
])
def test_full_stops_where_memory_or_predicted_time_runs_out(estimate, previous, budget, run, why):
    ran, reason, _ = full_decision(estimate, 4 * GIB, previous, flops=16e9, episodes=100, budget_s=budget)
    assert ran is run and why in reason


def test_encoder_time_per_episode_is_the_median_over_calls():
    timer = EncoderTimer()
    timer.calls = [(8.0, 16), (0.16, 16), (0.2, 16), (0.01, 1)]  # a slow first call does not set the number
    assert timer.per_episode() == pytest.approx((0.01 + 0.0125) / 2)
    assert timer.seconds == pytest.approx(8.37)
    assert math.isnan(EncoderTimer().per_episode())
