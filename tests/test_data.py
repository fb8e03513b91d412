"""Task data (docs/design.md §6): both layouts, split configs, demonstrations, episodes, synthetic tasks, bad input."""

import json
import random
import time

import pytest

from saicl.meta_train.data import (
    DataError,
    Example,
    TaskData,
    load_tasks,
    make_episode,
    sample_demonstrations,
    write_jsonl,
    write_split_config,
)
from saicl.meta_train.episodes import EpisodeDataset, KSchedule, SyntheticSource, TaskSource
from saicl.meta_train.synthetic import FAMILIES, sample_episode, write_synthetic_collection


def _examples(task, n, options=("yes", "no")):
    return [Example(f"{task} input {i}", options[i % len(options)], tuple(options), task) for i in range(n)]


@pytest.fixture
def single_file(tmp_path):
    path = tmp_path / "tasks.jsonl"
    write_jsonl(path, _examples("alpha", 20) + _examples("beta", 12, ("a", "b", "c")))
    return path


@pytest.fixture
def metaicl_folder(tmp_path):
    root = tmp_path / "metaicl"
    for task in ("t1", "t2", "t3"):
        write_jsonl(root / task / f"{task}_16384_100_train.jsonl", _examples(task, 30))
        write_jsonl(root / task / f"{task}_16384_100_test.jsonl", _examples(task, 5))
        write_jsonl(root / task / f"{task}_4_13_train.jsonl", _examples(task, 4))
        write_jsonl(root / task / f"{task}_4_13_test.jsonl", _examples(task, 6))
    config = write_split_config(tmp_path / "split.json", train=["t1", "t2"], test=["t3"])
    return root, config


def test_single_file_groups_and_splits_deterministically(single_file):
    tasks = load_tasks(single_file, k=4)
    assert sorted(tasks) == ["alpha", "beta"]
    alpha = tasks["alpha"]
    assert len(alpha.train) + len(alpha.test) == 20 and len(alpha.train) >= 4 and alpha.test
    assert set(alpha.train).isdisjoint(alpha.test)
    assert load_tasks(single_file, k=4, seed=13)["alpha"].test == alpha.test  # queries do not depend on the seed
    assert alpha.is_classification and tasks["beta"].train[0].options == ("a", "b", "c")


def test_single_file_with_split_config(single_file, tmp_path):
    config = write_split_config(tmp_path / "s.json", train=["alpha"], test=["beta"])
    assert list(load_tasks(single_file, split="train", config=config, k=2)) == ["alpha"]
    assert list(load_tasks(single_file, split="test", config=config, k=2)) == ["beta"]


def test_metaicl_folder_exact_files_and_pool_fallback(metaicl_folder):
    root, config = metaicl_folder
    test = load_tasks(root, split="test", config=config, k=4, seed=13)
    assert list(test) == ["t3"] and len(test["t3"].train) == 4 and len(test["t3"].test) == 6  # exact k/seed files
    pooled = load_tasks(root, split="test", config=config, k=8, seed=42)  # no such files: the largest pool
    assert len(pooled["t3"].train) == 30 and len(pooled["t3"].test) == 5
    assert sorted(load_tasks(root, split="train", config=config, k=4)) == ["t1", "t2"]


def test_split_config_inside_folder_and_shipped_name(metaicl_folder):
    root, config = metaicl_folder
    (root / "splits.json").write_text(config.read_text())
    assert list(load_tasks(root, split="test", k=4, seed=13)) == ["t3"]
    with pytest.raises(DataError, match="neither a file nor a shipped config"):
        load_tasks(root, config="no-such-config")
    with pytest.raises(DataError, match="lists tasks|does not exist"):
        load_tasks(root, split="test", config="offline", k=4)  # shipped config, tasks absent from this folder


def test_sample_demonstrations_is_one_draw_per_seed():
    task = TaskData("t", _examples("t", 50), [])
    a, b = sample_demonstrations(task, 8, 100), sample_demonstrations(task, 8, 100)
    assert a == b and len(set(a)) == 8 and a != sample_demonstrations(task, 8, 13)
    assert a == random.Random(100).sample(task.train, 8)
    assert sample_demonstrations(task, 0, 1) == []
    with pytest.raises(ValueError, match="fewer than k=51"):
        sample_demonstrations(task, 51, 1)


def test_make_episode_matches_the_processor_format(tokenizer):
    from saicl import ICLProcessor

    demos = [Example("x1", "yes", ("yes", "no")), Example("x2", "no", ("yes", "no"))]
    episode = make_episode(demos, Example("q", "no", ("yes", "no")))
    assert episode == {"demonstrations": [("x1", "yes"), ("x2", "no")], "query": "q", "options": ["yes", "no"],
                       "output": "no"}
    batch = ICLProcessor(tokenizer)([episode])
    assert batch["segment_ids"].max().item() == 1


def test_is_classification():
    assert not TaskData("g", [Example("a", "b")], []).is_classification
    assert TaskData("c", [Example("a", "b", ("b", "c"))], [Example("d", "c", ("b", "c"))]).is_classification


