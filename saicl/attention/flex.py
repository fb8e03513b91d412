"""``attn_backend="flex"``: PyTorch FlexAttention with the structure as a block mask and the T5 bias as a
``score_mod`` (DESIGN §4).

Per encoder pass, :meth:`FlexBackend.prepare` pads the layout's per-token fields to a *bucketed* length
and builds one :class:`~torch.nn.attention.flex_attention.BlockMask` from the structure predicate; every
layer then runs ``torch.compile(flex_attention)`` on q, k, v padded to that length. The two modifications
are, for batch ``b``, head ``h``, query token ``x`` and key token ``y``::

    mask_mod:  valid[b, x] & valid[b, y] & structure.allowed(segment[b, x], segment[b, y])
               (validity read off the segment id: padding carries PAD_SEGMENT)
    score_mod: score + table[h, clamp(rel(x, y), -M, M) + M]
    rel(x, y) = position[y] - position[x] + shift[x] * is_query[y] - shift[y] * is_query[x]

What compiled FlexAttention does on CPU (torch 2.13, measured; see tests/test_flex.py):

* Only fp32, fp16 and bf16 compile; float64 fails at lowering. No backward at all: ``flex_attention``
  raises as soon as q, k or v requires grad on CPU, compiled or not.
* Automatic dynamic shapes (the default after a second shape) generate C++ that fails at run time with
  batch > 1 (``index out of bounds: 0 <= tmp53 < cur_kvSplitSize``; with other versions of the template
  it does not even compile: ``cur_kvSplitSize4 was not declared``). Static compiles (``dynamic=False``)
  work for every shape, at 4-6 s per new shape on 2 cores, so lengths are padded up to buckets
  (:func:`padded_length`) to bound the number of compiles; padded tokens are invalid, so their blocks
  are empty and cost no attention work.

Where the compiled kernel cannot serve a call (gradients on CPU, float64 on CPU, or a compile that
failed), the backend evaluates the *same* ``mask_mod`` and ``score_mod`` densely with broadcast index
tensors (:func:`math_attention`, what FlexAttention's own unfused reference computes): exact, float64-
and autograd-capable, gradients flowing to the bias table, but quadratic in memory. Each such fallback
warns once per process.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..layout import EncoderLayout
from ..structures import PAD_SEGMENT
from .base import AttentionBackend, check_qkv

try:  # FlexAttention is a prototype API: keep the import failure as the unavailability reason.
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    _IMPORT_ERROR: str | None = None
except ImportError as err:  # pragma: no cover - depends on the torch build
    BlockMask = flex_attention = None  # type: ignore[assignment,misc]
    _IMPORT_ERROR = f"torch.nn.attention.flex_attention is not importable in torch {torch.__version__} ({err})"

# FlexAttention's default sparse block (both on CPU and CUDA); padded lengths are multiples of it so
# that no block straddles the end of the sequence.
BLOCK_SIZE = 128
# Dtypes compiled FlexAttention accepts on CPU (float64 raises NotImplementedError at lowering).
_CPU_COMPILED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Each (batch, padded length, heads, head dim, dtype, structure) is one static compile; dynamo's default
# of 8 per code object would silently send the rest to the slow unfused path.
_RECOMPILE_LIMIT = 64

# Bit width of each packed per-token field (:func:`pack_fields`): sequences up to 2**20 tokens.
_FIELD_BITS = 20
_FIELD_LIMIT = 1 << _FIELD_BITS

_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def padded_length(length: int) -> int:
    """Bucketed sequence length the compiled kernel runs at (bounds the number of static compiles).

    Multiples of :data:`BLOCK_SIZE` up to 2048 tokens; beyond, multiples of 1/8 of the power of two just
    below, so at most 8 buckets per octave and at most 12.5% padding. Padded tokens are masked: blocks made
    only of them are skipped, but a block they share with real tokens becomes a partial block, whose
    mask_mod is evaluated per element (the price of bounded recompiles).
    """
    granularity = max(BLOCK_SIZE, 2 ** max(0, int(math.log2(max(length, 1))) - 3))
    return max(granularity, -(-length // granularity) * granularity)


@dataclass
class FlexPrepared:
    """Per-forward state shared by all layers.

    Attributes:
        layout: the encoder layout (``length`` = ``L``).
        table: ``(heads, 2M+1)`` per-distance bias table, as given (differentiable).
        max_distance: ``M``.
        length / padded: ``L`` and the bucketed length ``Lp >= L`` the compiled kernel runs at.
        segment: ``(batch, Lp)`` segment ids, ``PAD_SEGMENT`` exactly on padding (including the
            bucket padding).
        fields: ``(batch, Lp)`` position, shift and is_query packed by :func:`pack_fields`.
        mask_mod: FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` closing over the fields.
        block_mask: :class:`BlockMask` of shape ``(batch, 1, Lp, Lp)``, built lazily by the compiled path.
    """

    layout: EncoderLayout
    table: torch.Tensor
    max_distance: int
    length: int
    padded: int
    segment: torch.Tensor
    fields: torch.Tensor
    mask_mod: Callable[..., torch.Tensor]
    block_mask: BlockMask | None = None
    tables: dict[torch.dtype, torch.Tensor] = field(default_factory=dict, repr=False)
    score_mods: dict[torch.dtype, Callable[..., torch.Tensor]] = field(default_factory=dict, repr=False)

    def score_mod_for(self, dtype: torch.dtype) -> Callable[..., torch.Tensor]:
        """One ``score_mod`` per dtype and forward: a fresh closure per layer costs flex ~15 ms per call."""
        if dtype not in self.score_mods:
            self.score_mods[dtype] = _make_score_mod(self, self.table_for(dtype))
        return self.score_mods[dtype]

    def table_for(self, dtype: torch.dtype) -> torch.Tensor:
        """The bias table in the dtype the scores are computed in (fp32 for half inputs), cast once."""
        dtype = torch.promote_types(dtype, torch.float32)
        if dtype not in self.tables:
            self.tables[dtype] = self.table.to(dtype)
        return self.tables[dtype]


def _make_mask_mod(structure_allowed, segment: torch.Tensor) -> Callable[..., torch.Tensor]:
    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        # Padding (segment PAD_SEGMENT, exactly the invalid tokens) neither gives nor receives attention
        # (DESIGN §2); the predicate says the rest. Validity is read off the segment id rather than a
        # separate tensor: every gather costs a bounds-checked load per element in the CPU kernel.
        seg_q, seg_k = segment[b, q_idx], segment[b, kv_idx]
        return structure_allowed(seg_q, seg_k) & (seg_q != PAD_SEGMENT) & (seg_k != PAD_SEGMENT)

    return mask_mod


def pack_fields(position: torch.Tensor, shift: torch.Tensor, is_query: torch.Tensor) -> torch.Tensor:
    """One int64 per token holding ``position | shift << 20 | is_query << 40`` (all ``(batch, L)``).

    ``score_mod`` then needs two gathers per score instead of six (measured ~30% faster on CPU).
    """
    if position.numel() and not bool(((position >= 0) & (position.maximum(shift) < _FIELD_LIMIT)).all()):
        raise ValueError(f"flex backend: positions and shifts must lie in [0, {_FIELD_LIMIT})")
    return position.long() | (shift.long() << _FIELD_BITS) | (is_query.long() << (2 * _FIELD_BITS))


def _make_score_mod(prepared: FlexPrepared, table: torch.Tensor) -> Callable[..., torch.Tensor]:
    fields, max_distance = prepared.fields, prepared.max_distance
    low = _FIELD_LIMIT - 1

    def score_mod(
        score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        f_q, f_k = fields[b, q_idx], fields[b, kv_idx]
        pos_q, pos_k = f_q & low, f_k & low
        shift_q, shift_k = (f_q >> _FIELD_BITS) & low, (f_k >> _FIELD_BITS) & low
        is_query_q, is_query_k = f_q >> (2 * _FIELD_BITS), f_k >> (2 * _FIELD_BITS)
        # rel(x, y) as in layout.py; the bias comes from the host-built per-distance table, so no log
        # is evaluated in the kernel (exact T5 bucket edges).
        rel = pos_k - pos_q + shift_q * is_query_k - shift_k * is_query_q
        return score + table[h, rel.clamp(-max_distance, max_distance) + max_distance]

    return score_mod


def block_mask_from_mask_mod(
    mask_mod: Callable[..., torch.Tensor], batch: int, length: int, device: torch.device
) -> BlockMask:
    """:class:`BlockMask` ``(batch, 1, length, length)`` of a head-independent, broadcasting ``mask_mod``.

    Same result as ``create_block_mask(mask_mod, batch, None, length, length)``, but the mod is called once
    on broadcast index tensors instead of through ``vmap``, which materialises every gathered per-token
    field at ``(batch, length, length)`` (at 9k tokens: 2.7 s instead of a fraction of it). ``length``
    must be a multiple of :data:`BLOCK_SIZE`.
    """
    blocks = length // BLOCK_SIZE
    zero = torch.zeros((), dtype=torch.long, device=device)
    dense = mask_mod(
        torch.arange(batch, device=device).view(batch, 1, 1),
        zero,
        torch.arange(length, device=device).view(1, length, 1),
        torch.arange(length, device=device).view(1, 1, length),
    ).view(batch, blocks, BLOCK_SIZE, blocks, BLOCK_SIZE)
    count = dense.sum(dim=(2, 4), dtype=torch.int32)  # allowed pairs per (q block, kv block)
    return _block_mask_from_counts(count, length, mask_mod)


def _block_mask_from_counts(count: torch.Tensor, length: int, mask_mod: Callable[..., torch.Tensor]) -> BlockMask:
    """:class:`BlockMask` from allowed-pair counts ``(batch, q blocks, kv blocks)``."""
    full = count == BLOCK_SIZE * BLOCK_SIZE  # whole blocks skip the mask_mod in the kernel
    partial = (count > 0) & ~full

    def ordered(block_dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (batch, 1, q blocks) counts and (batch, 1, q blocks, kv blocks) indices, listed blocks first.
        num = block_dense.sum(-1, dtype=torch.int32)[:, None]
        indices = torch.argsort(block_dense.to(torch.int8), dim=-1, descending=True, stable=True)
        return num, indices.to(torch.int32)[:, None]

    return BlockMask.from_kv_blocks(
        *ordered(partial), *ordered(full), BLOCK_SIZE=BLOCK_SIZE, mask_mod=mask_mod, seq_lengths=(length, length)
    )


def block_mask_from_key_ranges(
    key_ranges: torch.Tensor, length: int, mask_mod: Callable[..., torch.Tensor], max_chunk_elements: int = 1 << 24
) -> BlockMask:
    """:class:`BlockMask` ``(batch, 1, length, length)`` from per-token key ranges, without an ``L x L`` tensor.

    Args:
        key_ranges: ``(batch, L, 4)`` from :meth:`saicl.layout.EncoderLayout.key_ranges` (``L <= length``).
        length: padded length, a multiple of :data:`BLOCK_SIZE`.
    Each (query block, key block) count of allowed pairs is the sum over the block's rows of the overlap of
    the row's two key ranges with the key block; memory is ``rows x key blocks`` per chunk of rows.
    """
    batch, rows, _ = key_ranges.shape
    blocks = length // BLOCK_SIZE
    ranges = F.pad(key_ranges, (0, 0, 0, length - rows))  # padded rows see nothing
    block_start = torch.arange(blocks, device=ranges.device) * BLOCK_SIZE
    block_end = block_start + BLOCK_SIZE
    chunk_blocks = max(1, max_chunk_elements // (batch * BLOCK_SIZE * blocks))
    counts = []
    for first in range(0, blocks, chunk_blocks):
        chunk = ranges[:, first * BLOCK_SIZE:(first + chunk_blocks) * BLOCK_SIZE, None, :]
        overlap = sum(
            (torch.minimum(chunk[..., hi], block_end) - torch.maximum(chunk[..., lo], block_start)).clamp_min(0)
            for lo, hi in ((0, 1), (2, 3))
        )  # (batch, chunk rows, key blocks)
        counts.append(overlap.view(batch, -1, BLOCK_SIZE, blocks).sum(2))
    return _block_mask_from_counts(torch.cat(counts, 1), length, mask_mod)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prepared: FlexPrepared) -> torch.Tensor:
    """Dense evaluation of the backend's ``mask_mod`` and ``score_mod`` (any dtype, differentiable).

    The modifications are elementwise, so calling them on broadcast index tensors
    ``b (B,1,1,1), h (1,H,1,1), q_idx (1,1,L,1), kv_idx (1,1,1,L)`` gives the full score matrix, as
    FlexAttention's own unfused reference does with ``vmap``.

    Args:
        q, k, v: ``(batch, heads, L, head_dim)`` (unpadded).
    Returns:
        ``(batch, heads, L, head_dim)`` in q's dtype; rows of padding tokens are not yet zeroed.
    """
    batch, heads, length, _ = q.shape
    device = q.device
    b = torch.arange(batch, device=device).view(batch, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, heads, 1, 1)
    q_idx = torch.arange(length, device=device).view(1, 1, length, 1)
    kv_idx = torch.arange(length, device=device).view(1, 1, 1, length)
    compute = torch.promote_types(q.dtype, torch.float32)  # half inputs: fp32 scores and softmax
    table = prepared.table_for(compute)
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2))
    scores = _make_score_mod(prepared, table)(scores, b, h, q_idx, kv_idx)
    allowed = prepared.mask_mod(b, h, q_idx, kv_idx)
    # The dtype minimum rather than -inf: padding rows see nothing, and a finite fill keeps their
    # softmax (and its gradient) free of NaN; those rows are zeroed afterwards.
    scores = scores.masked_fill(~allowed, torch.finfo(compute).min)
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.to(compute)).to(q.dtype)


class FlexBackend(AttentionBackend):
    """``attn_backend="flex"``: FlexAttention block mask + T5-bias ``score_mod`` (see the module docstring).

    The compiled path serves CPU inference (fp32/bf16/fp16) and everything on CUDA, training included;
    gradients on CPU and float64 on CPU take :func:`math_attention`.
    """

    name = "flex"

    def __init__(self) -> None:
        self._compiled: Callable[..., torch.Tensor] | None = None
        # Compile keys that failed once: never retried (a failing compile costs seconds every time).
        self._failed: set[tuple] = set()

    def unavailable_reason(self, device: torch.device) -> str | None:
        if _IMPORT_ERROR is not None:
            return _IMPORT_ERROR
        if torch.device(device).type not in ("cpu", "cuda"):
            return f"FlexAttention runs on cpu and cuda here, not on {torch.device(device).type}"
        return None

    # ----------------------------------------------------------------------------------------------
    def prepare(self, layout: EncoderLayout, table: torch.Tensor) -> FlexPrepared:
        """Pad the layout's per-token fields to the bucketed length; the block mask is built on first use.

        Args:
            layout: the encoder layout, ``(batch, L)`` fields.
            table: ``(heads, 2M+1)`` per-distance bias table.
        """
        if table.dim() != 2 or table.shape[1] % 2 != 1:
            raise ValueError(f"table must be (heads, 2M+1); got shape {tuple(table.shape)}")
        length = layout.length
        pad = padded_length(length) - length

        def padded(t: torch.Tensor, value) -> torch.Tensor:
            return F.pad(t, (0, pad), value=value) if pad else t

        # The mask reads validity off the segment id, so make sure padding carries PAD_SEGMENT.
        segment = padded(layout.segment.masked_fill(~layout.valid, PAD_SEGMENT), PAD_SEGMENT)
        return FlexPrepared(
            layout=layout,
            table=table,
            max_distance=(table.shape[1] - 1) // 2,
            length=length,
            padded=length + pad,
            segment=segment,
            fields=padded(pack_fields(layout.position, layout.shift, layout.is_query), 0),
            mask_mod=_make_mask_mod(layout.structure.allowed, segment),
        )

    def block_mask(self, prepared: FlexPrepared) -> BlockMask:
        """The ``(batch, 1, Lp, Lp)`` block mask of the prepared layout (built once, then cached)."""
        if prepared.block_mask is None:
            # From the span form (linear in L); block_mask_from_mask_mod is the quadratic cross-check.
            prepared.block_mask = block_mask_from_key_ranges(
                prepared.layout.key_ranges(), prepared.padded, prepared.mask_mod
            )
        return prepared.block_mask

    # ----------------------------------------------------------------------------------------------
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prepared: FlexPrepared) -> torch.Tensor:
        """Attention of ``(batch, L, heads, head_dim)`` q, k, v; returns the same shape, padding rows zero."""
        check_qkv(q, k, v, prepared.layout)
        out = None
        reason = self._math_reason(q, k, v, prepared)
        if reason is None:
            key = (tuple(q.shape), prepared.padded, q.dtype, q.device.type, prepared.layout.structure.name)
            if key not in self._failed:
                try:
                    out = self._compiled_attention(q, k, v, prepared)
                except Exception as err:  # noqa: BLE001 - any compile/runtime failure: stay correct
                    self._failed.add(key)
                    _warn_once(
                        f"failed:{key}",
                        f"compiled FlexAttention failed for q shape {tuple(q.shape)} ({q.dtype}, padded length "
                        f"{prepared.padded}): {type(err).__name__}: {str(err).splitlines()[0][:300]}; using the "
                        "dense math path for this shape instead (exact, but quadratic in memory)",
                    )
        else:
            _warn_once(reason, reason)
        if out is None:
            out = math_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), prepared).transpose(1, 2)
        return out * prepared.layout.valid[:, :, None, None].to(out.dtype)

    @staticmethod
    def _math_reason(q, k, v, prepared: FlexPrepared) -> str | None:
        """Why this call cannot use compiled FlexAttention (``None`` if it can)."""
        if q.device.type == "cpu":
            needs_grad = torch.is_grad_enabled() and any(
                t.requires_grad for t in (q, k, v, prepared.table)
            )
            if needs_grad:
                return (
                    "attn_backend='flex': FlexAttention has no backward on CPU, so training on CPU uses the "
                    "dense math path of the same mask_mod/score_mod (exact, but quadratic in memory and slow); "
                    "attn_backend='torch' is the CPU training backend"
                )
            if q.dtype not in _CPU_COMPILED_DTYPES:
                return (
                    f"attn_backend='flex': compiled FlexAttention on CPU supports fp32/fp16/bf16, not {q.dtype}; "
                    "using the dense math path of the same mask_mod/score_mod (exact, quadratic in memory)"
                )
        return None

    def _compiled_attention(self, q, k, v, prepared: FlexPrepared) -> torch.Tensor:
        if self._compiled is None:
            dynamo_config = torch._dynamo.config
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, _RECOMPILE_LIMIT)
            # Static shapes: automatic dynamic shapes miscompile the CPU template (module docstring).
            self._compiled = torch.compile(flex_attention, dynamic=False)
        pad = prepared.padded - prepared.length
        # Pad in the (B, L, H, D) layout, then view as (B, H, Lp, D): the strides are the same whether or
        # not padding was needed, so both cases share one compiled kernel.
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)).transpose(1, 2) if pad else t.transpose(1, 2) for t in (q, k, v))
        score_mod = prepared.score_mod_for(q.dtype)
        out = self._compiled(q, k, v, score_mod=score_mod, block_mask=self.block_mask(prepared), scale=1.0)
        return out[:, :, : prepared.length].transpose(1, 2)
