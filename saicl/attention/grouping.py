"""Segment-batched grouping of an encoder layout: dense grids of spans and their T5 bias blocks.

Shared by the ``torch`` (:mod:`saicl.attention.segmented`) and ``xformers`` backends. The layout's
span form splits every episode into *local spans* (tokens that see their own span and the episode's
global span) and one *global span* (tokens that see every valid token); see :mod:`saicl.layout`.

* **Local groups.** Spans of similar length are stacked into one padded grid ``(N, S)`` per group
  (:func:`group_spans`): mixed demonstration lengths cost at most a bounded padding factor per group
  instead of padding every span to the longest one in the batch. A span's keys are its own ``S``
  slots followed by the ``G`` slots of its episode's global span.
* **Global rows** (the query for ``saicl``, everything for ``full``) see the whole encoder row: a
  ``(B, G)`` grid whose keys are all ``L`` tokens of the episode.

Everything per pair is built on the layout's device from the layout's per-token fields: the table
column of every (row, key) pair (:class:`BiasIndex`, int32) and, per dtype, the bias gathered from
the per-distance table. Masked key slots point at an extra table column holding the *compute dtype's*
minimum, appended after the table is cast, so a fully masked row stays finite under autocast (the
float32 minimum cast to bf16 or fp16 would become ``-inf`` and its softmax NaN).

Flat token ``t`` of episode ``b`` is row ``b * L + t`` of the ``(B * L, ...)`` view of q, k, v. Grid
slots holding no token point at a real token of the same episode (finite values) and are never
written back: their output row is the spare row ``B * L`` (:attr:`Grid.scatter`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..layout import EncoderLayout
from .base import check_qkv

# A span joins a group while its length is at most the group's first (shortest) length plus this slack:
# max(_MIN_SLACK, first // _SLACK_DIVISOR). Padding costs at most (1.25)^2 of a span's own pairs, or a few
# slots on short spans, where one more SDPA call would cost more than the padding.
_MIN_SLACK = 8
_SLACK_DIVISOR = 4


def group_spans(lengths: Sequence[int]) -> list[list[int]]:
    """Partition spans into groups of similar length; each group keeps the spans' original order.

    Args:
        lengths: length of every span (any order).
    Returns:
        Lists of indices into ``lengths``, groups by increasing length; every index appears once.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    first = None
    for i in order:
        if first is None or lengths[i] > first + max(_MIN_SLACK, first // _SLACK_DIVISOR):
            groups.append([])
            first = lengths[i]
        groups[-1].append(i)
    return [sorted(g) for g in groups]


@dataclass
class Grid:
    """Rows of tokens stacked into a dense ``(R, S)`` grid of flat token indices.

    Attributes:
        index: ``(R, S)`` long flat indices into ``B * L`` (empty slots: a real token of the row's episode).
        filled: ``(R, S)`` bool, ``False`` on empty slots.
        scatter: ``(R * S,)`` long output row of each slot; empty slots point at the spare row ``B * L``.
        start: if the grid is the plain slice ``[start, start + R * S)`` of the flat tokens, its start
            (so it can be read as a view, without a copy); else ``None``.
        full: every slot holds a token (known on the host, no device sync).
    """

    index: torch.Tensor
    filled: torch.Tensor
    scatter: torch.Tensor
    start: int | None
    full: bool

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.index.shape)  # type: ignore[return-value]


def make_grid(
    rows: Sequence[tuple[int, int, int]], width: int, length: int, spare: int, device: torch.device
) -> Grid:
    """A :class:`Grid` of ``(episode, start, count)`` rows, ``width`` slots each, built on ``device``.

    Only the ``(R, 3)`` row table crosses from the host; the ``(R, width)`` indices are built on ``device``.
    ``spare`` is the output row of empty slots.
    """
    info = torch.tensor(list(rows), dtype=torch.long).view(-1, 3)
    flat_starts = (info[:, 0] * length + info[:, 1]).tolist()
    full = bool((info[:, 2] == width).all())
    regular = full and all(s == flat_starts[0] + r * width for r, s in enumerate(flat_starts))
    info = info.to(device)
    episode, start, count = info[:, 0:1], info[:, 1:2], info[:, 2:3]
    slot = torch.arange(width, device=device)[None, :]
    filled = slot < count
    index = episode * length + torch.where(filled, start + slot, 0)
    scatter = torch.where(filled, index, spare).reshape(-1)
    return Grid(index=index, filled=filled, scatter=scatter, start=flat_starts[0] if regular and rows else None,
                full=full)


