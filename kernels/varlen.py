"""Packed (varlen) metadata for the structured attention kernels, from plain tensors.

The kernels never see ``(batch, length)`` tensors: the tokens of every episode are packed back to
back into ``(total_tokens, heads, head_dim)`` (``cu_seqlens`` style, padding dropped). What the
kernels need about a token is given per token:

* ``position``, ``shift``, ``is_query``: the relative distance of key ``y`` seen from ``x`` is
  ``pos[y] - pos[x] + shift[x] * is_query[y] - shift[y] * is_query[x]`` (see ``docs/design.md``);
* ``key_ranges``: the keys it may attend to, two half-open ranges ``[a0, a1) u [b0, b1)`` relative
  to the start of its episode (``b0 == b1`` when there is no second range). This is exactly the
  model's ``EncoderLayout.key_ranges()`` with its rows packed; :func:`build_plan` shifts them to
  packed coordinates.

Visibility must be symmetric (``x`` sees ``y`` iff ``y`` sees ``x``; every structure of the package
is): the backward pass finds the query rows that see a key tile with that tile's own ranges.

Scheduling: every episode is cut into *tiles* of ``block_m`` consecutive tokens (a tile never
crosses an episode). A tile's key set is the union of its rows' ranges, stored as two disjoint
ranges (merged when they touch, so no key is ever visited twice). Rows of a tile may belong to
different spans (demonstrations shorter than a tile): the kernels mask every element with the row's
own ranges, so a straddling tile is exact; it only visits the keys of all the spans it touches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Rows of VarlenPlan.fields: the two view codes of every token (see view_codes).
FIELD_VIEW0, FIELD_VIEW1 = range(2)
N_FIELDS = 2
# |position| and |position - shift| bound: the view codes 2 * value + is_query must fit int32.
MAX_POSITION = 2**29
# Columns of VarlenPlan.tiles.
TILE_ROW0, TILE_ROW1, TILE_K1_LO, TILE_K1_HI, TILE_K2_LO, TILE_K2_HI = range(6)
N_TILE_COLUMNS = 6


@dataclass
class VarlenPlan:
    """Everything the kernels need about one batch of packed episodes (built once per forward pass).

    Attributes:
        cu_seqlens: ``(batch + 1,)`` int32, packed start of every episode (and the total).
        fields: ``(2, total_tokens)`` int32 view codes ``2 * position + is_query`` and
            ``2 * (position - shift) + is_query`` (:func:`view_codes`).
        ranges: ``(total_tokens, 4)`` int32 key ranges ``a0, a1, b0, b1`` in packed coordinates.
        tiles: ``(num_tiles, 6)`` int32: ``row0, row1`` (the tile's packed rows, ``row1 - row0 <=
            block_m``) and two disjoint key ranges ``k1_lo, k1_hi, k2_lo, k2_hi`` (possibly empty).
        block_m: tile size the plan was built for (rows per program, and the backward's key tile).
    """

    cu_seqlens: torch.Tensor
    fields: torch.Tensor
    ranges: torch.Tensor
    tiles: torch.Tensor
    block_m: int

    @property
    def total_tokens(self) -> int:
        return self.fields.shape[1]

    @property
    def num_tiles(self) -> int:
        return self.tiles.shape[0]

    @property
    def device(self) -> torch.device:
        return self.fields.device

    def to(self, device: torch.device | str) -> VarlenPlan:
        """The same plan with its tensors on ``device``."""
        return VarlenPlan(
            cu_seqlens=self.cu_seqlens.to(device), fields=self.fields.to(device), ranges=self.ranges.to(device),
            tiles=self.tiles.to(device), block_m=self.block_m,
        )

    def visited_pairs(self) -> int:
        """Query-key pairs the kernels compute (tile rows x visited keys), for efficiency reports."""
        t = self.tiles.long()
        rows = t[:, TILE_ROW1] - t[:, TILE_ROW0]
        keys = (t[:, TILE_K1_HI] - t[:, TILE_K1_LO]) + (t[:, TILE_K2_HI] - t[:, TILE_K2_LO])
        return int((rows * keys).sum())


def _check_vector(name: str, x: torch.Tensor, total: int) -> None:
    if x.dim() != 1 or x.shape[0] != total:
        raise ValueError(f"{name} must be ({total},) (one value per packed token); got {tuple(x.shape)}")
    if x.dtype.is_floating_point or x.dtype.is_complex:
        raise ValueError(f"{name} must be an integer (or bool) tensor; got {x.dtype}")


def build_plan(
    cu_seqlens: torch.Tensor,
    position: torch.Tensor,
    shift: torch.Tensor,
    is_query: torch.Tensor,
    key_ranges: torch.Tensor,
    block_m: int,
) -> VarlenPlan:
    """Per-token fields and a tile schedule (one host pass, one copy to ``position``'s device).

    Args:
        cu_seqlens: ``(batch + 1,)`` integer, packed start of every episode; ``cu_seqlens[0] == 0``,
            non-decreasing, ``cu_seqlens[-1] == total_tokens``.
        position, shift, is_query: ``(total_tokens,)`` integer (``is_query`` may be bool).
        key_ranges: ``(total_tokens, 4)`` integer ``[a0, a1, b0, b1]`` relative to the token's episode
            start, ``0 <= a0 <= a1 <= n`` and ``0 <= b0 <= b1 <= n`` (``n`` its episode's length);
            every token must see itself. Visibility must be symmetric (module docstring).
        block_m: tile size (rows per program); also the key-tile size of the backward pass.
    Returns:
        A :class:`VarlenPlan` on ``position``'s device.
    Raises:
        ValueError: naming the argument that does not fit.
    """
    if block_m <= 0:
        raise ValueError(f"block_m must be positive, got {block_m}")
    device = position.device
    cu = cu_seqlens.detach().to("cpu").long()
    if cu.dim() != 1 or cu.numel() < 1 or int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must be (batch + 1,) non-decreasing and start at 0; got {cu.tolist()[:8]}")
    total = int(cu[-1])
    for name, x in (("position", position), ("shift", shift), ("is_query", is_query)):
        _check_vector(name, x, total)
    if key_ranges.shape != (total, 4) or key_ranges.dtype.is_floating_point:
        raise ValueError(
            f"key_ranges must be an integer ({total}, 4) tensor [a0, a1, b0, b1]; got "
            f"{tuple(key_ranges.shape)} {key_ranges.dtype}"
        )
    if total >= 2**31:
        raise ValueError(f"total_tokens must be < 2**31 (int32 token indices); got {total}")

    lengths = cu[1:] - cu[:-1]
    episode_start = torch.repeat_interleave(cu[:-1], lengths)  # (total,)
    episode_len = torch.repeat_interleave(lengths, lengths)
    local = key_ranges.detach().to("cpu").long()
    a0, a1, b0, b1 = local.t()
    own = torch.arange(total) - episode_start
    bad = (
        (a0 < 0) | (a0 > a1) | (a1 > episode_len) | (b0 < 0) | (b0 > b1) | (b1 > episode_len)
        | ~(((own >= a0) & (own < a1)) | ((own >= b0) & (own < b1)))
    )
    if bool(bad.any()):
        t = int(bad.nonzero()[0])
        raise ValueError(
            f"key_ranges[{t}] = {local[t].tolist()} is not two ranges inside its episode of "
            f"{int(episode_len[t])} tokens containing the token itself (index {int(own[t])})"
        )
    ranges = local + episode_start[:, None]
    # Normal form: a non-empty first range (the tile schedule spans first ranges), an empty second
    # range as (0, 0).
    swap = (a1 == a0)[:, None]
    ranges = torch.where(swap, ranges[:, [2, 3, 0, 1]], ranges)
    ranges[:, 2:] = torch.where((ranges[:, 3] > ranges[:, 2])[:, None], ranges[:, 2:], 0)

    fields = view_codes(position.detach().to("cpu"), shift.detach().to("cpu"), is_query.detach().to("cpu"))
    tiles = _tiles(cu.tolist(), ranges, block_m)
    return VarlenPlan(
        cu_seqlens=cu.to(torch.int32).to(device),
        fields=fields.to(torch.int32).contiguous().to(device),
        ranges=ranges.to(torch.int32).contiguous().to(device),
        tiles=tiles.contiguous().to(device),
        block_m=block_m,
    )


def view_codes(position: torch.Tensor, shift: torch.Tensor, is_query: torch.Tensor) -> torch.Tensor:
    """``(2, n)`` long: ``2 * position + is_query`` and ``2 * (position - shift) + is_query``.

    A token's position seen from a non-query token is ``position``, seen from a query token
    ``position - shift``, so ``rel(x, y) = view[is_query[x]](y) - view[is_query[y]](x)``; the low bit
    carries ``is_query`` along. Two int32 vectors per token instead of three.
    """
    pos, shift, isq = position.long(), shift.long(), is_query.long()
    if bool(((isq != 0) & (isq != 1)).any()):
        raise ValueError("is_query must be 0/1 (or bool)")
    for name, value in (("position", pos), ("position - shift", pos - shift)):
        if value.numel() and int(value.abs().max()) >= MAX_POSITION:
            raise ValueError(f"{name} must lie in (-2**29, 2**29); got {int(value.abs().max())}")
    return torch.stack([2 * pos + isq, 2 * (pos - shift) + isq])


def _tiles(cu: list[int], ranges: torch.Tensor, block_m: int) -> torch.Tensor:
    """Tile schedule ``(num_tiles, 6)`` int32 from packed per-token ranges ``(total, 4)`` (a0, a1, b0, b1)."""
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
