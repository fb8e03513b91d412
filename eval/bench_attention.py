"""Time one encoder attention layer against the number of demonstrations.

Compares, with the T5 relative-position bias:

* ``torch`` backend under ``saicl`` (segment-batched, :mod:`saicl.attention.segmented`);
* ``flex`` backend under ``saicl`` (FlexAttention; reported with the reason if it cannot run);
* dense ``F.scaled_dot_product_attention`` with the ``(B, H, L, L)`` bias under ``full``, i.e. what
  Hugging Face T5 does.

What is timed: ``fwd`` is the attention call alone under ``torch.no_grad()`` with the per-forward
state (segment plan, block mask, dense bias) built beforehand, since a model builds it once for all
layers. ``fwd+bwd`` builds that state from a bias table that requires grad, runs the attention and
backpropagates into q, k, v and the table. ``flops`` counts structured FLOPs, ``4 * H * D`` per
allowed (query token, key token) pair for ``fwd`` and three times that for ``fwd+bwd`` (the usual
convention: the backward costs about twice the forward). Peak memory on CPU is sampled from the
process's resident set size during one extra, untimed call (approximate); on CUDA it is
``torch.cuda.max_memory_allocated``.

Run: ``python -m saicl.eval.bench_attention --demos 32,128,512``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from saicl.attention import get_backend
from saicl.attention.eager import dense_bias
from saicl.layout import EncoderLayout, build_layout
from saicl.testing import segment_batch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
MAX_DISTANCE = 128


@dataclass
class Case:
    """One benchmark shape."""

    n_demos: int
    demo_len: int
    query_len: int
    batch: int
    heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    def layout(self, structure: str) -> EncoderLayout:
        demos = [[self.demo_len] * self.n_demos] * self.batch
        mask, seg = segment_batch(demos, [self.query_len] * self.batch)
        return build_layout(mask.to(self.device), seg.to(self.device), structure)

    @property
    def length(self) -> int:
        return self.n_demos * self.demo_len + self.query_len

    def allowed_pairs(self, structure: str) -> int:
        """Allowed (query token, key token) pairs of the whole batch."""
        if structure == "full":
            return self.batch * self.length**2
        per_demo = self.demo_len * (self.demo_len + self.query_len)
        return self.batch * (self.n_demos * per_demo + self.query_len * self.length)


def machine_info() -> dict[str, str | int | float]:
    """CPU model, torch version, thread count and load (timings on a busy machine are noisy)."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {
        "cpu": cpu,
        "cores": os.cpu_count() or 0,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_1min": round(load, 2),
    }


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemAvailable", info.get("MemTotal", 0))
    except OSError:
        return 0


def dense_bytes(case: Case, backward: bool) -> int:
    """Rough peak of the dense baseline: the ``(B, H, L, L)`` bias (built twice: gather, mask), the
    int64 index and mask intermediates, and for the backward the scores, probabilities and their
    gradients (SDPA's math path, taken when the mask needs a gradient)."""
    square = case.batch * case.length**2
    elem = torch.finfo(case.dtype).bits // 8
    total = 2 * case.heads * square * elem + 3 * square * 8
    if backward:
        total += 4 * case.heads * square * max(elem, 4)
    return total


class RssSampler:
    """Peak resident set size above the starting point, sampled every millisecond in a thread."""

    def __init__(self) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._stop = threading.Event()
        self.start = self.peak = self._rss()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def peak_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], object], device: torch.device, warmup: int, repeats: int
) -> tuple[float, float | None]:
    """Median milliseconds of ``fn`` over ``repeats`` runs after ``warmup`` runs, and peak memory (MB)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    elif os.path.exists("/proc/self/statm"):
        with RssSampler() as sampler:
            fn()
        peak = sampler.peak_mb
    else:
        peak = None
    return statistics.median(times), peak


def _inputs(case: Case, grad: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shape = (case.batch, case.length, case.heads, case.head_dim)
    q, k, v = (torch.randn(shape, generator=gen).to(case.dtype).to(case.device) for _ in range(3))
    table = torch.randn(case.heads, 2 * MAX_DISTANCE + 1, generator=gen).to(case.dtype).to(case.device)
    if grad:
        for t in (q, k, v, table):
            t.requires_grad_(True)
    return q, k, v, table


def backend_fns(name: str, case: Case) -> tuple[Callable[[], object], Callable[[], object]]:
    """``(forward, forward+backward)`` closures for a registered backend under ``saicl``."""
    backend = get_backend(name, case.device)
    layout = case.layout("saicl")
    q, k, v, table = _inputs(case, grad=False)
    with torch.no_grad():
        prepared = backend.prepare(layout, table)

    def fwd():
        with torch.no_grad():
            return backend.attend(q, k, v, prepared)

    gq, gk, gv, gtable = _inputs(case, grad=True)
    grad_out = torch.randn_like(gq)

    def fwd_bwd():
        out = backend.attend(gq, gk, gv, backend.prepare(layout, gtable))
        out.backward(grad_out)

    return fwd, fwd_bwd


def dense_fns(case: Case) -> tuple[Callable[[], object], Callable[[], object]]:
    """Dense SDPA with the full ``(B, H, L, L)`` T5 bias under ``full`` (Hugging Face T5's path)."""
    layout = case.layout("full")
    q, k, v, table = (t.transpose(1, 2) if t.dim() == 4 else t for t in _inputs(case, grad=False))
    bias = None

    def fwd():
        nonlocal bias
        if bias is None:  # built once, like T5's position_bias, outside the timed call
            bias = dense_bias(layout, table).bias
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)

    gq, gk, gv, gtable = _inputs(case, grad=True)
    grad_out = torch.randn_like(gq).transpose(1, 2)

    def fwd_bwd():
        mask = dense_bias(layout, gtable).bias
        out = F.scaled_dot_product_attention(gq.transpose(1, 2), gk.transpose(1, 2), gv.transpose(1, 2),
                                             attn_mask=mask, scale=1.0)
        out.backward(grad_out)

    return fwd, fwd_bwd


