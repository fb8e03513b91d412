"""``attn_backend="torch"``: segment-batched attention in plain PyTorch (CPU default; trains).

The layout is grouped by :mod:`saicl.attention.grouping` (shared with the ``xformers`` backend): local
spans of similar length stacked into dense grids, each span seeing its own tokens and its episode's
global span, plus the global rows that see the whole episode. No ``length x length`` tensor is built
for ``saicl`` or ``fid`` (``full`` is dense by definition: its global span is the sequence).

Two execution paths share one :class:`~saicl.attention.grouping.Grouping`:

* **No gradient** (inference) on CPU and CUDA: per group, the own-span keys and the global keys run as
  two attention calls that also return their log-sum-exps, merged exactly (softmax over the union of
  both key groups). The global keys are never copied per span: for a single episode they are a
  stride-0 broadcast. The calls are the fused kernels public SDPA itself dispatches to on each device
  (:data:`LSE_OPS`: the CPU flash kernel, CUDA's memory-efficient kernel); they are private ATen ops, so
  their schemas are pinned here and checked (a mismatch, or another device, takes the joint path).
* **Joint** (anything needs a gradient, or no pinned op): the keys of each span and of its global span
  are gathered into one ``(N, H, S + G, D)`` block and one public
  :func:`torch.nn.functional.scaled_dot_product_attention` with the bias as its mask runs under
  ordinary autograd, so gradients reach q, k, v and the bias table.

Padding rows of the output are zero.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from ..layout import EncoderLayout
from .base import AttentionBackend
from .grouping import Grouping, LocalGroup, build_grouping, gather_rows, grouped_attention

LseAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]

# The private ops behind public SDPA that also return the log-sum-exp, with the exact schemas this module
# calls. Pinned: tests/test_segmented.py checks them, and an op whose schema differs is not used.
PINNED_SCHEMAS = {
    "cpu": (
        "_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_flash_attention_for_cpu(Tensor query, Tensor key, Tensor value, "
        "float dropout_p=0., bool is_causal=False, *, Tensor? attn_mask=None, float? scale=None) "
        "-> (Tensor output, Tensor logsumexp)",
    ),
    "cuda": (
        "_scaled_dot_product_efficient_attention",
        "aten::_scaled_dot_product_efficient_attention(Tensor query, Tensor key, Tensor value, "
        "Tensor? attn_bias, bool compute_log_sumexp, float dropout_p=0., bool is_causal=False, *, "
        "float? scale=None) -> (Tensor output, Tensor log_sumexp, Tensor philox_seed, Tensor philox_offset)",
    ),
}
# Memory-efficient kernels read the bias in aligned vectors (public SDPA pads it to 16 elements itself).
_CUDA_BIAS_ALIGN = 16
_CUDA_LSE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _pinned_op(device_type: str):
    name, schema = PINNED_SCHEMAS[device_type]
    packet = getattr(torch.ops.aten, name, None)
    if packet is None or str(packet.default._schema) != schema:
        return None
    return packet.default


def _cpu_lse(q, k, v, bias):
    out, lse = _CPU_OP(q, k, v, dropout_p=0.0, is_causal=False, attn_mask=bias, scale=1.0)
    return out, lse


def _cuda_lse(q, k, v, bias):
    out, lse, _, _ = _CUDA_OP(
        q, k, v, bias.expand(q.shape[0], -1, -1, -1), compute_log_sumexp=True, dropout_p=0.0, is_causal=False,
        scale=1.0,
    )
    return out, lse[..., : q.shape[2]]  # the kernel pads the log-sum-exp's rows to a multiple of 32


_CPU_OP = _pinned_op("cpu")
_CUDA_OP = _pinned_op("cuda")


def lse_attention(device: torch.device, dtype: torch.dtype) -> LseAttention | None:
    """``fn(q, k, v, bias) -> (out, lse)`` for ``(N, H, S, D)`` inputs on ``device``, or ``None`` if none is pinned.

    ``bias`` is ``(N or 1, H, S, K)`` in q's dtype; ``lse`` is ``(N, H, S)`` float32.
    """
    if device.type == "cpu" and _CPU_OP is not None:
        return _cpu_lse
    if device.type == "cuda" and _CUDA_OP is not None and dtype in _CUDA_LSE_DTYPES:
        return _cuda_lse
    return None


def sdpa_grid(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Public SDPA on grids: q ``(R, S, H, D)``, k, v ``(R, K, H, D)``, bias ``(R or 1, H, S, K)``; no scaling."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias,
                                         scale=1.0)
    return out.transpose(1, 2)


def _local_split(q_flat, k_flat, v_flat, plan: Grouping, i: int, group: LocalGroup, lse_fn: LseAttention):
    """Local rows of one group without autograd: own-span and global-key attention merged by log-sum-exp.

    Returns ``(N, S, H, D)``.
    """
    heads, n, dtype = plan.heads, group.n_spans, q_flat.dtype
    rows = group.rows
    qg, kg, vg = (gather_rows(t, rows.index, rows.start, heads).transpose(1, 2) for t in (q_flat, k_flat, v_flat))
    bias_self = plan.bias((i, "self"), lambda: group.self_index.index, dtype)
    out_self, lse_self = lse_fn(qg, kg, vg, bias_self)
    if group.cross is not None:
        if group.cross_shared:  # one episode: every span shares the global keys, a stride-0 broadcast (no copy)
            kc, vc = (gather_rows(t, group.cross.index[:1], None, heads).transpose(1, 2).expand(n, -1, -1, -1)
                      for t in (k_flat, v_flat))
        else:
            kc, vc = (gather_rows(t, group.cross.index, None, heads).transpose(1, 2) for t in (k_flat, v_flat))
        bias_cross = plan.bias((i, "cross"), lambda: group.cross_index.index, dtype)
        out_cross, lse_cross = lse_fn(qg, kc, vc, bias_cross)
        # softmax over the union of both key groups = convex mix of the two partial softmaxes with weight
        # sigmoid(lse_self - lse_cross); done in place to avoid large temporaries.
        weight = torch.sigmoid(lse_self - lse_cross).to(out_self.dtype).unsqueeze(-1)
        out_self.sub_(out_cross).mul_(weight).add_(out_cross)
    return out_self.transpose(1, 2)


class SegmentedBackend(AttentionBackend):
    """``attn_backend="torch"``: segment-batched attention, memory linear in the demonstrations."""

    name = "torch"

    def prepare(self, layout: EncoderLayout, table: torch.Tensor) -> Grouping:
        """Group the spans and build the bias indices on ``table``'s device, once per encoder pass.

        Args:
            layout: the encoder layout.
            table: ``(heads, 2M+1)`` per-distance bias table.
        """
        align = _CUDA_BIAS_ALIGN if table.device.type == "cuda" else 1
        return build_grouping(layout, table, align=align)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prepared: Grouping) -> torch.Tensor:
        """Structured attention of ``(batch, length, heads, head_dim)`` q, k, v; returns the same shape."""
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, prepared.table))
        lse_fn = None if needs_grad else lse_attention(q.device, q.dtype)
        split = None if lse_fn is None else partial(_local_split, lse_fn=lse_fn)
        return grouped_attention(q, k, v, prepared, sdpa_grid, split=split)
