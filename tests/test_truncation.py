"""Truncation accounting over several episodes and batches: the processor, saicl-eval and saicl-train.

What the token caps cut must be counted exactly once per episode, whatever the batching, the number of
DataLoader workers, or the evaluation passes interleaved with training.
"""

import json

import pytest

from saicl import ICLProcessor, TruncationReport


def _episode(demo_lengths, query_length):
    return {"demonstrations": [("x" * n, "y") for n in demo_lengths], "query": "q" * query_length}


def test_processor_sums_every_batch_and_counts_every_query(tokenizer):
    # Caps: a demonstration "x..x y" of n + 2 tokens is cut when n + 2 > 5; a query of m tokens + EOS when m > 3.
    processor = ICLProcessor(tokenizer, max_demo_tokens=5, max_query_tokens=4)
    batches = [
        [_episode([1, 9], 2), _episode([], 7)],  # demo 9 cut (6 tokens), query 7 cut (4 tokens)
        [_episode([3, 4, 2], 3)],  # demo 4 cut (1 token); nothing else
        [_episode([], 1), _episode([8], 1), _episode([], 20)],  # demo 8 cut (5), query 20 cut (17)
    ]
    reports = [processor(b).truncation for b in batches]
    assert [(r.demonstrations, r.queries) for r in reports] == [(1, 1), (1, 0), (1, 1)]
    assert [r.queries_total for r in reports] == [2, 1, 3]  # every query counts, truncated or not
    assert [r.demonstrations_total for r in reports] == [2, 3, 1]
    total = processor.truncation_total
    assert total.counts() == {"demonstrations": 3, "demonstrations_total": 6, "queries": 2, "queries_total": 6,
                              "tokens_dropped": 6 + 4 + 1 + 5 + 17}
    assert processor.last_truncation is reports[-1] and reports[-1].episodes == [1, 2]
    assert processor.reset_truncation().counts() == total.counts()
    assert processor.truncation_total.counts() == TruncationReport().counts()
    processor(batches[1])
    assert processor.truncation_total.counts() == reports[1].counts()
    assert (reports[0] + reports[2]).counts()["tokens_dropped"] == 6 + 4 + 5 + 17


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from saicl.testing import save_tiny_t5

    path = tmp_path_factory.mktemp("ckpt")
    save_tiny_t5(path, seed=3)
    return path


def test_eval_counts_truncation_in_every_batch_of_a_task(tiny_checkpoint, tmp_path):
    """Every query and demonstration is 300 characters: with --batch-size 1, each batch truncates."""
    from transformers import ByT5Tokenizer

    from saicl import SAICLForConditionalGeneration
    from saicl.eval.evaluate import EvalConfig, evaluate_model

    data = tmp_path / "long.jsonl"
    rows = [{"task": "long", "input": f"{i} " + "w" * 300, "output": "yes" if i % 2 else "no", "options": ["yes", "no"]}
            for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = SAICLForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_backend="torch")
    config = EvalConfig(data=str(data), structures=("saicl", "full"), seeds=(100,), ks=(2,), orders=2, max_queries=3,
                        batch_size=1, max_demo_tokens=16, max_query_tokens=16)
    results = evaluate_model(model, ByT5Tokenizer(), config, show_progress=False)
    truncation = results["truncation"]
    # 3 queries, each with the same 2 demonstrations: counted once per episode, not per batch/order/structure.
    assert truncation["queries"] == truncation["queries_total"] == 3
    assert truncation["demonstrations"] == truncation["demonstrations_total"] == 6
    assert truncation["tokens_dropped"] == 3 * (302 + 1 - 16) + 6 * (302 + 4 - 16)
    assert "once" in results["truncation_counted"]


def _expected_truncated(config, episodes):
    processor = ICLProcessor(ByT5(), max_demo_tokens=config.max_demo_tokens, max_query_tokens=config.max_query_tokens)
    report = processor(list(episodes)).truncation
    return report.demonstrations + report.queries


def ByT5():
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


def test_training_counts_truncation_in_the_main_process_and_apart_from_eval(tmp_path):
    from saicl.meta_train.train import TrainConfig, build_data, train

    common = dict(model="micro", max_steps=2, batch_size=4, k="1-3", eval_steps=2, eval_episodes=4, eval_k=3,
                  max_demo_tokens=3, max_query_tokens=2, threads=1, progress=False, save_steps=2, logging_steps=1)
    config = TrainConfig(**common, output_dir=str(tmp_path / "w0"))
    dataset, eval_episodes = build_data(config)
    expected_train = _expected_truncated(config, (dataset[i] for i in range(len(dataset))))
    expected_eval = _expected_truncated(config, eval_episodes)
    assert expected_train > 0 and expected_eval > 0
    in_process = train(config)
    with_worker = train(TrainConfig(**common, num_workers=1, output_dir=str(tmp_path / "w1")))
    for result in (in_process, with_worker):
        assert (result.truncated, result.eval_truncated) == (expected_train, expected_eval)
