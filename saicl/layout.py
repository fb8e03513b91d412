"""Per-token layout of an encoder pass: who may attend to whom, and at which relative distance.

Built once per forward pass from the processor's ``attention_mask`` and ``segment_ids`` (docs/design.md §5)
and shared by every layer and every attention backend.

Relative position of key ``y`` seen from query token ``x`` (docs/design.md §3), from per-token fields::

    rel(x, y) = position[y] - position[x] + shift[x] * is_query[y] - shift[y] * is_query[x]

* ``full``: ``position`` is the index in the concatenation, ``shift = 0``.
* ``saicl``: demonstration tokens count ``0..len_i-1`` with ``shift = len_i``; query tokens count
  ``0..len_q-1``. So demonstration-to-query distances are those of the text ``d_i q``.
* ``fid``: the sequence is expanded to pairs ``d_i q`` (query copied), each pair its own frame with
  ordinary positions and ``shift = 0``.

Besides the predicate (``structure.allowed``), the layout also gives the compressed form every
fast backend uses: per episode, *local spans* (tokens that see only their own span and the global
span) and one *global span* (tokens that see, and are seen by, every valid token).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .positions import table_index
from .structures import PAD_SEGMENT, QUERY_SEGMENT, Structure, get_structure

Span = tuple[int, int]  # (start, length) in layout coordinates


@dataclass
class EncoderLayout:
    """Layout of one batch of episodes as the encoder sees it.

    All tensors are ``(batch, length)`` on the model's device, where ``length`` is the encoder
    sequence length (for ``fid``: the expanded pairs, otherwise the input length).

    Attributes:
        structure: the attention structure.
        valid: bool, ``False`` on padding.
        segment: long, the predicate's segment id (``PAD_SEGMENT`` on padding).
        position, shift: long, see the module docstring.
        is_query: bool, query tokens (and, for ``fid``, their copies).
        local_spans: per episode, spans that see only themselves and the global span.
        global_spans: per episode, the span that sees everything (``None`` if there is none).
        demo_lengths / query_lengths: token counts of the *input* episode (before any expansion).
        source_index: ``fid`` only: for each encoder token, its index in the input sequence.
    """

    structure: Structure
    valid: torch.Tensor
    segment: torch.Tensor
    position: torch.Tensor
    shift: torch.Tensor
    is_query: torch.Tensor
    local_spans: list[list[Span]]
    global_spans: list[Span | None]
    demo_lengths: list[list[int]]
    query_lengths: list[int]
    source_index: torch.Tensor | None = None
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    @property
    def device(self) -> torch.device:
        return self.valid.device

    def relative_positions(self) -> torch.Tensor:
        """Dense ``(batch, length, length)`` relative distances ``rel[b, x, y]`` (oracle/tests only)."""
        pos, shift, isq = self.position, self.shift, self.is_query.long()
        return (
            pos[:, None, :] - pos[:, :, None]
            + shift[:, :, None] * isq[:, None, :]
            - shift[:, None, :] * isq[:, :, None]
        )

    def allowed_mask(self) -> torch.Tensor:
        """Dense ``(batch, length, length)`` bool mask from the structure predicate (oracle/tests only)."""
        allowed = self.structure.allowed(self.segment[:, :, None], self.segment[:, None, :])
        return allowed & self.valid[:, :, None] & self.valid[:, None, :]

    def allowed_mask_from_spans(self) -> torch.Tensor:
        """The same mask rebuilt from the span form; tests check the two agree."""
        mask = torch.zeros(self.batch_size, self.length, self.length, dtype=torch.bool)
        for b in range(self.batch_size):
            glob = self.global_spans[b]
            if glob is not None:
                gs, gl = glob
                valid_len = int(self.valid[b].sum())
                mask[b, gs:gs + gl, :valid_len] = True
                mask[b, :valid_len, gs:gs + gl] = True
            for start, length in self.local_spans[b]:
                mask[b, start:start + length, start:start + length] = True
        return mask.to(self.device)

    def key_ranges(self) -> torch.Tensor:
        """Keys each token may attend to, as two half-open ranges: ``(batch, length, 4)`` long.

        ``[a0, a1, b0, b1]`` per token: a local-span token sees its own span ``[a0, a1)`` and the global
        span ``[b0, b1)``; a global-span token sees every valid token ``[0, n)`` (``b0 = b1 = 0``);
        padding sees nothing. The two ranges never overlap. Linear in ``length`` (no ``L x L``).
        """
        ranges = torch.zeros(self.batch_size, self.length, 4, dtype=torch.long)
        valid_lengths = self.valid.sum(1).tolist()
        for b in range(self.batch_size):
            glob = self.global_spans[b]
            g0, g1 = (glob[0], glob[0] + glob[1]) if glob is not None else (0, 0)
            if self.local_spans[b]:
                starts, lengths = (torch.tensor(x, dtype=torch.long) for x in zip(*self.local_spans[b]))
                globals_ = torch.tensor([g0, g1]).expand(len(starts), 2)
                rows = torch.cat([torch.stack([starts, starts + lengths], 1), globals_], 1)
                first = int(starts.min())
                span_tokens = int(lengths.sum())
                ranges[b, first:first + span_tokens] = torch.repeat_interleave(rows, lengths, dim=0)
            if glob is not None:
                ranges[b, g0:g1] = torch.tensor([0, valid_lengths[b], 0, 0])
        return ranges.to(self.device)

    def bias_index(self, max_distance: int) -> torch.Tensor:
        """Dense ``(batch, length, length)`` column indices into the bias table (oracle only)."""
        return table_index(self.relative_positions(), max_distance)


def _check_inputs(attention_mask: torch.Tensor, segment_ids: torch.Tensor) -> None:
    if attention_mask.dim() != 2 or segment_ids.dim() != 2:
        raise ValueError(
            "attention_mask and segment_ids must be (batch, length); got shapes "
            f"{tuple(attention_mask.shape)} and {tuple(segment_ids.shape)}"
        )
    if attention_mask.shape != segment_ids.shape:
        raise ValueError(
            f"segment_ids shape {tuple(segment_ids.shape)} does not match attention_mask / input_ids "
            f"shape {tuple(attention_mask.shape)}"
        )


def _episode_segments(b: int, mask_row: torch.Tensor, seg_row: torch.Tensor) -> tuple[list[int], int]:
    """Demonstration lengths and query length of episode ``b`` (validated, host tensors)."""
    n = int(mask_row.sum())
    if n == 0:
        raise ValueError(f"episode {b}: attention_mask is all zeros (an episode needs a query)")
    if not bool(mask_row[:n].all()):
        raise ValueError(f"episode {b}: attention_mask must be 1s followed by 0s (padding on the right)")
    values, counts = torch.unique_consecutive(seg_row[:n], return_counts=True)
    values, counts = values.tolist(), counts.tolist()
    if values[-1] != QUERY_SEGMENT:
        raise ValueError(
            f"episode {b}: segment_ids must end with the query (segment id {QUERY_SEGMENT}); "
            f"the last non-padding token has segment id {values[-1]}"
        )
    demo_ids = values[:-1]
    if demo_ids != list(range(len(demo_ids))):
        raise ValueError(
            f"episode {b}: demonstration segment ids must be 0, 1, ..., k-1 in order, each one "
            f"contiguous, followed by the query ({QUERY_SEGMENT}); got the run {values}"
        )
    return counts[:-1], counts[-1]


def build_layout(
    attention_mask: torch.Tensor, segment_ids: torch.Tensor, structure: str | Structure
) -> EncoderLayout:
    """Build the encoder layout for a batch (validates the segment ids; one host sync).

    Args:
        attention_mask: ``(batch, length)``, 1 on tokens, 0 on right padding.
        segment_ids: ``(batch, length)``, demonstration index ``0..k-1`` or ``-1`` for the query.
        structure: a registered structure name or :class:`Structure`.
    """
    structure = get_structure(structure)
    _check_inputs(attention_mask, segment_ids)
    device = attention_mask.device
    mask_cpu = attention_mask.detach().to("cpu").bool()
    seg_cpu = segment_ids.detach().to("cpu").long()
    episodes = [_episode_segments(b, mask_cpu[b], seg_cpu[b]) for b in range(mask_cpu.shape[0])]
    demo_lengths = [d for d, _ in episodes]
    query_lengths = [q for _, q in episodes]
    if structure.query_per_demo:
        fields = _fid_fields(demo_lengths, query_lengths)
    else:
        fields = _inplace_fields(structure, demo_lengths, query_lengths, mask_cpu.shape[1])
    (valid, segment, position, shift, is_query, source, local_spans, global_spans) = fields
    return EncoderLayout(
        structure=structure,
        valid=valid.to(device),
        segment=segment.to(device),
        position=position.to(device),
        shift=shift.to(device),
        is_query=is_query.to(device),
        local_spans=local_spans,
        global_spans=global_spans,
        demo_lengths=demo_lengths,
        query_lengths=query_lengths,
        source_index=None if source is None else source.to(device),
    )


def _positions_in_segments(lengths: torch.Tensor) -> torch.Tensor:
    """``[0..l0-1, 0..l1-1, ...]`` for segment lengths ``lengths``."""
    starts = torch.cumsum(lengths, 0) - lengths
    total = int(lengths.sum())
    return torch.arange(total) - torch.repeat_interleave(starts, lengths)


def _inplace_fields(structure: Structure, demo_lengths, query_lengths, length: int):
    batch = len(demo_lengths)
    valid = torch.zeros(batch, length, dtype=torch.bool)
    segment = torch.full((batch, length), PAD_SEGMENT, dtype=torch.long)
    position = torch.zeros(batch, length, dtype=torch.long)
    shift = torch.zeros(batch, length, dtype=torch.long)
    is_query = torch.zeros(batch, length, dtype=torch.bool)
    local_spans, global_spans = [], []
    for b, (demos, lq) in enumerate(zip(demo_lengths, query_lengths)):
        lengths = torch.tensor([*demos, lq], dtype=torch.long)
        k, n = len(demos), int(lengths.sum())
        valid[b, :n] = True
        segment[b, :n] = torch.repeat_interleave(torch.tensor([*range(k), QUERY_SEGMENT]), lengths)
        is_query[b, n - lq:n] = True
        starts = (torch.cumsum(lengths, 0) - lengths).tolist()
        if structure.demo_frames:
            position[b, :n] = _positions_in_segments(lengths)
            shift[b, :n - lq] = torch.repeat_interleave(lengths[:k], lengths[:k])
            local_spans.append([(starts[i], demos[i]) for i in range(k)])
            global_spans.append((n - lq, lq))
        else:
            position[b, :n] = torch.arange(n)
            local_spans.append([])
            global_spans.append((0, n))
    return valid, segment, position, shift, is_query, None, local_spans, global_spans


def _fid_fields(demo_lengths, query_lengths):
    per_episode = []
    for demos, lq in zip(demo_lengths, query_lengths):
        n_demo_tokens = sum(demos)
        query_source = torch.arange(n_demo_tokens, n_demo_tokens + lq)
        if not demos:  # no demonstrations: plain T5 on the query
            per_episode.append(([query_source], [QUERY_SEGMENT], [lq]))
            continue
        starts = torch.cumsum(torch.tensor(demos), 0) - torch.tensor(demos)
        pieces, ids, lens = [], [], []
        for i, (start, ld) in enumerate(zip(starts.tolist(), demos)):
            pieces += [torch.arange(start, start + ld), query_source]
            ids.append(i)
            lens.append(ld + lq)
        per_episode.append((pieces, ids, lens))
    length = max(sum(lens) for _, _, lens in per_episode)
    batch = len(per_episode)
    valid = torch.zeros(batch, length, dtype=torch.bool)
    segment = torch.full((batch, length), PAD_SEGMENT, dtype=torch.long)
    position = torch.zeros(batch, length, dtype=torch.long)
    shift = torch.zeros(batch, length, dtype=torch.long)
    is_query = torch.zeros(batch, length, dtype=torch.bool)
    source = torch.zeros(batch, length, dtype=torch.long)
    local_spans, global_spans = [], []
    for b, ((pieces, ids, lens), lq) in enumerate(zip(per_episode, query_lengths)):
        lens_t = torch.tensor(lens, dtype=torch.long)
        n = int(lens_t.sum())
        valid[b, :n] = True
        source[b, :n] = torch.cat(pieces)
        segment[b, :n] = torch.repeat_interleave(torch.tensor(ids), lens_t)
        pos = _positions_in_segments(lens_t)
        position[b, :n] = pos
        is_query[b, :n] = pos >= torch.repeat_interleave(lens_t - lq, lens_t)
        starts = (torch.cumsum(lens_t, 0) - lens_t).tolist()
        local_spans.append(list(zip(starts, lens)))
        global_spans.append(None)
    return valid, segment, position, shift, is_query, source, local_spans, global_spans
