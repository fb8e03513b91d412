"""``attn_backend="torch"``: segment-batched attention in plain PyTorch (CPU default; trains).

The layout's span form (:class:`saicl.layout.EncoderLayout`) splits every episode into *local
spans* (tokens that see their own span and the global span) and one *global span* (tokens that see
every valid token). This backend never builds a ``length x length`` tensor for ``saicl`` or ``fid``:

* **Local rows.** All local spans of the batch are stacked into a padded grid ``(N, Ls)``
  (``N`` spans, ``Ls`` the longest span). Each span's keys are its own tokens (``Ls`` slots) and
  the global span of its episode (``Lg`` slots), so scores are ``(N, H, Ls, Ls + Lg)``: linear in
  the number of demonstrations. The bias of both key groups is gathered from the per-distance
  table once per forward, with padded key slots folded in as the dtype's minimum.
* **Global rows** (the query for ``saicl``, everything for ``full``) attend to the whole encoder
  row: ``(B, H, Lg, L)`` scores, linear in ``L`` because ``Lg`` is the query length. For ``full``
  the global span *is* the sequence, so ``full`` is dense by definition.

Two execution paths share one plan (:class:`SegmentPlan`):

* **Inference** (CPU, no tensor needs a gradient): the local part runs as two fused flash-attention
  calls (own span, global span) whose partial results are merged with their log-sum-exps. No
  key copies are made: for a single episode with equal-length spans, queries and keys are strided
  views of the caller's ``(B, L, H, D)`` tensors.
* **Training** (anything needs a gradient): the keys of each span and of its global span are
  gathered into one ``(N, H, Ls + Lg, D)`` block and a single ``scaled_dot_product_attention``
  with the bias as its mask runs under ordinary autograd, so gradients reach q, k, v and the bias
  table.

Padding rows of the output are zero; grid slots that hold no token are computed on a harmless
stand-in token and never written back, and their key slots are masked, so they get no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..layout import EncoderLayout
from ..positions import table_index
from .base import AttentionBackend, check_qkv


def _regular_start(index: torch.Tensor) -> int | None:
    """``start`` if the ``(N, S)`` grid ``index`` is ``start + arange(N * S)`` (a plain view), else None."""
    if index.numel() == 0:
        return None
    start = int(index[0, 0])
    expected = torch.arange(start, start + index.numel(), dtype=index.dtype).view_as(index)
    return start if torch.equal(index, expected) else None


def _pad_grid(
    spans: list[tuple[int, int, int]], width: int, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat token indices of a padded grid of spans.

    Args:
        spans: ``(episode, start, length)`` per grid row.
        width: grid width (the longest span).
        length: encoder length ``L`` (flat index of token ``t`` of episode ``b`` is ``b * L + t``).
    Returns:
        ``index`` ``(rows, width)`` long (padding slots point at token 0 of the row's episode, a
        real token, so gathered values stay finite) and ``filled`` ``(rows, width)`` bool.
    """
    rows = len(spans)
    slot = torch.arange(width)
    if rows == 0:
        return torch.zeros(0, width, dtype=torch.long), torch.zeros(0, width, dtype=torch.bool)
    info = torch.tensor(spans, dtype=torch.long)
    episode, start, count = info[:, 0:1], info[:, 1:2], info[:, 2:3]
    filled = slot[None, :] < count
    index = episode * length + torch.where(filled, start + slot[None, :], 0)
    return index, filled


