"""The ``noisy`` synthetic family: answerable by construction, labels flipped at the stated rate, more
demonstrations help a non-learned majority vote, deterministic in the seed."""

from __future__ import annotations

import filecmp
import math
import random
from collections import Counter

import pytest

from saicl.meta_train.data import load_tasks, sample_demonstrations
from saicl.meta_train.synthetic import (
    NOISY_FLIP,
    noisy_class,
    noisy_task,
    sample_episode,
    vote_oracle,
    write_synthetic_collection,
)

# Frequency checks allow Z standard errors: a correct generator fails one with probability < 1e-6
# (two-sided normal tail at 5 sigma ~ 5.7e-7), so these tests are not flaky, yet a rate off by a few
# points at these sample sizes is far outside the bound.
Z = 5.0


def binomial_bound(p: float, n: int) -> float:
    """Allowed |observed rate - p| for n Bernoulli(p) trials (at least one count, for p near 0)."""
    return Z * math.sqrt(p * (1 - p) / n) + 1 / n


def true_labels(task, n_classes: int = 4, n: int = 400) -> dict[int, str]:
    """Class -> label, read from the task's queries (which always carry the true label)."""
    rng = random.Random("true-labels")
    seen: dict[int, set[str]] = {}
    for _ in range(n):
        q = task.query(rng)
        seen.setdefault(noisy_class(q.input, n_classes), set()).add(q.output)
    assert all(len(labels) == 1 for labels in seen.values()), f"a class's query label varies: {seen}"
    assert len(seen) == n_classes
    return {c: labels.pop() for c, labels in seen.items()}


@pytest.mark.parametrize("keyed", [False, True])
@pytest.mark.parametrize("flip", [0.0, 0.1, NOISY_FLIP, 0.6])
def test_demonstration_labels_are_flipped_at_the_stated_rate(flip, keyed):
    task = noisy_task(random.Random(1), flip=flip, keyed=keyed)
    truth = true_labels(task)
    rng, n = random.Random(2), 4000
    demos = [task.draw(rng) for _ in range(n)]
    flipped = [d for d in demos if d.output != truth[noisy_class(d.input, 4)]]
    assert abs(len(flipped) / n - flip) <= binomial_bound(flip, n), (len(flipped) / n, flip)
    # a flipped label is another label of the task, each of the 3 others equally likely
    assert all(d.output in d.options for d in flipped)
    if flipped:
        wrong = Counter((noisy_class(d.input, 4), d.output) for d in flipped)
        per_other = len(flipped) / 3
        for c in range(4):
            for label in set(truth.values()) - {truth[c]}:
                share = 1 / 12  # P(class c) * P(this wrong label | flipped)
                assert abs(wrong[(c, label)] / len(flipped) - share) <= binomial_bound(share, len(flipped)), \
                    (c, label, wrong[(c, label)], per_other)


def test_written_pools_flip_at_the_stated_rate_and_queries_carry_the_true_label(tmp_path):
    data = write_synthetic_collection(tmp_path, seed=3, families=("noisy",), n_train_tasks=1, n_test_tasks=2,
                                      n_queries=64, noisy_flip=0.3)
    for task in load_tasks(data, split="test", k=0).values():
        assert len(task.train) >= 1024 + 64  # room for k = 1024 demonstrations and different seeds
        truth = {}
        for q in task.test:  # one label per class among the queries: the true label
            assert truth.setdefault(noisy_class(q.input, 4), q.output) == q.output
        by_class = Counter(noisy_class(d.input, 4) for d in task.train)
        flips = sum(d.output != truth[noisy_class(d.input, 4)] for d in task.train
                    if noisy_class(d.input, 4) in truth)
        n = sum(by_class[c] for c in truth)
        assert abs(flips / n - 0.3) <= binomial_bound(0.3, n), flips / n


@pytest.mark.parametrize("family", ["noisy", "noisy-keys"])
@pytest.mark.parametrize("k", [1, 2, 4, 16])
def test_episodes_are_answerable_by_construction(k, family):
    rng = random.Random(f"answerable:{k}")
    for _ in range(300):
        demos, query = sample_episode(rng, family, k)
        assert len(demos) == k
        c = noisy_class(query.input, 4)
        assert any(noisy_class(d.input, 4) == c and d.output == query.output for d in demos), (demos, query)


def test_written_queries_are_answerable_from_their_pool(tmp_path):
    data = write_synthetic_collection(tmp_path, seed=0, families=("noisy",), n_train_tasks=1, n_test_tasks=3,
                                      n_queries=32)
    for task in load_tasks(data, split="test", k=0).values():
        for q in task.test:
            c = noisy_class(q.input, 4)
            assert any(noisy_class(d.input, 4) == c and d.output == q.output for d in task.train)


