"""Distributed ``saicl-eval``: 2 gloo ranks on CPU give the one-process JSON, and an error on one rank stops all.

The 2-rank run goes through ``torchrun``; the error tests start the two ranks by hand (``RANK``, ``WORLD_SIZE``,
``MASTER_*``) so that no launcher kills a waiting rank for us: a rank that hangs fails the test by its timeout.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from saicl.eval.distributed import split_units
from saicl.eval.eval_tasks import WorkUnit

# The only JSON field allowed to differ between launches: how the work was shared and how long each rank took.
LAUNCH_FIELDS = ("distributed",)
TIMEOUT_S = 180  # far above a healthy run (~10-25 s on 2 loaded cores), far below gloo's 30-minute wait


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from saicl.meta_train.synthetic import write_synthetic_collection
    from saicl.testing import save_tiny_t5

    root = tmp_path_factory.mktemp("dist_eval")
    save_tiny_t5(root / "ckpt", seed=3)
    data = write_synthetic_collection(root / "data", seed=0, n_train_tasks=1, n_test_tasks=1, n_examples=12,
                                      n_queries=4)
    # 3 structures x 2 k x 2 seeds x 3 tasks = 36 units of unequal cost (k), generation-free classification
    return ["--checkpoint", str(root / "ckpt"), "--data", str(data), "--seeds", "100,13", "--k", "2,4",
            "--orders", "2", "--max-queries", "3", "--tokenizer", "byt5", "--attn-backend", "torch", "--no-progress"]


def _run(command: list[str], env: dict | None = None) -> subprocess.Popen:
    # own session, so that a hung run is killed whole (torchrun's workers would outlive a plain kill)
    return subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def _finish(processes: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    done = []
    for process in processes:
        try:
            stdout, stderr = process.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for p in processes:
                os.killpg(p.pid, signal.SIGKILL)
            pytest.fail(f"a rank did not finish in {TIMEOUT_S} s (hung waiting for another rank?)")
        done.append((process.returncode, stdout, stderr))
    return done


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _by_hand(argv: list[str], script: list[str]) -> list[tuple[int, str, str]]:
    """Two ranks started without a launcher (``script``: what follows ``python``)."""
    port = str(_free_port())
    processes = [_run([sys.executable, *script, *argv],
                      {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": port}) for r in range(2)]
    return _finish(processes)


def test_split_is_a_deterministic_balanced_partition():
    units = [WorkUnit(i, "saicl", k, 0, f"t{i}", cost=3 * (k + 1)) for i, k in enumerate([0, 16, 2, 64, 4, 4, 1, 8])]
    for size in (1, 2, 3, 8, 11):
        shares = split_units(units, size)
        assert shares == split_units(list(reversed(units)), size)  # depends on the units, not their order
        assert len(shares) == size and sorted(u.index for s in shares for u in s) == list(range(len(units)))
        assert all([u.index for u in s] == sorted(u.index for u in s) for s in shares)  # canonical order kept
        loads = [sum(u.cost for u in s) for s in shares]
        assert max(loads) - min(loads) <= max(u.cost for u in units)  # greedy: within one unit of balance


@pytest.mark.slow
def test_two_ranks_equal_one_process(inputs, tmp_path, capsys):
    from saicl.eval.evaluate import main

    two = tmp_path / "two" / "eval.json"
    torchrun = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                     "-m", "saicl.eval.evaluate", *inputs, "--json", str(two)])
    one = tmp_path / "one" / "eval.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs: the scores' summation order then matches bit for bit
    try:
        assert main([*inputs, "--json", str(one)]) == 0
    finally:
        torch.set_num_threads(threads)
    single_stdout = capsys.readouterr().out
    ((code, stdout, stderr),) = _finish([torchrun])
    assert code == 0, stderr[-3000:]

    single, distributed = json.loads(one.read_text()), json.loads(two.read_text())
    n_units = 3 * 2 * 2 * 3
    assert single["distributed"]["units_per_rank"] == [n_units]
    shared = distributed["distributed"]
    assert shared["world_size"] == 2 and len(shared["seconds_per_rank"]) == 2
    # each rank ran a real share, and together every unit exactly once
    assert sum(shared["units_per_rank"]) == n_units and min(shared["units_per_rank"]) > 0, shared
    for name in LAUNCH_FIELDS:
        del single[name], distributed[name]
    assert distributed == single
    assert len(single["rows"]) == 3 * 2 * 3
    # rank 0 alone prints the tables and writes the results
    assert stdout.count("**overall**") == single_stdout.count("**overall**") == 2
    assert stdout.count("results: ") == 1 and stdout.count("plot: ") == 2


@pytest.mark.slow
def test_an_output_error_on_rank_0_stops_rank_1(inputs, tmp_path):
    """Only rank 0 checks (and writes) the outputs: rank 1 must learn of its failure, not wait for it."""
    (code0, _, err0), (code1, _, err1) = _by_hand([*inputs, "--json", str(tmp_path)], ["-m", "saicl.eval.evaluate"])
    assert code0 == 2 and f"saicl-eval: error: --json {tmp_path}" in err0, err0[-2000:]
    assert code1 == 2 and "saicl-eval: error: stopped because rank 0 failed: --json" in err1, err1[-2000:]
    assert "Traceback" not in err0 + err1


@pytest.mark.slow
def test_a_crash_on_rank_1_while_evaluating_stops_rank_0(inputs, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent("""
        import os, sys
        from saicl.eval import eval_runner
        from saicl.eval.evaluate import main

        def run_task(*args, **kwargs):
            if os.environ["RANK"] == "1":
                raise RuntimeError("injected crash on rank 1")
            return original(*args, **kwargs)

        original, eval_runner.run_task = eval_runner.run_task, run_task
        sys.exit(main(sys.argv[1:]))
    """))
    out = tmp_path / "eval.json"
    (code0, _, err0), (code1, _, err1) = _by_hand([*inputs, "--json", str(out)], [str(driver)])
    assert code1 == 1 and "RuntimeError: injected crash on rank 1" in err1, err1[-2000:]  # its own traceback
    assert code0 == 1, err0[-2000:]
    assert "saicl-eval: error: stopped because rank 1 failed: RuntimeError: injected crash on rank 1" in err0
    assert not out.exists()
