"""Memory of benchmark cases: an estimate made *before* running (to skip what cannot fit) and an honest
measurement of the peak.

Measurement
-----------
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated
  before the call (weights and inputs excluded), in the benchmark process itself.
* CPU: in a separate worker process (``python -m saicl.eval.memory``) started with
  ``MALLOC_MMAP_THRESHOLD_=65536``, so that glibc serves every allocation above 64 KiB with its own
  ``mmap`` and returns it on free: the resident set then tracks the live tensors instead of a heap that
  only grows. For each case the worker builds the model and inputs, runs one warm-up call (compiles,
  lazy initialisation), reads ``VmRSS``, resets the kernel's high-water mark (``echo 5 >
  /proc/self/clear_refs``), runs one call and reads ``VmHWM``: ``peak_mem_mb = VmHWM - VmRSS`` is the
  extra resident memory of one call. Timings are *not* taken in that process (the fixed threshold adds
  page faults); they come from the main process with the default allocator.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .bench_cases import BenchCase, build_call, release_models

MB = 1024 * 1024
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
RESULT_PREFIX = "MEMORY-RESULT "
MARGIN = 1.25  # the estimate is multiplied by this before comparing with the limit


# ---------------------------------------------------------------------------------------------------
# Estimate


def _dense_bytes(batch: int, length: int, heads: int, elem: int, train: bool, eager: bool) -> int:
    # Calibrated on measured peaks (2-core CPU, fp32, 4 heads): the torch backend's full attention needs
    # the (B, H, L, L) bias twice while it is built plus int64 (B, L, L) distances (measured 32 B/pair at
    # H * elem = 16); the eager oracle also materialises scores and probabilities. Training keeps ~3 more.
    per_pair = heads * elem * ((3 if eager else 2) + (3 if train else 0)) + (40 if eager else 24)
    return batch * length * length * per_pair


def attention_workspace_bytes(case: BenchCase) -> int:
    """Estimated extra bytes of one attention call beyond q, k, v (the structure's pairs, the backend's way)."""
    layout = case.counting_layout()
    elem = torch.empty(0, dtype=case.torch_dtype).element_size()
    train = case.pass_ == "fwd+bwd"
    length, heads = layout.length, case.heads
    dense = case.backend in ("eager", "sdpa-bias") or case.structure == "full" or (
        case.backend == "flex" and case.device == "cpu" and (train or case.dtype == "float64")
    )
    if case.backend == "flex" and case.structure == "full" and not (case.device == "cpu" and train):
        dense = False  # compiled FlexAttention never materialises (L, L)
    if case.backend == "sdpa":
        dense = False  # no bias, no mask: SDPA's fused kernels never materialise (L, L)
    if dense:
        return _dense_bytes(case.batch, length, heads, elem, train, eager=case.backend == "eager")
    # Local spans: the bias block (one copy per span unless all spans share it) and the int64 distances
    # built before sharing is detected (calibrated on measured peaks, see _dense_bytes).
    per_pair = heads * elem * (1 + (3 if train else 0)) + 32
    pairs = 0
    for b in range(layout.batch_size):
        glob = layout.global_spans[b]
        glob_len = glob[1] if glob is not None else 0
        spans = layout.local_spans[b]
        span_len = max((n for _, n in spans), default=0)
        pairs += len(spans) * span_len * (span_len + glob_len) + glob_len * int(layout.valid[b].sum())
    block_mask = 0
    if case.backend in ("flex", "triton", "triton-kernel"):
        pairs = 0  # block-sparse kernels: no per-pair tensors
    if case.backend == "flex":  # its block lists are quadratic in the number of 128-token blocks
        from saicl.attention.flex import block_mask_bytes, compile_settings

        padded = compile_settings(torch.device(case.device).type).pad(length)
        block_mask = block_mask_bytes(case.batch, padded, with_q_blocks=train)
    grids = 4 * case.batch * length * heads * case.head_dim * elem  # gathered q/k/v grids and the output
    return pairs * per_pair + grids + block_mask


def estimate_bytes(case: BenchCase) -> int:
    """Estimated total bytes one call of ``case`` needs (inputs, weights, activations, workspace)."""
    layout = case.counting_layout()
    elem = torch.empty(0, dtype=case.torch_dtype).element_size()
    tokens = case.batch * layout.length
    inner = case.heads * case.head_dim
    train = case.pass_ == "fwd+bwd"
    qkv = 4 * tokens * inner * elem
    attention = attention_workspace_bytes(case)
    if case.what == "attention":
        return qkv * (2 if train else 1) + attention
    config = case.model_config()
    layers = config.num_layers + config.num_decoder_layers
    per_layer = 4 * config.d_model * inner + 2 * config.d_model * config.d_ff
    cross = config.num_decoder_layers * 4 * config.d_model * inner
    params = config.vocab_size * config.d_model + layers * per_layer + cross
    weights = params * elem * (4 if train else 1)  # training: weights, gradients and a 2x margin
    # hidden states, q/k/v/output and the FFN intermediate alive at once (calibrated: 12.7 KB/token measured
    # for d_model 256, 4 x 64 heads, d_ff 1024, fp32, against 13.3 KB/token from this formula)
    per_token = (4 * config.d_model + 3 * inner + 1.5 * config.d_ff) * elem
    activations = tokens * per_token * (config.num_layers * 2 if train else 1)
    total = weights + activations + attention * (config.num_layers if train else 1)
    if case.what == "model":
        rows = case.n_options if not train else 1
        enc = case.batch * layout.length
        total += rows * enc * (config.d_model + 2 * inner) * elem  # repeated encoder states, cross K/V
        total += rows * enc * case.heads * case.option_len * elem * 3  # cross-attention scores
    return int(total)


def memory_limit_bytes(device: str) -> int:
    """Default budget: 85% of the memory available now (CPU) or of the GPU's total memory."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return int(0.85 * torch.cuda.get_device_properties(torch.device(device)).total_memory)
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in lines}
        return int(0.85 * min(info["MemAvailable"], info["MemTotal"]))
    except (OSError, KeyError, ValueError):
        return 8 * 1024**3


