"""saicl-bench: CLI and config, rows (contract fields, versions, percentiles), skip reasons, the one FLOP
convention from key_ranges, the interleaved timing loop, the default/full sweeps and their estimate,
the attention-level providers (tiny, CPU)."""

import ast
import csv
import json
import re
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from saicl.config_cli import ConfigError
from saicl.eval import bench, bench_runner
from saicl.eval.bench import BenchConfig, build_parser, config_from_args, main
from saicl.eval.bench_cases import BenchCase, build_call, case_flops
from saicl.eval.flops import FWD_BWD_FACTOR, allowed_pairs
from saicl.eval.machine import git_sha, versions
from saicl.layout import build_layout
from saicl.testing import segment_batch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--demos", "1,2", "--demo-len", "4", "--query-len", "3", "--heads", "2", "--head-dim", "8", "--d-model", "16",
        "--d-ff", "32", "--layers", "1", "--decoder-layers", "1", "--vocab-size", "64", "--repeats", "3",
        "--budget-s", "0.5", "--no-progress"]
CONTRACT_FIELDS = {"what", "structure", "backend", "pass", "n_demos", "demo_len", "query_len", "batch", "heads",
                   "head_dim", "dtype", "device", "ms_median", "peak_mem_mb", "flops"}
PROVENANCE_FIELDS = {"torch", "triton", "saicl", "git_sha", "device_name", "ms_p10", "ms_p90", "noisy"}
# Every flag saicl-bench has ever had (users' scripts and main_job's recorded command use them).
FLAGS = ("--what", "--structures", "--backends", "--passes", "--demos", "--demo-len", "--query-len", "--batch",
         "--heads", "--head-dim", "--dtype", "--device", "--d-model", "--d-ff", "--layers", "--decoder-layers",
         "--vocab-size", "--options", "--option-len", "--repeats", "--budget-s", "--max-call-s", "--mem-limit-gb",
         "--no-memory", "--json", "--csv", "--plot", "--no-progress", "--full")


def parse(*argv: str) -> BenchConfig:
    return config_from_args(build_parser().parse_args(list(argv)))


