"""Encoder attention structures, each defined once as a predicate over segment ids.

Segment ids follow docs/design.md §5: demonstration tokens carry their index ``0..k-1``, query tokens
carry :data:`QUERY_SEGMENT` (``-1``). Inside the encoder, ``fid`` works on an expanded sequence in
which every (demonstration, query) pair is its own frame; there the segment id is the pair index.

The predicate ``allowed(query_segment, key_segment)`` is elementwise and broadcasting, so the
same function builds the dense mask (eager oracle), the FlexAttention ``mask_mod`` and the block
layouts of the kernels. Padding is excluded separately, by the layout's validity mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

QUERY_SEGMENT = -1
PAD_SEGMENT = -2

Predicate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _saicl_allowed(query_segment: torch.Tensor, key_segment: torch.Tensor) -> torch.Tensor:
    # A demonstration sees itself and the query; the query sees everything.
    return (
        (query_segment == key_segment)
        | (query_segment == QUERY_SEGMENT)
        | (key_segment == QUERY_SEGMENT)
    )


def _full_allowed(query_segment: torch.Tensor, key_segment: torch.Tensor) -> torch.Tensor:
    # Written elementwise (not torch.ones) so it also works inside FlexAttention's vmap.
    return (query_segment == key_segment) | (query_segment != key_segment)


def _fid_allowed(query_segment: torch.Tensor, key_segment: torch.Tensor) -> torch.Tensor:
    # Segment ids are pair ids in the expanded fid sequence: each pair is encoded alone.
    return query_segment == key_segment


@dataclass(frozen=True)
class Structure:
    """One encoder structure.

    Attributes:
        name: registry name (``saicl``, ``full``, ``fid``).
        allowed: elementwise predicate ``(query_segment, key_segment) -> bool tensor``.
        demo_frames: positions restart in every demonstration and the query sits right after
            each demonstration (permutation-invariant T5 bias, docs/design.md §3).
        query_per_demo: the query is copied once per demonstration (Fusion-in-Decoder).
        description: one line for ``--help`` texts and errors.
    """

    name: str
    allowed: Predicate
    demo_frames: bool
    query_per_demo: bool
    description: str


STRUCTURES: dict[str, Structure] = {
    s.name: s
    for s in (
        Structure(
            "saicl",
            _saicl_allowed,
            demo_frames=True,
            query_per_demo=False,
            description="each demonstration attends to itself and the query; the query to all",
        ),
        Structure(
            "full",
            _full_allowed,
            demo_frames=False,
            query_per_demo=False,
            description="plain concatenation d_1 ... d_k q (MetaICL-style baseline)",
        ),
        Structure(
            "fid",
            _fid_allowed,
            demo_frames=True,
            query_per_demo=True,
            description="Fusion-in-Decoder: each (demonstration, query) pair encoded alone",
        ),
    )
}


def get_structure(name: str | Structure) -> Structure:
    """Return the registered structure called ``name`` (ValueError naming the choices if unknown)."""
    if isinstance(name, Structure):
        return name
    if name not in STRUCTURES:
        raise ValueError(
            f"structure={name!r} is not a known structure; expected one of {sorted(STRUCTURES)}"
        )
    return STRUCTURES[name]
