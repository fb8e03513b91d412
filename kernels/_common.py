"""Settings shared by the forward and backward kernels: interpreter detection, dtypes, block sizes,
input checks and the jit helpers every kernel uses.

Nothing here touches CUDA at import time: only the ``TRITON_INTERPRET`` flag is read, and it has to
be read now, because ``triton.jit`` decides between compiling and interpreting when the kernel
module is imported.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# True when the kernels were defined under the Triton interpreter (CPU, numpy semantics).
INTERPRETED: bool = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")

LOG2E = 1.4426950408889634

# Tile sizes. Under the interpreter large blocks are much faster (fewer numpy calls per element).
INTERPRETER_BLOCK_M = 64
INTERPRETER_BLOCK_N = 64
GPU_BLOCK_M = 64

# How the dK/dV kernel produces the bias-table gradient (constexpr ``DBIAS``).
DBIAS_NONE = 0  # the table does not require grad: no work at all
DBIAS_ATOMIC = 1  # fp32 atomic scatter-add of dS into a (heads, 2M+1) buffer: fast, run-to-run order varies
DBIAS_DETERMINISTIC = 2  # the same scatter in int64 fixed point: bitwise reproducible

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256


def default_block_m(dtype: torch.dtype | None = None, head_dim: int | None = None) -> int:
    """Tile size of the plan: large under the interpreter; on GPUs the tile the autotuner's configs were
    verified at (64, smaller for fp32 inputs: :func:`kernels.configs.block_m_for`)."""
    if INTERPRETED:
        return INTERPRETER_BLOCK_M
    if dtype is None or head_dim is None:
        return GPU_BLOCK_M
    from .configs import block_m_for

    return block_m_for(dtype, block_d(head_dim))


def acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 for everything else."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def torch_acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def upcast_inputs(dtype: torch.dtype, interpreted: bool = INTERPRETED) -> bool:
    """Whether to cast loaded q/k/v/dO to the accumulation dtype before the dots.

    Always under the interpreter (its bf16 arithmetic is wrong); on GPUs half precision inputs stay
    in their dtype so the dots run on tensor cores.
    """
    return interpreted or dtype in (torch.float32, torch.float64)


def dot_precision(dtype: torch.dtype, interpreted: bool = INTERPRETED) -> str:
    """``input_precision`` of fp32 dots: ``tf32x3`` keeps fp32 accuracy on tensor cores."""
    return "ieee" if interpreted or dtype == torch.float64 else "tf32x3"


def block_d(head_dim: int) -> int:
    """Head dimension padded to a power of two >= 16 (tl.dot's minimum); extra lanes are masked."""
    return max(16, triton.next_power_of_2(head_dim))


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor) -> None:
    """Raise ValueError naming the problem if packed q/k/v and the table do not fit together."""
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            "q, k, v must all be (total_tokens, heads, head_dim); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q, k, v must share one of {SUPPORTED_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be <= {MAX_HEAD_DIM}, got {q.shape[-1]}")
    if table.dim() != 2 or table.shape[0] != q.shape[1] or table.shape[1] % 2 != 1:
        raise ValueError(
            f"table must be (heads, 2 * max_distance + 1) with heads={q.shape[1]}; got {tuple(table.shape)}"
        )
    if not (q.device == k.device == v.device == table.device):
        raise ValueError(f"q, k, v and table must be on one device; got {q.device}, {k.device}, {v.device}, "
                         f"{table.device}")


@triton.jit
def token_offset(token, stride_tok):
    """Element offset of row ``token`` of a ``(tokens, heads, head_dim)`` tensor, in int64.

    ``token * stride_tok`` reaches 2**31 once ``total_tokens * heads * head_dim`` does (1M tokens x
    2048 values per token), so the product is formed in int64. Only scalar row bases go through
    here; offsets inside a tile (``< BLOCK * stride_tok``) stay int32 and cheap.
    """
    return tl.cast(token, tl.int64) * stride_tok


