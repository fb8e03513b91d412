"""Backward kernels of structured encoder attention: dQ, dK, dV and the bias-table gradient.

With ``p = exp(s - lse)`` recomputed from the saved base-2 log-sum-exp, ``dp = dO v^T`` and
``delta = rowsum(dO * O)``::

    ds = p * (dp - delta)        dq = ds k        dk = ds^T q        dv = p^T dO
    dtable[h, c] = sum over visible pairs (x, y) with clamp(rel(x, y), -M, M) + M == c of ds[x, y]

Two kernels, both one program per (tile, head):

* ``_bwd_dq_kernel``: a query tile walks its key ranges exactly as the forward does (one loop over
  both ranges).
* ``_bwd_dkdv_kernel``: a *key* tile walks the query rows that can see it. Visibility is symmetric
  (see :mod:`kernels.varlen`), so those rows are the tile's own plan ranges, and a query sees a key
  of the tile iff it lies in that key's ranges. It also produces the bias-table gradient, in one of
  two ways (constexpr ``DBIAS``):

  - ``DBIAS_ATOMIC`` (default): every visible pair adds its ``ds`` to ``dtable[h, c]`` with a fp32
    atomic (``red.global.add``, no return value). Nothing extra lives in registers; the summation
    order, hence the last bits, vary from run to run.
  - ``DBIAS_DETERMINISTIC``: the same scatter, but of ``ds`` in 64-bit fixed point (``ds * scale``
    rounded toward zero, ``int64`` atomics). Integer addition is associative, so the result is bitwise
    reproducible whatever the order. ``scale = 2**61 / B`` with ``B = 2 * sum_i |dO_i| * max_j |v_j|``
    (all heads), a bound on ``sum |ds|`` since ``|dp_ij| <= |dO_i| |v_j|``, ``|delta_i| <= max_j |dp_ij|``
    and ``sum_j p_ij = 1``: the sum cannot overflow, and its quantum ``B / 2**61`` is far below fp32
    rounding. Costs the same as the atomic path (64-bit atomics, one conversion).

  Neither holds a one-hot ``(pairs x columns)`` matrix, which is what made the earlier formulation
  spill tens of KB per thread and exceed the shared memory of an A100.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from .attention_fwd import check_plan
from .configs import DKDV_VARIANTS, autotuned, device_capability, dkdv_launches
from .varlen import VarlenPlan

# Fixed-point scale of the deterministic table gradient: 2**61 / (bound on the sum of |ds|), leaving a
# factor 4 of headroom below int64's 2**63 for fp32 rounding of p and of the bound.
FIXED_POINT_RANGE = 2.0**61


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, TABLE, DO, LSE, DELTA, DQ, FIELDS, RANGES, TILES,
    stride_tok, stride_head, n_tokens, n_heads, max_distance,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    h = tl.program_id(1)
    offs_m, mask_m, v0_m, v1_m, q_base, q_tile, q_mask, kv_tile, mask_d, walk, n_blocks = C.plan_tile(
        TILES, FIELDS, tl.program_id(0), h, n_tokens, stride_tok, stride_head, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D)
    q = C.load_tile(Q + q_base, q_tile, q_mask, ACC, UPCAST)
    do = C.load_tile(DO + q_base, q_tile, q_mask, ACC, UPCAST)
    lse, delta = C.load_row_stats(LSE, DELTA, offs_m, mask_m, n_heads, h)
    table_row = TABLE + h * (2 * max_distance + 1)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for j in range(0, n_blocks):
        k, v, bias = C.key_block(j, walk, h, K, V, FIELDS, RANGES, table_row, offs_m, v0_m, v1_m, kv_tile, mask_d,
                                 n_tokens, stride_tok, stride_head, max_distance, BLOCK_N, ACC, UPCAST)
        # dp before s: p is consumed at once, one fewer (rows x keys) tensor alive (no spill on sm_80).
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION, out_dtype=ACC) - delta[:, None]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) + bias
        ds = tl.exp2(s * 1.4426950408889634 - lse[:, None]) * dp  # 0 for invisible pairs (s = -inf)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION, out_dtype=ACC)
    tl.store(DQ + q_base + q_tile, dq.to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, TABLE, DO, LSE, DELTA, DK, DV, DTABLE, FIELDS, RANGES, TILES,
    SCALE, stride_tok, stride_head, n_tokens, n_heads, max_distance,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    DBIAS: tl.constexpr, PARTS: tl.constexpr,
):
    """dK, dV (and the bias gradient) of one key tile: walks the queries that see it.

    ``PARTS``: 3 computes both; 1 only dV (no bias gradient); 2 only dK and the bias gradient.
    ``DTABLE``: ``(heads, 2M+1)`` fp32 (atomic) or int64 (deterministic, fixed point) accumulator;
    ``SCALE``: one fp32, the fixed-point scale (read only in deterministic mode).
    Blocks are laid out (query, key): rows are the ``BLOCK_N`` queries, columns the tile's keys.
    """
    h = tl.program_id(1)
    # The tile's rows are keys here; the walk is over the query rows that see them.
    offs_m, mask_m, v0_m, v1_m, kv_base, kv_tile, kv_mask, q_tile, mask_d, walk, n_blocks = C.plan_tile(
        TILES, FIELDS, tl.program_id(0), h, n_tokens, stride_tok, stride_head, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D)
    k = C.load_tile(K + kv_base, kv_tile, kv_mask, ACC, UPCAST)
    v = C.load_tile(V + kv_base, kv_tile, kv_mask, ACC, UPCAST)
    n_columns = 2 * max_distance + 1
    table_row = TABLE + h * n_columns
    if DBIAS == 2:
        fixed_point_scale = tl.load(SCALE)

    dk = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for j in range(0, n_blocks):
        q, do, lse, delta, bias, idx = C.query_block(
            j, walk, h, Q, DO, LSE, DELTA, FIELDS, RANGES, table_row, offs_m, mask_m, v0_m, v1_m, q_tile, mask_d,
            n_tokens, n_heads, stride_tok, stride_head, max_distance, BLOCK_N, ACC, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) + bias
        p = tl.exp2(s * 1.4426950408889634 - lse[:, None])  # 0 for invisible pairs (s = -inf)
        if PARTS & 1:
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION, out_dtype=ACC)
        if PARTS & 2:
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION, out_dtype=ACC)
            ds = p * (dp - delta[:, None])  # exactly 0 for invisible pairs (p == 0)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION, out_dtype=ACC)
            # Invisible pairs have ds == 0 exactly and idx a valid column: adding their zeros is harmless,
            # and cheaper in registers than carrying a mask to the atomics.
            if DBIAS == 1:  # C.DBIAS_ATOMIC
                tl.atomic_add(DTABLE + h * n_columns + idx, ds, sem="relaxed")
            elif DBIAS == 2:  # C.DBIAS_DETERMINISTIC: int64 fixed point, order-independent sums
                fixed = (ds * fixed_point_scale).to(tl.int64)
                tl.atomic_add(DTABLE + h * n_columns + idx, fixed, sem="relaxed")
    if PARTS & 2:
        tl.store(DK + kv_base + kv_tile, dk.to(DK.dtype.element_ty), mask=kv_mask)
    if PARTS & 1:
        tl.store(DV + kv_base + kv_tile, dv.to(DV.dtype.element_ty), mask=kv_mask)


def backward_meta(
    dtype: torch.dtype, head_dim: int, block_m: int, dbias: int = C.DBIAS_NONE, interpreted: bool = C.INTERPRETED,
) -> tuple[dict, dict]:
    """Constexpr arguments of the dQ and the dK/dV kernels (shared with the AOT report)."""
    meta = dict(
        HEAD_DIM=head_dim, BLOCK_D=C.block_d(head_dim), BLOCK_M=block_m, ACC=C.acc_dtype(dtype),
        UPCAST=C.upcast_inputs(dtype, interpreted), PRECISION=C.dot_precision(dtype, interpreted),
    )
    return meta, dict(meta, DBIAS=dbias)


def fixed_point_scale(do: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scale of the deterministic table gradient: ``2**61 / B``, ``B = 2 sum_i |dO_i| max_j |v_j|``.

    ``B`` bounds ``sum |ds|`` over every pair and head (see the module docstring), so the int64 sums
    cannot overflow. ``do``, ``v``: ``(total_tokens, heads, head_dim)``. Returns a one-element fp32
    tensor on their device (no host sync).
    """
    bound = 2.0 * do.float().norm(dim=-1).sum() * v.float().norm(dim=-1).max()
    return torch.where(bound > 0, FIXED_POINT_RANGE / bound, 1.0).reshape(1).float()


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
    deterministic: bool = False,
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
        table_grad: compute the bias-table gradient (no work and ``None`` returned otherwise).
        deterministic: bitwise reproducible table gradient (int64 fixed-point atomics); default fp32
            atomics, whose summation order varies from run to run.
        block_n: inner block size; ``None`` autotunes on GPUs and uses 64 under the interpreter.
        dq, dk, dv: optional preallocated outputs (tests pass NaN-filled buffers).
    Returns:
        ``dq, dk, dv`` in q's dtype and the table gradient ``(heads, 2M+1)`` in the table's dtype
        (``None`` when ``table_grad`` is False).
    """
    C.check_inputs(q, k, v, table)
    check_plan(plan, q)
    do, q, k, v, out = (t.contiguous() for t in (do, q, k, v, out))
    table = table.contiguous()
    n_tokens, n_heads, head_dim = q.shape
    acc = C.torch_acc_dtype(q.dtype)
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    n_columns = table.shape[1]
    max_distance = (n_columns - 1) // 2
    if plan.num_tiles == 0:
        return dq, dk, dv, (torch.zeros_like(table) if table_grad else None)
    dbias = C.DBIAS_NONE
    if table_grad:
        dbias = C.DBIAS_DETERMINISTIC if deterministic else C.DBIAS_ATOMIC
    meta, dkdv_meta = backward_meta(q.dtype, head_dim, plan.block_m, dbias)
    scale = torch.ones(1, dtype=torch.float32, device=q.device)
    if dbias == C.DBIAS_ATOMIC:
        dtable_buffer = torch.zeros(n_heads, n_columns, dtype=acc, device=q.device)
    elif dbias == C.DBIAS_DETERMINISTIC:
        dtable_buffer = torch.zeros(n_heads, n_columns, dtype=torch.int64, device=q.device)
        scale = fixed_point_scale(do, v)
    else:  # never written: a one-element placeholder keeps the signature
        dtable_buffer = torch.empty(1, dtype=acc, device=q.device)
    # delta = rowsum(dO * O): O(tokens * dim), cheaper in torch than as a third kernel.
    delta = (do.to(acc) * out.to(acc)).sum(-1).contiguous()
    common = (plan.fields, plan.ranges, plan.tiles, q.stride(0), q.stride(1), n_tokens, n_heads, max_distance)
    dq_args = (q, k, v, table, do, lse, delta, dq, *common)
    dkdv_args = (q, k, v, table, do, lse, delta, dk, dv, dtable_buffer, plan.fields, plan.ranges, plan.tiles,
                 scale, *common[3:])
    grid = (plan.num_tiles, n_heads)
    tuned = block_n is None and not C.INTERPRETED
    if tuned:
        autotuned("dq", _bwd_dq_kernel)[grid](*dq_args, **meta)
    else:
        _bwd_dq_kernel[grid](*dq_args, **meta, BLOCK_N=block_n or C.INTERPRETER_BLOCK_N)
    # Large head dims: a dV launch (no bias gradient) and a dK launch (with it); fused otherwise.
    for launch in dkdv_launches(dkdv_meta["BLOCK_D"], dbias, device_capability(q.device), q.dtype):
        launch_dbias, parts = DKDV_VARIANTS[launch]
        part_meta = dict(dkdv_meta, PARTS=parts, DBIAS=launch_dbias)
        if tuned:
            autotuned("dkdv", _bwd_dkdv_kernel)[grid](*dkdv_args, **part_meta)
        else:
            _bwd_dkdv_kernel[grid](*dkdv_args, **part_meta, BLOCK_N=block_n or C.INTERPRETER_BLOCK_N)
    dtable = None
    if dbias == C.DBIAS_ATOMIC:
        dtable = dtable_buffer.to(table.dtype)
    elif dbias == C.DBIAS_DETERMINISTIC:
        dtable = (dtable_buffer.to(torch.float64) / scale.double()).to(table.dtype)
    return dq, dk, dv, dtable
