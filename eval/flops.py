"""Structured FLOP counts: the work a structure *needs*, the bound a measured speed-up is compared with.

Every ``saicl-bench`` row (all levels, all backends and providers) counts FLOPs here, with one convention:

* attention: ``4 * heads * head_dim`` FLOPs per allowed (query token, key token) pair (``Q K^T`` and
  ``P V``, 2 FLOPs per multiply-add); the allowed pairs come from the layout's ``key_ranges()``, the one
  sparse form every fast backend consumes; padding pairs are not counted;
* a dense ``x @ W`` with ``W`` ``(d_in, d_out)``: ``2 * d_in * d_out`` per token;
* ``fwd+bwd`` = :data:`FWD_BWD_FACTOR` (3) x ``fwd``.

Why 3 and not flash-attention's 3.5: the backward of every product ``Y = A B`` needs two products of the
same size (``dA = dY B^T``, ``dB = A^T dY``), so the *algorithmic* work of forward+backward is 3x the
forward for attention and for the projections/FFN alike. flash-attention's 3.5 adds the recomputation
of ``Q K^T`` that a memory-saving kernel chooses to do in its backward; whether a backend recomputes is an
implementation choice (the ``eager`` and ``torch`` backends keep the probabilities, ``flex`` and
``triton`` recompute), and counting it would credit the recomputing backends with work the model does
not need. So rates here are *useful* FLOP/s, as model-FLOP utilisation counts them, comparable across
backends and across levels (an encoder row mixes attention with dense products, where 3x is exact).
A flash-style kernel's rate in flash-attention's convention is 3.5/3 times the one reported here for
``fwd+bwd``; ``fwd`` rates are the same in both. Ratios against ``full`` do not depend on the factor.

The structured-FLOP ratio of structure ``s`` against ``full`` is ``flops(full) / flops(s)``: the speed-up a
perfect implementation would reach if time were proportional to FLOPs.
"""

from __future__ import annotations

import torch

from saicl.layout import EncoderLayout

FWD_BWD_FACTOR = 3  # fwd+bwd FLOPs / fwd FLOPs, for every row (the module docstring says why 3)
PASS_FACTOR = {"fwd": 1, "fwd+bwd": FWD_BWD_FACTOR}


def allowed_pairs(layout: EncoderLayout) -> int:
    """Allowed (query token, key token) pairs of a layout, from its ``key_ranges()`` (no ``L x L`` tensor).

    Every token sees the keys of two disjoint half-open ranges ``[a0, a1) u [b0, b1)`` (padding sees
    none), so the pairs are the summed range lengths: ``(batch, length, 4)`` in, one integer out.
    """
    key = ("allowed_pairs",)  # counted once per layout: a sweep counts the same shape for every backend
    if key not in layout.cache:
        ranges = layout.key_ranges().to("cpu", torch.long)
        layout.cache[key] = int((ranges[..., 1] - ranges[..., 0] + ranges[..., 3] - ranges[..., 2]).sum())
    return layout.cache[key]


def attention_flops(layout: EncoderLayout, heads: int, head_dim: int, pass_: str = "fwd") -> int:
    """FLOPs of one structured attention layer (scores and weighted sum only)."""
    return 4 * heads * head_dim * allowed_pairs(layout) * PASS_FACTOR[pass_]


def _ffn_matrices(config) -> int:
    # relu/gelu FFN: wi, wo; gated (t5-v1_1): wi_0, wi_1, wo.
    return 3 if getattr(config, "is_gated_act", False) else 2


def encoder_flops(layout: EncoderLayout, config, pass_: str = "fwd") -> int:
    """FLOPs of the encoder: per layer, q/k/v/o projections and the FFN on every valid token, plus attention.

    ``config`` is a ``T5Config``/``SAICLConfig`` (``d_model``, ``d_kv``, ``num_heads``, ``d_ff``, ``num_layers``).
    """
    tokens = int(layout.valid.sum())
    inner = config.num_heads * config.d_kv
    per_token = 4 * 2 * config.d_model * inner + _ffn_matrices(config) * 2 * config.d_model * config.d_ff
    attention = 4 * config.num_heads * config.d_kv * allowed_pairs(layout)
    return (tokens * per_token + attention) * config.num_layers * PASS_FACTOR[pass_]


def decoder_flops(encoder_tokens_per_row: list[int], target_len: int, config, pass_: str = "fwd") -> int:
    """FLOPs of the decoder and LM head over option rows (as ``score_options`` runs them).

    Args:
        encoder_tokens_per_row: for every decoder row (one per option), the encoder tokens it cross-attends to.
        target_len: decoder tokens per row.
    """
    d, inner, heads, d_kv = config.d_model, config.num_heads * config.d_kv, config.num_heads, config.d_kv
    layers = config.num_decoder_layers
    total = 0
    for enc in encoder_tokens_per_row:
        per_layer = (
            target_len * 4 * 2 * d * inner  # self-attention projections
            + 4 * heads * d_kv * target_len * target_len  # self-attention (causal counted fully: an upper bound)
            + target_len * 2 * 2 * d * inner  # cross-attention q, o
            + enc * 2 * 2 * d * inner  # cross-attention k, v over the encoder states (per row, as HF does)
            + 4 * heads * d_kv * target_len * enc  # cross-attention
            + target_len * _ffn_matrices(config) * 2 * d * config.d_ff
        )
        total += per_layer * layers + target_len * 2 * d * config.vocab_size
    return total * PASS_FACTOR[pass_]


__all__ = ["FWD_BWD_FACTOR", "PASS_FACTOR", "allowed_pairs", "attention_flops", "decoder_flops", "encoder_flops"]