# ---------------------------------------------------------------------------------------------------
# Measurement


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def cpu_peak_supported() -> str | None:
    """``None`` if the CPU high-water-mark method works here, else why not."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        _proc_status_kb("VmHWM")
    except OSError as err:
        return f"cannot reset the resident-set high-water mark ({err}); needs Linux /proc"
    return None


def measure_cpu_peak(fn, warmup: bool = True) -> tuple[float, float]:
    """``(peak extra MiB of one call, baseline MiB)`` by the high-water-mark method (see module docstring)."""
    if warmup:
        fn()
    gc.collect()
    base_kb = _proc_status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    result = fn()
    peak_kb = _proc_status_kb("VmHWM")
    del result
    return max(0, peak_kb - base_kb) / 1024, base_kb / 1024


def measure_cuda_peak(fn, device: str, warmup: bool = True) -> float:
    """Peak extra MiB allocated by one call on CUDA (weights and inputs excluded)."""
    if warmup:
        fn()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del result
    return max(0, peak) / MB


def _worker(path: str) -> int:
    """Measure every case of the JSON file ``path`` ([{"case": row, "warmup": bool}, ...]); print results."""
    reason = cpu_peak_supported()
    for item in json.loads(Path(path).read_text()):
        case = BenchCase.from_row(item["case"])
        result = {"key": item["key"]}
        try:
            if reason is not None:
                raise RuntimeError(reason)
            fn = build_call(case, for_memory=True)
            result["peak_mem_mb"], result["base_mem_mb"] = measure_cpu_peak(fn, warmup=item.get("warmup", True))
            del fn
        except Exception as err:  # reported per case, the sweep goes on
            result["error"] = f"{type(err).__name__}: {err}"
        release_models()
        gc.collect()
        print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


def measure_cpu_cases(items: list[dict], timeout_s: float = 3600, progress=None) -> dict[str, dict]:
    """Run the CPU memory worker over ``items`` (``{"key", "case", "warmup"}``); restart it after a crash.

    Returns ``{key: {"peak_mem_mb", "base_mem_mb"} or {"error"}}``; a case during which the worker died
    (e.g. killed for memory) gets an ``error`` naming the exit code.
    """
    results: dict[str, dict] = {}
    pending = list(items)
    env = {**os.environ, **WORKER_ENV}
    deadline = time.monotonic() + timeout_s
    while pending:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
            json.dump(pending, handle)
            spec = handle.name
        try:
            proc = subprocess.Popen([sys.executable, "-m", "saicl.eval.memory", spec], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env)
            for line in proc.stdout:
                if line.startswith(RESULT_PREFIX):
                    result = json.loads(line[len(RESULT_PREFIX):])
                    results[result.pop("key")] = result
                    if progress is not None:
                        progress(1)
                if time.monotonic() > deadline:
                    proc.kill()
            proc.wait()
            stderr = proc.stderr.read()
        finally:
            os.unlink(spec)
        remaining = [item for item in pending if item["key"] not in results]
        if not remaining:
            break
        crashed = remaining[0]
        tail = stderr.strip().splitlines()[-1:] if stderr.strip() else []
        message = f"memory worker exited with code {proc.returncode} during this case"
        results[crashed["key"]] = {"error": message + (f": {tail[0]}" if tail else "")}
        if progress is not None:
            progress(1)
        pending = remaining[1:]
        if time.monotonic() > deadline:
            for item in pending:
                results[item["key"]] = {"error": "memory measurement timed out"}
            break
    return results


__all__ = [
    "MARGIN",
    "attention_workspace_bytes",
    "cpu_peak_supported",
    "estimate_bytes",
    "measure_cpu_cases",
    "measure_cpu_peak",
    "measure_cuda_peak",
    "memory_limit_bytes",
]


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