def vote_accuracy(tasks, k: int, seeds=(100, 13, 21, 42, 87)) -> float:
    """Majority vote of the demonstrations of the query's class (no vote: a wrong answer), over the held-out
    tasks and MetaICL's seeds, demonstrations drawn as saicl-eval draws them."""
    right = total = 0
    for task in tasks.values():
        for seed in seeds:
            demos = sample_demonstrations(task, k, seed)
            for q in task.test:
                right += vote_oracle(demos, q) == q.output
                total += 1
    return right / total


@pytest.mark.parametrize("family", ["noisy", "noisy-keys"])
def test_majority_vote_gets_more_accurate_with_more_demonstrations(tmp_path, family):
    # the family rewards more demonstrations: a non-learned plurality vote over the query's class
    data = write_synthetic_collection(tmp_path, seed=0, families=(family,), n_train_tasks=1, n_test_tasks=4,
                                      n_queries=32)
    tasks = load_tasks(data, split="test", k=0)
    acc = {k: vote_accuracy(tasks, k) for k in (4, 16, 64)}
    n = 4 * 5 * 32  # votes per k: tasks x seeds x queries
    margin = 2 * binomial_bound(0.5, n)  # two independent estimates, each within its bound
    assert acc[4] + margin < acc[16] and acc[16] + margin / 2 < acc[64], acc
    assert acc[64] > 0.9, acc  # 16 votes per class at flip 0.3: the plurality is almost always right


def test_noisy_is_deterministic_in_the_seed(tmp_path):
    def episodes(seed):
        rng = random.Random(seed)
        return [sample_episode(rng, "noisy", 8) for _ in range(20)]

    assert episodes(5) == episodes(5)
    assert episodes(5) != episodes(6)
    a = write_synthetic_collection(tmp_path / "a", seed=7, families=("noisy",), n_train_tasks=1, n_test_tasks=2)
    b = write_synthetic_collection(tmp_path / "b", seed=7, families=("noisy",), n_train_tasks=1, n_test_tasks=2)
    c = write_synthetic_collection(tmp_path / "c", seed=8, families=("noisy",), n_train_tasks=1, n_test_tasks=2)
    files = sorted(p.relative_to(a) for p in a.rglob("*.jsonl"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.jsonl"))
    assert all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)
    assert not all((c / f).is_file() and filecmp.cmp(a / f, c / f, shallow=False) for f in files)


@pytest.mark.parametrize("kwargs, match", [
    ({"flip": 0.75}, "flip=0.75"),  # 4 classes: the true label would no longer be the most frequent
    ({"flip": -0.1}, "flip=-0.1"),
    ({"n_classes": 1}, "n_classes=1"),
    ({"n_classes": 9}, "n_classes=9"),
    ({"length": 0}, "length=0"),
])
def test_bad_settings_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        noisy_task(random.Random(0), **kwargs)


def test_keyed_variant_repeats_one_input_per_class():
    task = noisy_task(random.Random(4), keyed=True)
    rng = random.Random(5)
    inputs: dict[int, set[str]] = {}
    for _ in range(200):
        d = task.draw(rng)
        inputs.setdefault(noisy_class(d.input, 4), set()).add(d.input)
    assert sorted(inputs) == [0, 1, 2, 3] and all(len(v) == 1 for v in inputs.values())


def test_open_variant_draws_queries_independently_of_the_demonstrations():
    # the k=1 warm-up family: the query's class is unrelated to the demonstration's (1 in 4 the same class)
    rng, n = random.Random(6), 2000
    same = sum(noisy_class(d[0].input, 4) == noisy_class(q.input, 4)
               for d, q in (sample_episode(rng, "noisy-keys-open", 1) for _ in range(n)))
    assert abs(same / n - 0.25) <= binomial_bound(0.25, n), same / n


def test_training_stream_accepts_the_family():
    from saicl.meta_train.config import TrainConfig
    from saicl.meta_train.episodes import SyntheticSource

    assert TrainConfig(data="synthetic:noisy,noisy-keys").synthetic_families == ["noisy", "noisy-keys"]
    demos, query = SyntheticSource(["noisy"]).episode(random.Random(0), 6)
    assert len(demos) == 6 and query.output in query.options


def test_shipped_recipe_config_loads_and_names_the_family():
    from pathlib import Path

    from saicl.meta_train.config import TrainConfig, load_yaml
    from saicl.meta_train.synthetic import FAMILIES

    path = Path(__file__).resolve().parents[1] / "meta_train" / "configs" / "noisy.yaml"
    config = TrainConfig(**load_yaml(path))
    assert config.synthetic_families == ["noisy-keys"] and all(f in FAMILIES for f in config.synthetic_families)
    assert config.k_schedule.k_max == config.eval_k == 8  # measured at the top of the training k