@triton.jit
def walk_block(j, blocks1, lo1, hi1, lo2, hi2, BLOCK: tl.constexpr):
    """Block ``j`` of a walk over two disjoint ranges ``[lo1, hi1)`` then ``[lo2, hi2)`` in steps of
    ``BLOCK`` (``blocks1 = cdiv(hi1 - lo1, BLOCK)``): returns ``(start, lo, hi)`` of its range.

    One loop over both ranges instead of two inlined copies of the loop body: half the code, and
    fewer registers held across the two copies.
    """
    first = j < blocks1
    start = tl.where(first, lo1 + j * BLOCK, lo2 + (j - blocks1) * BLOCK)
    return start, tl.where(first, lo1, lo2), tl.where(first, hi1, hi2)


@triton.jit
def load_tile_fields(FIELDS, offs, mask, n_tokens):
    """The two view codes of the tokens ``offs`` (see :func:`bias_index`; masked tokens read 0)."""
    view0 = tl.load(FIELDS + offs, mask=mask, other=0)
    view1 = tl.load(FIELDS + n_tokens + offs, mask=mask, other=0)
    return view0, view1


@triton.jit
def key_ranges(RANGES, offs, mask, lo, hi):
    """Key ranges of the tokens ``offs`` clipped to ``[lo, hi)``, as ``(start, length)`` pairs.

    Masked tokens get empty ranges. Clipping the 1-D ranges once spares a 2-D comparison per block.
    """
    a0 = tl.maximum(tl.load(RANGES + offs * 4 + 0, mask=mask, other=0), lo)
    a1 = tl.minimum(tl.load(RANGES + offs * 4 + 1, mask=mask, other=0), hi)
    b0 = tl.maximum(tl.load(RANGES + offs * 4 + 2, mask=mask, other=0), lo)
    b1 = tl.minimum(tl.load(RANGES + offs * 4 + 3, mask=mask, other=0), hi)
    return a0, tl.maximum(a1 - a0, 0), b0, tl.maximum(b1 - b0, 0)


@triton.jit
def bias_index(v0_q, v1_q, v0_k, v1_k, max_distance, QUERY_ROWS: tl.constexpr):
    """Bias-table column of every (query, key) pair of a block: ``(queries, keys)`` if ``QUERY_ROWS``
    else ``(keys, queries)``. A valid column even for invisible pairs.

    With ``V0 = position`` and ``V1 = position - shift``, for query x and key y::

        rel(x, y) = pos[y] - pos[x] + shift[x] * is_query[y] - shift[y] * is_query[x]
                  = V[is_query[x]](y) - V[is_query[y]](x)
        column    = clamp(rel, -M, M) + M

    so each token needs only its two *view codes* ``v0 = 2 * V0 + is_query`` and
    ``v1 = 2 * V1 + is_query`` (:func:`kernels.varlen.view_codes`): two vectors per side instead of
    three, which matters because the vectors of one side are the costly ones in the 2-D register
    layouts the compiler picks (several rows per thread, one column).
    """
    if QUERY_ROWS:
        v0x, v1x, v0y, v1y = v0_q[:, None], v1_q[:, None], v0_k[None, :], v1_k[None, :]
    else:
        v0x, v1x, v0y, v1y = v0_q[None, :], v1_q[None, :], v0_k[:, None], v1_k[:, None]
    x_view = tl.where((v0y & 1) != 0, v1x, v0x)  # x seen from y; low bit is_query[x]
    y_view = tl.where((x_view & 1) != 0, v1y, v0y)  # y seen from x; low bit is_query[y]
    rel = (y_view >> 1) - (x_view >> 1)
    return tl.minimum(tl.maximum(rel + max_distance, 0), 2 * max_distance)


@triton.jit
def in_ranges(points, a0, len_a, b0, len_b, POINT_ROWS: tl.constexpr):
    """2-D mask ``point in [a0, a0 + len_a) or point in [b0, b0 + len_b)``: points along rows and ranges
    along columns if ``POINT_ROWS``, else the transpose.

    Visibility is symmetric, so either side's ranges can be tested against the other side's index (an
    ``arange``, cheap in any layout). ``lo <= p < lo + len`` is one unsigned comparison of ``p - lo``
    (a negative difference wraps to a huge unsigned value).
    """
    if POINT_ROWS:
        p, a0, len_a, b0, len_b = points[:, None], a0[None, :], len_a[None, :], b0[None, :], len_b[None, :]
    else:
        p, a0, len_a, b0, len_b = points[None, :], a0[:, None], len_a[:, None], b0[:, None], len_b[:, None]
    in_a = (p - a0).to(tl.uint32, bitcast=True) < len_a.to(tl.uint32, bitcast=True)
    in_b = (p - b0).to(tl.uint32, bitcast=True) < len_b.to(tl.uint32, bitcast=True)
    return in_a | in_b