def test_help_lists_every_flag(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in FLAGS:
        assert re.search(rf"{flag}\b", out), flag


def test_flags_map_onto_the_config_fields():
    config = parse("--what", "encoder", "--layers", "3", "--decoder-layers", "1", "--options", "5", "--no-memory",
                   "--mem-limit-gb", "2", "--device", "cpu", "--backends", "sdpa-dense,torch")
    assert (config.levels, config.num_layers, config.num_decoder_layers, config.n_options) == (("encoder",), 3, 1, 5)
    assert config.measure_memory is False and config.mem_limit_bytes == 2 * 1024**3
    assert config.backends == ("sdpa-bias", "torch")  # bench_attention's dense baseline, under its new name


@pytest.mark.parametrize(
    "extra, message",
    [
        pytest.param(["--what", "layer"], "--what layer: unknown layer", id="bad-level"),
        pytest.param(["--backends", "warp"], "--backends warp: unknown warp", id="bad-backend"),
        pytest.param(["--passes", "bwd"], "--passes bwd: unknown bwd", id="bad-pass"),
        pytest.param(["--demos", "4,x"], "--demos 4,x: expected integers", id="bad-demos"),
        pytest.param(["--heads", "0"], "--heads 0: expected a value >= 1", id="bad-heads"),
        pytest.param(["--layers", "0"], "--layers 0: expected a value >= 1", id="bad-layers"),
        pytest.param(["--budget-s", "0"], "--budget-s 0.0: expected a positive number", id="bad-budget"),
        pytest.param(["--mem-limit-gb", "inf"], "--mem-limit-gb inf: expected a positive number", id="inf-limit"),
        pytest.param(["--device", "cuda:7"], "CUDA is not available", id="no-cuda"),
        pytest.param(["--device", "bogus"], "--device bogus", id="bad-device"),
    ],
)
def test_bad_flags_exit_2_with_one_line_naming_the_flag(capsys, extra, message):
    if "cuda:7" in extra and torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert main([*TINY, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_config_validates_itself():
    with pytest.raises(ConfigError, match="heads=0"):
        BenchConfig(heads=0)
    with pytest.raises(ValueError, match="backends"):
        BenchConfig(backends=("warp",))
    assert BenchConfig(backends=("all",)).backends == ("eager", "torch", "flex", "triton", "xformers")
    assert BenchConfig(backends=("auto",), device="cpu").backends == ("torch",)


def test_rows_json_csv_plot_and_memory(tmp_path, capsys):
    paths = {"json": tmp_path / "b.json", "csv": tmp_path / "b.csv", "plot": tmp_path / "b.png"}
    code = main([*TINY, "--demos", "2", "--backends", "torch,xformers", "--passes", "fwd,fwd+bwd",
                 "--json", str(paths["json"]), "--csv", str(paths["csv"]), "--plot", str(paths["plot"])])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    n_cases = 3 * 2 * 3 * 2  # levels x passes x structures x backends
    assert out.startswith(f"saicl-bench: {n_cases} configurations, estimated ~")  # printed before it starts
    assert "speed-up vs full" in out and "FLOP ratio" in out and "p50 (p10–p90)" in out
    result = json.loads(paths["json"].read_text())
    assert set(result) >= {"machine", "config", "rows", "targets"}
    assert {"torch", "triton", "saicl", "git_sha", "loadavg_start", "loadavg_end", "wall_s", "probe_gflops",
            "estimate_s"} <= set(result["machine"])
    rows = result["rows"]
    assert len(rows) == n_cases
    assert {r["what"] for r in rows} == {"attention", "encoder", "model"}
    assert {r["pass"] for r in rows} == {"fwd", "fwd+bwd"}
    for row in rows:
        assert CONTRACT_FIELDS | PROVENANCE_FIELDS - {"ms_p10", "ms_p90", "noisy"} <= set(row)
        assert row["status"] in ("ok", "skipped")
        assert row["torch"] == torch.__version__ and row["saicl"] == versions()["saicl"] and row["device"] == "cpu"
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["backend"] for r in ok} == {"torch"}
    for row in ok:
        assert 0 < row["ms_p10"] <= row["ms_median"] <= row["ms_p90"]
        assert row["ms_min"] <= row["ms_p10"] and isinstance(row["noisy"], bool) and 1 <= row["repeats"] <= 3
        assert row["flops"] > 0
        assert row["gflops_per_s"] == pytest.approx(row["flops"] / row["ms_median"] / 1e6, abs=0.01)
        assert row["peak_mem_mb"] is not None and row["peak_mem_mb"] >= 0  # measured in the worker process
    skipped = [r for r in rows if r["backend"] == "xformers"]
    assert skipped and all(r["status"] == "skipped" and "backend unavailable" in r["reason"] for r in skipped)
    saicl = [r for r in ok if r["structure"] == "saicl"]
    assert all("speedup_vs_full" in r and "flop_ratio_vs_full" in r and "bound_fraction" in r for r in saicl)
    with paths["csv"].open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(rows) and PROVENANCE_FIELDS <= set(table[0])
    assert paths["plot"].stat().st_size > 1000


def test_rows_carry_versions_device_and_percentiles():
    config = BenchConfig(levels=("attention",), backends=("torch",), demos=(1, 2), demo_len=4, query_len=3, heads=2,
                         head_dim=8, repeats=3, budget_s=0.5, measure_memory=False)
    result = bench.run_bench(config, show_progress=False)
    rows = result["rows"]
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    expected = {**versions(), "device": "cpu", "device_name": result["machine"]["cpu"]}
    for row in rows:
        assert {k: row[k] for k in expected} == expected
        assert 0 < row["ms_p10"] <= row["ms_median"] <= row["ms_p90"] and isinstance(row["noisy"], bool)
    assert result["machine"]["torch"] == torch.__version__ and result["config"]["mem_limit_gb"] > 0
    table = bench.markdown_table(rows)
    assert f"torch {torch.__version__}" in table and "p50 (p10–p90)" in table


def test_configurations_that_do_not_fit_are_skipped_with_the_reason(tmp_path, capsys):
    code = main([*TINY, "--what", "attention", "--backends", "torch", "--no-memory", "--mem-limit-gb", "0.0000001",
                 "--json", str(tmp_path / "b.json")])
    assert code == 0
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert rows and all(r["status"] == "skipped" and "does not fit" in r["reason"] for r in rows)
    assert "does not fit" in capsys.readouterr().out


# --- the default and the full sweep -----------------------------------------------------------------


def test_default_sweep_is_small_and_full_is_one_flag():
    default, full = parse("--device", "cpu"), parse("--device", "cpu", "--full")
    assert len(default.cases()) == 3 * 3 * 1 * 3  # levels x structures x (the device's backend) x demos
    assert len(full.cases()) == 315  # every registered backend, demos 4..4096: the sweep of issue 11
    assert parse("--device", "cpu", "--full", "--demos", "4").demos == (4,)  # explicit flags still win


def test_estimate_fits_the_two_minute_default_and_grows_with_the_sweep():
    rate = 170e9  # about the probe's rate on the idle 2-core CI VM (one 512 x 512 matmul reaches ~200 GFLOP/s)
    default, full = parse("--device", "cpu"), parse("--device", "cpu", "--full")
    assert 30 < default.estimate_s(rate) <= 120
    # issue 11: still running after 15 minutes; sizes that cannot fit or exceed --max-call-s are skipped, as run
    assert 15 * 60 < full.estimate_s(rate) < 60 * 60
    assert default.estimate_s(rate / 2) > default.estimate_s(rate)  # a slower machine takes longer
    assert bench.probe_rate("cpu", seconds=0.05) > 1e8


# --- timing: percentiles, interleaving ----------------------------------------------------------------


def test_percentiles_match_numpy_and_the_spread_flags_a_busy_machine():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 10):
        samples = rng.exponential(size=n).tolist()
        for q in (10, 50, 90):
            assert bench_runner.percentile(samples, q) == pytest.approx(np.percentile(samples, q))
    quiet = bench_runner.timing_summary([0.010, 0.0101, 0.0102, 0.0099, 0.0100], first_s=0.02)
    busy = bench_runner.timing_summary([0.010, 0.030, 0.011, 0.010, 0.025], first_s=0.02)
    assert quiet["ms_p10"] <= quiet["ms_median"] <= quiet["ms_p90"] and not quiet["noisy"]
    assert busy["noisy"] and busy["ms_median"] == pytest.approx(11.0)


def test_contenders_are_timed_interleaved_within_their_budget():
    calls = []
    contenders = [bench_runner.Contender(fn=lambda name=name: calls.append(name), first_s=first)
                  for name, first in (("a", 0.001), ("b", 0.001), ("slow", 0.6))]
    bench_runner.time_contenders(contenders, "cpu", repeats=3, budget_s=1.0)
    assert calls == ["a", "b", "slow", "a", "b", "a", "b"]  # round by round; slow: one call fits its budget
    assert [len(c.samples) for c in contenders] == [3, 3, 1]


def test_dense_fallback_guard_stops_before_the_dense_path_when_it_cannot_fit():
    ran = []

    def falls_back():
        warnings.warn("attn_backend='flex': ... uses the dense math path", RuntimeWarning, stacklevel=1)
        ran.append(1)  # the dense work

    case = BenchCase(what="attention", structure="saicl", backend="flex", pass_="fwd+bwd", n_demos=64)
    state = bench_runner.SweepState(limit=1024, max_call_s=10)
    with pytest.raises(MemoryError, match="dense fallback needs"):
        bench_runner._guarded_warm_up(case, falls_back, state)
    assert ran == []  # stopped at the warning
    state.limit = 2**40
    _, note = bench_runner._guarded_warm_up(case, falls_back, state)
    assert ran == [1] and note.startswith("ran the dense fallback")


# --- FLOPs: one convention, from key_ranges -----------------------------------------------------------


@pytest.mark.parametrize("structure", ["saicl", "full", "fid"])
def test_flops_from_key_ranges_equal_the_dense_mask_count(structure):
    # ragged demonstrations, an episode without demonstrations and right padding
    mask, seg = segment_batch([[3, 5, 1], [], [2, 2]], [4, 1, 6])
    layout = build_layout(mask, seg, structure)
    assert allowed_pairs(layout) == int(layout.allowed_mask().sum())


def test_allowed_pairs_match_the_structures():
    case = BenchCase(what="attention", structure="full", backend="torch", pass_="fwd", n_demos=3, demo_len=5,
                     query_len=2)
    length = 3 * 5 + 2
    assert allowed_pairs(case.layout("full")) == length**2
    assert allowed_pairs(case.layout("saicl")) == 3 * 5 * (5 + 2) + 2 * length
    assert allowed_pairs(case.layout("fid")) == 3 * (5 + 2) ** 2


@pytest.mark.parametrize("what", ["attention", "encoder", "model"])
def test_one_fwd_bwd_convention_for_every_level(what):
    fwd = BenchCase(what=what, structure="saicl", backend="torch", pass_="fwd", n_demos=3, d_model=32, heads=2,
                    head_dim=16, d_ff=64, vocab_size=64, n_options=1)
    train = BenchCase(**{**fwd.__dict__, "pass_": "fwd+bwd"})
    assert FWD_BWD_FACTOR == 3 and case_flops(train) == FWD_BWD_FACTOR * case_flops(fwd)


def test_flop_ratio_at_128_demos_matches_the_hand_count():
    # 8 heads x 64, demos of 64 tokens, query 64: the structured FLOP ratio at 128 demos is 43.2x (by hand).
    full = BenchCase(what="attention", structure="full", backend="torch", pass_="fwd", n_demos=128, heads=8)
    saicl = BenchCase(what="attention", structure="saicl", backend="torch", pass_="fwd", n_demos=128, heads=8)
    assert case_flops(full) / case_flops(saicl) == pytest.approx(43.2, abs=0.05)


# --- providers, versions, the old entry points ---------------------------------------------------------


def test_providers_exist_at_the_attention_level_only_and_sdpa_computes_full_only():
    config = BenchConfig(backends=("torch", "sdpa", "sdpa-bias"), demos=(2,), levels=("attention", "encoder"))
    got = {(c.what, c.structure, c.backend) for c in config.cases()}
    assert ("attention", "full", "sdpa") in got and ("attention", "saicl", "sdpa") not in got
    assert {("attention", s, "sdpa-bias") for s in ("saicl", "full", "fid")} <= got
    assert not any(what == "encoder" and backend != "torch" for what, _, backend in got)


@pytest.mark.parametrize("provider", ["sdpa-bias", "sdpa"])
def test_dense_providers_compute_the_structure(provider):
    from saicl.attention.eager import dense_bias, eager_attention
    from saicl.testing import random_qkv, random_table

    structure = "full" if provider == "sdpa" else "saicl"
    case = BenchCase(what="attention", structure=structure, backend=provider, pass_="fwd", n_demos=3, demo_len=4,
                     query_len=3, heads=2, head_dim=8)
    out = build_call(case)().transpose(1, 2)
    layout = case.layout()
    q, k, v = random_qkv(1, layout.length, 2, 8, dtype=torch.float32)
    table = random_table(2, 128, dtype=torch.float32) if provider == "sdpa-bias" else torch.zeros(2, 257)
    expected = eager_attention(q, k, v, dense_bias(layout, table))
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(out, expected, rtol=256 * eps, atol=256 * eps * expected.abs().max().item())


def test_triton_kernel_provider_times_the_bias_table_gradient():
    """fwd+bwd of the bare kernels includes the table gradient (the table is a trained parameter)."""
    from saicl.kernels import _common

    if not _common.INTERPRETED and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter or CUDA")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = BenchCase(what="attention", structure="saicl", backend="triton-kernel", pass_="fwd+bwd", n_demos=2,
                     demo_len=8, query_len=8, heads=1, head_dim=16, device=device)
    grads = build_call(case)()
    assert len(grads) == 4 and grads[3].shape == (1, 257) and grads[3].abs().sum() > 0