@dataclass
class BiasIndex:
    """Table columns of every (row slot, key slot) pair of a grid: the bias before the gather.

    Attributes:
        index: ``(R or 1, S, K)`` int32 column of the extended table (:func:`extended_table`); masked keys
            point at the last column (the compute dtype's minimum). ``R`` collapses to 1 when every row of the
            grid has the same distances and nothing is masked (equal-length demonstrations): one copy,
            broadcast.
    """

    index: torch.Tensor

    @property
    def shared(self) -> bool:
        return self.index.shape[0] == 1


def extended_table(table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(H, 2M+2)``: the per-distance table cast to ``dtype`` plus a last column at ``dtype``'s minimum.

    The minimum is written after the cast, so it is finite in ``dtype`` (fp32's minimum in bf16 is -inf).
    Differentiable in ``table``.
    """
    table = table.to(dtype)
    return torch.cat([table, table.new_full((table.shape[0], 1), torch.finfo(dtype).min)], dim=1)


def bias_index(
    fields: tuple[torch.Tensor, torch.Tensor, torch.Tensor], rows: torch.Tensor, keys: torch.Tensor,
    key_ok: torch.Tensor | None, max_distance: int,
) -> BiasIndex:
    """Table columns of grid ``rows`` ``(R, S)`` against grid ``keys`` ``(R, K)``, on their device.

    Args:
        fields: flat int32 ``position, shift, is_query`` ``(B * L,)`` (:func:`flat_fields`, grids' device).
        key_ok: ``(R, K)`` bool, ``False`` on key slots a row may not see (``None``: all allowed).
        max_distance: ``M`` of the ``(H, 2M+1)`` table.
    """
    if key_ok is not None and bool(key_ok.all()):
        key_ok = None
    if key_ok is None and rows.shape[0] > 1:
        # Every row carries the same fields (equal-length demonstrations): one shared copy. One sync.
        same = torch.stack([(f[g] == f[g[:1]]).all() for f in fields for g in (rows, keys)]).all()
        if bool(same):
            rows, keys = rows[:1], keys[:1]
    pos, shift, isq = fields
    pr, sr, qr = (f[rows][:, :, None] for f in (pos, shift, isq))
    pk, sk, qk = (f[keys][:, None, :] for f in (pos, shift, isq))
    # rel(x, y) = position[y] - position[x] + shift[x] * is_query[y] - shift[y] * is_query[x] (layout.py)
    column = (pk - pr + sr * qk - sk * qr).clamp_(-max_distance, max_distance).add_(max_distance)
    if key_ok is not None:
        column.masked_fill_(~key_ok[:, None, :], 2 * max_distance + 1)
    return BiasIndex(index=column)


def gather_bias(table_ext: torch.Tensor, index: torch.Tensor, align: int = 1) -> torch.Tensor:
    """``(R, H, S, K)`` bias ``table_ext[h, index[r, s, k]]`` whose row stride is a multiple of ``align``.

    Args:
        table_ext: ``(H, C)`` from :func:`extended_table`.
        index: ``(R, S, K)`` columns (int32).
        align: the storage of each ``(s, :)`` row is padded to a multiple of this many elements (memory-
            efficient kernels read the bias in aligned vectors); the result is a view of the first ``K``.
    """
    width = index.shape[-1]
    padded = -(-width // align) * align
    if padded != width:  # padding keys read the masked column; they are sliced off below
        index = torch.nn.functional.pad(index, (0, padded - width), value=table_ext.shape[1] - 1)
    bias = table_ext[:, index].permute(1, 0, 2, 3).contiguous()  # differentiable gather
    return bias[..., :width]


@dataclass
class LocalGroup:
    """Local spans of similar length: a ``(N, S)`` grid and the ``G`` global keys of each span.

    Attributes:
        rows: the spans' tokens (queries, and the first ``S`` keys of each span).
        cross: ``(N, G)`` the global span of each span's episode (``None`` if the structure has none).
        cross_shared: every span has the same global keys (one episode): they can be broadcast.
        self_index / cross_index: columns of the bias on own keys ``(N or 1, S, S)`` and on global keys
            ``(N or 1, S, G)``.
    """

    rows: Grid
    cross: Grid | None
    cross_shared: bool
    self_index: BiasIndex
    cross_index: BiasIndex | None

    @property
    def n_spans(self) -> int:
        return self.rows.shape[0]

    @property
    def width(self) -> int:
        return self.rows.shape[1]

    def key_grid(self) -> torch.Tensor:
        """``(N, S + G)`` flat indices of each span's keys: own span, then global span."""
        if self.cross is None:
            return self.rows.index
        return torch.cat([self.rows.index, self.cross.index], dim=1)

    def joint_index(self) -> torch.Tensor:
        """``(N or 1, S, S + G)`` bias columns over :meth:`key_grid`."""
        if self.cross_index is None:
            return self.self_index.index
        self_i, cross_i = self.self_index.index, self.cross_index.index
        rows = max(self_i.shape[0], cross_i.shape[0])
        return torch.cat([self_i.expand(rows, -1, -1), cross_i.expand(rows, -1, -1)], dim=2)


@dataclass
class GlobalRows:
    """Rows that see every valid token of their episode: a ``(B, G)`` grid against all ``L`` keys.

    Attributes:
        rows: the global spans.
        index: ``(B, G, L)`` bias columns (invalid keys masked).
    """

    rows: Grid
    index: BiasIndex


@dataclass
class Grouping:
    """The segment-batched form of one encoder pass (built once per forward by :func:`build_grouping`).

    Attributes:
        layout: the layout it was built for (``B`` episodes of ``L`` tokens).
        groups: local span groups.
        glob: the global rows (``None`` if the structure has no global span, e.g. ``fid``).
        pad_rows: ``(P,)`` flat indices of padding tokens (their output rows are zero).
        table: ``(H, 2M+1)`` per-distance bias table (differentiable).
        align: row alignment of the gathered biases (:func:`gather_bias`).
    """

    layout: EncoderLayout
    groups: list[LocalGroup]
    glob: GlobalRows | None
    pad_rows: torch.Tensor
    table: torch.Tensor
    align: int = 1
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def heads(self) -> int:
        return self.table.shape[0]

    @property
    def spare_row(self) -> int:
        """Output row that absorbs writes from empty grid slots (dropped at the end)."""
        return self.layout.batch_size * self.layout.length

    def bias(self, name: tuple, index: Callable[[], torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Bias ``(R or 1, H, S, K)`` in ``dtype`` of the columns ``index()`` ``(R or 1, S, K)``.

        Cached per ``name`` and dtype: every layer of the pass reuses it; under autocast the compute dtype
        (bf16) differs from the table's (fp32), so the cast happens here, before the mask is applied.
        """
        key = ("bias", name, dtype)
        if key not in self._cache:
            tkey = ("table", dtype)
            if tkey not in self._cache:
                self._cache[tkey] = extended_table(self.table, dtype)
            self._cache[key] = gather_bias(self._cache[tkey], index(), self.align)
        return self._cache[key]


def flat_fields(layout: EncoderLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``position, shift, is_query`` of the layout as flat ``(B * L,)`` int32 tensors on ``device``.

    int32 halves the per-pair distance temporaries; positions are far below 2**31.
    """
    return tuple(t.to(device=device, dtype=torch.int32).reshape(-1)  # type: ignore[return-value]
                 for t in (layout.position, layout.shift, layout.is_query))


def build_grouping(layout: EncoderLayout, table: torch.Tensor, align: int = 1) -> Grouping:
    """Group the layout's spans and build every bias index on ``table``'s device.

    Args:
        layout: the encoder layout (its tensors are moved to ``table``'s device if they are elsewhere).
        table: ``(H, 2M+1)`` per-distance bias table; the biases are gathered from it lazily per dtype.
        align: row alignment of the gathered biases (1 for torch SDPA on CPU; 16 for memory-efficient kernels).
    """
    if table.dim() != 2 or table.shape[1] % 2 != 1:
        raise ValueError(f"table must be (heads, 2 * max_distance + 1); got shape {tuple(table.shape)}")
    device = table.device
    batch, length = layout.batch_size, layout.length
    max_distance = (table.shape[1] - 1) // 2
    fields = flat_fields(layout, device)
    valid = layout.valid.to(device)
    spare = batch * length  # output row that absorbs writes from empty grid slots

    globs = layout.global_spans
    has_glob = any(g is not None for g in globs)
    if has_glob and not all(g is not None for g in globs):
        raise ValueError("layout.global_spans mixes episodes with and without a global span")
    glob_len = max((g[1] for g in globs), default=0) if has_glob else 0

    spans = [(b, start, n) for b, row in enumerate(layout.local_spans) for start, n in row]
    groups = []
    for members in group_spans([n for _, _, n in spans]):
        rows_spec = [spans[i] for i in members]
        rows = make_grid(rows_spec, max(n for _, _, n in rows_spec), length, spare, device)
        self_index = bias_index(fields, rows.index, rows.index, None if rows.full else rows.filled, max_distance)
        cross = cross_index = None
        cross_shared = False
        if has_glob:
            cross_spec = [(b, globs[b][0], globs[b][1]) for b, _, _ in rows_spec]
            cross = make_grid(cross_spec, glob_len, length, spare, device)
            cross_shared = len({(b, s) for b, s, _ in cross_spec}) == 1 and cross.full
            cross_index = bias_index(fields, rows.index, cross.index, None if cross.full else cross.filled,
                                     max_distance)
        groups.append(LocalGroup(rows=rows, cross=cross, cross_shared=cross_shared, self_index=self_index,
                                 cross_index=cross_index))

    glob = None
    if has_glob:
        rows = make_grid([(b, g[0], g[1]) for b, g in enumerate(globs)], glob_len, length, spare, device)
        every = torch.arange(batch * length, device=device).view(batch, length)
        glob = GlobalRows(rows=rows, index=bias_index(fields, rows.index, every, valid, max_distance))

    return Grouping(layout=layout, groups=groups, glob=glob, pad_rows=torch.nonzero(~valid.reshape(-1)).reshape(-1),
                    table=table, align=align)


def glob_slice(grouping: Grouping) -> tuple[int, int] | None:
    """``(start, length)`` if every episode's global span is the same full slice, else ``None``."""
    globs = grouping.layout.global_spans
    if grouping.glob is None or not grouping.glob.rows.full or len({tuple(g) for g in globs}) != 1:
        return None
    return globs[0]


def gather_rows(flat: torch.Tensor, grid: torch.Tensor, start: int | None, heads: int) -> torch.Tensor:
    """Rows of ``flat`` ``(B * L, H * D)`` as a ``(R, S, H, D)`` grid (a view when ``start`` is set).

    Args:
        grid: ``(R, S)`` flat token indices.
    """
    rows, slots = grid.shape
    if start is not None:
        block = flat[start:start + rows * slots]
    else:
        block = flat.index_select(0, grid.reshape(-1))
    return block.view(rows, slots, heads, -1)


# attention(q, k, v, bias) on "BMHK" tensors: q (R, S, H, D), k and v (R, K, H, D), bias (R or 1, H, S, K) in
# q's dtype (1: shared by every row, to be broadcast); returns (R, S, H, D). No 1/sqrt(d) scaling (T5).
GridAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# split(q_flat, k_flat, v_flat, grouping, i, group) -> (N, S, H, D): a group's local rows computed another way.
SplitAttention = Callable[..., torch.Tensor]


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Grouping, attention: GridAttention,
    split: SplitAttention | None = None,
) -> torch.Tensor:
    """Structured attention of ``(B, L, H, D)`` q, k, v through the grouping; returns ``(B, L, H, D)``.

    Every local group runs ``attention`` once over its ``(N, S)`` grid against its ``[own span | global
    span]`` keys (or ``split`` computes it); the global rows run ``attention`` against all ``L`` keys. Padding
    rows of the output are zero.
    """
    layout = plan.layout
    check_qkv(q, k, v, layout)
    if q.shape[2] != plan.heads:
        raise ValueError(f"q has {q.shape[2]} heads but the bias table has {plan.heads}")
    batch, length, heads, head_dim = q.shape
    q_flat, k_flat, v_flat = (t.reshape(batch * length, heads * head_dim) for t in (q, k, v))
    out = q.new_empty(batch * length + 1, heads * head_dim)  # + the spare row for empty grid slots
    for i, group in enumerate(plan.groups):
        if split is not None:
            local = split(q_flat, k_flat, v_flat, plan, i, group)
        else:
            rows = group.rows
            qg = gather_rows(q_flat, rows.index, rows.start, heads)
            keys = group.key_grid()
            kg, vg = (gather_rows(t, keys, None, heads) for t in (k_flat, v_flat))
            bias = plan.bias((i, "joint"), group.joint_index, q.dtype)
            local = attention(qg, kg, vg, bias)
        out.index_copy_(0, group.rows.scatter, local.reshape(-1, heads * head_dim))
    if plan.glob is not None:
        glob = plan.glob
        same = glob_slice(plan)
        if same is not None:  # the same slice of every episode: a strided view
            qg = q[:, same[0]:same[0] + same[1]]
        else:
            qg = gather_rows(q_flat, glob.rows.index, glob.rows.start, heads)
        # Global rows see the whole encoder row; invalid keys are masked in their bias.
        bias = plan.bias(("glob",), lambda: glob.index.index, q.dtype)
        out_glob = attention(qg, k, v, bias)
        out.index_copy_(0, glob.rows.scatter, out_glob.reshape(-1, heads * head_dim))
    if plan.pad_rows.numel():
        out.index_fill_(0, plan.pad_rows, 0.0)
    return out[: batch * length].view(batch, length, heads, head_dim)
