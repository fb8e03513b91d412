"""Packed (varlen) metadata for the structured attention kernels.

The kernels never see ``(batch, length)`` tensors: the valid tokens of every episode are packed
back to back into ``(total_tokens, heads, head_dim)`` (``cu_seqlens`` style, padding dropped), and
everything the kernels need about a token is one column of :attr:`VarlenPlan.fields`.

Span form (see :mod:`saicl.layout`): a token of a *local span* sees its own span and the episode's
global span; a token of the *global span* sees every valid token of its episode. So the keys of
token ``x`` are the union of at most two contiguous packed ranges ``[a0, a1) u [b0, b1)``. This
relation is symmetric (``x`` sees ``y`` iff ``y`` sees ``x``), which the backward pass relies on:
the query rows that can see a key tile are found with the very same ranges.

Scheduling: every episode is cut into *tiles* of ``block_m`` consecutive tokens (a tile never
crosses an episode). A tile's key set is the union of its rows' ranges, stored as two disjoint
ranges (merged when they touch, so no key is ever visited twice). Rows of a tile may belong to
different spans (demonstrations shorter than a tile): the kernels mask every element with the row's
own ranges, so a straddling tile is exact; it only visits the keys of all the spans it touches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saicl.layout import EncoderLayout

# Rows of VarlenPlan.fields.
FIELD_POSITION, FIELD_SHIFT, FIELD_IS_QUERY, FIELD_A0, FIELD_A1, FIELD_B0, FIELD_B1 = range(7)
N_FIELDS = 7
# Columns of VarlenPlan.tiles.
TILE_ROW0, TILE_ROW1, TILE_K1_LO, TILE_K1_HI, TILE_K2_LO, TILE_K2_HI = range(6)
N_TILE_COLUMNS = 6


@dataclass
class VarlenPlan:
    """Everything the kernels need about one batch of episodes, packed once per forward pass.

    Attributes:
        flat_index: ``(total_tokens,)`` long, index of every packed token in the flattened
            ``(batch * length)`` input; packing is ``x.flatten(0, 1)[flat_index]``.
        cu_seqlens: ``(batch + 1,)`` int32, packed start of every episode (and the total).
        fields: ``(7, total_tokens)`` int32 per-token fields: ``position``, ``shift``, ``is_query``
            (relative-position formula of :mod:`saicl.layout`), then the key ranges
            ``a0, a1, b0, b1`` in packed coordinates (``b0 == b1`` when there is no second range).
        tiles: ``(num_tiles, 6)`` int32: ``row0, row1`` (the tile's packed rows, ``row1 - row0 <=
            block_m``) and two disjoint key ranges ``k1_lo, k1_hi, k2_lo, k2_hi`` (possibly empty).
        block_m: tile size the plan was built for.
        batch, length: shape of the unpacked input.
    """

    flat_index: torch.Tensor
    cu_seqlens: torch.Tensor
    fields: torch.Tensor
    tiles: torch.Tensor
    block_m: int
    batch: int
    length: int

    @property
    def total_tokens(self) -> int:
        return self.flat_index.shape[0]

    @property
    def num_tiles(self) -> int:
        return self.tiles.shape[0]

    def visited_pairs(self) -> int:
        """Query-key pairs the kernels compute (tile rows x visited keys), for efficiency reports."""
        t = self.tiles.long()
        rows = t[:, TILE_ROW1] - t[:, TILE_ROW0]
        keys = (t[:, TILE_K1_HI] - t[:, TILE_K1_LO]) + (t[:, TILE_K2_HI] - t[:, TILE_K2_LO])
        return int((rows * keys).sum())

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, length, *rest)`` -> ``(total_tokens, *rest)`` (differentiable gather)."""
        return x.flatten(0, 1).index_select(0, self.flat_index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """``(total_tokens, *rest)`` -> ``(batch, length, *rest)``, zeros on padding (differentiable)."""
        out = x.new_zeros((self.batch * self.length, *x.shape[1:]))
        out = out.index_copy(0, self.flat_index, x)
        return out.unflatten(0, (self.batch, self.length))


def _episode_spans(layout: EncoderLayout, b: int, n: int) -> list[tuple[int, int, bool]]:
    """``(start, length, is_local)`` spans of episode ``b`` sorted by start; checks they tile ``[0, n)``."""
    spans = [(s, length, True) for s, length in layout.local_spans[b] if length > 0]
    glob = layout.global_spans[b]
    if glob is not None and glob[1] > 0:
        spans.append((glob[0], glob[1], False))
    spans.sort()
    covered = 0
    for start, length, _ in spans:
        if start != covered:
            raise ValueError(f"episode {b}: layout spans do not tile the episode (gap or overlap at {start})")
        covered += length
    if covered != n:
        raise ValueError(f"episode {b}: layout spans cover {covered} tokens, the episode has {n}")
    return spans


def build_plan(layout: EncoderLayout, block_m: int) -> VarlenPlan:
    """Pack the layout into per-token fields and a tile schedule (one host pass, one copy to device).

    Args:
        layout: the encoder layout (valid tokens must be a prefix of every row, as built by
            :func:`saicl.layout.build_layout`).
        block_m: tile size (rows per program); also the key-tile size of the backward pass.
    Returns:
        A :class:`VarlenPlan` on ``layout.device``.
    """
    if block_m <= 0:
        raise ValueError(f"block_m must be positive, got {block_m}")
    device = layout.device
    valid = layout.valid.detach().to("cpu")
    lengths = valid.sum(1).tolist()
    if not bool((valid == (torch.arange(valid.shape[1]) < valid.sum(1, keepdim=True))).all()):
        raise ValueError("layout.valid must be a prefix of every row (padding on the right)")
    batch, length = valid.shape
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)

    # Per span: (packed start, length, a0, a1, b0, b1); repeated over the span's tokens below.
    span_rows: list[tuple[int, int, int, int, int, int]] = []
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        base = cu[b]
        glob = layout.global_spans[b]
        g0, g1 = (base + glob[0], base + glob[0] + glob[1]) if glob is not None and glob[1] > 0 else (0, 0)
        for start, span_len, is_local in _episode_spans(layout, b, n):
            s0 = base + start
            if is_local:
                span_rows.append((s0, span_len, s0, s0 + span_len, g0, g1))
            else:  # global span: every valid token of the episode
                span_rows.append((s0, span_len, base, base + n, 0, 0))
    spans = torch.tensor(span_rows, dtype=torch.long).reshape(-1, 6)
    span_len = spans[:, 1]
    ranges = torch.repeat_interleave(spans[:, 2:6], span_len, dim=0)  # (total, 4)

    flat_index = torch.nonzero(valid.flatten(), as_tuple=False).flatten()
    per_token = [
        layout.position.detach().to("cpu").flatten()[flat_index],
        layout.shift.detach().to("cpu").flatten()[flat_index],
        layout.is_query.detach().to("cpu").flatten()[flat_index].long(),
    ]
    fields = torch.stack([*per_token, *ranges.t()]).to(torch.int32)

    tiles = _tiles(cu, ranges, block_m)
    return VarlenPlan(
        flat_index=flat_index.to(device),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=device),
        fields=fields.contiguous().to(device),
        tiles=tiles.contiguous().to(device),
        block_m=block_m,
        batch=batch,
        length=length,
    )


