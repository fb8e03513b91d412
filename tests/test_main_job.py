"""The main job (saicl-run / python -m saicl run) on tiny settings: report files, summary, exit codes."""

import json

import pytest

from saicl.__main__ import main as saicl_main
from saicl.eval.main_job import main

TINY = ["--eval-seeds", "100,13", "--eval-queries", "2", "--eval-tasks", "1", "--eval-k", "2,4", "--eval-orders", "2",
        "--bench-demos", "1,2", "--bench-d-model", "64", "--bench-max-call-s", "5", "--no-progress"]


def test_help_through_python_m_saicl(capsys):
    assert saicl_main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--out", "--max-steps", "--no-train", "--eval-k", "--no-bench", "--no-progress", "--json", "--study",
                 "--study-seeds", "--full-max-s"):
        assert flag in out
    assert saicl_main(["--help"]) == 0
    assert "run" in capsys.readouterr().out


def test_tiny_main_job_writes_the_report(tmp_path, capsys, monkeypatch):
    from saicl.eval import main_job

    monkeypatch.setitem(main_job.RECIPE, "eval_episodes", 16)  # held-out accuracy during training: kept small
    out = tmp_path / "report"
    code = main(["--out", str(out), "--max-steps", "2", "--json", str(tmp_path / "summary.json"), *TINY])
    assert code == 0
    stdout = capsys.readouterr().out
    assert f"Report: {out.resolve() / 'report.md'}" in stdout
    for name in ("report.md", "results.json", "bench.csv", "bench_attention.png", "bench_encoder.png",
                 "eval_scaling.png", "train_loss.png", "train_heldout_accuracy.png"):
        assert (out / name).is_file(), name
    for structure in ("saicl", "full", "fid"):
        assert (out / "runs" / structure / "final" / "config.json").is_file()
    report = (out / "report.md").read_text()
    for heading in ("## Meta-training", "## Scaling with the number of demonstrations", "## Claims of the paper",
                    "## Held-out evaluation details", "## Speed and memory", "Order sensitivity",
                    "**One training seed**"):
        assert heading in report
    assert "![eval_scaling.png](eval_scaling.png)" in report
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["training"]["0"]) == {"saicl", "full", "fid"}
    assert all(r["steps"] == 2 for r in summary["training"]["0"].values())
    evaluation = summary["scaling"]["0"]["evaluation"]
    order = {(r["structure"], r["k"]): r for r in evaluation["order"]}
    assert order[("saicl", 4)]["invariant"] is True and order[("fid", 4)]["invariant"] is True
    timing = {(r["structure"], r["k"]) for r in summary["scaling"]["0"]["timing"]}
    assert timing == {(s, k) for s in ("saicl", "full", "fid") for k in (2, 4)}
    # two training steps cannot leave the plateau: every quality claim is not measurable, never a verdict
    analysis = summary["analysis"]
    assert all(p["reason"] for p in analysis["plateau"].values())
    assert "did not leave the plateau" in report
    assert "| full (did not leave the plateau) |" in report  # labelled in the scaling table itself
    quality = [c for c in analysis["claims"] if c["claim"].startswith(("quality", "gains"))]
    assert quality and all(c["verdict"] == "not measurable here" for c in quality)
    assert summary["bench"]["rows"]
    # a second run into the same folder is allowed (it was written by saicl-run)
    assert main(["--out", str(out), "--no-train", "--no-bench", *TINY]) == 0
    assert "UNTRAINED" in (out / "report.md").read_text()


