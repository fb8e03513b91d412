"""Forward kernel of structured (SAICL / FiD / full) encoder attention over packed tokens.

Math (T5 semantics: no ``1/sqrt(d)`` scaling), for a query token ``x`` and the keys ``y`` it may see::

    s[x, y]  = q[x] . k[y] + table[h, clamp(rel(x, y), -M, M) + M]
    rel(x,y) = position[y] - position[x] + shift[x] * is_query[y] - shift[y] * is_query[x]
    o[x]     = sum_y softmax_y(s[x, :]) v[y]          lse[x] = log2 sum_y exp(s[x, y])   (base 2)

One program per (tile, head). A tile is ``BLOCK_M`` consecutive packed rows of one episode; it walks
only the (at most two) key ranges of its plan row in ``BLOCK_N`` steps with an online exp2 softmax,
and masks every element with the row's own key ranges, so tiles whose rows straddle several
demonstrations are exact. No ``L x L`` tensor exists anywhere. The reference is the eager oracle,
:mod:`saicl.attention.eager`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from .varlen import VarlenPlan


@triton.jit
def load_fields(FIELDS, offs, mask, n_tokens):
    """Per-token fields of ``offs`` (masked tokens see no key: empty ranges)."""
    pos = tl.load(FIELDS + 0 * n_tokens + offs, mask=mask, other=0)
    shift = tl.load(FIELDS + 1 * n_tokens + offs, mask=mask, other=0)
    isq = tl.load(FIELDS + 2 * n_tokens + offs, mask=mask, other=0)
    a0 = tl.load(FIELDS + 3 * n_tokens + offs, mask=mask, other=0)
    a1 = tl.load(FIELDS + 4 * n_tokens + offs, mask=mask, other=0)
    b0 = tl.load(FIELDS + 5 * n_tokens + offs, mask=mask, other=0)
    b1 = tl.load(FIELDS + 6 * n_tokens + offs, mask=mask, other=0)
    return pos, shift, isq, a0, a1, b0, b1


@triton.jit
def pair_index_and_mask(
    pos_x, shift_x, isq_x, a0_x, a1_x, b0_x, b1_x, offs_y, pos_y, shift_y, isq_y, y_hi, max_distance
):
    """Bias-table column and visibility of every (row x, column y) pair of a block.

    Rows are queries, columns keys. ``y_hi`` bounds the key range being walked, so a key that the row
    may see but that belongs to the tile's other range is not counted twice.
    """
    rel = (
        pos_y[None, :] - pos_x[:, None]
        + shift_x[:, None] * isq_y[None, :]
        - shift_y[None, :] * isq_x[:, None]
    )
    idx = tl.minimum(tl.maximum(rel, -max_distance), max_distance) + max_distance
    y = offs_y[None, :]
    allowed = ((y >= a0_x[:, None]) & (y < a1_x[:, None])) | ((y >= b0_x[:, None]) & (y < b1_x[:, None]))
    allowed = allowed & (y < y_hi)
    return idx, allowed


@triton.jit
def _fwd_range(
    acc, l_i, m_i, q, pos_m, shift_m, isq_m, a0_m, a1_m, b0_m, b1_m,
    K, V, TABLE, FIELDS, k_lo, k_hi, h, stride_tok, stride_head, n_tokens, max_distance,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Online-softmax update of one tile over keys ``[k_lo, k_hi)``."""
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    for start in range(k_lo, k_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < k_hi
        kv_off = offs_n[:, None] * stride_tok + h * stride_head + offs_d[None, :]
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(ACC)
            v = v.to(ACC)
        pos_n, shift_n, isq_n, _a0, _a1, _b0, _b1 = load_fields(FIELDS, offs_n, mask_n, n_tokens)
        idx, allowed = pair_index_and_mask(
            pos_m, shift_m, isq_m, a0_m, a1_m, b0_m, b1_m, offs_n, pos_n, shift_n, isq_n, k_hi, max_distance
        )
        bias = tl.load(TABLE + h * (2 * max_distance + 1) + idx, mask=allowed, other=0.0).to(ACC)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) + bias
        s = tl.where(allowed, s * 1.4426950408889634, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION, out_dtype=ACC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, TABLE, OUT, LSE, FIELDS, TILES,
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

    offs_m = row0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < row1
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q_off = offs_m[:, None] * stride_tok + h * stride_head + offs_d[None, :]
    q_mask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(ACC)
    pos_m, shift_m, isq_m, a0_m, a1_m, b0_m, b1_m = load_fields(FIELDS, offs_m, mask_m, n_tokens)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    m_i = tl.zeros([BLOCK_M], dtype=ACC) - 1.0e30
    acc, l_i, m_i = _fwd_range(
        acc, l_i, m_i, q, pos_m, shift_m, isq_m, a0_m, a1_m, b0_m, b1_m,
        K, V, TABLE, FIELDS, k1_lo, k1_hi, h, stride_tok, stride_head, n_tokens, max_distance,
        HEAD_DIM, BLOCK_D, BLOCK_N, ACC, UPCAST, PRECISION,
    )
    acc, l_i, m_i = _fwd_range(
        acc, l_i, m_i, q, pos_m, shift_m, isq_m, a0_m, a1_m, b0_m, b1_m,
        K, V, TABLE, FIELDS, k2_lo, k2_hi, h, stride_tok, stride_head, n_tokens, max_distance,
        HEAD_DIM, BLOCK_D, BLOCK_N, ACC, UPCAST, PRECISION,
    )
    # Every valid row sees at least itself, so l_i > 0 there; the guard only keeps the rows past the
    # tile's end (never stored) free of 0/0.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(OUT + q_off, out.to(OUT.dtype.element_ty), mask=q_mask)
    tl.store(LSE + offs_m * n_heads + h, m_i + tl.log2(l_safe), mask=mask_m)


_FWD_CONFIGS = [
    triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bn in (32, 64, 128)
    for w in (4, 8)
    for s in (2, 3)
]
_tuned: dict[str, object] = {}


def _gpu_kernel(name: str, kernel, configs, key):
    """The autotuned variant of ``kernel`` (built lazily: autotuning needs a GPU)."""
    if name not in _tuned:
        _tuned[name] = triton.autotune(configs=configs, key=key)(kernel)
    return _tuned[name]


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
        q, k, v: ``(total_tokens, heads, head_dim)``, same dtype, contiguous.
        table: ``(heads, 2M+1)`` per-distance bias table (any float dtype; read as the accumulator dtype).
        plan: :func:`kernels.varlen.build_plan` of the layout.
        block_n: key block size; ``None`` autotunes on GPUs and uses 32 under the interpreter.
        out, lse: optional preallocated outputs (tests pass NaN-filled buffers).
    Returns:
        ``out`` ``(total_tokens, heads, head_dim)`` in q's dtype and ``lse`` ``(total_tokens, heads)``
        in the accumulator dtype, base-2 log-sum-exp of every row's scores (for the backward pass).
    """
    C.check_inputs(q, k, v, table)
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
    args = (q, k, v, table, out, lse, plan.fields, plan.tiles, q.stride(0), q.stride(1), n_tokens, n_heads,
            max_distance)
    meta = dict(
        HEAD_DIM=head_dim, BLOCK_D=C.block_d(head_dim), BLOCK_M=plan.block_m,
        ACC=C.acc_dtype(q.dtype), UPCAST=C.upcast_inputs(q.dtype), PRECISION=C.dot_precision(q.dtype),
    )
    if block_n is None and not C.INTERPRETED:
        _gpu_kernel("fwd", _fwd_kernel, _FWD_CONFIGS, ["HEAD_DIM", "BLOCK_M"])[grid](*args, **meta)
    else:
        _fwd_kernel[grid](*args, **meta, BLOCK_N=block_n or C.INTERPRETER_BLOCK_N)
    return out, lse


