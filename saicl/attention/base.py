"""The one interface every encoder attention backend implements (docs/design.md §4).

A backend works in two steps so per-forward work is not repeated in every layer:

* ``prepare(layout, table)`` once per encoder pass: index plans, bias blocks, block masks.
  ``table`` is the per-distance bias table ``(heads, 2M+1)`` (:func:`saicl.positions.bias_table`),
  differentiable, shared by all layers as in T5.
* ``attend(q, k, v, prepared)`` in every layer: ``q, k, v`` are ``(batch, length, heads, head_dim)``
  and the result has the same shape. T5 semantics: no ``1/sqrt(d)`` scaling, the bias is added to
  the scores, padding rows of the output are zero.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from ..layout import EncoderLayout


class BackendUnavailableError(RuntimeError):
    """Raised when an attention backend cannot run here; the message says why."""


class AttentionBackend(ABC):
    """Base class of encoder attention backends."""

    name: ClassVar[str]

    def unavailable_reason(self, device: torch.device) -> str | None:
        """``None`` if the backend can run on ``device``, else a sentence saying why not."""
        return None

    def head_dim_reason(self, device: torch.device, head_dim: int) -> str | None:
        """``None`` if the backend supports heads of ``head_dim`` on ``device``, else a sentence saying why not."""
        return None

    @abstractmethod
    def prepare(self, layout: EncoderLayout, table: torch.Tensor) -> Any:
        """Per-forward state for :meth:`attend` (layer-independent)."""

    @abstractmethod
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prepared: Any) -> torch.Tensor:
        """Attention of ``(batch, length, heads, head_dim)`` inputs; returns the same shape."""

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: EncoderLayout, table: torch.Tensor
    ) -> torch.Tensor:
        return self.attend(q, k, v, self.prepare(layout, table))


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: EncoderLayout) -> None:
    """Raise a ValueError naming the mismatch if q/k/v do not fit the layout."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            "q, k, v must all be (batch, length, heads, head_dim); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[:2] != (layout.batch_size, layout.length):
        raise ValueError(
            f"q has (batch, length) = {tuple(q.shape[:2])} but the layout is "
            f"({layout.batch_size}, {layout.length})"
        )
