"""The Triton kernels compile lean for a real GPU, checked on CPU: ``python -m saicl.kernels.aot``.

Triton compiles for sm_90 without a GPU (ptxas ships with the wheel); a spill (stack bytes) or a
shared-memory request above the arch's per-block limit in any config the autotuner may pick fails.
The report runs in a subprocess without ``TRITON_INTERPRET`` (the interpreter replaces the jit
functions at import).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from saicl.kernels import _common
from saicl.kernels.aot import SHARED_LIMIT, compiled_variants, main, problems
from saicl.kernels.configs import configs_for

ENV = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}


def _aot(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "saicl.kernels.aot", *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def test_representative_subset_compiles_without_spills_for_sm90(tmp_path):
    """Forward and dK/dV with the bias gradient, bf16, head dims 64 and 128, every autotuner config."""
    out = tmp_path / "aot.json"
    result = _aot("--arch", "90", "--dtypes", "bf16", "--head-dims", "64,128", "--kernels", "forward,dkdv+dbias",
                  "--json", str(out))
    assert out.exists(), result.stderr[-2000:]
    rows = json.loads(out.read_text())
    bad = [r for r in rows if r["stack_bytes"] or r["shared_bytes"] > SHARED_LIMIT[90] or not r["ok"]]
    assert not bad, "\n".join(f"{r['kernel']} d{r['head_dim']} {r['config']}: {r['problems']}" for r in bad)
    assert result.returncode == 0, result.stderr[-2000:]
    # Every config the autotuner may pick was compiled: the fused dK/dV at 64, dV + dK at 128.
    expected = sum(
        len(configs_for(launch, torch.bfloat16, _common.block_d(d), 90))
        for d in (64, 128)
        for launch in ["forward", *compiled_variants("dkdv+dbias", _common.block_d(d), 90)]
    )
    assert len(rows) == expected
    assert {r["kernel"] for r in rows} == {"forward", "dkdv+dbias", "dv", "dk+dbias"}
    assert all(r["registers"] <= 255 and r["cubin"] is None for r in rows)


def test_a_spill_or_too_much_shared_memory_fails_a_row():
    assert problems(90, 0, SHARED_LIMIT[90]) == []
    assert "limit of sm_80" in problems(80, 0, SHARED_LIMIT[80] + 1)[0]
    assert "stack" in problems(90, 8, 1024)[0]


@pytest.mark.parametrize(
    "args,needle",
    [(["--arch", "70"], "--arch"), (["--dtypes", "fp8"], "--dtypes"), (["--head-dims", "x"], "--head-dims"),
     (["--kernels", "nope"], "--kernels"), (["--json", "/nonexistent-dir/a.json"], "--json")],
)
def test_cli_user_mistakes_exit_2_with_one_line(args, needle, capsys):
    try:
        code = main(args)
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0]
