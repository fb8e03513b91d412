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
    tile = tl.program_id(0)
    h = tl.program_id(1)
    row0 = tl.load(TILES + tile * 6 + 0)
    row1 = tl.load(TILES + tile * 6 + 1)
    k1_lo = tl.load(TILES + tile * 6 + 2)
    k1_hi = tl.load(TILES + tile * 6 + 3)
    k2_lo = tl.load(TILES + tile * 6 + 4)
    k2_hi = tl.load(TILES + tile * 6 + 5)

    rows = tl.arange(0, BLOCK_M)
    offs_m = row0 + rows
    mask_m = offs_m < row1
    cols = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    # Offsets inside a tile stay int32 (< BLOCK * stride_tok); the tile's base is int64.
    q_base = C.token_offset(row0, stride_tok) + h * stride_head
    q_tile = rows[:, None] * stride_tok + offs_d[None, :]
    q_mask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + q_base + q_tile, mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(ACC)
    v0_m, v1_m = C.load_tile_fields(FIELDS, offs_m, mask_m, n_tokens)
    kv_tile = cols[:, None] * stride_tok + offs_d[None, :]
    table_row = TABLE + h * (2 * max_distance + 1)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    # Finite start: a block in which a row sees no key yields p = 0, not NaN.
    m_i = tl.zeros([BLOCK_M], dtype=ACC) - 1.0e30
    blocks1 = tl.cdiv(k1_hi - k1_lo, BLOCK_N)
    for j in range(0, blocks1 + tl.cdiv(k2_hi - k2_lo, BLOCK_N)):
        start, _k_lo, k_hi = C.walk_block(j, blocks1, k1_lo, k1_hi, k2_lo, k2_hi, BLOCK_N)
        offs_n = start + cols
        mask_n = offs_n < k_hi
        kv_base = C.token_offset(start, stride_tok) + h * stride_head
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + kv_base + kv_tile, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_base + kv_tile, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(ACC)
            v = v.to(ACC)
        v0_n, v1_n = C.load_tile_fields(FIELDS, offs_n, mask_n, n_tokens)
        # Keys past k_hi (the tile's other range, or nothing) get empty ranges: never visible here.
        a0_n, len_a, b0_n, len_b = C.key_ranges(RANGES, offs_n, mask_n, 0, n_tokens)
        idx = C.bias_index(v0_m, v1_m, v0_n, v1_n, max_distance, True)
        allowed = C.in_ranges(offs_m, a0_n, len_a, b0_n, len_b, True)
        # idx is a valid column even for invisible pairs: an unmasked gather (a masked one costs registers).
        # The mask is folded into the bias (-inf), so that it never exists in the dot's register layout.
        bias = tl.where(allowed, tl.load(table_row + idx).to(ACC), float("-inf"))
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
