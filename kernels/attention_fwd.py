"""Forward kernel of structured (SAICL / FiD / full) encoder attention over packed tokens.

Math (T5 semantics: no ``1/sqrt(d)`` scaling), for a query token ``x`` and the keys ``y`` it may see::

    s[x, y]  = q[x] . k[y] + table[h, clamp(rel(x, y), -M, M) + M]
    rel(x,y) = position[y] - position[x] + shift[x] * is_query[y] - shift[y] * is_query[x]
    o[x]     = sum_y softmax_y(s[x, :]) v[y]          lse[x] = log2 sum_y exp(s[x, y])   (base 2)

One program per (tile, head). A tile is ``BLOCK_M`` consecutive packed rows of one episode; it walks
only the (at most two) key ranges of its plan row in ``BLOCK_N`` steps (one loop over both) with an
online exp2 softmax,
and masks every element with the row's own key ranges, so tiles whose rows straddle several
demonstrations are exact. No ``L x L`` tensor exists anywhere. Row fields and ranges are loaded once
per tile; a key block loads only its keys' three fields.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from .configs import autotuned
from .varlen import VarlenPlan


@triton.jit
def _fwd_kernel(
    Q, K, V, TABLE, OUT, LSE, FIELDS, RANGES, TILES,
    stride_tok, stride_head, n_tokens, n_heads, max_distance,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    h = tl.program_id(1)
    offs_m, mask_m, v0_m, v1_m, q_base, q_tile, q_mask, kv_tile, mask_d, walk, n_blocks = C.plan_tile(
        TILES, FIELDS, tl.program_id(0), h, n_tokens, stride_tok, stride_head, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D)
    q = C.load_tile(Q + q_base, q_tile, q_mask, ACC, UPCAST)
    table_row = TABLE + h * (2 * max_distance + 1)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    # Finite start: a block in which a row sees no key yields p = 0, not NaN.
    m_i = tl.zeros([BLOCK_M], dtype=ACC) - 1.0e30
    for j in range(0, n_blocks):
        k, v, bias = C.key_block(j, walk, h, K, V, FIELDS, RANGES, table_row, offs_m, v0_m, v1_m, kv_tile, mask_d,
                                 n_tokens, stride_tok, stride_head, max_distance, BLOCK_N, ACC, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) + bias
        s = s * 1.4426950408889634
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION, out_dtype=ACC)
        m_i = m_new
    # Every valid row sees at least itself, so l_i > 0 there; the guard only keeps the rows past the
    # tile's end (never stored) free of 0/0.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(OUT + q_base + q_tile, out.to(OUT.dtype.element_ty), mask=q_mask)
    tl.store(LSE + offs_m * n_heads + h, m_i + tl.log2(l_safe), mask=mask_m)


def forward_meta(dtype: torch.dtype, head_dim: int, block_m: int, interpreted: bool = C.INTERPRETED) -> dict:
    """Constexpr arguments of :func:`_fwd_kernel` for inputs of ``dtype`` (shared with the AOT report)."""
    return dict(
        HEAD_DIM=head_dim, BLOCK_D=C.block_d(head_dim), BLOCK_M=block_m, ACC=C.acc_dtype(dtype),
        UPCAST=C.upcast_inputs(dtype, interpreted), PRECISION=C.dot_precision(dtype, interpreted),
    )


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: torch.Tensor,
    plan: VarlenPlan,
    *,
    block_n: int | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on packed inputs.

    Args:
        q, k, v: ``(total_tokens, heads, head_dim)``, same dtype.
        table: ``(heads, 2M+1)`` per-distance bias table (any float dtype; read as the accumulator dtype).
        plan: :func:`kernels.varlen.build_plan` of the batch.
        block_n: key block size; ``None`` autotunes on GPUs and uses 64 under the interpreter.
        out, lse: optional preallocated outputs (tests pass NaN-filled buffers).
    Returns:
        ``out`` ``(total_tokens, heads, head_dim)`` in q's dtype and ``lse`` ``(total_tokens, heads)``
        in the accumulator dtype, base-2 log-sum-exp of every row's scores (for the backward pass).
    """
    C.check_inputs(q, k, v, table)
    check_plan(plan, q)
    q, k, v = (t.contiguous() for t in (q, k, v))
    table = table.contiguous()
    n_tokens, n_heads, head_dim = q.shape
    if out is None:
        out = torch.empty_like(q)
    if lse is None:
        lse = torch.empty(n_tokens, n_heads, dtype=C.torch_acc_dtype(q.dtype), device=q.device)
    if plan.num_tiles == 0:
        return out, lse
    max_distance = (table.shape[1] - 1) // 2
    grid = (plan.num_tiles, n_heads)
    args = (q, k, v, table, out, lse, plan.fields, plan.ranges, plan.tiles, q.stride(0), q.stride(1), n_tokens,
            n_heads, max_distance)
    meta = forward_meta(q.dtype, head_dim, plan.block_m)
    if block_n is None and not C.INTERPRETED:
        autotuned("forward", _fwd_kernel)[grid](*args, **meta)
    else:
        _fwd_kernel[grid](*args, **meta, BLOCK_N=block_n or C.INTERPRETER_BLOCK_N)
    return out, lse


def check_plan(plan: VarlenPlan, q: torch.Tensor) -> None:
    """Raise ValueError if the plan was built for another token count or lives on another device."""
    if plan.total_tokens != q.shape[0]:
        raise ValueError(f"plan is for {plan.total_tokens} packed tokens, q has {q.shape[0]}")
    if plan.device != q.device:
        raise ValueError(f"plan is on {plan.device}, q on {q.device}: build the plan on q's device")
