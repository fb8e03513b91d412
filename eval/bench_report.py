"""What ``saicl-bench`` writes: the CSV, the markdown tables, the log-log plot and the checked targets."""

from __future__ import annotations

import math
import os
from pathlib import Path

from saicl.outputs import atomic_path

from .bench_cases import LEVELS, PASSES

CSV_FIELDS = ("what", "structure", "backend", "pass", "n_demos", "demo_len", "query_len", "batch", "heads",
              "head_dim", "dtype", "device", "ms_median", "peak_mem_mb", "flops", "status", "reason", "ms_p10",
              "ms_p90", "noisy", "ms_min", "repeats", "first_call_ms", "gflops_per_s", "est_mem_mb", "base_mem_mb",
              "speedup_vs_full", "flop_ratio_vs_full", "bound_fraction", "note", "device_name", "torch", "triton",
              "saicl", "git_sha", "d_model", "d_ff", "num_layers", "num_decoder_layers", "vocab_size", "n_options",
              "option_len")


def write_csv(rows: list[dict], path: str | os.PathLike) -> Path:
    """One line per row, the columns of :data:`CSV_FIELDS` (empty where a row has no value)."""
    import csv

    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:  # never a truncated CSV under path
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in CSV_FIELDS})
    return Path(path)


def _num(value, fmt: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _time_cell(r: dict) -> str:
    cell = f"{_num(r['ms_median'], '.1f')} ({_num(r.get('ms_p10'), '.1f')}–{_num(r.get('ms_p90'), '.1f')})"
    return cell + (" *" if r.get("noisy") else "")


def _provenance(rows: list[dict]) -> str:
    r0 = rows[0]
    sha = r0.get("git_sha")
    return (f"{r0.get('device_name', r0['device'])}; torch {r0.get('torch')}, triton {r0.get('triton')}, "
            f"saicl {r0.get('saicl')}" + (f" ({sha[:12]}{'-dirty' if sha.endswith('-dirty') else ''})" if sha else ""))


def markdown_table(rows: list[dict]) -> str:
    """One table per (level, pass): time p50 (p10–p90), memory, GFLOP/s, speed-up against full, FLOP ratio."""
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
            lines += [f"#### {what}, {pass_} ({shape})", "", _provenance(mine), "",
                      "| demos | structure | backend | ms p50 (p10–p90) | peak MB | GFLOP/s | speed-up vs full | "
                      "FLOP ratio | % of bound |", "|---|---|---|---|---|---|---|---|---|"]
            ok = [r for r in mine if r["status"] == "ok"]
            for r in sorted(ok, key=lambda r: (r["n_demos"], r["backend"], r["structure"])):
                fraction = r.get("bound_fraction")
                lines.append(
                    f"| {r['n_demos']} | {r['structure']} | {r['backend']} | {_time_cell(r)} | "
                    f"{_num(r['peak_mem_mb'], '.0f')} | {_num(r.get('gflops_per_s'), '.1f')} | "
                    f"{_num(r.get('speedup_vs_full'), '.2f')} | {_num(r.get('flop_ratio_vs_full'), '.2f')} | "
                    f"{'–' if fraction is None else f'{100 * fraction:.0f}%'} |"
                )
            if any(r.get("noisy") for r in ok):
                lines += ["", "\\* noisy: p90 - p10 above a quarter of p50 (a busy machine); re-measure before "
                              "quoting."]
            notes = sorted({f"{r['backend']}: {r['note']}" for r in ok if r.get("note")})
            if notes:
                lines += ["", "Notes:"] + [f"- {n}" for n in notes]
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


__all__ = ["CSV_FIELDS", "markdown_table", "plot_rows", "targets", "write_csv"]
