"""TFLOP/s of structured encoder attention against the number of demonstrations (CUDA only).

Run (writes one CSV and one PNG per configuration into ``--out``, in the style of the Triton
tutorials' ``perf_report``)::

    python -m saicl.kernels.benchmark --out bench-kernels            # full sweep, bf16
    python -m saicl.kernels.benchmark --out bench-kernels --quick    # 16..128 demonstrations only

Configurations: demonstration and query length 64 and 128, head dim 64 and 128, 8 heads, batch 1,
forward and forward+backward, ``n_demos`` 16..1024. Providers: ``triton`` (this package), ``flex``
(``get_backend("flex")``), dense ``sdpa`` without bias (flash; a lower bound on dense cost) and
``sdpa-bias`` (dense SDPA with a float ``(B, H, L, L)`` T5 bias, what Hugging Face T5 does; skipped
once that bias would not fit). Throughput is always computed on the *structured* FLOPs (the pairs
``saicl`` allows), so the dense providers show the effective rate of doing the work they waste:
``fwd = 4 * pairs * head_dim * heads``, ``fwd+bwd = 3.5 * fwd`` (flash-attention's convention).
Timings from ``triton.testing.do_bench`` (median); the layout/plan build (once per forward, shared
by all layers) is outside the timed region. Importing this module never touches CUDA.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

DENSE_BIAS_MAX_BYTES = 8 * 2**30  # skip sdpa-bias when its (B, H, L, L) bias would exceed this
PROVIDERS = ["triton", "flex", "sdpa", "sdpa-bias"]


def structured_pairs(n_demos: int, demo_len: int, query_len: int) -> int:
    """Query-key pairs of one ``saicl`` episode (a demonstration sees itself and the query; the query all)."""
    demo_pairs = n_demos * demo_len * (demo_len + query_len)
    query_pairs = query_len * (n_demos * demo_len + query_len)
    return demo_pairs + query_pairs


def structured_flops(
    n_demos: int, demo_len: int, query_len: int, heads: int, head_dim: int, mode: str
) -> float:
    fwd = 4.0 * structured_pairs(n_demos, demo_len, query_len) * head_dim * heads
    return fwd * (3.5 if mode == "fwd+bwd" else 1.0)


def _make_bench(provider: str, n_demos: int, demo_len: int, query_len: int, heads: int, head_dim: int,
                mode: str, dtype: torch.dtype, device: str = "cuda"):
    """A zero-argument callable running one attention (and its backward), or ``None`` if skipped."""
    import torch.nn.functional as F

    from saicl.attention import get_backend
    from saicl.layout import build_layout
    from saicl.testing import random_table, segment_batch

    length = n_demos * demo_len + query_len
    mask, seg = segment_batch([[demo_len] * n_demos], [query_len])
    layout = build_layout(mask.to(device), seg.to(device), "saicl")
    shape = (1, length, heads, head_dim)
    needs_grad = mode == "fwd+bwd"
    # The table is a trained parameter: fwd+bwd includes its gradient (the dK/dV kernel's bias part).
    table = random_table(heads, 128, dtype=torch.float32).to(device).requires_grad_(needs_grad)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=needs_grad) for _ in range(3))
    grad = torch.randn(shape, device=device, dtype=dtype)

    if provider in ("triton", "flex"):
        backend = get_backend(provider, device)
        prepared = backend.prepare(layout, table)

        def run():
            return backend.attend(q, k, v, prepared)
    elif provider == "sdpa":
        def run():
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=1.0
            )
            return out.transpose(1, 2)
    elif provider == "sdpa-bias":
        if heads * length * length * torch.finfo(dtype).bits // 8 > DENSE_BIAS_MAX_BYTES:
            return None
        from saicl.attention.eager import dense_bias

        bias = dense_bias(layout, table.detach().to(dtype)).bias  # (1, H, L, L), mask folded in

        def run():
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias, scale=1.0
            )
            return out.transpose(1, 2)
    else:
        raise ValueError(f"unknown provider {provider!r}")

    if mode == "fwd":
        def step():
            with torch.no_grad():
                run()
    else:
        # The dense baselines take no table (sdpa) or a precomputed bias (sdpa-bias).
        grad_inputs = (q, k, v, table) if provider in ("triton", "flex") else (q, k, v)

        def step():
            out = run()
            torch.autograd.grad(out, grad_inputs, grad)
    return step


def _benchmarks(quick: bool, dtype: torch.dtype):
    import triton

    n_values = [16, 32, 64, 128] if quick else [16, 32, 64, 128, 256, 512, 1024]
    configs = []
    for mode in ("fwd", "fwd+bwd"):
        for seg_len in (64, 128):
            for head_dim in (64, 128):
                configs.append(triton.testing.Benchmark(
                    x_names=["n_demos"], x_vals=n_values, x_log=True,
                    line_arg="provider", line_vals=PROVIDERS, line_names=PROVIDERS,
                    styles=[("red", "-"), ("blue", "-"), ("green", "--"), ("black", ":")],
                    ylabel="TFLOP/s (structured FLOPs)",
                    plot_name=f"saicl-attention-{mode.replace('+', '-')}-len{seg_len}-d{head_dim}",
                    args=dict(demo_len=seg_len, query_len=seg_len, heads=8, head_dim=head_dim, mode=mode,
                              dtype=dtype),
                ))
    return configs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-kernels"), help="folder for CSVs and PNGs")
    parser.add_argument("--quick", action="store_true", help="only 16..128 demonstrations")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="input dtype")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("saicl.kernels.benchmark needs a CUDA GPU (the Triton kernels only run interpreted on CPU, "
              "which says nothing about speed); nothing was measured.", file=sys.stderr)
        return 2
    import triton

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]

    def bench(n_demos, provider, demo_len, query_len, heads, head_dim, mode, dtype):
        try:
            step = _make_bench(provider, n_demos, demo_len, query_len, heads, head_dim, mode, dtype)
        except torch.OutOfMemoryError:
            step = None
        if step is None:
            return float("nan")
        try:
            ms = triton.testing.do_bench(step)
        except torch.OutOfMemoryError:
            return float("nan")
        finally:
            torch.cuda.empty_cache()
        return structured_flops(n_demos, demo_len, query_len, heads, head_dim, mode) / ms * 1e-9

    args.out.mkdir(parents=True, exist_ok=True)
    perf = triton.testing.perf_report(_benchmarks(args.quick, dtype))(bench)
    perf.run(save_path=str(args.out), print_data=True)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"CSVs and PNGs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
