"""Backward kernels of structured encoder attention: dQ, dK, dV and the bias-table gradient.

With ``p = exp(s - lse)`` recomputed from the saved base-2 log-sum-exp, ``dp = dO v^T`` and
``delta = rowsum(dO * O)``::

    ds = p * (dp - delta)        dq = ds k        dk = ds^T q        dv = p^T dO
    dtable[h, c] = sum over visible pairs (x, y) with clamp(rel(x, y), -M, M) + M == c of ds[x, y]

Two kernels, both one program per (tile, head), no atomics:

* ``_bwd_dq_kernel``: a query tile walks its key ranges exactly as the forward does.
* ``_bwd_dkdv_kernel``: a *key* tile walks the query rows that can see it. Visibility is symmetric
  (see :mod:`kernels.varlen`), so those rows are the tile's own plan ranges; elements are masked
  with the query rows' ranges, i.e. the forward's definition. It also accumulates the bias-table
  gradient of its pairs in registers: the column ``c = hi * LO + lo`` of every pair is one-hot
  encoded twice and ``hist[hi, lo] += onehot_hi^T (ds * onehot_lo)`` is one small matmul per block
  (exact: one-hots are 0/1). Each program writes its own row of a ``(tiles, heads, HI * LO)``
  partial buffer, summed afterwards in a fixed order by torch: deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from .attention_fwd import _gpu_kernel, load_fields, pair_index_and_mask
from .varlen import VarlenPlan


@triton.jit
def _bwd_dq_range(
    dq, q, do, lse, delta, pos_m, shift_m, isq_m, a0_m, a1_m, b0_m, b1_m,
    K, V, TABLE, FIELDS, k_lo, k_hi, h, stride_tok, stride_head, n_tokens, max_distance,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
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
        p = tl.where(allowed, tl.exp2(s * 1.4426950408889634 - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION, out_dtype=ACC)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, TABLE, DO, LSE, DELTA, DQ, FIELDS, TILES,
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
    do = tl.load(DO + q_off, mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(ACC)
        do = do.to(ACC)
    lse = tl.load(LSE + offs_m * n_heads + h, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + offs_m * n_heads + h, mask=mask_m, other=0.0)
    pos_m, shift_m, isq_m, a0_m, a1_m, b0_m, b1_m = load_fields(FIELDS, offs_m, mask_m, n_tokens)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    dq = _bwd_dq_range(
        dq, q, do, lse, delta, pos_m, shift_m, isq_m, a0_m, a1_m, b0_m, b1_m,
        K, V, TABLE, FIELDS, k1_lo, k1_hi, h, stride_tok, stride_head, n_tokens, max_distance,
        HEAD_DIM, BLOCK_D, BLOCK_N, ACC, UPCAST, PRECISION,
    )
    dq = _bwd_dq_range(
        dq, q, do, lse, delta, pos_m, shift_m, isq_m, a0_m, a1_m, b0_m, b1_m,
        K, V, TABLE, FIELDS, k2_lo, k2_hi, h, stride_tok, stride_head, n_tokens, max_distance,
        HEAD_DIM, BLOCK_D, BLOCK_N, ACC, UPCAST, PRECISION,
    )
    tl.store(DQ + q_off, dq.to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _bwd_dkdv_range(
    dk, dv, hist, k, v, offs_m, mask_m, pos_m, shift_m, isq_m,
    Q, DO, LSE, DELTA, TABLE, FIELDS, q_lo, q_hi, h, stride_tok, stride_head, n_tokens, n_heads, max_distance,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    DBIAS: tl.constexpr, HIST_HI: tl.constexpr, HIST_LO: tl.constexpr,
):
    """Accumulate dK, dV (and the bias histogram) of key tile rows ``offs_m`` over queries ``[q_lo, q_hi)``.

    Blocks are laid out (query, key): rows are the ``BLOCK_N`` queries, columns the tile's keys.
    """
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    for start in range(q_lo, q_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < q_hi
        q_off = offs_n[:, None] * stride_tok + h * stride_head + offs_d[None, :]
        q_mask = mask_n[:, None] & mask_d[None, :]
        q = tl.load(Q + q_off, mask=q_mask, other=0.0)
        do = tl.load(DO + q_off, mask=q_mask, other=0.0)
        if UPCAST:
            q = q.to(ACC)
            do = do.to(ACC)
        lse = tl.load(LSE + offs_n * n_heads + h, mask=mask_n, other=0.0)
        delta = tl.load(DELTA + offs_n * n_heads + h, mask=mask_n, other=0.0)
        pos_n, shift_n, isq_n, a0_n, a1_n, b0_n, b1_n = load_fields(FIELDS, offs_n, mask_n, n_tokens)
        # Queries are rows here: the mask is "key column in the query row's ranges", the forward's rule.
        idx, allowed = pair_index_and_mask(
            pos_n, shift_n, isq_n, a0_n, a1_n, b0_n, b1_n,
            offs_m, pos_m, shift_m, isq_m, n_tokens, max_distance,
        )
        allowed = allowed & mask_m[None, :]
        bias = tl.load(TABLE + h * (2 * max_distance + 1) + idx, mask=allowed, other=0.0).to(ACC)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) + bias
        p = tl.where(allowed, tl.exp2(s * 1.4426950408889634 - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION, out_dtype=ACC)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION, out_dtype=ACC)
        if DBIAS:
            flat_idx = tl.reshape(idx, (BLOCK_N * BLOCK_M,))
            flat_ds = tl.reshape(ds, (BLOCK_N * BLOCK_M,))
            # Built directly as (HIST_HI, pairs): no transpose before the dot.
            hot_hi = (tl.arange(0, HIST_HI)[:, None] == (flat_idx // HIST_LO)[None, :]).to(ACC)
            hot_lo = (flat_idx % HIST_LO)[:, None] == tl.arange(0, HIST_LO)[None, :]
            weighted_lo = tl.where(hot_lo, flat_ds[:, None], 0.0).to(ACC)
            hist += tl.dot(hot_hi, weighted_lo, input_precision=PRECISION, out_dtype=ACC)
    return dk, dv, hist


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, TABLE, DO, LSE, DELTA, DK, DV, DTABLE_PARTIAL, FIELDS, TILES,
    stride_tok, stride_head, n_tokens, n_heads, max_distance,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    DBIAS: tl.constexpr, HIST_HI: tl.constexpr, HIST_LO: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    row0 = tl.load(TILES + tile * 6 + 0)
    row1 = tl.load(TILES + tile * 6 + 1)
    q1_lo = tl.load(TILES + tile * 6 + 2)
    q1_hi = tl.load(TILES + tile * 6 + 3)
    q2_lo = tl.load(TILES + tile * 6 + 4)
    q2_hi = tl.load(TILES + tile * 6 + 5)

    offs_m = row0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < row1
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    kv_off = offs_m[:, None] * stride_tok + h * stride_head + offs_d[None, :]
    kv_mask = mask_m[:, None] & mask_d[None, :]
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(ACC)
        v = v.to(ACC)
    pos_m, shift_m, isq_m, _a0, _a1, _b0, _b1 = load_fields(FIELDS, offs_m, mask_m, n_tokens)

    dk = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    hist = tl.zeros([HIST_HI, HIST_LO], dtype=ACC)
    dk, dv, hist = _bwd_dkdv_range(
        dk, dv, hist, k, v, offs_m, mask_m, pos_m, shift_m, isq_m,
        Q, DO, LSE, DELTA, TABLE, FIELDS, q1_lo, q1_hi, h, stride_tok, stride_head, n_tokens, n_heads,
        max_distance, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, ACC, UPCAST, PRECISION, DBIAS, HIST_HI, HIST_LO,
    )
    dk, dv, hist = _bwd_dkdv_range(
        dk, dv, hist, k, v, offs_m, mask_m, pos_m, shift_m, isq_m,
        Q, DO, LSE, DELTA, TABLE, FIELDS, q2_lo, q2_hi, h, stride_tok, stride_head, n_tokens, n_heads,
        max_distance, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, ACC, UPCAST, PRECISION, DBIAS, HIST_HI, HIST_LO,
    )
    tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)
    if DBIAS:
        cols = tl.arange(0, HIST_HI)[:, None] * HIST_LO + tl.arange(0, HIST_LO)[None, :]
        tl.store(DTABLE_PARTIAL + (tile * n_heads + h) * (HIST_HI * HIST_LO) + cols, hist)


_BWD_CONFIGS = [
    triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bn in (16, 32, 64)
    for w in (4, 8)
    for s in (1, 2)
]


def attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    plan: VarlenPlan,
    *,
    table_grad: bool = True,
    block_n: int | None = None,
    dq: torch.Tensor | None = None,
    dk: torch.Tensor | None = None,
    dv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the backward kernels on packed tensors.

    Args:
        do: ``(total_tokens, heads, head_dim)`` gradient of the output.
        q, k, v, table, plan: as given to :func:`kernels.attention_fwd.attention_forward`.
        out, lse: its outputs.
        table_grad: compute the bias-table gradient (skipped work otherwise).
        block_n: inner block size; ``None`` autotunes on GPUs and uses 32 under the interpreter.
        dq, dk, dv: optional preallocated outputs (tests pass NaN-filled buffers).
    Returns:
        ``dq, dk, dv`` in q's dtype and the table gradient ``(heads, 2M+1)`` in the table's dtype
        (``None`` when ``table_grad`` is False).
    """
    C.check_inputs(q, k, v, table)
    do, q, k, v, out = (t.contiguous() for t in (do, q, k, v, out))
    table = table.contiguous()
    n_tokens, n_heads, head_dim = q.shape
    acc = C.torch_acc_dtype(q.dtype)
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    n_columns = table.shape[1]
    max_distance = (n_columns - 1) // 2
    hist_hi, hist_lo = C.hist_shape(n_columns)
    partial = torch.empty(
        (max(plan.num_tiles, 1) if table_grad else 1, n_heads, hist_hi * hist_lo), dtype=acc, device=q.device
    )
    if plan.num_tiles == 0:
        dtable = torch.zeros_like(table) if table_grad else None
        return dq, dk, dv, dtable
    # delta = rowsum(dO * O): O(tokens * dim), cheaper in torch than as a third kernel.
    delta = (do.to(acc) * out.to(acc)).sum(-1).contiguous()
    grid = (plan.num_tiles, n_heads)
    meta = dict(
        HEAD_DIM=head_dim, BLOCK_D=C.block_d(head_dim), BLOCK_M=plan.block_m,
        ACC=C.acc_dtype(q.dtype), UPCAST=C.upcast_inputs(q.dtype), PRECISION=C.dot_precision(q.dtype),
    )
    common = (plan.fields, plan.tiles, q.stride(0), q.stride(1), n_tokens, n_heads, max_distance)
    dq_args = (q, k, v, table, do, lse, delta, dq, *common)
    dkdv_args = (q, k, v, table, do, lse, delta, dk, dv, partial, *common)
    dkdv_meta = dict(meta, DBIAS=table_grad, HIST_HI=hist_hi, HIST_LO=hist_lo)
    if block_n is None and not C.INTERPRETED:
        _gpu_kernel("bwd_dq", _bwd_dq_kernel, _BWD_CONFIGS, ["HEAD_DIM", "BLOCK_M"])[grid](*dq_args, **meta)
        _gpu_kernel("bwd_dkdv", _bwd_dkdv_kernel, _BWD_CONFIGS, ["HEAD_DIM", "BLOCK_M", "DBIAS"])[grid](
            *dkdv_args, **dkdv_meta
        )
    else:
        bn = block_n or C.INTERPRETER_BLOCK_N
        _bwd_dq_kernel[grid](*dq_args, **meta, BLOCK_N=bn)
        _bwd_dkdv_kernel[grid](*dkdv_args, **dkdv_meta, BLOCK_N=bn)
    dtable = None
    if table_grad:
        # Fixed-order reduction over programs: deterministic, unlike float atomics.
        dtable = partial.sum(0)[:, :n_columns].to(table.dtype)
    return dq, dk, dv, dtable
