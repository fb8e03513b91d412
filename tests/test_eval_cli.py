"""saicl-eval: CLI smoke tests, JSON schema, order invariance, generation tasks, determinism (tiny, CPU)."""

import json

import pytest

from saicl.eval.evaluate import ORDER_TOLERANCE, EvalConfig, evaluate_model, main


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    from saicl.meta_train.synthetic import write_synthetic_collection

    return write_synthetic_collection(tmp_path_factory.mktemp("tasks"), seed=0, n_train_tasks=1, n_test_tasks=1,
                                      n_examples=12, n_queries=4)


@pytest.fixture(scope="module")
def generation_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "copy.jsonl"
    rows = [{"task": "copy", "input": f"say {w}", "output": w, "options": []}
            for w in ["red", "blue", "green", "cat", "dog", "sun", "moon", "star"]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from transformers import ByT5Tokenizer

    from saicl import SAICLForConditionalGeneration
    from saicl.testing import save_tiny_t5

    path = tmp_path_factory.mktemp("ckpt")
    save_tiny_t5(path, seed=3)
    return path, SAICLForConditionalGeneration.from_pretrained(path, attn_backend="torch").eval(), ByT5Tokenizer()


def test_help_lists_every_flag(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    # every flag saicl-eval had before its flags were generated from EvalConfig / EvalRunOptions
    for flag in ("--checkpoint", "--data", "--split", "--split-config", "--structures", "--seeds", "--k", "--orders",
                 "--tasks", "--max-queries", "--batch-size", "--max-new-tokens", "--max-demo-tokens",
                 "--max-query-tokens", "--template", "--tokenizer", "--attn-backend", "--device", "--dtype", "--json",
                 "--plot-dir", "--no-progress"):
        assert f"{flag} " in out or f"{flag}\n" in out or f"{flag}," in out, flag


@pytest.mark.parametrize(
    "extra, message",
    [
        pytest.param(["--k", "four"], "--k four: expected integers", id="bad-k"),
        pytest.param(["--k", "4,-1"], "--k 4,-1: expected values >= 0", id="negative-k"),
        pytest.param(["--structures", "saicl,dense"], "--structures saicl,dense: unknown structure 'dense'",
                     id="bad-structure"),
        pytest.param(["--orders", "0"], "--orders 0: expected a value >= 1", id="bad-orders"),
        pytest.param(["--split", "dev"], "--split dev: unknown dev; expected one of test, train", id="bad-split"),
        pytest.param(["--max-queries", "0"], "--max-queries 0: expected a value >= 1", id="bad-max-queries"),
        pytest.param(["--template", "{output}"], "--template {output}: expected a template containing {input}",
                     id="bad-template"),
        pytest.param(["--tasks", "nope"], "--tasks nope: names tasks not in the 'test' split", id="unknown-task"),
        pytest.param(["--dtype", "float8"], "--dtype float8: unknown float8", id="bad-dtype"),
        pytest.param(["--attn-backend", "warp"], "--attn-backend warp: ", id="bad-backend"),
        pytest.param(["--device", "bogus"], "--device 'bogus'", id="bad-device"),
    ],
)
def test_bad_flags_give_a_clear_message_and_exit_2(tiny_model, collection, capsys, extra, message):
    code = main(["--checkpoint", str(tiny_model[0]), "--data", str(collection), "--no-progress", *extra])
    assert code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "saicl-eval" in line]  # (transformers' loading bar aside)
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err


def test_flags_are_generated_from_the_config():
    """Every EvalConfig / EvalRunOptions field is a flag whose default is the dataclass's, given once."""
    from saicl.config_cli import config_from_args
    from saicl.eval.evaluate import EvalRunOptions, build_parser

    argv = ["--checkpoint", "ckpt", "--data", "tasks.jsonl"]
    args = build_parser().parse_args(argv)
    assert config_from_args(EvalConfig, args) == EvalConfig(data="tasks.jsonl")
    assert config_from_args(EvalRunOptions, args) == EvalRunOptions(checkpoint="ckpt")
    args = build_parser().parse_args([*argv, "--k", "0,4", "--seeds", "1", "--tasks", "a,b", "--max-queries", "none",
                                      "--query-template", "Q: {input}", "--no-progress", "--json", "r.json"])
    assert config_from_args(EvalConfig, args) == EvalConfig(data="tasks.jsonl", ks=(0, 4), seeds=(1,),
                                                            tasks=("a", "b"), query_template="Q: {input}")
    assert config_from_args(EvalRunOptions, args) == EvalRunOptions(checkpoint="ckpt", progress=False, json="r.json")


def test_unknown_flag_and_missing_required_exit_2(capsys):
    assert main(["--bogus"]) == 2
    assert "required" in capsys.readouterr().err


def test_missing_files_exit_2(tiny_model, collection, tmp_path, capsys):
    assert main(["--checkpoint", str(tiny_model[0]), "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "nockpt"), "--data", str(collection)]) == 2
    assert "no such folder" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task": "t", "input": "x"}\n')
    assert main(["--checkpoint", str(tiny_model[0]), "--data", str(bad), "--no-progress"]) == 2
    assert "line 1" in capsys.readouterr().err


def test_cli_writes_json_table_and_plots(tiny_model, collection, tmp_path, capsys):
    out = tmp_path / "out" / "eval.json"
    code = main(["--checkpoint", str(tiny_model[0]), "--data", str(collection), "--seeds", "100,13", "--k", "2,4",
                 "--orders", "2", "--max-queries", "3", "--tokenizer", "byt5", "--json", str(out), "--no-progress"])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "| task | metric | saicl | full | fid |" in stdout and "**overall**" in stdout
    results = json.loads(out.read_text())
    assert set(results) >= {"config", "rows", "overall", "order", "skipped", "tie_rule", "truncation"}
    row = results["rows"][0]
    assert set(row) >= {"structure", "k", "task", "kind", "metric", "per_seed", "mean", "worst", "n_queries",
                        "order_spread", "order_max_nll_diff"}
    assert set(row["per_seed"]) == {"100", "13"}
    assert {(r["structure"], r["k"]) for r in results["overall"]} == {(s, k) for s in ("saicl", "full", "fid")
                                                                      for k in (2, 4)}
    assert (out.parent / "eval_scaling.png").stat().st_size > 1000
    assert (out.parent / "eval_structures.png").exists()


def test_saicl_and_fid_are_order_invariant_full_is_not(tiny_model, collection):
    _, model, tokenizer = tiny_model
    config = EvalConfig(data=str(collection), seeds=(100,), ks=(4,), orders=3, max_queries=4)
    results = evaluate_model(model, tokenizer, config, show_progress=False)
    order = {r["structure"]: r for r in results["order"]}
    for structure in ("saicl", "fid"):
        assert order[structure]["invariant"] is True
        assert order[structure]["max_nll_diff"] <= ORDER_TOLERANCE
        assert order[structure]["metric_spread"] == 0.0 and order[structure]["agreement"] == 1.0
    assert order["full"]["max_nll_diff"] > ORDER_TOLERANCE
    assert order["full"]["invariant"] is False
    # deterministic: the same call gives the same numbers
    again = evaluate_model(model, tokenizer, config, show_progress=False)
    assert again["rows"] == results["rows"]
    assert model.config.structure == "saicl"  # restored


def test_generation_task_uses_exact_match(tiny_model, generation_file):
    _, model, tokenizer = tiny_model
    config = EvalConfig(data=str(generation_file), structures=("saicl",), seeds=(100, 13), ks=(2,), orders=2,
                        max_new_tokens=4)
    results = evaluate_model(model, tokenizer, config, show_progress=False)
    (row,) = results["rows"]
    assert row["kind"] == "generation" and row["metric"] == "exact_match"
    assert 0.0 <= row["mean"] <= 1.0
    assert row["order_agreement"] == 1.0  # saicl generation does not depend on the order either


def test_k_larger_than_a_pool_skips_that_task_with_a_reason(tiny_model, collection):
    _, model, tokenizer = tiny_model
    config = EvalConfig(data=str(collection), structures=("saicl",), seeds=(100,), ks=(8,), orders=1, max_queries=2)
    results = evaluate_model(model, tokenizer, config, show_progress=False)
    skipped = {s["task"] for s in results["skipped"]}
    assert "lookup_test_00" in skipped  # its pool holds 4 keys
    assert all("< k=8" in s["reason"] for s in results["skipped"])
    assert {r["task"] for r in results["rows"]} == {"mapping_test_00", "position_test_00"}


def test_seeds_that_cannot_differ_are_reported(tiny_model, tmp_path, capsys):
    """A single-file task of 8 examples keeps 4 fixed queries: with k = 4, every seed draws the whole pool."""
    data = tmp_path / "small.jsonl"
    rows = [{"task": "small", "input": f"item {i}", "output": "yes" if i % 2 else "no", "options": ["yes", "no"]}
            for i in range(8)] + [{"task": "big", "input": f"thing {i}", "output": "a", "options": ["a", "b"]}
                                  for i in range(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval.json"
    code = main(["--checkpoint", str(tiny_model[0]), "--data", str(data), "--structures", "saicl", "--seeds", "100,13",
                 "--k", "2,4", "--orders", "1", "--max-queries", "1", "--tokenizer", "byt5", "--json", str(out),
                 "--no-progress"])
    assert code == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert warnings == ["saicl-eval: warning: task 'small', k=4: all 2 seeds get the same demonstrations in the "
                        "same order (demonstration pool of 4 = k); its worst/std over seeds are 0 by construction"]
    assert "Seeds identical (one demonstration set, no spread over seeds): small (k=4)" in captured.out
    results = json.loads(out.read_text())
    assert results["identical_seeds"] == [{"k": 4, "task": "small", "seeds": [100, 13],
                                           "reason": "demonstration pool of 4 = k"}]
    differ = {(r["task"], r["k"]): r["seeds_differ"] for r in results["rows"]}
    assert differ == {("small", 2): True, ("small", 4): False, ("big", 2): True, ("big", 4): True}


def test_query_set_is_the_same_for_every_k(tiny_model, tmp_path):
    data = tmp_path / "one.jsonl"
    data.write_text("".join(json.dumps({"task": "one", "input": f"q{i}", "output": "x", "options": ["x", "y"]}) + "\n"
                            for i in range(12)))
    _, model, tokenizer = tiny_model
    config = EvalConfig(data=str(data), structures=("saicl",), seeds=(100,), ks=(1, 5, 6, 8), orders=1)
    results = evaluate_model(model, tokenizer, config, show_progress=False)
    assert {r["k"]: r["n_queries"] for r in results["rows"]} == {1: 6, 5: 6, 6: 6}
    assert [(s["k"], s["reason"]) for s in results["skipped"]] == [(8, "6 demonstration candidates < k=8")]
