"""Dense masked attention: the oracle every other backend and kernel is tested against.

Materialises the ``(batch, heads, length, length)`` scores, so it is quadratic in memory; it is
float64-capable and written to be obviously right, not fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import EncoderLayout
from .base import AttentionBackend, check_qkv


@dataclass
class DenseBias:
    """``bias``: ``(batch, heads, length, length)`` additive bias with the mask folded in."""

    bias: torch.Tensor
    valid: torch.Tensor
    layout: EncoderLayout


def dense_bias(layout: EncoderLayout, table: torch.Tensor) -> DenseBias:
    """Dense T5 bias of the layout with disallowed pairs set to the dtype's minimum.

    Args:
        table: ``(heads, 2M+1)`` per-distance bias table.
    """
    max_distance = (table.shape[1] - 1) // 2
    bias = table[:, layout.bias_index(max_distance)].permute(1, 0, 2, 3)  # (B, H, L, L)
    allowed = layout.allowed_mask()[:, None]
    bias = bias.masked_fill(~allowed, torch.finfo(table.dtype).min)
    return DenseBias(bias=bias, valid=layout.valid, layout=layout)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prepared: DenseBias) -> torch.Tensor:
    """Reference attention.

    Args:
        q, k, v: ``(batch, length, heads, head_dim)``.
        prepared: from :func:`dense_bias`.
    Returns:
        ``(batch, length, heads, head_dim)``; rows of padding tokens are zero.
    """
    check_qkv(q, k, v, prepared.layout)
    # Half precision (also under autocast) gets fp32 scores and softmax; float64 stays float64. The clamp
    # keeps a mask minimum that became -inf in a lower-precision cast finite, so fully masked (padding)
    # rows stay NaN-free.
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k).to(compute)
    scores = scores + prepared.bias.to(compute).clamp_min(torch.finfo(compute).min)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return out * prepared.valid[:, :, None, None].to(out.dtype)


class EagerBackend(AttentionBackend):
    """``attn_backend="eager"``: dense mask and bias, the oracle."""

    name = "eager"

    def prepare(self, layout: EncoderLayout, table: torch.Tensor) -> DenseBias:
        return dense_bias(layout, table)

    def attend(self, q, k, v, prepared: DenseBias) -> torch.Tensor:
        return eager_attention(q, k, v, prepared)