def test_kernel_benchmark_helper_is_tensor_only():
    tree = ast.parse((ROOT / "kernels" / "benchmark.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 1 or not (node.module or "").startswith("saicl"), node.module
            assert node.level <= 1
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("saicl") for a in node.names)
    assert "pair" not in (ROOT / "kernels" / "benchmark.py").read_text()  # no second FLOP count


def test_git_sha_only_for_a_tracked_checkout(tmp_path):
    sha = versions()["git_sha"]
    if subprocess.run(["git", "-C", str(ROOT), "ls-files", "--error-unmatch", "saicl/__init__.py"],
                      capture_output=True).returncode == 0:
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", sha)
    assert git_sha(tmp_path) is None  # not a repository
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "README").write_text("a repository with a commit\n")
    subprocess.run([*git, "add", "README"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    assert git_sha(tmp_path / "pkg") is None  # inside a repository (a virtualenv's site-packages), not its code
    subprocess.run([*git, "add", "pkg/__init__.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "two"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert git_sha(tmp_path / "pkg") == head
    (tmp_path / "pkg" / "__init__.py").write_text("changed = True\n")
    assert git_sha(tmp_path / "pkg") == head + "-dirty"


def test_bench_attention_forwards_to_the_attention_level(monkeypatch):
    from saicl.eval import bench_attention

    seen = []
    monkeypatch.setattr(bench_attention, "bench_main", lambda argv: seen.append(argv) or 0)
    assert bench_attention.main(["--demos", "32"]) == 0
    assert seen == [["--what", "attention", "--demos", "32"]]
