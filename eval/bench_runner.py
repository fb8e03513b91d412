"""The one runner of ``saicl-bench``: skip rules, the interleaved timing loop, rows, and a duration estimate.

Contenders that are compared side by side (every structure and backend/provider at one level, pass and
number of demonstrations) are built together and timed *interleaved*: after one warm-up call each, round
``r`` times one call of every contender, so a load change on a shared machine hits them all alike. Each row
keeps the 10th, 50th and 90th percentile of its calls and flags a spread that says the machine was busy.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .bench_cases import BenchCase, build_call, case_flops, release_models
from .machine import device_name, versions
from .memory import MARGIN, _dense_bytes, estimate_bytes, measure_cpu_cases, measure_cuda_peak

GiB = 1024**3
# (p90 - p10) / p50 above this marks a row "noisy": calls of one configuration varied by more than a quarter,
# which on these machines means other work was competing for the cores (or the GPU clock changed).
NOISY_SPREAD = 0.25
# Warm-up before the memory measurement unless one call takes longer than this (the warm-up then costs
# more than it protects against: only FlexAttention compiles on the first call, and it always warms up).
MEMORY_WARMUP_MAX_S = 5.0
# Backends whose documented fallback to dense math is guarded: the warning is caught before the dense
# path runs, and the call goes ahead only if the dense estimate fits the memory budget.
GUARDED_BACKENDS = ("flex",)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``samples``, linearly interpolated (numpy's default rule)."""
    ordered = sorted(samples)
    if not ordered:
        raise ValueError("percentile of no samples")
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def timing_summary(samples_s: Sequence[float], first_s: float) -> dict:
    """Row fields of one contender's timed calls (seconds in, milliseconds out)."""
    p10, p50, p90 = (percentile(samples_s, q) * 1000 for q in (10, 50, 90))
    return {"ms_median": p50, "ms_p10": p10, "ms_p90": p90, "ms_min": min(samples_s) * 1000,
            "repeats": len(samples_s), "first_call_ms": first_s * 1000,
            "noisy": bool(p50 > 0 and (p90 - p10) / p50 > NOISY_SPREAD)}


@dataclass
class Contender:
    """One call being timed, its warm-up seconds, its number of timed calls and their seconds."""

    fn: Callable[[], object]
    first_s: float = 0.0
    count: int = 0
    samples: list[float] = field(default_factory=list)
    error: BaseException | None = None


def time_contenders(contenders: list[Contender], device: str, repeats: int, budget_s: float) -> None:
    """The timing loop: each contender has been warmed up (``first_s``); then up to ``repeats`` calls each
    within about ``budget_s`` per contender (at least one), interleaved round by round. Fills ``samples``;
    a contender whose call raises keeps the exception in ``error`` and leaves the rounds."""
    for c in contenders:
        c.count = max(1, min(repeats, int(budget_s / max(c.first_s, 1e-6))))
    for round_ in range(max((c.count for c in contenders), default=0)):
        for c in contenders:
            if c.error is not None or round_ >= c.count:
                continue
            try:
                _sync(device)
                start = time.perf_counter()
                c.fn()
                _sync(device)
                c.samples.append(time.perf_counter() - start)
            except Exception as err:  # reported in the row; the other contenders go on
                c.error = err


def warm_up(fn: Callable[[], object], device: str) -> float:
    """Run ``fn`` once (compiles, lazy initialisation); its seconds."""
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------
# The sweep


def _series(case: BenchCase) -> tuple:
    return (case.what, case.pass_, case.structure, case.backend)


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".strip().splitlines()[0][:300]


@dataclass
class SweepState:
    """What earlier sizes taught the sweep: the last timing of each series, series stopped, known fallbacks."""

    limit: int
    max_call_s: float
    last: dict[tuple, tuple[BenchCase, float, int]] = field(default_factory=dict)
    stopped: dict[tuple, str] = field(default_factory=dict)
    fallbacks: dict[tuple, str] = field(default_factory=dict)  # (backend, pass) -> the dense-fallback warning

    def skip_reason(self, case: BenchCase, flops: int, estimate: int, unavailable: str | None) -> str | None:
        """Why ``case`` is not run (``None``: run it); a size too big or too slow stops its series."""
        series = _series(case)
        if unavailable is not None:
            return f"backend unavailable: {unavailable}"
        if series in self.stopped:
            return self.stopped[series]
        if estimate * MARGIN > self.limit:
            self.stopped[series] = (f"does not fit: needs ~{estimate * MARGIN / GiB:.1f} GiB (estimate incl. "
                                    f"{MARGIN}x margin) > budget {self.limit / GiB:.1f} GiB")
            return self.stopped[series]
        if series in self.last:
            prev, ms, prev_flops = self.last[series]
            predicted = ms / 1000 * flops / max(prev_flops, 1)
            if predicted > self.max_call_s:
                self.stopped[series] = (f"too slow: predicted {predicted:.0f} s per call (from {ms / 1000:.1f} s at "
                                        f"{prev.n_demos} demos, scaled by FLOPs) > --max-call-s {self.max_call_s:g}")
                return self.stopped[series]
        return None


