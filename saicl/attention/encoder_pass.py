"""Per-forward attention state of the structured encoder, handed from block to block.

The encoder builds the :class:`~saicl.layout.EncoderLayout` once; the bias table is computed *inside* the
first block, from that block's own ``relative_attention_bias`` weight (so the weight is materialised where
it lives: FSDP unshards it in that block's forward, ``device_map`` puts it on that block's device); each
block then asks for the backend's prepared state on its own device, built once per device and pass. A
model split over devices (``device_map``) therefore never mixes a block's tensors with another device's
prepared state.

:class:`EncoderPass` is immutable: each step returns a new object, so a block recomputed by (non-reentrant)
gradient checkpointing redoes exactly the work of its original forward, and later blocks keep the state
the original forward handed them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..layout import EncoderLayout
from ..positions import bias_table
from .base import AttentionBackend
from .registry import get_backend


def layout_to(layout: EncoderLayout, device: torch.device) -> EncoderLayout:
    """``layout`` with its tensors on ``device`` (itself if they are there already); caches are not carried."""
    if layout.device == torch.device(device):
        return layout
    moved = {
        f.name: getattr(layout, f.name).to(device)
        for f in dataclasses.fields(layout)
        if isinstance(getattr(layout, f.name), torch.Tensor)
    }
    return dataclasses.replace(layout, **moved, cache={})


class EncoderPass:
    """Attention state of one encoder forward pass (immutable: every step returns a new object).

    A plain class, not a dataclass, on purpose: FSDP rebuilds every dataclass and tensor found in a module's
    output to hook it; this state is internal to the encoder and must pass between blocks untouched.

    Attributes:
        backend_name: ``config.attn_backend`` (``"auto"`` resolved per device).
        layout: the layout as built on the input's device.
        head_dim: the model's ``d_kv`` (backends that cannot run it are skipped by ``auto``).
        num_buckets / max_distance: T5's relative-attention bucket settings.
        table: ``(heads, 2M+1)`` per-distance bias table, set by the first block (:meth:`with_table`).
        device: where :attr:`prepared` lives.
        backend / prepared: the resolved backend and its per-pass state on :attr:`device`.
    """

    __slots__ = ("backend_name", "layout", "head_dim", "num_buckets", "max_distance", "table", "device", "backend",
                 "prepared")

    def __init__(
        self, backend_name: str, layout: EncoderLayout, head_dim: int, num_buckets: int, max_distance: int,
        table: torch.Tensor | None = None, device: torch.device | None = None,
        backend: AttentionBackend | None = None, prepared: Any = None,
    ) -> None:
        self.backend_name, self.layout, self.head_dim = backend_name, layout, head_dim
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.table, self.device, self.backend, self.prepared = table, device, backend, prepared

    def _replace(self, **changes: Any) -> EncoderPass:
        fields = {name: getattr(self, name) for name in self.__slots__}
        return EncoderPass(**{**fields, **changes})

    def __repr__(self) -> str:
        return (f"EncoderPass(backend={self.backend_name!r}, structure={self.layout.structure.name!r}, "
                f"table={'set' if self.table is not None else 'unset'}, device={self.device})")

    def with_table(self, relative_attention_bias: torch.Tensor, dtype: torch.dtype) -> EncoderPass:
        """The pass with its bias table built from the first block's ``(num_buckets, heads)`` bucket weight.

        Call it inside that block's forward; the table stays differentiable in the weight.
        """
        table = bias_table(relative_attention_bias, self.num_buckets, self.max_distance).to(dtype)
        return self._replace(table=table, device=None, backend=None, prepared=None)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> EncoderPass:
        """The pass with the backend's prepared state on ``device`` (itself if it is there already).

        Before the first block has set the table there is nothing to move yet. (``accelerate``'s device hooks
        call this too, as they do ``.to`` on every argument.)
        """
        device = torch.device(device)
        if self.table is None or (self.prepared is not None and self.device == device):
            return self
        backend = get_backend(self.backend_name, device, head_dim=self.head_dim)
        prepared = backend.prepare(layout_to(self.layout, device), self.table.to(device))
        return self._replace(device=device, backend=backend, prepared=prepared)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Structured attention of ``(batch, length, heads, head_dim)`` q, k, v on the prepared device."""
        if self.prepared is None or q.device != self.device:
            raise RuntimeError(
                f"attention state prepared on {self.device}, but q is on {q.device}: the encoder's first block "
                "sets the bias table and every block moves the state to its device (.to) before attending"
            )
        return self.backend.attend(q, k, v, self.prepared)
