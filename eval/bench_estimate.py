"""How long a ``saicl-bench`` sweep will take, said before it starts: a model of the runner, scaled by a probe.

:func:`probe_rate` times a ``512 x 512`` matmul on the device for a few tenths of a second (on a busy machine
it slows down with everything else); :func:`estimate_seconds` walks the sweep's configurations as the runner
would (skips included) and adds each one's calls, predicted from its structured FLOPs, and fixed costs.
It is an estimate: the printed line says so, and the run reports its measured time beside it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from .bench_cases import BenchCase, case_flops, release_models
from .bench_runner import MEMORY_WARMUP_MAX_S
from .memory import MARGIN, estimate_bytes

if TYPE_CHECKING:
    from .bench import BenchConfig

# Derived from saicl-bench timings on the 2-core CPU VM at load ~1 (docs/evaluation.md, "Measured numbers"),
# where the probe's 512 x 512 fp32 matmul is taken to run at ~170 GFLOP/s (a single call reaches ~200): the
# fraction of that rate each kind of call reaches (the torch backend's sparse encoder ~120 GFLOP/s, dense full
# attention inside the encoder ~50, the eager oracle ~5), and fixed costs in seconds (per call, per
# configuration; the memory worker rebuilds each case).
STARTUP_S = 6.0  # the memory worker's start, the first model build
CALL_OVERHEAD_S = {"attention": 0.001, "encoder": 0.003, "model": 0.01}
CASE_OVERHEAD_S = {"attention": 0.02, "encoder": 0.05, "model": 0.1}
MEMORY_CASE_S = {"attention": 0.05, "encoder": 0.4, "model": 0.5}
FLEX_COMPILE_S = 15.0  # FlexAttention's first call of a shape on CPU (forward; its CPU backward is dense math)


def _efficiency(case: BenchCase) -> float:
    if case.backend == "eager" or (case.backend == "flex" and case.pass_ == "fwd+bwd"):
        return 0.03  # dense math in Python-level ops
    dense = case.structure == "full" or case.backend == "sdpa-bias"
    if case.what == "attention":
        return 0.8 if dense else 0.4  # one big fused product against many small per-span ones
    return 0.3 if dense else 0.7  # inside the model a dense float bias is slow; projections/FFN run well


def probe_rate(device: str, seconds: float = 0.2) -> float:
    """FLOP/s of a ``512 x 512`` fp32 matmul on ``device`` (a few tenths of a second): the estimate's scale."""
    dev = torch.device(device)
    a = torch.randn(512, 512, device=dev)
    calls, start = 0, time.perf_counter()
    while True:
        a @ a
        calls += 1
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and calls >= 3:
            return 2 * 512**3 * calls / elapsed


def estimate_seconds(config: BenchConfig, rate_flops: float) -> float:
    """Rough seconds the sweep takes on a device whose large matmuls run at ``rate_flops`` FLOP/s.

    Per runnable configuration: a fixed overhead, the warm-up and the timed calls (each ``flops /
    (rate * efficiency)`` plus a per-call overhead, the repeats bounded by ``budget_s``), a FlexAttention
    compile on CPU, and on CPU the memory worker's build, warm-up and call. Sizes predicted to exceed
    ``max_call_s`` or the memory budget are skipped as the runner skips them.
    """
    total = STARTUP_S
    limit = config.mem_limit_bytes
    stopped: set[tuple] = set()
    reasons: dict[str, str | None] = {}
    cpu = not config.device.startswith("cuda")
    for case in config.cases():
        series = (case.what, case.pass_, case.structure, case.backend)
        if case.backend not in reasons:
            reasons[case.backend] = config.unavailable(case)
        if reasons[case.backend] is not None or series in stopped:
            continue
        call = case_flops(case) / (rate_flops * _efficiency(case)) + CALL_OVERHEAD_S[case.what]
        if call > config.max_call_s or estimate_bytes(case) * MARGIN > limit:
            stopped.add(series)
            continue
        count = max(1, min(config.repeats, int(config.budget_s / call)))
        total += CASE_OVERHEAD_S[case.what] + (1 + count) * call
        if case.backend == "flex" and cpu and case.pass_ == "fwd":
            total += FLEX_COMPILE_S
        if config.measure_memory and cpu:
            total += MEMORY_CASE_S[case.what] + call * (2 if call <= MEMORY_WARMUP_MAX_S else 1)
    release_models()  # the layouts shared while counting
    return total


__all__ = ["estimate_seconds", "probe_rate"]
