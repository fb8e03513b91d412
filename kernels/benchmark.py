"""The call ``saicl-bench`` times for the ``triton-kernel`` provider: the kernels alone, on packed tensors.

Tensor-only, like the rest of this package: the caller builds the :class:`~kernels.varlen.VarlenPlan` (the
model side packs an ``EncoderLayout`` with ``saicl.attention.triton.pack_layout``) and packed inputs; the
runner, FLOP count, percentiles and rows are ``saicl-bench``'s (``saicl-bench --what attention --backends
triton-kernel,triton,flex,sdpa,sdpa-bias --passes fwd,fwd+bwd``; docs/evaluation.md). Importing this module
never touches CUDA.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .attention import varlen_structured_attention
from .varlen import VarlenPlan

PASSES = ("fwd", "fwd+bwd")


def kernel_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, plan: VarlenPlan,
                pass_: str = "fwd", grad_out: torch.Tensor | None = None) -> Callable[[], object]:
    """A zero-argument callable running the structured attention kernels once.

    Args:
        q, k, v: ``(total_tokens, heads, head_dim)`` packed inputs (``plan.total_tokens`` rows).
        table: ``(heads, 2M+1)`` bias table; for ``fwd+bwd`` its gradient is computed when it requires grad
            (the table is a trained parameter: the dK/dV kernel's bias part is then part of the time).
        plan: the batch's plan (:func:`kernels.varlen.build_plan`), built once per forward pass, so outside
            the timed call.
        pass_: ``"fwd"`` (no autograd graph) or ``"fwd+bwd"`` (forward, then ``autograd.grad`` into q, k, v
            and, if it requires grad, the table).
        grad_out: ``(total_tokens, heads, head_dim)`` upstream gradient for ``fwd+bwd`` (default: ones).
    """
    if pass_ not in PASSES:
        raise ValueError(f"pass_={pass_!r}: expected one of {PASSES}")
    if pass_ == "fwd":

        def forward():
            with torch.no_grad():
                return varlen_structured_attention(q, k, v, table, plan)

        return forward
    inputs = tuple(t for t in (q, k, v, table) if t.requires_grad)
    if not inputs:
        raise ValueError("pass_='fwd+bwd' needs q, k, v (and optionally table) that require grad")
    upstream = torch.ones_like(q) if grad_out is None else grad_out

    def forward_backward():
        out = varlen_structured_attention(q, k, v, table, plan)
        return torch.autograd.grad(out, inputs, upstream)

    return forward_backward


__all__ = ["PASSES", "kernel_call"]


if __name__ == "__main__":  # the sweep that lived here is saicl-bench's attention level now
    import sys

    print("python -m saicl.kernels.benchmark moved to: saicl-bench --what attention --backends "
          "triton-kernel,triton,flex,sdpa,sdpa-bias --passes fwd,fwd+bwd [--full] (docs/evaluation.md)",
          file=sys.stderr)
    sys.exit(2)
