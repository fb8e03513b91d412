"""``attn_backend="xformers"``: xFormers' memory-efficient attention over the segment-batched grouping.

The layout is grouped exactly as the ``torch`` backend groups it (:mod:`saicl.attention.grouping`):
per group of similar-length spans one ``xformers.ops.memory_efficient_attention`` call over the
``(N, S)`` grid against each span's ``[own span | global span]`` keys, and one call for the global rows
against all ``L`` keys. The T5 bias (mask folded in as the dtype's minimum) is a dense tensor bias
``(N, H, S, S + G)`` per group, gathered from the per-distance table on the device; its rows are stored
16-element aligned, as xFormers requires. Forward and backward (gradients reach q, k, v and, through the
bias, the table) run in xFormers' CUTLASS kernels.

Needs CUDA and the ``xformers`` extra (``pip install 'saicl[xformers]'``): every xFormers attention operator
is CUDA-only, so on any other device the backend reports itself unavailable with that reason.
"""

from __future__ import annotations

import importlib.util

import torch

from ..layout import EncoderLayout
from .base import AttentionBackend
from .grouping import GridAttention, Grouping, build_grouping, grouped_attention

# Row alignment of the tensor bias: xFormers asks for 128-bit aligned rows (4 fp32 / 8 half elements) on
# every dimension but the last; 16 covers both and matches PyTorch's memory-efficient kernel.
BIAS_ALIGN = 16


def xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``xformers.ops.memory_efficient_attention`` on grid tensors, without the ``1/sqrt(d)`` scaling (T5).

    Args:
        q: ``(R, S, H, D)``; k, v: ``(R, K, H, D)`` (xFormers' BMHK layout).
        bias: ``(R or 1, H, S, K)`` in q's dtype, row stride a multiple of :data:`BIAS_ALIGN`; a shared bias
            (first dimension 1) is broadcast with a stride-0 view, as xFormers wants the full shape.
    Returns:
        ``(R, S, H, D)``.
    """
    import xformers.ops as xops  # the extra: imported only when the backend runs

    return xops.memory_efficient_attention(q, k, v, attn_bias=full_bias(q, bias), scale=1.0)


def full_bias(q: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``bias`` ``(R or 1, H, S, K)`` as the ``(R, H, S, K)`` tensor xFormers checks for (a view, no copy)."""
    return bias.expand(q.shape[0], -1, -1, -1)


class XFormersBackend(AttentionBackend):
    """``attn_backend="xformers"``: segment-batched xFormers memory-efficient attention (CUDA).

    Args:
        attention: the grid attention to run (default :func:`xformers_attention`); tests pass a plain PyTorch
            stand-in to check the grouping and the biases on CPU.
    """

    name = "xformers"

    def __init__(self, attention: GridAttention | None = None) -> None:
        self._attention = attention or xformers_attention

    def unavailable_reason(self, device: torch.device) -> str | None:
        device = torch.device(device)
        if device.type != "cuda":
            return f"xformers attention runs only on CUDA devices, not on {device.type}"
        if importlib.util.find_spec("xformers") is None:
            return "the xformers package is not installed (pip install 'saicl[xformers]', CUDA only)"
        return None

    def prepare(self, layout: EncoderLayout, table: torch.Tensor) -> Grouping:
        """Group the spans and build the bias indices on ``table``'s device, once per encoder pass.

        Args:
            layout: the encoder layout.
            table: ``(heads, 2M+1)`` per-distance bias table.
        """
        return build_grouping(layout, table, align=BIAS_ALIGN)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prepared: Grouping) -> torch.Tensor:
        """Structured attention of ``(batch, length, heads, head_dim)`` q, k, v; returns the same shape."""
        return grouped_attention(q, k, v, prepared, self._attention)
