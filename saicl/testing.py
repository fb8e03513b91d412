"""Helpers that build synthetic inputs for tests and benchmarks (shared, never copied)."""

from __future__ import annotations

import torch

from .structures import QUERY_SEGMENT


def segment_batch(
    demo_lengths: list[list[int]], query_lengths: list[int], pad_to: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_mask`` and ``segment_ids`` (DESIGN §5) for episodes of the given token counts.

    Args:
        demo_lengths: per episode, the token count of each demonstration (may be empty).
        query_lengths: per episode, the query's token count (>= 1).
        pad_to: total length; defaults to the longest episode.
    Returns:
        ``(attention_mask, segment_ids)``, both ``(batch, length)`` long tensors.
    """
    rows = []
    for demos, lq in zip(demo_lengths, query_lengths, strict=True):
        ids = [i for i, n in enumerate(demos) for _ in range(n)] + [QUERY_SEGMENT] * lq
        rows.append(ids)
    length = max(len(r) for r in rows) if pad_to is None else pad_to
    segment_ids = torch.full((len(rows), length), QUERY_SEGMENT, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, ids in enumerate(rows):
        segment_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, : len(ids)] = 1
    return attention_mask, segment_ids


def random_qkv(
    batch: int, length: int, heads: int, head_dim: int, dtype=torch.float64, device="cpu", seed: int = 0,
    requires_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``(batch, length, heads, head_dim)`` q, k, v from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    tensors = [
        torch.randn(batch, length, heads, head_dim, generator=gen, dtype=torch.float64).to(dtype).to(device)
        for _ in range(3)
    ]
    for t in tensors:
        t.requires_grad_(requires_grad)
    return tuple(tensors)


def random_table(heads: int, max_distance: int = 128, dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    """A random per-distance bias table ``(heads, 2 * max_distance + 1)``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(heads, 2 * max_distance + 1, generator=gen, dtype=torch.float64).to(dtype)


def tiny_t5_config(gated: bool = False, **overrides):
    """A tiny ``T5Config`` (ByT5 vocabulary of 384) for tests and demos; ``gated`` = t5-v1_1 style."""
    from transformers import T5Config

    fields = dict(
        vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        feed_forward_proj="gated-gelu" if gated else "relu",
    )
    if gated:
        fields["tie_word_embeddings"] = False  # as t5-v1_1 checkpoints: no decoder-output scaling
    fields.update(overrides)
    return T5Config(**fields)


def save_tiny_t5(path, gated: bool = False, seed: int = 0, **overrides):
    """Build a randomly initialised Hugging Face ``T5ForConditionalGeneration`` and save it to ``path``."""
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(tiny_t5_config(gated=gated, **overrides))
    model.save_pretrained(path)
    return model