@dataclass
class SegmentPlan:
    """Layer-independent state of one encoder pass (built by :meth:`SegmentedBackend.prepare`).

    Index tensors are flat indices into the ``(B * L)`` tokens of the layout.

    Attributes:
        layout: the layout the plan was built for.
        n_spans / span_len: ``N`` local spans in the grid, ``Ls`` slots each.
        glob_len: ``Lg`` slots of the global grid (0 if the structure has no global span).
        local_index: ``(N, Ls)`` gather indices of the local grid (``None`` if there are no spans).
        local_scatter: ``(N * Ls,)`` rows of the output for each local slot; empty slots point at a
            spare row ``B * L`` that is dropped.
        local_start: if the local grid is a plain view of the input (one episode, equal spans,
            back to back), its first token; else ``None``.
        cross_index: ``(N, Lg)`` gather indices of each span's global keys.
        cross_start: first token of the global span if every span shares one (single episode).
        glob_index / glob_scatter / glob_start: the same for the global rows ``(B, Lg)``.
        bias_self: ``(N or 1, H, Ls, Ls)`` bias of a span's rows on its own keys, mask folded in.
        bias_cross: ``(N or 1, H, Ls, Lg)`` bias of a span's rows on its global keys.
        bias_glob: ``(B, H, Lg, L)`` bias of the global rows on every token.
        pad_rows: ``(P,)`` flat indices of padding tokens (their output rows are zero).
    """

    layout: EncoderLayout
    n_spans: int
    span_len: int
    glob_len: int
    local_index: torch.Tensor | None
    local_scatter: torch.Tensor | None
    local_start: int | None
    cross_index: torch.Tensor | None
    cross_start: int | None
    glob_index: torch.Tensor | None
    glob_scatter: torch.Tensor | None
    glob_start: int | None
    bias_self: torch.Tensor | None
    bias_cross: torch.Tensor | None
    bias_glob: torch.Tensor | None
    pad_rows: torch.Tensor
    _cache: dict = field(default_factory=dict, repr=False)

    def biases(self, dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
        """The bias blocks cast to ``dtype`` (cached: every layer of the pass reuses them)."""
        key = ("bias", dtype)
        if key not in self._cache:
            blocks = {"self": self.bias_self, "cross": self.bias_cross, "glob": self.bias_glob}
            self._cache[key] = {name: None if b is None else b.to(dtype) for name, b in blocks.items()}
        return self._cache[key]

    def joint_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """``(N or 1, H, Ls, Ls + Lg)``: own-span and global-key bias side by side (training path)."""
        key = ("joint", dtype)
        if key not in self._cache:
            b = self.biases(dtype)
            if b["cross"] is None:
                self._cache[key] = b["self"]
            else:
                self_b, cross_b = b["self"], b["cross"]
                rows = max(self_b.shape[0], cross_b.shape[0])
                self_b = self_b.expand(rows, *self_b.shape[1:])
                cross_b = cross_b.expand(rows, *cross_b.shape[1:])
                self._cache[key] = torch.cat([self_b, cross_b], dim=-1)
        return self._cache[key]


def _relative(fields: tuple[torch.Tensor, ...], rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Relative distances ``(R, Sr, Sk)`` between grid rows ``(R, Sr)`` and keys ``(R, Sk)``.

    ``fields`` are the layout's flat ``position, shift, is_query`` (see :mod:`saicl.layout`).
    """
    pos, shift, isq = fields
    pr, sr, qr = pos[rows][:, :, None], shift[rows][:, :, None], isq[rows][:, :, None]
    pk, sk, qk = pos[keys][:, None, :], shift[keys][:, None, :], isq[keys][:, None, :]
    return pk - pr + sr * qk - sk * qr


def _bias_block(
    table: torch.Tensor, rel: torch.Tensor, key_ok: torch.Tensor | None, share: bool
) -> torch.Tensor:
    """Gather ``(R or 1, H, Sr, Sk)`` bias from ``table`` ``(H, 2M+1)``; masked keys get the minimum.

    Args:
        rel: ``(R, Sr, Sk)`` relative distances.
        key_ok: ``(R, Sk)`` bool, ``False`` on key slots holding no allowed token (``None``: all ok).
        share: every row of ``rel`` is identical and nothing is masked: keep one copy, broadcast.
    """
    max_distance = (table.shape[1] - 1) // 2
    if share:
        rel = rel[:1]
    bias = table[:, table_index(rel, max_distance)].transpose(0, 1)  # differentiable gather
    if key_ok is not None and not share:
        bias = bias.masked_fill(~key_ok[:, None, None, :], torch.finfo(table.dtype).min)
    return bias.contiguous()


def _block(
    table: torch.Tensor, fields: tuple[torch.Tensor, ...], rows: torch.Tensor, keys: torch.Tensor,
    key_ok: torch.Tensor | None,
) -> torch.Tensor:
    """Bias block of grid ``rows`` ``(R, Sr)`` on grid ``keys`` ``(R, Sk)``: ``(R or 1, H, Sr, Sk)``.

    When every grid row carries the same position fields and no key is masked (equal-length
    demonstrations), all rows share one bias: it is built once and broadcast, which also makes
    this cheap (the check looks at ``(R, S)`` fields, not at ``(R, Sr, Sk)`` distances).
    """
    if key_ok is not None and bool(key_ok.all()):
        key_ok = None
    share = key_ok is None and all(
        bool(torch.equal(f[idx], f[idx[:1]].expand_as(idx))) for f in fields for idx in (rows, keys)
    )
    if share:
        rows, keys = rows[:1], keys[:1]
    rel = _relative(fields, rows, keys).to(table.device)
    return _bias_block(table, rel, None if key_ok is None else key_ok.to(table.device), share)


def build_plan(layout: EncoderLayout, table: torch.Tensor) -> SegmentPlan:
    """Index plans and bias blocks of one encoder pass (host work, once per forward).

    Args:
        layout: the encoder layout.
        table: ``(H, 2M+1)`` per-distance bias table; gradients flow from the bias blocks into it.
    """
    batch, length = layout.batch_size, layout.length
    device = table.device
    valid = layout.valid.detach().to("cpu").reshape(-1)
    fields = tuple(
        t.detach().to("cpu").reshape(-1).long() for t in (layout.position, layout.shift, layout.is_query)
    )

    local = [(b, start, n) for b, spans in enumerate(layout.local_spans) for start, n in spans]
    globs = layout.global_spans
    has_glob = any(g is not None for g in globs)
    if has_glob and not all(g is not None for g in globs):
        raise ValueError("layout.global_spans mixes episodes with and without a global span")
    span_len = max((n for _, _, n in local), default=0)
    glob_len = max((g[1] for g in globs), default=0) if has_glob else 0
    spare = batch * length  # output row that absorbs writes from empty grid slots

    local_index = local_scatter = cross_index = None
    local_start = cross_start = None
    bias_self = bias_cross = None
    if local:
        local_index, filled = _pad_grid(local, span_len, length)
        local_scatter = torch.where(filled, local_index, spare).reshape(-1)
        local_start = _regular_start(local_index) if bool(filled.all()) else None
        bias_self = _block(table, fields, local_index, local_index, filled)
        if has_glob:
            cross_spans = [(b, globs[b][0], globs[b][1]) for b, _, _ in local]
            cross_index, cross_ok = _pad_grid(cross_spans, glob_len, length)
            if len({(b, s) for b, s, _ in cross_spans}) == 1 and bool(cross_ok.all()):
                cross_start = cross_spans[0][1] + cross_spans[0][0] * length
            bias_cross = _block(table, fields, local_index, cross_index, cross_ok)

    glob_index = glob_scatter = glob_start = bias_glob = None
    if has_glob:
        glob_index, glob_filled = _pad_grid([(b, g[0], g[1]) for b, g in enumerate(globs)], glob_len, length)
        glob_scatter = torch.where(glob_filled, glob_index, spare).reshape(-1)
        starts = {(g[0], g[1]) for g in globs}
        if len(starts) == 1 and bool(glob_filled.all()):
            glob_start = globs[0][0]  # same slice of every episode: a strided view
        every = torch.arange(batch * length).view(batch, length)
        bias_glob = _block(table, fields, glob_index, every, valid.view(batch, length))

    return SegmentPlan(
        layout=layout,
        n_spans=len(local),
        span_len=span_len,
        glob_len=glob_len,
        local_index=_to(local_index, device),
        local_scatter=_to(local_scatter, device),
        local_start=local_start,
        cross_index=_to(cross_index, device),
        cross_start=cross_start,
        glob_index=_to(glob_index, device),
        glob_scatter=_to(glob_scatter, device),
        glob_start=glob_start,
        bias_self=bias_self,
        bias_cross=bias_cross,
        bias_glob=bias_glob,
        pad_rows=torch.nonzero(~valid).reshape(-1).to(device),
    )


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def _grid(flat: torch.Tensor, index: torch.Tensor, start: int | None, heads: int) -> torch.Tensor:
    """Rows of ``flat`` ``(B*L, H*D)`` as a ``(R, H, S, D)`` grid (a view when ``start`` is set).

    ``index`` is ``(R, S)``. The result is ``(R, S, H, D)`` in memory and transposed, which both
    SDPA and the flash kernel accept without a copy.
    """
    rows, slots = index.shape
    if start is not None:
        block = flat[start:start + rows * slots]
    else:
        block = flat.index_select(0, index.reshape(-1))
    return block.view(rows, slots, heads, -1).transpose(1, 2)


def _expand_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t.expand(rows, *t.shape[1:])


_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _local_inference(q_flat, k_flat, v_flat, plan: SegmentPlan, heads: int, bias) -> torch.Tensor:
    """Local rows without autograd: own-span and global-key flash attention merged by log-sum-exp.

    Returns ``(N, H, Ls, D)`` (memory laid out as ``(N, Ls, H, D)``).
    """
    n = plan.n_spans
    qg = _grid(q_flat, plan.local_index, plan.local_start, heads)
    kg = _grid(k_flat, plan.local_index, plan.local_start, heads)
    vg = _grid(v_flat, plan.local_index, plan.local_start, heads)
    out_self, lse_self = _flash_cpu(qg, kg, vg, 0.0, False, attn_mask=bias["self"], scale=1.0)
    if plan.cross_index is None:
        return out_self
    if plan.cross_start is not None:
        # One episode: every span shares the same global keys, a stride-0 broadcast (no copy).
        kc = _expand_rows(_grid(k_flat, plan.cross_index[:1], plan.cross_start, heads), n)
        vc = _expand_rows(_grid(v_flat, plan.cross_index[:1], plan.cross_start, heads), n)
    else:
        kc = _grid(k_flat, plan.cross_index, None, heads)
        vc = _grid(v_flat, plan.cross_index, None, heads)
    out_cross, lse_cross = _flash_cpu(qg, kc, vc, 0.0, False, attn_mask=bias["cross"], scale=1.0)
    # softmax over the union of both key groups = convex mix of the two partial softmaxes with
    # weight sigmoid(lse_self - lse_cross); done in place to avoid large temporaries.
    weight = torch.sigmoid(lse_self - lse_cross).to(out_self.dtype).unsqueeze(-1)
    out_self.sub_(out_cross).mul_(weight).add_(out_cross)
    return out_self


def _local_training(q_flat, k_flat, v_flat, plan: SegmentPlan, heads: int, dtype) -> torch.Tensor:
    """Local rows under autograd: one SDPA over ``[own span | global span]`` keys per span."""
    qg = _grid(q_flat, plan.local_index, plan.local_start, heads)
    key_index = plan.local_index
    if plan.cross_index is not None:
        key_index = torch.cat([plan.local_index, plan.cross_index], 1)
    kg = _grid(k_flat, key_index, None, heads)
    vg = _grid(v_flat, key_index, None, heads)
    return F.scaled_dot_product_attention(qg, kg, vg, attn_mask=plan.joint_bias(dtype), scale=1.0)


class SegmentedBackend(AttentionBackend):
    """``attn_backend="torch"``: segment-batched attention, memory linear in the demonstrations."""

    name = "torch"

    def prepare(self, layout: EncoderLayout, table: torch.Tensor) -> SegmentPlan:
        """Build the :class:`SegmentPlan` (indices and masked bias blocks) once per encoder pass.

        Args:
            layout: the encoder layout.
            table: ``(heads, 2M+1)`` per-distance bias table.
        """
        if table.dim() != 2 or table.shape[1] % 2 != 1:
            raise ValueError(f"table must be (heads, 2 * max_distance + 1); got shape {tuple(table.shape)}")
        return build_plan(layout, table)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prepared: SegmentPlan
    ) -> torch.Tensor:
        """Structured attention of ``(batch, length, heads, head_dim)`` q, k, v; returns the same shape."""
        layout = prepared.layout
        check_qkv(q, k, v, layout)
        bias_heads = next(b for b in (prepared.bias_self, prepared.bias_glob) if b is not None).shape[1]
        if q.shape[2] != bias_heads:
            raise ValueError(f"q has {q.shape[2]} heads but the bias table has {bias_heads}")
        batch, length, heads, head_dim = q.shape
        q_flat, k_flat, v_flat = (t.reshape(batch * length, heads * head_dim) for t in (q, k, v))
        bias = prepared.biases(q.dtype)
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, *bias.values())
        )
        inference = not needs_grad and q.device.type == "cpu" and _flash_cpu is not None

        # One spare row absorbs writes from empty grid slots; it is dropped at the end.
        out = q.new_empty(batch * length + 1, heads * head_dim)
        if prepared.n_spans:
            if inference:
                local = _local_inference(q_flat, k_flat, v_flat, prepared, heads, bias)
            else:
                local = _local_training(q_flat, k_flat, v_flat, prepared, heads, q.dtype)
            out.index_copy_(0, prepared.local_scatter, local.transpose(1, 2).reshape(-1, heads * head_dim))
        if prepared.glob_index is not None:
            if prepared.glob_start is not None:  # same slice of every episode: a strided view
                start = prepared.glob_start
                qg = q[:, start:start + prepared.glob_len].transpose(1, 2)
            else:
                qg = _grid(q_flat, prepared.glob_index, None, heads)
            # Global rows see the whole encoder row; invalid keys are masked in bias_glob.
            glob = F.scaled_dot_product_attention(
                qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias["glob"], scale=1.0
            )
            out.index_copy_(0, prepared.glob_scatter, glob.transpose(1, 2).reshape(-1, heads * head_dim))
        if prepared.pad_rows.numel():
            out.index_fill_(0, prepared.pad_rows, 0.0)
        return out[: batch * length].view(batch, length, heads, head_dim)
