"""The main job (saicl-run / python -m saicl run) on tiny settings: report files, summary, exit codes."""

import json

import pytest

from saicl.__main__ import main as saicl_main
from saicl.eval.main_job import main

TINY = ["--eval-seeds", "100", "--eval-queries", "2", "--eval-tasks", "1", "--eval-k", "2,4", "--eval-orders", "2",
        "--bench-demos", "1,2", "--bench-d-model", "64", "--bench-max-call-s", "5", "--no-progress"]


def test_help_through_python_m_saicl(capsys):
    assert saicl_main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--out", "--max-steps", "--no-train", "--eval-k", "--no-bench", "--json"):
        assert flag in out
    assert saicl_main(["--help"]) == 0
    assert "run" in capsys.readouterr().out


def test_tiny_main_job_writes_the_report(tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["--out", str(out), "--max-steps", "2", "--json", str(tmp_path / "summary.json"), *TINY])
    assert code == 0
    stdout = capsys.readouterr().out
    assert f"Report: {out.resolve() / 'report.md'}" in stdout
    for name in ("report.md", "results.json", "bench.csv", "bench_attention.png", "bench_encoder.png",
                 "eval_scaling.png", "eval_structures.png", "train_loss.png"):
        assert (out / name).is_file(), name
    for structure in ("saicl", "full", "fid"):
        assert (out / "runs" / structure / "final" / "config.json").is_file()
    report = (out / "report.md").read_text()
    for heading in ("## Meta-training", "## Held-out evaluation", "## Speed and memory", "Order sensitivity"):
        assert heading in report
    assert "![eval_scaling.png](eval_scaling.png)" in report
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["training"]) == {"saicl", "full", "fid"}
    assert all(r["steps"] == 2 for r in summary["training"].values())
    order = {(r["structure"], r["k"]): r for r in summary["evaluation"]["order"]}
    assert order[("saicl", 4)]["invariant"] is True and order[("fid", 4)]["invariant"] is True
    assert summary["bench"]["rows"]
    # a second run into the same folder is allowed (it was written by saicl-run)
    assert main(["--out", str(out), "--no-train", "--no-bench", *TINY]) == 0
    assert "UNTRAINED" in (out / "report.md").read_text()


def test_refuses_a_foreign_non_empty_out_folder(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("not a report")
    assert main(["--out", str(tmp_path), "--no-train", "--no-bench", *TINY]) == 2
    assert "was not written by saicl-run" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    pytest.param(["--eval-k", "a"], "--eval-k must be comma-separated integers", id="bad-k"),
    pytest.param(["--structures", "dense"], "--structures: unknown ['dense']", id="bad-structure"),
    pytest.param(["--max-steps", "0"], "--max-steps must be >= 1", id="bad-steps"),
])
def test_bad_flags_exit_2(tmp_path, capsys, extra, message):
    assert main(["--out", str(tmp_path / "r"), *TINY, *extra]) == 2
    assert message in capsys.readouterr().err


def test_a_report_folder_of_an_older_saicl_run_is_reused(tmp_path, capsys):
    """A folder marked by saicl-run before ownership markers existed (``.saicl-report``) is still the job's."""
    from saicl.outputs import read_marker

    out = tmp_path / "report"
    out.mkdir()
    (out / ".saicl-report").write_text("written by saicl-run\n")
    (out / "report.md").write_text("old report\n")
    assert main(["--out", str(out), "--no-train", "--no-bench", *TINY]) == 0
    assert read_marker(out)["tool"] == "saicl-run" and "UNTRAINED" in (out / "report.md").read_text()