@triton.jit
def load_tile(PTR, offsets, mask, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """A q/k/v/dO tile (masked lanes read 0), cast to the accumulation dtype ``ACC`` if ``UPCAST``."""
    x = tl.load(PTR + offsets, mask=mask, other=0.0)
    if UPCAST:
        x = x.to(ACC)
    return x


@triton.jit
def load_row_stats(LSE, DELTA, offs, mask, n_heads, h):
    """The saved base-2 log-sum-exp and ``rowsum(dO * O)`` of the query rows ``offs`` at head ``h``."""
    lse = tl.load(LSE + offs * n_heads + h, mask=mask, other=0.0)
    delta = tl.load(DELTA + offs * n_heads + h, mask=mask, other=0.0)
    return lse, delta


@triton.jit
def plan_tile(TILES, FIELDS, tile, h, n_tokens, stride_tok, stride_head,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Prologue of every kernel: the ``BLOCK_M`` packed rows of plan tile ``tile`` at head ``h``.

    Returns ``(offs, mask, v0, v1, base, tile_offs, tile_mask, block_offs, mask_d, walk, n_blocks)``:
    the rows' token indices, validity and view codes; the int64 element offset of the tile's first row
    and the int32 offsets/mask of its ``(BLOCK_M, BLOCK_D)`` tile (``< BLOCK * stride_tok``: int32 is
    enough inside a tile); the offsets of a ``(BLOCK_N, BLOCK_D)`` block of the walk and the head-dim
    mask; ``walk = (lo1, hi1, lo2, hi2, blocks1)``, the two ranges the tile walks (keys for a query
    tile, queries for a key tile) for :func:`walk_tile`, and the number of ``BLOCK_N`` blocks in them.
    """
    row0 = tl.load(TILES + tile * 6 + 0)
    row1 = tl.load(TILES + tile * 6 + 1)
    lo1 = tl.load(TILES + tile * 6 + 2)
    hi1 = tl.load(TILES + tile * 6 + 3)
    lo2 = tl.load(TILES + tile * 6 + 4)
    hi2 = tl.load(TILES + tile * 6 + 5)
    rows = tl.arange(0, BLOCK_M)
    offs = row0 + rows
    mask = offs < row1
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    base = token_offset(row0, stride_tok) + h * stride_head
    tile_offs = rows[:, None] * stride_tok + offs_d[None, :]
    tile_mask = mask[:, None] & mask_d[None, :]
    block_offs = tl.arange(0, BLOCK_N)[:, None] * stride_tok + offs_d[None, :]
    v0, v1 = load_tile_fields(FIELDS, offs, mask, n_tokens)
    blocks1 = tl.cdiv(hi1 - lo1, BLOCK_N)
    n_blocks = blocks1 + tl.cdiv(hi2 - lo2, BLOCK_N)
    return offs, mask, v0, v1, base, tile_offs, tile_mask, block_offs, mask_d, (lo1, hi1, lo2, hi2, blocks1), n_blocks


@triton.jit
def walk_tile(j, walk, h, A, B, FIELDS, block_offs, mask_d, n_tokens, stride_tok, stride_head,
              BLOCK: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """Block ``j`` of a tile's walk (``walk`` from :func:`plan_tile`): its ``BLOCK`` tokens, the tiles of
    ``A`` and ``B`` (k and v, or q and dO) at head ``h``, and their view codes.

    Returns ``(offs, mask, lo, hi, a, b, v0, v1)``; ``[lo, hi)`` is the range the block lies in, and
    tokens past ``hi`` are masked (they read 0).
    """
    lo1, hi1, lo2, hi2, blocks1 = walk
    start, lo, hi = walk_block(j, blocks1, lo1, hi1, lo2, hi2, BLOCK)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < hi
    base = token_offset(start, stride_tok) + h * stride_head
    block_mask = mask[:, None] & mask_d[None, :]
    a = load_tile(A + base, block_offs, block_mask, ACC, UPCAST)
    b = load_tile(B + base, block_offs, block_mask, ACC, UPCAST)
    v0, v1 = load_tile_fields(FIELDS, offs, mask, n_tokens)
    return offs, mask, lo, hi, a, b, v0, v1


@triton.jit
def masked_bias(table_row, offs_q, v0_q, v1_q, v0_k, v1_k, a0_k, len_a, b0_k, len_b, max_distance,
                ACC: tl.constexpr):
    """``(queries, keys)`` bias of a block with invisible pairs at ``-inf``, and its table columns.

    ``a0_k, len_a, b0_k, len_b``: the keys' ranges (:func:`key_ranges`). The columns are valid even for
    invisible pairs, so the gather is unmasked (a masked one costs registers), and the mask is folded
    into the bias so that it never exists in the dot's register layout.
    """
    idx = bias_index(v0_q, v1_q, v0_k, v1_k, max_distance, True)
    allowed = in_ranges(offs_q, a0_k, len_a, b0_k, len_b, True)
    return tl.where(allowed, tl.load(table_row + idx).to(ACC), float("-inf")), idx


@triton.jit
def key_block(j, walk, h, K, V, FIELDS, RANGES, table_row, offs_m, v0_m, v1_m, block_offs, mask_d,
              n_tokens, stride_tok, stride_head, max_distance,
              BLOCK_N: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """Key block ``j`` of a query tile's walk (forward and dQ kernels): ``(k, v, bias)``, the
    ``(BLOCK_N, BLOCK_D)`` key and value tiles and the ``(queries, keys)`` masked bias."""
    offs_n, mask_n, _lo, _hi, k, v, v0_n, v1_n = walk_tile(
        j, walk, h, K, V, FIELDS, block_offs, mask_d, n_tokens, stride_tok, stride_head, BLOCK_N, ACC, UPCAST)
    # Keys past the block's range (the tile's other range, or nothing) get empty ranges: never visible.
    a0_n, len_a, b0_n, len_b = key_ranges(RANGES, offs_n, mask_n, 0, n_tokens)
    bias, _idx = masked_bias(table_row, offs_m, v0_m, v1_m, v0_n, v1_n, a0_n, len_a, b0_n, len_b, max_distance, ACC)
    return k, v, bias


@triton.jit
def query_block(j, walk, h, Q, DO, LSE, DELTA, FIELDS, RANGES, table_row, offs_m, mask_m, v0_m, v1_m,
                block_offs, mask_d, n_tokens, n_heads, stride_tok, stride_head, max_distance,
                BLOCK_N: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """Query block ``j`` of a key tile's walk (dK/dV kernel): ``(q, do, lse, delta, bias, idx)``, the
    ``(BLOCK_N, BLOCK_D)`` query and output-gradient tiles, the rows' saved statistics, the
    ``(queries, keys)`` masked bias and its table columns."""
    offs_n, mask_n, q_lo, q_hi, q, do, v0_n, v1_n = walk_tile(
        j, walk, h, Q, DO, FIELDS, block_offs, mask_d, n_tokens, stride_tok, stride_head, BLOCK_N, ACC, UPCAST)
    lse, delta = load_row_stats(LSE, DELTA, offs_n, mask_n, n_heads, h)
    # The key tile's own ranges, clipped to this block's range: visibility is symmetric, so query x sees
    # key y iff x lies in y's ranges. Keys past the tile's end get empty ranges.
    a0_m, len_a, b0_m, len_b = key_ranges(RANGES, offs_m, mask_m, q_lo, q_hi)
    bias, idx = masked_bias(table_row, offs_n, v0_n, v1_n, v0_m, v1_m, a0_m, len_a, b0_m, len_b, max_distance, ACC)
    return q, do, lse, delta, bias, idx
