"""Autograd wrapper and public functions of the structured attention kernels.

Layers (as in flash-attention): raw launchers (:mod:`kernels.attention_fwd`,
:mod:`kernels.attention_bwd`), then :class:`StructuredAttentionFunction`, then the typed public
functions :func:`varlen_structured_attention` (packed inputs) and :func:`saicl_attention`
(``(batch, length, heads, head_dim)`` inputs plus an :class:`~saicl.layout.EncoderLayout`).
"""

from __future__ import annotations

import torch

from saicl.layout import EncoderLayout

from . import _common as C
from .attention_bwd import attention_backward
from .attention_fwd import attention_forward
from .varlen import VarlenPlan, build_plan


class StructuredAttentionFunction(torch.autograd.Function):
    """Packed structured attention; differentiable in ``q``, ``k``, ``v`` and ``table``."""

    @staticmethod
    def forward(ctx, q, k, v, table, plan: VarlenPlan, block_n: int | None):
        out, lse = attention_forward(q, k, v, table, plan, block_n=block_n)
        ctx.save_for_backward(q, k, v, table, out, lse)
        ctx.plan = plan
        ctx.block_n = block_n
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, table, out, lse = ctx.saved_tensors
        dq, dk, dv, dtable = attention_backward(
            grad_out, q, k, v, table, out, lse, ctx.plan,
            table_grad=ctx.needs_input_grad[3], block_n=ctx.block_n,
        )
        return dq, dk, dv, dtable, None, None


def varlen_structured_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: torch.Tensor,
    plan: VarlenPlan,
    *,
    block_n: int | None = None,
) -> torch.Tensor:
    """Structured attention over packed tokens (no ``L x L`` tensor, excluded key blocks skipped).

    Args:
        q, k, v: ``(total_tokens, heads, head_dim)``, one dtype among fp16, bf16, fp32 (fp64 too,
            meant for the interpreter and gradcheck); ``head_dim <= 256`` (any value: it is padded
            to a power of two >= 16 and masked). ``total_tokens == plan.total_tokens``.
        table: ``(heads, 2M+1)`` per-distance T5 bias table (:func:`saicl.positions.bias_table`);
            entry ``[h, clamp(rel, -M, M) + M]`` is added to the score. No ``1/sqrt(d)`` scaling.
        plan: :func:`kernels.varlen.build_plan` of the layout (who sees whom, relative positions).
        block_n: inner block size; ``None``: autotuned on GPUs, 32 under the interpreter.
    Returns:
        ``(total_tokens, heads, head_dim)`` in q's dtype. Accumulation is in fp32 (fp64 for fp64).
        Every token sees at least itself, so no row is empty; ``total_tokens == 0`` returns an empty
        tensor. Gradients flow to q, k, v and table (the table gradient is deterministic).
    """
    return StructuredAttentionFunction.apply(q, k, v, table, plan, block_n)


def saicl_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: EncoderLayout,
    table: torch.Tensor,
    *,
    plan: VarlenPlan | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Encoder attention of a layout (``saicl``, ``fid`` or ``full``) with the Triton kernels.

    Args:
        q, k, v: ``(batch, length, heads, head_dim)`` with ``(batch, length)`` the layout's shape
            (for ``fid`` the expanded pair sequence).
        layout: :func:`saicl.layout.build_layout` output.
        table: ``(heads, 2M+1)`` per-distance bias table.
        plan: a plan built earlier for this layout (reuse it across layers); built here if ``None``.
        block_m: tile size when the plan is built here (default: 64 on GPUs, 32 interpreted).
        block_n: see :func:`varlen_structured_attention`.
    Returns:
        ``(batch, length, heads, head_dim)``; padding rows are zero. Episodes with zero
        demonstrations are plain attention over the query.
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            "q, k, v must all be (batch, length, heads, head_dim); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if plan is None:
        plan = build_plan(layout, block_m or C.default_block_m())
    if q.shape[:2] != (plan.batch, plan.length):
        raise ValueError(
            f"q has (batch, length) = {tuple(q.shape[:2])}, the plan ({plan.batch}, {plan.length})"
        )
    packed = [plan.pack(t).contiguous() for t in (q, k, v)]
    out = varlen_structured_attention(*packed, table, plan, block_n=block_n)
    return plan.unpack(out)