def test_refuses_a_foreign_non_empty_out_folder(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("not a report")
    assert main(["--out", str(tmp_path), "--no-train", "--no-bench", *TINY]) == 2
    assert "was not written by saicl-run" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    pytest.param(["--eval-k", "a"], "--eval-k a: expected integers", id="bad-k"),
    pytest.param(["--eval-k", "4,5000"], "--eval-k 4,5000: the held-out noisy-keys tasks have", id="k-over-pool"),
    pytest.param(["--structures", "dense"], "--structures dense: unknown dense", id="bad-structure"),
    pytest.param(["--max-steps", "0"], "--max-steps 0: expected a value >= 1", id="bad-steps"),
    pytest.param(["--bench-backends", "torch,nope"], "--bench-backends torch,nope: unknown nope", id="bad-backend"),
    pytest.param(["--bench-demos", "-1"], "--bench-demos -1: expected", id="bad-bench-demos"),
    pytest.param(["--study", "--study-seeds", "1"], "--study-seeds 1: expected a value >= 2", id="one-seed-study"),
    pytest.param(["--full-max-s", "0"], "--full-max-s 0.0: expected a positive number", id="bad-budget"),
    pytest.param(["--eval-seeds", "1,1"], "--eval-seeds 1,1: expected distinct seeds", id="same-seeds"),
])
def test_bad_flags_exit_2_before_anything_runs(tmp_path, capsys, monkeypatch, extra, message):
    import saicl.meta_train.train as train_module

    monkeypatch.setattr(train_module, "train", lambda *a, **k: pytest.fail("trained before validating flags"))
    assert main(["--out", str(tmp_path / "r"), *TINY, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_an_unavailable_bench_backend_is_refused_before_training(tmp_path, capsys, monkeypatch):
    import saicl.attention.registry as registry

    monkeypatch.setattr(registry, "available_backends", lambda device="cpu", head_dim=None: {"torch": "no kernel"})
    assert main(["--out", str(tmp_path / "r"), *TINY, "--bench-backends", "torch"]) == 2
    assert "--bench-backends torch: unavailable on this machine: torch (no kernel)" in capsys.readouterr().err


def test_study_trains_several_seeds_and_reports_both_spreads(tmp_path, monkeypatch):
    """--study, training replaced by fresh untrained models (the statistics are what is tested); the third seed
    is interrupted (Ctrl-C): the report covers the two finished seeds and says so."""
    from saicl.eval import main_job
    from saicl.meta_train.models import build_model

    def fake_train(config, out, progress, seeds):
        if seeds == (2,):
            raise KeyboardInterrupt
        paths = {seed: {s: build_model("tiny", s, seed=seed) for s in config.structures} for seed in seeds}
        result = {"steps": 1, "wall_time_s": 0.0, "losses": [(1, 1.0)], "evals": [
            {"step": 1, "accuracy": 0.6, "chance": 0.25}]}
        return paths, {seed: {s: result for s in config.structures} for seed in seeds}, \
            main_job.train_config(config, out).to_dict(), []

    monkeypatch.setattr(main_job, "train_models", fake_train)
    out = tmp_path / "study"
    config = main_job.MainJobConfig(out=str(out), study=True, study_seeds=3, structures=("saicl", "fid"),
                                    eval_seeds=(100, 13), eval_queries=2, eval_tasks=1, eval_k=(2, 4),
                                    bench=False, progress=False)
    summary = main_job.run_main_job(config)
    assert summary["training_seeds"] == [0, 1] and set(summary["scaling"]) == {"0", "1"}
    assert any("interrupted during training seed 2" in note for note in summary["notes"])
    stats = {(r["structure"], r["k"]): r for r in summary["analysis"]["stats"]}
    row = stats[("saicl", 4)]
    assert row["n_train"] == 2 and row["n_eval"] == 2 and row["train_seeds"] == ["0", "1"]
    assert row["std_train"] == pytest.approx(abs(row["means"][0] - row["means"][1]) / 2)
    assert "std over 2 training seeds" in summary["analysis"]["claims_spread"]
    report = (out / "report.md").read_text()
    assert "**Study: 2 training seeds**" in report and "± std (training seeds) ± std (evaluation seeds)" in report


def test_the_overall_progress_bar_has_a_total_and_shows_elapsed_and_remaining(capsys):
    from saicl.eval.main_job import JobProgress, MainJobConfig

    config = MainJobConfig(eval_k=(4, 1024), bench=False)
    progress = JobProgress(config, steps=100)
    # total = estimated seconds: 3 structures x (100 steps + both k's episodes)
    assert progress.bar.total == round(3 * (100 * JobProgress.S_PER_STEP + sum(progress.eval_s.values())))
    assert progress.eval_s[1024] > progress.eval_s[4] > 0
    progress.advance(progress.train_s, "trained saicl")
    progress.close()
    err = capsys.readouterr().err
    assert "elapsed" in err and "remaining" in err
    minutes, seconds = divmod(progress.bar.total, 60)
    assert f"(estimated {minutes:02d}:{seconds:02d})" in err  # the whole job's estimate from the first moment
