"""T5 relative-position buckets and the per-distance bias lookup table (docs/design.md §3).

Kernels never evaluate ``log`` on the device: float32 log ratios land exactly on bucket edges, so
an approximate device ``log`` can flip buckets. Instead the host computes, once, the bucket of
every distance ``-M..M`` (``M = relative_attention_max_distance``; every ``|rel| >= M`` shares the
saturated bucket), and the bias table is a differentiable gather from the bucket embedding.
"""

from __future__ import annotations

import functools

import torch
from transformers.models.t5.modeling_t5 import T5Attention


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> torch.Tensor:
    """T5's bucket function, taken from Hugging Face itself so both always agree.

    Args:
        relative_position: integer tensor of any shape, ``key_position - query_position``.
    Returns:
        Long tensor of the same shape with values in ``[0, num_buckets)``.
    """
    return T5Attention._relative_position_bucket(
        relative_position, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )


@functools.lru_cache(maxsize=32)
def _distance_buckets(num_buckets: int, max_distance: int) -> tuple[int, ...]:
    # Cached as plain ints, not a tensor: a tensor first created under torch.inference_mode()
    # could not be used later in autograd.
    distances = torch.arange(-max_distance, max_distance + 1, dtype=torch.long)
    return tuple(relative_position_bucket(distances, True, num_buckets, max_distance).tolist())


def distance_buckets(num_buckets: int, max_distance: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bucket of every relative distance ``-max_distance..max_distance``: shape ``(2M+1,)``."""
    return torch.tensor(_distance_buckets(num_buckets, max_distance), dtype=torch.long, device=device)


def bias_table(embedding_weight: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Per-distance bias table, differentiable in ``embedding_weight``.

    Args:
        embedding_weight: ``(num_buckets, heads)``, T5's ``relative_attention_bias.weight``.
    Returns:
        ``(heads, 2 * max_distance + 1)``; entry ``[h, rel + max_distance]`` is the bias of head
        ``h`` for relative distance ``rel`` clamped to ``[-max_distance, max_distance]``.
    """
    buckets = distance_buckets(num_buckets, max_distance, embedding_weight.device)
    return embedding_weight[buckets].t().contiguous()


def table_index(relative_position: torch.Tensor, max_distance: int) -> torch.Tensor:
    """Map relative distances to column indices of :func:`bias_table` (clamped, same shape)."""
    return relative_position.clamp(-max_distance, max_distance) + max_distance