BAD_LINES = [
    ("not json", "line 2: not valid JSON"),
    ('["a list"]', "line 2: expected a JSON object"),
    ('{"task": "t", "output": "y"}', "line 2: missing field 'input'"),
    ('{"task": "t", "input": "x", "output": 3}', "line 2: field 'output' must be a string"),
    ('{"task": "t", "input": "  ", "output": "y"}', "line 2: field 'input' is empty"),
    ('{"task": "t", "input": "x", "output": "z", "options": ["y", "n"]}', "line 2: output 'z' is not among"),
    ('{"task": "t", "input": "x", "output": "y", "options": "y,n"}', "line 2: field 'options' must be a list"),
    ('{"input": "x", "output": "y"}', "line 2: missing or empty field 'task'"),
]


@pytest.mark.parametrize("line,message", BAD_LINES, ids=[m.split(": ", 1)[1][:24] for _, m in BAD_LINES])
def test_malformed_lines_are_named_by_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"task": "t", "input": "x", "output": "y"}\n' + line + "\n")
    with pytest.raises(DataError, match=message) as err:
        load_tasks(path, k=0)
    assert str(path) in str(err.value)


def test_missing_empty_and_too_small(tmp_path, metaicl_folder):
    with pytest.raises(DataError, match="no such file"):
        load_tasks(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="holds no examples"):
        load_tasks(empty)
    small = tmp_path / "small.jsonl"
    write_jsonl(small, _examples("tiny", 4))
    with pytest.raises(DataError, match="has 4 examples; k=4 needs at least k\\+1"):
        load_tasks(small, k=4)
    root, config = metaicl_folder
    with pytest.raises(DataError, match="fewer than k=40"):
        load_tasks(root, split="train", config=config, k=40)
    (root / "t1" / "t1_16384_100_train.jsonl").write_text("")
    with pytest.raises(DataError, match="holds no examples"):
        load_tasks(root, split="train", config=config, k=4)
    with pytest.raises(DataError, match="split='dev'"):
        load_tasks(root, split="dev")


