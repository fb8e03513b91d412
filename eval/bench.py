"""``saicl-bench``: speed and peak memory against the number of demonstrations.

For every level (one attention layer, the encoder, the whole model scoring options), pass, structure
(``saicl``, ``full``, ``fid``), backend and number of demonstrations, one :class:`BenchCase` is
timed (median of several calls after a warm-up) and its peak memory measured (see
:mod:`saicl.eval.memory`). Every row carries its structured FLOPs; rows of ``saicl`` and ``fid`` also
carry the measured speed-up over ``full`` (same level, pass, backend and size), the structured-FLOP
ratio (the bound), and the fraction of the bound reached.

Skipped, with the reason in the row: backends that cannot run here, configurations whose estimated
memory exceeds the budget (``--mem-limit-gb``), and configurations predicted (from the previous size's
time, scaled by FLOPs) to take longer than ``--max-call-s`` per call.

Example: ``saicl-bench --what encoder --demos 4,16,64,128 --json bench.json --csv bench.csv --plot bench.png``
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from saicl.attention.registry import backend_names, unavailable_reason
from saicl.outputs import atomic_path, save_results, validate_output_file
from saicl.structures import STRUCTURES

from .bench_cases import DTYPES, LEVELS, PASSES, BenchCase, build_call, case_flops, release_models
from .cli import CLIError, check_device, comma_ints, comma_names, progress_bar, run_cli, write_json
from .memory import MARGIN, estimate_bytes, measure_cpu_cases, measure_cuda_peak, memory_limit_bytes

PROG = "saicl-bench"
GiB = 1024**3
# Sizes for a 2-core CPU (the whole default sweep takes minutes) and for one GPU.
CPU_DEFAULTS = dict(demos="4,16,64,128,256,1024,4096", dtype="float32", d_model=256, heads=4, head_dim=64,
                    d_ff=1024, num_layers=2, num_decoder_layers=2, max_call_s=20.0)
GPU_DEFAULTS = dict(demos="4,16,64,256,1024,4096,16384", dtype="bfloat16", d_model=768, heads=12, head_dim=64,
                    d_ff=3072, num_layers=12, num_decoder_layers=12, max_call_s=30.0)
# Warm-up before the memory measurement unless one call takes longer than this (the warm-up then costs
# more than it protects against: only FlexAttention compiles on the first call, and it always warms up).
MEMORY_WARMUP_MAX_S = 5.0


@dataclass
class BenchConfig:
    """A sweep (the CLI flags map one to one onto these fields)."""

    levels: tuple[str, ...] = LEVELS
    structures: tuple[str, ...] = ("saicl", "full", "fid")
    backends: tuple[str, ...] = ("eager", "torch", "flex", "triton", "xformers")
    passes: tuple[str, ...] = ("fwd",)
    demos: tuple[int, ...] = (4, 16, 64, 128, 256, 1024, 4096)
    demo_len: int = 64
    query_len: int = 64
    batch: int = 1
    heads: int = 4
    head_dim: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    d_model: int = 256
    d_ff: int = 1024
    num_layers: int = 2
    num_decoder_layers: int = 2
    vocab_size: int = 32128
    n_options: int = 2
    option_len: int = 4
    repeats: int = 5
    budget_s: float = 5.0
    max_call_s: float = 20.0
    mem_limit_bytes: int | None = None
    measure_memory: bool = True

    def cases(self) -> list[BenchCase]:
        """Every configuration of the sweep, series by series, demonstrations ascending."""
        return [
            BenchCase(what=what, structure=structure, backend=backend, pass_=pass_, n_demos=n,
                      demo_len=self.demo_len, query_len=self.query_len, batch=self.batch, heads=self.heads,
                      head_dim=self.head_dim, dtype=self.dtype, device=self.device, d_model=self.d_model,
                      d_ff=self.d_ff, num_layers=self.num_layers, num_decoder_layers=self.num_decoder_layers,
                      vocab_size=self.vocab_size, n_options=self.n_options, option_len=self.option_len)
            for what in self.levels for pass_ in self.passes for structure in self.structures
            for backend in self.backends for n in sorted(self.demos)
        ]


def _series(case: BenchCase) -> tuple:
    return (case.what, case.pass_, case.structure, case.backend)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_call(fn, device: str, repeats: int, budget_s: float) -> dict:
    """Warm up once, then time up to ``repeats`` calls within about ``budget_s`` (at least one)."""
    start = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - start
    count = max(1, min(repeats, int(budget_s / max(first, 1e-6))))
    times = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"ms_median": statistics.median(times) * 1000, "ms_min": min(times) * 1000, "repeats": count,
            "first_call_ms": first * 1000}


def machine_info(device: str) -> dict:
    """Where the numbers come from: CPU, cores, threads, load, versions, GPU."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": device,
            "loadavg_start": _loadavg()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def _skip(case: BenchCase, reason: str, **extra) -> dict:
    return {**case.to_row(), "status": "skipped", "reason": reason, "ms_median": None, "peak_mem_mb": None, **extra}


