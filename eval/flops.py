"""Structured FLOP counts: the work a structure *needs*, the bound a measured speed-up is compared with.

Conventions (the same as ``eval/bench_attention.py`` and the Triton tutorials):

* attention: ``4 * heads * head_dim`` FLOPs per allowed (query token, key token) pair (``Q K^T`` and
  ``P V``, 2 FLOPs per multiply-add); padding pairs are not counted;
* a dense ``x @ W`` with ``W`` ``(d_in, d_out)``: ``2 * d_in * d_out`` per token;
* ``fwd+bwd`` = 3x ``fwd`` (the backward costs about twice the forward).

The structured-FLOP ratio of structure ``s`` against ``full`` is ``flops(full) / flops(s)``: the speed-up a
perfect implementation would reach if time were proportional to FLOPs.
"""

from __future__ import annotations

from saicl.layout import EncoderLayout

PASS_FACTOR = {"fwd": 1, "fwd+bwd": 3}


def allowed_pairs(layout: EncoderLayout) -> int:
    """Allowed (query token, key token) pairs of a layout, from its span form (no ``L x L`` tensor).

    Local-span tokens see their span and their episode's global span; global-span tokens see every
    valid token of the episode (``saicl``: the query; ``full``: everything; ``fid``: no global span).
    """
    pairs = 0
    for b in range(layout.batch_size):
        n_valid = int(layout.valid[b].sum())
        glob = layout.global_spans[b]
        glob_len = glob[1] if glob is not None else 0
        pairs += sum(n * (n + glob_len) for _, n in layout.local_spans[b])
        pairs += glob_len * n_valid
    return pairs


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


__all__ = ["PASS_FACTOR", "allowed_pairs", "attention_flops", "decoder_flops", "encoder_flops"]