def test_bad_split_configs(tmp_path, metaicl_folder):
    root, _ = metaicl_folder
    cases = {
        "overlap.json": ({"train": ["t1"], "test": ["t1"]}, "in both 'train' and 'test'"),
        "missing.json": ({"train": ["t1"], "test": ["nope"]}, "'nope' is listed but the folder"),
        "shape.json": (["t1"], "a split config is a JSON object"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_text(json.dumps(content))
        with pytest.raises(DataError, match=message):
            load_tasks(root, split="test", config=path, k=4, seed=13)
    broken = tmp_path / "broken.json"
    broken.write_text('{"train": [\n')
    with pytest.raises(DataError, match="broken.json, line 2"):
        load_tasks(root, config=broken)


def test_synthetic_collection_is_fast_deterministic_and_loads(tmp_path):
    start = time.perf_counter()
    a = write_synthetic_collection(tmp_path / "a", seed=3)
    assert time.perf_counter() - start < 2
    b = write_synthetic_collection(tmp_path / "b", seed=3)
    files = sorted(p.relative_to(a) for p in a.rglob("*.jsonl"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.jsonl"))
    assert all((a / f).read_text() == (b / f).read_text() for f in files)
    test, train = load_tasks(a, split="test", k=4, seed=21), load_tasks(a, split="train", k=4)
    assert set(test).isdisjoint(train) and len(test) == 12 and len(train) == 24
    assert all(t.is_classification and t.test for t in test.values())
    lookup = test["lookup_test_00"]  # every key shown once with k = 4: the query's key is among them
    demos = sample_demonstrations(lookup, 4, 87)
    assert all(any(d.input == q.input and d.output == q.output for d in demos) for q in lookup.test)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_synthetic_answers_come_from_the_demonstrations(family):
    rng = random.Random(0)
    for _ in range(50):
        demos, query = sample_episode(rng, family, 4)
        assert query.output in query.options and len(demos) == 4
        if family == "lookup":
            assert any(d.input == query.input and d.output == query.output for d in demos)
        if family == "mapping":  # the same class is shown with the same (per-task) label word
            assert query.output in {d.output for d in demos}
    # a new task draws new labels: no fixed input->output mapping exists across tasks
    outputs = {sample_episode(random.Random(s), "lookup", 2)[1].output for s in range(40)}
    assert len(outputs) > 3


def test_episode_dataset_is_a_function_of_the_index_and_follows_the_schedule(metaicl_folder):
    schedule = KSchedule.parse("2-6", warmup_steps=3, k_start=2)
    data = EpisodeDataset(SyntheticSource(["lookup", "position"]), schedule, length=80, seed=5, per_step=8)
    assert data[17] == EpisodeDataset(SyntheticSource(["lookup", "position"]), schedule, 80, 5, 8)[17]
    assert {len(data[i]["demonstrations"]) for i in range(24)} == {2}  # curriculum: k=2 for 3 steps
    assert {len(data[i]["demonstrations"]) for i in range(24, 80)} > {2}
    root, config = metaicl_folder
    source = TaskSource(load_tasks(root, split="train", config=config, k=4), k_max=6)
    demos, query = source.episode(random.Random(0), 6)
    assert len(demos) == 6 and query not in demos
    with pytest.raises(ValueError, match="fewer than k\\+1"):
        TaskSource({"t": TaskData("t", _examples("t", 3), [])}, k_max=3)
    with pytest.raises(ValueError, match="expected an integer"):
        KSchedule.parse("two")
    with pytest.raises(ValueError, match="empty or negative"):
        KSchedule.parse("5-2")


# ---------------------------------------------------------------------------------------------------
# Encodings, options, fixed query sets (reliability issue: items 5 and 6, minor items)

GOOD_ROW = '{"task": "t", "input": "x", "output": "y"}'


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (GOOD_ROW + "\n").encode() * 3)
    assert len(load_tasks(path, k=0)["t"]) == 3
    config = tmp_path / "split.json"
    config.write_bytes(b"\xef\xbb\xbf" + json.dumps({"train": [], "test": ["t"]}).encode())
    assert list(load_tasks(path, split="test", config=config, k=0)) == ["t"]


def test_non_utf8_bytes_name_the_file_and_line(tmp_path, metaicl_folder):
    path = tmp_path / "latin1.jsonl"
    latin1 = '{"task": "t", "input": "caf\xe9", "output": "y"}\n'.encode("latin-1")
    path.write_bytes((GOOD_ROW + "\n").encode() + latin1)
    with pytest.raises(DataError, match=r"latin1\.jsonl, line 2: not valid UTF-8 \(byte 0xe9 at column 28\)"):
        load_tasks(path, k=0)
    root, config = metaicl_folder  # in a folder of tasks, the bad file is the one named
    bad = root / "t2" / "t2_16384_100_train.jsonl"
    bad.write_bytes(bad.read_bytes() + b'{"task": "t2", "input": "\xff", "output": "yes"}\n')
    with pytest.raises(DataError, match=r"t2_16384_100_train\.jsonl, line 31: not valid UTF-8 \(byte 0xff"):
        load_tasks(root, split="train", config=config, k=4)


def test_utf16_files_get_a_hint(tmp_path):
    path = tmp_path / "utf16.jsonl"
    path.write_text(GOOD_ROW + "\n", encoding="utf-16")  # with a byte-order mark
    with pytest.raises(DataError, match=r"utf16\.jsonl, line 1: not valid UTF-8.*UTF-16 byte-order mark"):
        load_tasks(path, k=0)
    path.write_text(GOOD_ROW + "\n", encoding="utf-16-le")  # no mark: decodes as UTF-8 with NUL bytes
    with pytest.raises(DataError, match=r"utf16\.jsonl, line 1: holds NUL bytes; is the file UTF-16\? save it as"):
        load_tasks(path, k=0)
    good = tmp_path / "good.jsonl"
    good.write_text(GOOD_ROW + "\n")
    config = tmp_path / "split.json"
    config.write_text(json.dumps({"train": [], "test": ["t"]}), encoding="utf-16")
    with pytest.raises(DataError, match=r"split\.json, line 1: not valid UTF-8.*UTF-16"):
        load_tasks(good, split="test", config=config, k=0)


@pytest.mark.parametrize("options", ['""', '"yes"', "{}", '["a", 1]'])
def test_options_that_are_not_a_list_are_a_data_error(tmp_path, options):
    path = tmp_path / "opts.jsonl"
    path.write_text(GOOD_ROW + "\n" + GOOD_ROW[:-1] + f', "options": {options}}}\n')
    with pytest.raises(DataError, match=r"opts\.jsonl, line 2: field 'options' must be a list of strings"):
        load_tasks(path, k=0)


def test_absent_null_or_empty_options_mean_a_generation_task(tmp_path):
    path = tmp_path / "gen.jsonl"
    path.write_text(GOOD_ROW + "\n" + GOOD_ROW[:-1] + ', "options": null}\n' + GOOD_ROW[:-1] + ', "options": []}\n')
    assert all(not e.options for e in load_tasks(path, k=0)["t"].train + load_tasks(path, k=0)["t"].test)


def test_single_file_query_set_is_fixed_across_k_and_seeds(tmp_path):
    path = tmp_path / "tasks.jsonl"
    write_jsonl(path, _examples("alpha", 12))
    reference = load_tasks(path, k=1, seed=100)["alpha"]
    assert len(reference.test) == 6
    for k in (0, 2, 5, 6, 8, 11):  # up to n - 1: the pool may then be smaller than k (evaluation skips it)
        for seed in (100, 13):
            task = load_tasks(path, k=k, seed=seed)["alpha"]
            assert task.test == reference.test and task.train == reference.train, (k, seed)