def run_sweep(config: BenchConfig, show_progress: bool = True) -> list[dict]:
    """Time every case of ``config`` (skipping with reasons), then measure peak memory; returns the rows."""
    limit = config.mem_limit_bytes or memory_limit_bytes(config.device)
    cases = config.cases()
    rows: list[dict] = []
    last: dict[tuple, tuple[BenchCase, float, int]] = {}  # series -> (case, ms, flops) of the last size run
    stopped: dict[tuple, str] = {}
    reasons = {b: unavailable_reason(b, config.device) for b in set(config.backends)}
    bar = progress_bar(len(cases), "bench", enabled=show_progress)
    try:
        for case in cases:
            bar.set_postfix_str(f"{case.what} {case.structure}/{case.backend} {case.pass_} k={case.n_demos}")
            series = _series(case)
            flops = case_flops(case)
            estimate = estimate_bytes(case)
            extra = {"flops": flops, "est_mem_mb": round(estimate / 2**20, 1)}
            if reasons[case.backend] is not None:
                rows.append(_skip(case, f"backend unavailable: {reasons[case.backend]}", **extra))
            elif series in stopped:
                rows.append(_skip(case, stopped[series], **extra))
            elif estimate * MARGIN > limit:
                stopped[series] = f"does not fit: needs ~{estimate * MARGIN / GiB:.1f} GiB (estimate incl. " \
                                  f"{MARGIN}x margin) > budget {limit / GiB:.1f} GiB"
                rows.append(_skip(case, stopped[series], **extra))
            elif series in last and last[series][1] / 1000 * flops / last[series][2] > config.max_call_s:
                prev, ms, prev_flops = last[series]
                predicted = ms / 1000 * flops / prev_flops
                stopped[series] = (f"too slow: predicted {predicted:.0f} s per call (from {ms / 1000:.1f} s at "
                                   f"{prev.n_demos} demos, scaled by FLOPs) > --max-call-s {config.max_call_s:g}")
                rows.append(_skip(case, stopped[series], **extra))
            else:
                rows.append(_measure(case, config, extra))
                if rows[-1]["status"] == "ok":
                    last[series] = (case, rows[-1]["ms_median"], flops)
                else:
                    stopped[series] = f"not run: a smaller size failed ({rows[-1]['reason']})"
            bar.update(1)
    finally:
        bar.close()
        release_models()
    if config.measure_memory and not config.device.startswith("cuda"):
        _measure_cpu_memory(rows, show_progress)
    add_speedups(rows)
    return rows


