"""``attn_backend="triton"``: the fused block-sparse kernels behind the backend interface.

``prepare`` packs the layout once per encoder pass (packed token index, ``cu_seqlens``, per-token
fields, tile schedule: :class:`kernels.varlen.VarlenPlan`); ``attend`` packs ``q, k, v`` of one layer,
runs the kernels and unpacks. Importing this module never queries CUDA.

On CPU the kernels run only in the Triton interpreter, which must have been switched on
(``TRITON_INTERPRET=1``) before this module was first imported; it is meant for tests (slow).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saicl.attention.base import AttentionBackend, check_qkv
from saicl.layout import EncoderLayout

try:
    from . import _common as C
    from .attention import varlen_structured_attention
    from .varlen import VarlenPlan, build_plan

    _IMPORT_ERROR: str | None = None
except ImportError as err:  # triton missing or broken: the backend reports it instead of failing imports
    _IMPORT_ERROR = f"importing triton failed ({err})"


@dataclass
class TritonPrepared:
    """Per-forward state: the packed plan and the bias table shared by all layers."""

    plan: VarlenPlan
    table: torch.Tensor
    layout: EncoderLayout


class TritonBackend(AttentionBackend):
    """Fused structured attention (forward and backward) in Triton.

    Args:
        block_m: tile size of the plan (default 64 on GPUs, 32 under the interpreter).
        block_n: inner block size (default: autotuned on GPUs, 32 under the interpreter).
    """

    name = "triton"

    def __init__(self, block_m: int | None = None, block_n: int | None = None) -> None:
        self.block_m = block_m
        self.block_n = block_n

    def unavailable_reason(self, device: torch.device) -> str | None:
        device = torch.device(device)
        if _IMPORT_ERROR is not None:
            return _IMPORT_ERROR
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            if C.INTERPRETED:
                return None
            return (
                "the Triton kernels need a CUDA device; on CPU they run only in the Triton interpreter, "
                "enabled by setting TRITON_INTERPRET=1 before saicl.kernels is first imported "
                "(slow, for tests)"
            )
        return f"the Triton kernels run on CUDA devices only, not on {device.type}"

    def prepare(self, layout: EncoderLayout, table: torch.Tensor) -> TritonPrepared:
        if _IMPORT_ERROR is not None:
            raise RuntimeError(f"attn_backend='triton' is unavailable: {_IMPORT_ERROR}")
        block_m = self.block_m or C.default_block_m()
        key = ("triton_plan", block_m)
        if key not in layout.cache:  # the layout is shared by all layers (and the decoder's passes)
            layout.cache[key] = build_plan(layout, block_m)
        return TritonPrepared(plan=layout.cache[key], table=table, layout=layout)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prepared: TritonPrepared
    ) -> torch.Tensor:
        check_qkv(q, k, v, prepared.layout)
        plan = prepared.plan
        packed = [plan.pack(t).contiguous() for t in (q, k, v)]
        out = varlen_structured_attention(*packed, prepared.table, plan, block_n=self.block_n)
        return plan.unpack(out)
