"""Autograd wrapper and public function of the structured attention kernels (tensors only).

Layers (as in flash-attention): raw launchers (:mod:`kernels.attention_fwd`,
:mod:`kernels.attention_bwd`), then :class:`StructuredAttentionFunction`, then the typed public
function :func:`varlen_structured_attention` on packed inputs and a :class:`~kernels.varlen.VarlenPlan`.
The model-side adapter (packing an ``EncoderLayout``) is ``saicl.attention.triton``.
"""

from __future__ import annotations

import torch

from .attention_bwd import attention_backward
from .attention_fwd import attention_forward
from .varlen import VarlenPlan, build_plan

__all__ = ["StructuredAttentionFunction", "VarlenPlan", "build_plan", "varlen_structured_attention"]


class StructuredAttentionFunction(torch.autograd.Function):
    """Packed structured attention; differentiable in ``q``, ``k``, ``v`` and ``table``."""

    @staticmethod
    def forward(ctx, q, k, v, table, plan: VarlenPlan, block_n: int | None, deterministic: bool | None):
        out, lse = attention_forward(q, k, v, table, plan, block_n=block_n)
        ctx.save_for_backward(q, k, v, table, out, lse)
        ctx.plan = plan
        ctx.block_n = block_n
        ctx.deterministic = deterministic
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, table, out, lse = ctx.saved_tensors
        deterministic = ctx.deterministic
        if deterministic is None:
            deterministic = torch.are_deterministic_algorithms_enabled()
        dq, dk, dv, dtable = attention_backward(
            grad_out, q, k, v, table, out, lse, ctx.plan,
            table_grad=ctx.needs_input_grad[3], deterministic=deterministic, block_n=ctx.block_n,
        )
        return dq, dk, dv, dtable, None, None, None


def varlen_structured_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: torch.Tensor,
    plan: VarlenPlan,
    *,
    block_n: int | None = None,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """Structured attention over packed tokens (no ``L x L`` tensor, excluded key blocks skipped).

    Args:
        q, k, v: ``(total_tokens, heads, head_dim)``, one dtype among fp16, bf16, fp32 (fp64 too,
            meant for the interpreter and gradcheck); ``head_dim <= 256`` (any value: it is padded
            to a power of two >= 16 and masked). ``total_tokens == plan.total_tokens``.
        table: ``(heads, 2M+1)`` per-distance T5 bias table; entry ``[h, clamp(rel, -M, M) + M]`` is
            added to the score. No ``1/sqrt(d)`` scaling.
        plan: :func:`kernels.varlen.build_plan` of the batch (who sees whom, relative positions).
        block_n: inner block size; ``None``: autotuned on GPUs, 64 under the interpreter.
        deterministic: table gradient summed exactly in int64 fixed point (bitwise reproducible)
            instead of with fp32 atomics (the default: cheapest, last bits vary from run to run);
            ``None`` follows ``torch.are_deterministic_algorithms_enabled()``.
    Returns:
        ``(total_tokens, heads, head_dim)`` in q's dtype. Accumulation is in fp32 (fp64 for fp64).
        ``total_tokens == 0`` returns an empty tensor. Gradients flow to q, k, v and table; the
        table gradient is computed only when the table requires grad.
    """
    return StructuredAttentionFunction.apply(q, k, v, table, plan, block_n, deterministic)