def _measure(case: BenchCase, config: BenchConfig, extra: dict) -> dict:
    try:
        fn = build_call(case)
        timing = time_call(fn, case.device, config.repeats, config.budget_s)
        row = {**case.to_row(), "status": "ok", "reason": "", **extra, **timing, "peak_mem_mb": None}
        if config.measure_memory and case.device.startswith("cuda"):
            row["peak_mem_mb"] = round(measure_cuda_peak(fn, case.device, warmup=False), 1)
        del fn
    except torch.OutOfMemoryError as err:
        return _skip(case, f"out of memory: {str(err).splitlines()[0]}", **extra)
    except Exception as err:  # one failing configuration must not end the sweep; the row says why
        return {**case.to_row(), "status": "error", "reason": f"{type(err).__name__}: {err}"[:300], **extra,
                "ms_median": None, "peak_mem_mb": None}
    row["gflops_per_s"] = round(case_flops(case) / (row["ms_median"] / 1000) / 1e9, 2) if row["ms_median"] else None
    return row


def _measure_cpu_memory(rows: list[dict], show_progress: bool) -> None:
    items = []
    for i, row in enumerate(rows):
        if row["status"] == "ok":
            warmup = row["backend"] == "flex" or row["first_call_ms"] / 1000 <= MEMORY_WARMUP_MAX_S
            items.append({"key": str(i), "case": BenchCase.from_row(row).to_row(), "warmup": warmup})
    if not items:
        return
    bar = progress_bar(len(items), "bench memory", enabled=show_progress)
    try:
        results = measure_cpu_cases(items, progress=bar.update)
    finally:
        bar.close()
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


# ---------------------------------------------------------------------------------------------------
# Output


CSV_FIELDS = ("what", "structure", "backend", "pass", "n_demos", "demo_len", "query_len", "batch", "heads",
              "head_dim", "dtype", "device", "ms_median", "peak_mem_mb", "flops", "status", "reason", "ms_min",
              "repeats", "gflops_per_s", "est_mem_mb", "base_mem_mb", "speedup_vs_full", "flop_ratio_vs_full",
              "bound_fraction", "d_model", "d_ff", "num_layers", "num_decoder_layers", "vocab_size", "n_options",
              "option_len")


def write_csv(rows: list[dict], path: str | os.PathLike) -> Path:
    import csv

    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:  # never a truncated CSV under path
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in CSV_FIELDS})
    return Path(path)