def _guard_dense_fallback(
    fn: Callable[[], object], case: Case, budget: float, backward: bool, known: str | None
) -> tuple[Callable[[], object], str | None, str | None]:
    """Run ``fn`` once with RuntimeWarnings as errors; if it warns (e.g. of a dense fallback), or
    warned before (``known``), run it only when the dense estimate fits ``budget``.

    Returns the function to time, the note for the table, and the warning (if any).
    """
    message = known
    if message is None:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            try:
                fn()
                return fn, None, None
            except RuntimeWarning as warning:
                message = _reason(warning)
    need = dense_bytes(case, backward=backward)
    if need > budget:
        return fn, f"skipped: {message} (dense fallback needs ~{need / 2**30:.1f} GB)", message

    def quiet():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return fn()

    return quiet, f"ran dense fallback: {message}", message


def _reason(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return text if len(text) <= 160 else text[:157] + "..."


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    budget = args.max_mem_gb * 2**30 if args.max_mem_gb is not None else 0.6 * _available_bytes()
    passes = [p.strip() for p in args.passes.split(",") if p.strip()]
    jobs = []
    for n_demos in args.demos:
        case = Case(
            n_demos, args.demo_len, args.query_len, args.batch, args.heads, args.head_dim, dtype, device
        )
        for backend in args.backends:
            jobs.append((case, backend))
    rows: list[dict] = []
    fallbacks: dict[tuple[str, str], str] = {}  # (backend, pass) -> its dense-fallback warning
    progress = _progress(len(jobs) * len(passes), args.no_progress)
    for case, backend in jobs:
        structure = "full" if backend == "sdpa-dense" else "saicl"
        fns, error = None, None
        if backend == "sdpa-dense":
            need = dense_bytes(case, backward=False)
            if need > budget:
                error = f"skipped: needs ~{need / 2**30:.1f} GB (budget {budget / 2**30:.1f} GB)"
            else:
                fns = dense_fns(case)
        else:
            try:
                fns = backend_fns(backend, case)
            except Exception as err:  # noqa: BLE001 - any failure of an optional backend is reported
                error = _reason(err)
        for pass_name in passes:
            note, ms, peak = error, None, None
            if note is None and backend == "sdpa-dense" and pass_name == "fwd+bwd":
                need = dense_bytes(case, backward=True)
                if need > budget:
                    note = f"skipped: needs ~{need / 2**30:.1f} GB (budget {budget / 2**30:.1f} GB)"
            if note is None:
                fn = fns[0] if pass_name == "fwd" else fns[1]
                if backend not in ("torch", "sdpa-dense"):
                    # A backend may warn that it falls back to dense math (FlexAttention's CPU
                    # backward): check that first, since dense can exhaust the machine's memory.
                    # Backends may warn only once per process, so the finding is remembered.
                    fn, note, warned = _guard_dense_fallback(
                        fn, case, budget, pass_name == "fwd+bwd", fallbacks.get((backend, pass_name))
                    )
                    if warned is not None:
                        fallbacks[(backend, pass_name)] = warned
            if note is None or note.startswith("ran "):
                try:
                    ms, peak = measure(fn, device, args.warmup, args.repeats)
                except Exception as err:  # noqa: BLE001 - e.g. FlexAttention has no CPU backward
                    note = "n/a: " + _reason(err)
            pairs = case.allowed_pairs(structure)
            rows.append({
                "what": "attention", "structure": structure, "backend": backend, "pass": pass_name,
                "n_demos": case.n_demos, "demo_len": case.demo_len, "query_len": case.query_len,
                "batch": case.batch, "heads": case.heads, "head_dim": case.head_dim, "dtype": args.dtype,
                "device": str(device), "ms_median": ms,
                "peak_mem_mb": None if peak is None else round(peak, 1),
                "flops": 4 * case.heads * case.head_dim * pairs * (3 if pass_name == "fwd+bwd" else 1),
                "repeats": args.repeats, "threads": torch.get_num_threads(), "note": note,
            })
            progress.update(1)
        if device.type == "cpu":
            del fns  # free the dense bias before the next, larger case
    progress.close()
    return rows


def _progress(total: int, disabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency, but never fail the benchmark on it
        disabled = True
    if disabled:
        class _Null:
            def update(self, n):
                pass

            def close(self):
                pass

        return _Null()
    return tqdm(total=total, desc="attention benchmark", file=sys.stderr)


def table_markdown(rows: list[dict], info: dict) -> str:
    """Markdown table: one line per (demonstrations, pass), ms per backend and ratios to ``torch``."""
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    lookup = {(r["n_demos"], r["pass"], r["backend"]): r for r in rows}
    head = ["demos", "pass", *[f"{b} ms" for b in backends]]
    if "torch" in backends:
        head += [f"{b}/torch" for b in backends if b != "torch"]
    head += ["torch GFLOP/s", "torch peak MB"]
    lines = [
        f"Machine: {info['cpu']} ({info['cores']} cores), torch {info['torch']}, {info['threads']} threads, "
        f"load average {info['load_1min']}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    notes = []
    for n_demos, pass_name in dict.fromkeys((r["n_demos"], r["pass"]) for r in rows):
        cells = [str(n_demos), pass_name]
        for b in backends:
            r = lookup[(n_demos, pass_name, b)]
            if r["ms_median"] is None:
                notes.append(f"{b} at {n_demos} demos, {pass_name}: {r['note']}")
                cells.append(f"n/a [{len(notes)}]")
            elif r["note"]:
                notes.append(f"{b} at {n_demos} demos, {pass_name}: {r['note']}")
                cells.append(f"{r['ms_median']:.1f} [{len(notes)}]")
            else:
                cells.append(f"{r['ms_median']:.1f}")
        base = lookup.get((n_demos, pass_name, "torch"))
        base_ms = None if base is None else base["ms_median"]
        for b in backends:
            if b == "torch" or "torch" not in backends:
                continue
            other = lookup[(n_demos, pass_name, b)]["ms_median"]
            cells.append("-" if other is None or base_ms is None else f"{other / base_ms:.1f}x")
        if base_ms is not None:
            cells += [f"{base['flops'] / base_ms / 1e6:.1f}", str(base["peak_mem_mb"])]
        else:
            cells += ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += [""] + [f"[{i}] {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(lines)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m saicl.eval.bench_attention",
        description="Time one encoder attention layer (T5 bias) against the number of demonstrations: "
        "the torch and flex backends under saicl versus dense SDPA with the bias under full.",
    )
    parser.add_argument("--demos", type=_int_list, default=[32, 128, 512],
                        help="comma-separated numbers of demonstrations (default: 32,128,512)")
    parser.add_argument("--demo-len", type=int, default=64, help="tokens per demonstration (default: 64)")
    parser.add_argument("--query-len", type=int, default=64, help="tokens in the query (default: 64)")
    parser.add_argument("--batch", type=int, default=1, help="episodes per batch (default: 1)")
    parser.add_argument("--heads", type=int, default=8, help="attention heads (default: 8)")
    parser.add_argument("--head-dim", type=int, default=64, help="dimension per head (default: 64)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="q/k/v and bias dtype (default: fp32)")
    parser.add_argument("--device", default="cpu", help="device to run on, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--backends", default="torch,flex,sdpa-dense",
                        type=lambda s: [b.strip() for b in s.split(",") if b.strip()],
                        help="comma-separated: registered backends (torch, flex, ...) run under saicl, "
                        "sdpa-dense runs the dense baseline under full (default: torch,flex,sdpa-dense)")
    parser.add_argument("--passes", default="fwd,fwd+bwd",
                        help="comma-separated passes: fwd, fwd+bwd (default: both)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs per measurement; the median is reported (default: 5, at least 1)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed runs before timing (default: 1; FlexAttention compiles on its "
                        "first call)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's default)")
    parser.add_argument("--max-mem-gb", type=float, default=None,
                        help="skip dense runs whose estimated memory exceeds this "
                        "(default: 60%% of available memory)")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the result rows as JSON to PATH")
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    for name in ("demo_len", "query_len", "batch", "heads", "head_dim"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    bad = [p for p in args.passes.split(",") if p.strip() not in ("fwd", "fwd+bwd")]
    if bad:
        parser.error(f"--passes: unknown pass {bad[0]!r}; expected fwd and/or fwd+bwd")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = machine_info()
    rows = run(args)
    print(table_markdown(rows, info))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rows": rows}, f, indent=2)
    failed = [r for r in rows if r["backend"] == "torch" and r["ms_median"] is None]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