def _row(case: BenchCase, status: str, reason: str = "", **extra) -> dict:
    row = {**case.to_row(), "status": status, "reason": reason, "ms_median": None, "peak_mem_mb": None,
           "device_name": device_name(case.device), **versions()}
    row.update(extra)
    return row


def _guarded_warm_up(case: BenchCase, fn: Callable[[], object], state: SweepState) -> tuple[float, str]:
    """Warm up; for a guarded backend, a dense-fallback warning stops the call before the dense path runs,
    and the call is repeated (warnings silenced) only if the dense estimate fits. Returns ``(seconds, note)``."""
    if case.backend not in GUARDED_BACKENDS:
        return warm_up(fn, case.device), ""
    key = (case.backend, case.pass_, case.device)
    message = state.fallbacks.get(key)
    if message is None:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            try:
                return warm_up(fn, case.device), ""
            except RuntimeWarning as warning:  # warned (once per process) before computing densely
                message = state.fallbacks[key] = str(warning).split(";")[0][:200]  # its first clause
    layout_length = case.counting_layout().length
    dense = _dense_bytes(case.batch, layout_length, case.heads, case.torch_dtype.itemsize,
                         case.pass_ == "fwd+bwd", eager=True)
    if dense * MARGIN > state.limit:
        raise MemoryError(f"dense fallback needs ~{dense * MARGIN / GiB:.1f} GiB > budget "
                          f"{state.limit / GiB:.1f} GiB ({message})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        seconds = warm_up(fn, case.device)
    return seconds, f"ran the dense fallback: {message}"


def _quiet(fn: Callable[[], object]) -> Callable[[], object]:
    def call():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return fn()

    return call


def _chunks(items: list[tuple[int, BenchCase, int, int]], limit: int) -> list[list]:
    """Split contenders so that the estimates of those alive together fit the budget."""
    groups: list[list] = [[]]
    used = 0
    for item in items:
        need = item[3] * MARGIN
        if groups[-1] and used + need > limit:
            groups.append([])
            used = 0
        groups[-1].append(item)
        used += need
    return [g for g in groups if g]


def run_sweep(cases: list[BenchCase], *, repeats: int, budget_s: float, max_call_s: float, limit: int,
              measure_memory: bool, unavailable: Callable[[BenchCase], str | None],
              progress: Callable[..., None] | None = None) -> list[dict]:
    """Time every case (skipping with reasons), interleaving the contenders of each (level, pass, size);
    then measure peak memory. Returns one row per case, in the order of ``cases``."""
    state = SweepState(limit=limit, max_call_s=max_call_s)
    rows: list[dict | None] = [None] * len(cases)
    groups: dict[tuple, list[int]] = {}
    for i, case in enumerate(cases):
        groups.setdefault((case.what, case.pass_, case.n_demos), []).append(i)
    # sizes ascending within a level and pass, so the too-slow prediction has the previous size
    first_seen = {key: i for i, key in reversed(list(enumerate((c.what, c.pass_) for c in cases)))}
    order = sorted(groups, key=lambda key: (first_seen[key[:2]], key[2]))
    try:
        for key in order:
            runnable = []
            for i in groups[key]:
                case = cases[i]
                flops, estimate = case_flops(case), estimate_bytes(case)
                extra = {"flops": flops, "est_mem_mb": round(estimate / 2**20, 1)}
                reason = state.skip_reason(case, flops, estimate, unavailable(case))
                if reason is not None:
                    rows[i] = _row(case, "skipped", reason, **extra)
                    if progress:
                        progress(1, f"{case.what} {case.pass_} k={case.n_demos}")
                else:
                    runnable.append((i, case, flops, estimate))
            for chunk in _chunks(runnable, limit):
                _time_chunk(chunk, cases, rows, state, repeats, budget_s, measure_memory, progress)
    finally:
        release_models()
    done = [r for r in rows if r is not None]
    if measure_memory and not any(c.device.startswith("cuda") for c in cases):
        _measure_cpu_memory(done, progress)
    add_speedups(done)
    return done


def _time_chunk(chunk, cases, rows, state: SweepState, repeats, budget_s, measure_memory, progress) -> None:
    built: list[tuple[int, BenchCase, int, int, Contender, str]] = []
    for i, case, flops, estimate in chunk:
        extra = {"flops": flops, "est_mem_mb": round(estimate / 2**20, 1)}
        try:
            fn = build_call(case)
            first, note = _guarded_warm_up(case, fn, state)
            if note:
                fn = _quiet(fn)
            built.append((i, case, flops, estimate, Contender(fn=fn, first_s=first), note))
        except (torch.OutOfMemoryError, MemoryError) as err:
            what = "out of memory" if isinstance(err, torch.OutOfMemoryError) else "does not fit"
            rows[i] = _row(case, "skipped", f"{what}: {str(err).splitlines()[0][:300]}", **extra)
            state.stopped[_series(case)] = rows[i]["reason"]
        except Exception as err:  # one failing configuration must not end the sweep; the row says why
            rows[i] = _row(case, "error", _reason(err), **extra)
            state.stopped[_series(case)] = f"not run: a smaller size failed ({_reason(err)})"
    device = chunk[0][1].device
    time_contenders([b[4] for b in built], device, repeats, budget_s)
    for i, case, flops, estimate, contender, note in built:
        extra = {"flops": flops, "est_mem_mb": round(estimate / 2**20, 1)}
        if contender.error is not None or not contender.samples:
            err = contender.error or RuntimeError("no timed call")
            rows[i] = _row(case, "error", _reason(err), **extra)
            state.stopped[_series(case)] = f"not run: a smaller size failed ({_reason(err)})"
        else:
            timing = timing_summary(contender.samples, contender.first_s)
            rows[i] = _row(case, "ok", "", **extra, **timing, note=note,
                           gflops_per_s=round(flops / (timing["ms_median"] / 1000) / 1e9, 2))
            state.last[_series(case)] = (case, timing["ms_median"], flops)
            if measure_memory and case.device.startswith("cuda"):
                try:
                    rows[i]["peak_mem_mb"] = round(measure_cuda_peak(contender.fn, case.device, warmup=False), 1)
                except torch.OutOfMemoryError as err:
                    rows[i]["memory_error"] = _reason(err)
        if progress:
            progress(1, f"{case.what} {case.pass_} k={case.n_demos}")
    built.clear()


def _measure_cpu_memory(rows: list[dict], progress) -> None:
    items = []
    for i, row in enumerate(rows):
        if row["status"] == "ok":
            warmup = row["backend"] == "flex" or row["first_call_ms"] / 1000 <= MEMORY_WARMUP_MAX_S
            items.append({"key": str(i), "case": BenchCase.from_row(row).to_row(), "warmup": warmup})
    if not items:
        return
    if progress:
        progress(0, "memory", len(items))
    results = measure_cpu_cases(items, progress=(lambda n: progress(n, "memory")) if progress else None)
    for key, result in results.items():
        row = rows[int(key)]
        if "error" in result:
            row["memory_error"] = result["error"]
        else:
            row["peak_mem_mb"] = round(result["peak_mem_mb"], 1)
            row["base_mem_mb"] = round(result["base_mem_mb"], 1)


def add_speedups(rows: list[dict]) -> None:
    """Add ``speedup_vs_full``, ``flop_ratio_vs_full`` and ``bound_fraction`` to non-``full`` rows."""
    full = {(r["what"], r["pass"], r["backend"], r["n_demos"]): r for r in rows if r["structure"] == "full"}
    for row in rows:
        if row["structure"] == "full":
            continue
        ref = full.get((row["what"], row["pass"], row["backend"], row["n_demos"]))
        if ref is None:
            continue
        row["flop_ratio_vs_full"] = round(ref["flops"] / row["flops"], 2) if row.get("flops") else None
        if row["status"] == "ok" and ref["status"] == "ok":
            row["speedup_vs_full"] = round(ref["ms_median"] / row["ms_median"], 2)
            row["bound_fraction"] = round(row["speedup_vs_full"] / row["flop_ratio_vs_full"], 3)


__all__ = ["NOISY_SPREAD", "Contender", "add_speedups", "percentile", "run_sweep", "time_contenders",
           "timing_summary", "warm_up"]