def _num(value, fmt: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def markdown_table(rows: list[dict]) -> str:
    """One table per (level, pass): time, memory, GFLOP/s, speed-up against full beside the FLOP ratio."""
    lines = []
    for what in LEVELS:
        for pass_ in PASSES:
            mine = [r for r in rows if r["what"] == what and r["pass"] == pass_]
            if not mine:
                continue
            r0 = mine[0]
            shape = (f"demos of {r0['demo_len']} tokens, query {r0['query_len']}, batch {r0['batch']}, "
                     f"{r0['heads']} heads x {r0['head_dim']}, {r0['dtype']}, {r0['device']}")
            if what != "attention":
                shape += f"; d_model {r0['d_model']}, d_ff {r0['d_ff']}, {r0['num_layers']} layers"
            lines += [f"#### {what}, {pass_} ({shape})", "",
                      "| demos | structure | backend | ms (median) | peak MB | GFLOP/s | speed-up vs full | "
                      "FLOP ratio | % of bound |", "|---|---|---|---|---|---|---|---|---|"]
            ok = [r for r in mine if r["status"] == "ok"]
            for r in sorted(ok, key=lambda r: (r["n_demos"], r["backend"], r["structure"])):
                fraction = r.get("bound_fraction")
                lines.append(
                    f"| {r['n_demos']} | {r['structure']} | {r['backend']} | {_num(r['ms_median'], '.1f')} | "
                    f"{_num(r['peak_mem_mb'], '.0f')} | {_num(r.get('gflops_per_s'), '.1f')} | "
                    f"{_num(r.get('speedup_vs_full'), '.2f')} | {_num(r.get('flop_ratio_vs_full'), '.2f')} | "
                    f"{'–' if fraction is None else f'{100 * fraction:.0f}%'} |"
                )
            skipped = _skip_summary([r for r in mine if r["status"] != "ok"])
            if skipped:
                lines += ["", "Not run:"] + [f"- {s}" for s in skipped]
            lines.append("")
    return "\n".join(lines)


def _skip_summary(rows: list[dict]) -> list[str]:
    """Skipped/failed rows grouped by (structure, backend, reason): demonstrations listed once."""
    groups: dict[tuple, list[int]] = {}
    for r in rows:
        reason = r["reason"].split(" (from ")[0] if r["reason"].startswith("too slow") else r["reason"]
        structure = "all structures" if reason.startswith("backend unavailable") else r["structure"]
        groups.setdefault((structure, r["backend"], r["status"], reason), []).append(r["n_demos"])
    return [f"{s}/{b} at {','.join(map(str, sorted(set(n))))} demos: {status}: {reason}"
            for (s, b, status, reason), n in groups.items()]


def plot_rows(rows: list[dict], path: str | os.PathLike, what: str | None = None) -> Path:
    """Log-log time and peak memory against demonstrations, one line per (level, structure, backend, pass)."""
    from .plots import loglog_panels

    ok = [r for r in rows if r["status"] == "ok" and (what is None or r["what"] == what)]
    time_series: dict[str, list] = {}
    mem_series: dict[str, list] = {}
    levels = sorted({r["what"] for r in ok})
    for r in sorted(ok, key=lambda r: r["n_demos"]):
        name = f"{r['structure']}/{r['backend']}" + (f" {r['pass']}" if r["pass"] != "fwd" else "")
        if len(levels) > 1:
            name = f"{r['what']}: {name}"
        time_series.setdefault(name, []).append((r["n_demos"], r["ms_median"]))
        mem_series.setdefault(name, []).append((r["n_demos"], r["peak_mem_mb"]))
    title = f"saicl-bench{': ' + what if what else ''} ({ok[0]['device'] if ok else ''})"
    return loglog_panels({"time per call (ms)": time_series, "peak extra memory (MB)": mem_series}, path,
                         xlabel="demonstrations", title=title)


def targets(rows: list[dict]) -> list[dict]:
    """The issue's CPU targets, checked on the device's default backend (``auto``) for the rows the sweep covered."""
    from saicl.attention.registry import resolve_backend_name

    if not rows:
        return []
    default = resolve_backend_name("auto", rows[0]["device"])
    rows = [r for r in rows if r["backend"] == default]
    checks = []
    for r in rows:
        if (r["what"], r["structure"], r["pass"], r["n_demos"], r["demo_len"]) == ("encoder", "saicl", "fwd", 128, 64) \
                and r.get("bound_fraction") is not None:
            checks.append({"target": f"saicl encoder ({r['backend']}) at 128 demos of 64 tokens >= 80% of the FLOP "
                                     "bound against full", "value": r["bound_fraction"],
                           "met": r["bound_fraction"] >= 0.8})
    for r in rows:
        if (r["what"], r["n_demos"], r["pass"]) == ("encoder", 4096, "fwd") and r["structure"] in ("saicl", "full"):
            if r["structure"] == "saicl":
                fits = r["status"] == "ok" and (r["peak_mem_mb"] or 0) + (r.get("base_mem_mb") or 0) < 24 * 1024
                checks.append({"target": f"saicl encoder ({r['backend']}) at 4096 demos runs within 24 GiB",
                               "value": r["peak_mem_mb"], "met": fits})
            else:
                checks.append({"target": f"full encoder ({r['backend']}) at 4096 demos reported as not fitting",
                               "value": r["reason"], "met": r["status"] == "skipped" and "does not fit" in r["reason"]})
    return checks


# ---------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    d = GPU_DEFAULTS if cuda else CPU_DEFAULTS
    parser = argparse.ArgumentParser(
        prog="saicl-bench", description=__doc__.split("\n\n")[0],
        epilog=f"Defaults are sized for {'one GPU' if cuda else 'a 2-core CPU'} (detected: "
               f"{'CUDA' if cuda else 'no CUDA'}). Method and fields: docs/evaluation.md.",
    )
    parser.add_argument("--what", default=",".join(LEVELS),
                        help="comma-separated levels: attention (one layer), encoder, model (scoring options)")
    parser.add_argument("--structures", default="saicl,full,fid", help="comma-separated structures (default: all)")
    parser.add_argument("--backends", default="all",
                        help="comma-separated attention backends, or 'all' (unavailable ones are reported as "
                             "skipped with the reason; default: all)")
    parser.add_argument("--passes", default="fwd", help="comma-separated passes: fwd, fwd+bwd (default: fwd)")
    parser.add_argument("--demos", default=d["demos"],
                        help=f"comma-separated demonstration counts (default: {d['demos']})")
    parser.add_argument("--demo-len", type=int, default=64, help="tokens per demonstration (default: 64)")
    parser.add_argument("--query-len", type=int, default=64, help="tokens of the query (default: 64)")
    parser.add_argument("--batch", type=int, default=1, help="episodes per call (default: 1)")
    parser.add_argument("--heads", type=int, default=d["heads"], help=f"attention heads (default: {d['heads']})")
    parser.add_argument("--head-dim", type=int, default=d["head_dim"],
                        help=f"head dimension (default: {d['head_dim']})")
    parser.add_argument("--dtype", default=d["dtype"], choices=sorted(DTYPES), help=f"dtype (default: {d['dtype']})")
    parser.add_argument("--device", default="cuda" if cuda else "cpu", help="device (default: cuda if available)")
    parser.add_argument("--d-model", type=int, default=d["d_model"], help=f"model width (default: {d['d_model']})")
    parser.add_argument("--d-ff", type=int, default=d["d_ff"], help=f"feed-forward width (default: {d['d_ff']})")
    parser.add_argument("--layers", type=int, default=d["num_layers"],
                        help=f"encoder layers (default: {d['num_layers']})")
    parser.add_argument("--decoder-layers", type=int, default=d["num_decoder_layers"],
                        help=f"decoder layers (default: {d['num_decoder_layers']})")
    parser.add_argument("--vocab-size", type=int, default=32128, help="vocabulary size (default: 32128, T5's)")
    parser.add_argument("--options", type=int, default=2, help="options scored per episode at the model level")
    parser.add_argument("--option-len", type=int, default=4, help="tokens per option at the model level")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case, after one warm-up (default: 5)")
    parser.add_argument("--budget-s", type=float, default=5.0,
                        help="time budget per case for the repeats; at least one timed call (default: 5)")
    parser.add_argument("--max-call-s", type=float, default=d["max_call_s"],
                        help="skip a size whose predicted time per call exceeds this many seconds "
                             f"(default: {d['max_call_s']:g})")
    parser.add_argument("--mem-limit-gb", type=float, default=None,
                        help="memory budget in GiB for the fit check (default: 85%% of available memory)")
    parser.add_argument("--no-memory", action="store_true", help="do not measure peak memory")
    parser.add_argument("--json", metavar="PATH", help="write machine info and all rows as JSON to PATH")
    parser.add_argument("--csv", metavar="PATH", help="write the rows as CSV to PATH")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG (log-log time and memory) to PATH")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Validate the flags and build the sweep (CLIError naming the flag on bad input)."""
    backends = list(backend_names()) if args.backends == "all" else comma_names(args.backends, "--backends")
    backends = [b for b in backends if b != "auto"] if args.backends == "all" else backends
    unknown = [b for b in backends if b not in backend_names()]
    if unknown:
        raise CLIError(f"--backends: unknown {unknown}; expected some of {backend_names()}")
    for flag, value in (("--demo-len", args.demo_len), ("--query-len", args.query_len), ("--batch", args.batch),
                        ("--heads", args.heads), ("--head-dim", args.head_dim), ("--d-model", args.d_model),
                        ("--d-ff", args.d_ff), ("--layers", args.layers), ("--decoder-layers", args.decoder_layers),
                        ("--options", args.options), ("--option-len", args.option_len), ("--repeats", args.repeats),
                        ("--vocab-size", args.vocab_size)):
        if value < 1:
            raise CLIError(f"{flag} must be >= 1, got {value}")
    check_device(args.device)
    if args.max_call_s <= 0 or args.budget_s <= 0:
        raise CLIError("--max-call-s and --budget-s must be positive")
    if args.mem_limit_gb is not None and not (math.isfinite(args.mem_limit_gb) and args.mem_limit_gb > 0):
        raise CLIError(f"--mem-limit-gb must be a positive number of GiB, got {args.mem_limit_gb:g}")
    for flag, path in (("--json", args.json), ("--csv", args.csv), ("--plot", args.plot)):
        if path is not None:  # before the sweep: a bad path must not cost the run
            validate_output_file(path, flag)
    return BenchConfig(
        levels=tuple(comma_names(args.what, "--what", list(LEVELS))),
        structures=tuple(comma_names(args.structures, "--structures", sorted(STRUCTURES))),
        backends=tuple(backends), passes=tuple(comma_names(args.passes, "--passes", list(PASSES))),
        demos=tuple(comma_ints(args.demos, "--demos", minimum=0)), demo_len=args.demo_len,
        query_len=args.query_len, batch=args.batch, heads=args.heads, head_dim=args.head_dim, dtype=args.dtype,
        device=args.device, d_model=args.d_model, d_ff=args.d_ff, num_layers=args.layers,
        num_decoder_layers=args.decoder_layers, vocab_size=args.vocab_size, n_options=args.options,
        option_len=args.option_len, repeats=args.repeats, budget_s=args.budget_s, max_call_s=args.max_call_s,
        mem_limit_bytes=int(args.mem_limit_gb * GiB) if args.mem_limit_gb is not None else None,
        measure_memory=not args.no_memory,
    )


def run_bench(config: BenchConfig, show_progress: bool = True) -> dict:
    """Run a sweep; returns ``{"machine", "config", "rows", "targets"}`` (JSON-ready)."""
    from dataclasses import asdict

    machine = machine_info(config.device)
    start = time.perf_counter()
    rows = run_sweep(config, show_progress)
    machine["loadavg_end"] = _loadavg()
    machine["wall_s"] = round(time.perf_counter() - start, 1)
    limit = config.mem_limit_bytes or memory_limit_bytes(config.device)
    return {"machine": machine, "config": {**asdict(replace(config, mem_limit_bytes=limit))}, "rows": rows,
            "targets": targets(rows)}


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    result = run_bench(config, show_progress=not args.no_progress)
    m = result["machine"]
    print(f"saicl-bench on {m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads"
          f"{', ' + m['gpu'] if 'gpu' in m else ''}), torch {m['torch']}, load {m['loadavg_start']} -> "
          f"{m['loadavg_end']}, {m['wall_s']} s\n")
    print(markdown_table(result["rows"]))
    for check in result["targets"]:
        print(f"target: {check['target']}: {'MET' if check['met'] else 'NOT MET'} ({check['value']})")
    saved = True
    writers = (("--json", args.json, lambda tmp: write_json(tmp, result)),
               ("--csv", args.csv, lambda tmp: write_csv(result["rows"], tmp)),
               ("--plot", args.plot, lambda tmp: plot_rows(result["rows"], tmp)))
    for flag, path, write in writers:
        if path is not None:  # a write that fails now keeps the results beside the run (one line on stderr)
            where, ok = save_results(path, write, flag, PROG)
            saved &= ok
            if ok:
                print(f"{flag[2:]}: {where}")
    failed = [r for r in result["rows"] if r["status"] == "error"]
    if failed:
        print(f"{PROG}: {len(failed)} configuration(s) failed; see their 'reason'", file=sys.stderr)
    return 0 if saved and not failed else 1


def main(argv: list[str] | None = None) -> int:
    """Console entry point of ``saicl-bench`` (exit code 0 only if no configuration failed)."""
    return run_cli(_run, argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