def _tiles(cu: list[int], ranges: torch.Tensor, block_m: int) -> torch.Tensor:
    """Tile schedule ``(num_tiles, 6)`` int32 from per-token ranges ``(total, 4)`` (a0, a1, b0, b1)."""
    starts, ends = [], []
    for b in range(len(cu) - 1):
        for row0 in range(cu[b], cu[b + 1], block_m):
            starts.append(row0)
            ends.append(min(row0 + block_m, cu[b + 1]))
    if not starts:
        return torch.zeros(0, N_TILE_COLUMNS, dtype=torch.int32)
    row0 = torch.tensor(starts, dtype=torch.long)
    row1 = torch.tensor(ends, dtype=torch.long)
    tile_of = torch.repeat_interleave(torch.arange(len(starts)), row1 - row0)
    a0, a1, b0, b1 = ranges.t()
    has_b = b1 > b0
    big = torch.iinfo(torch.long).max

    def reduce(values: torch.Tensor, how: str, init: int) -> torch.Tensor:
        out = torch.full((len(starts),), init, dtype=torch.long)
        return out.scatter_reduce(0, tile_of, values, reduce=how, include_self=True)

    k1_lo, k1_hi = reduce(a0, "amin", big), reduce(a1, "amax", -1)
    k2_lo = reduce(torch.where(has_b, b0, big), "amin", big)
    k2_hi = reduce(torch.where(has_b, b1, -1), "amax", -1)
    has_k2 = k2_hi > k2_lo
    # Merge the ranges when they touch or overlap, so that no key is visited twice.
    merge = has_k2 & (k2_lo <= k1_hi) & (k2_hi >= k1_lo)
    k1_lo = torch.where(merge, torch.minimum(k1_lo, k2_lo), k1_lo)
    k1_hi = torch.where(merge, torch.maximum(k1_hi, k2_hi), k1_hi)
    keep = has_k2 & ~merge
    k2_lo = torch.where(keep, k2_lo, 0)
    k2_hi = torch.where(keep, k2_hi, 0)
    return torch.stack([row0, row1, k1_lo, k1_hi, k2_lo, k2_hi], dim=1).to(torch.int32)
