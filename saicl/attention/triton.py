"""``attn_backend="triton"``: the fused block-sparse kernels of :mod:`saicl.kernels` behind the backend
interface.

The kernels take packed tensors only; this adapter turns an :class:`~saicl.layout.EncoderLayout` into
them once per encoder pass (:func:`pack_layout`: packed token index, ``cu_seqlens``, per-token fields
and the layout's own ``key_ranges()``), then every layer packs ``q, k, v``, runs the kernels and
unpacks. Importing this module never queries CUDA.

On CPU the kernels run only in the Triton interpreter, which must have been switched on
(``TRITON_INTERPRET=1``) before :mod:`saicl.kernels` was first imported; it is meant for tests (slow).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import EncoderLayout
from .base import AttentionBackend, check_qkv

try:
    from saicl.kernels import _common as _kernel_settings
    from saicl.kernels import build_plan, varlen_structured_attention
    from saicl.kernels.varlen import VarlenPlan

    _IMPORT_ERROR: str | None = None
except ImportError as err:  # triton missing or broken: the backend reports it instead of failing imports
    _IMPORT_ERROR = f"importing triton failed ({err})"


@dataclass
class PackedLayout:
    """A layout in the kernels' packed form.

    Attributes:
        flat_index: ``(total_tokens,)`` long, index of every valid token in the flattened
            ``(batch * length)`` input; packing is ``x.flatten(0, 1)[flat_index]``.
        plan: the kernels' :class:`~saicl.kernels.varlen.VarlenPlan`.
        batch, length: shape of the unpacked input.
    """

    flat_index: torch.Tensor
    plan: VarlenPlan
    batch: int
    length: int

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, length, *rest)`` -> ``(total_tokens, *rest)`` contiguous (differentiable gather)."""
        return x.flatten(0, 1).index_select(0, self.flat_index).contiguous()

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """``(total_tokens, *rest)`` -> ``(batch, length, *rest)``, zeros on padding (differentiable)."""
        out = x.new_zeros((self.batch * self.length, *x.shape[1:]))
        out = out.index_copy(0, self.flat_index, x)
        return out.unflatten(0, (self.batch, self.length))


def pack_layout(layout: EncoderLayout, block_m: int) -> PackedLayout:
    """Pack ``layout`` (valid tokens must be a prefix of every row) for the kernels, tiles of ``block_m``."""
    valid = layout.valid.detach().to("cpu")
    lengths = valid.sum(1)
    if not bool((valid == (torch.arange(valid.shape[1]) < lengths[:, None])).all()):
        raise ValueError("layout.valid must be a prefix of every row (padding on the right)")
    flat_index = torch.nonzero(valid.flatten(), as_tuple=False).flatten()
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])

    def packed(x: torch.Tensor) -> torch.Tensor:
        return x.detach().to("cpu").flatten(0, 1)[flat_index]

    plan = build_plan(
        cu_seqlens, packed(layout.position), packed(layout.shift), packed(layout.is_query),
        packed(layout.key_ranges()), block_m,
    ).to(layout.device)
    return PackedLayout(flat_index=flat_index.to(layout.device), plan=plan, batch=layout.batch_size,
                        length=layout.length)


@dataclass
class TritonPrepared:
    """Per-forward state: the layout (its packed forms are cached on it) and the bias table of all layers."""

    layout: EncoderLayout
    table: torch.Tensor


class TritonBackend(AttentionBackend):
    """Fused structured attention (forward and backward) in Triton.

    Args:
        block_m: tile size of the plan (default: the tile the kernels' configs were verified at for the
            dtype and head dim, 64 for fp16/bf16; 64 under the interpreter).
        block_n: inner block size (default: autotuned on GPUs, 64 under the interpreter).
        deterministic: bitwise reproducible bias-table gradient (int64 fixed-point atomics) instead of
            fp32 atomics; ``None`` (default) follows ``torch.are_deterministic_algorithms_enabled()``.
    """

    name = "triton"

    def __init__(
        self, block_m: int | None = None, block_n: int | None = None, deterministic: bool | None = None
    ) -> None:
        self.block_m = block_m
        self.block_n = block_n
        self.deterministic = deterministic

    def unavailable_reason(self, device: torch.device) -> str | None:
        device = torch.device(device)
        if _IMPORT_ERROR is not None:
            return _IMPORT_ERROR
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            if _kernel_settings.INTERPRETED:
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
        return TritonPrepared(layout=layout, table=table)

    def packed(self, layout: EncoderLayout, block_m: int) -> PackedLayout:
        """The layout's packed form for tiles of ``block_m`` (built once, cached on the layout)."""
        key = ("triton_packed", block_m)
        if key not in layout.cache:  # the layout is shared by all layers (and the decoder's passes)
            layout.cache[key] = pack_layout(layout, block_m)
        return layout.cache[key]

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prepared: TritonPrepared
    ) -> torch.Tensor:
        check_qkv(q, k, v, prepared.layout)
        block_m = self.block_m or _kernel_settings.default_block_m(q.dtype, q.shape[-1])
        packed = self.packed(prepared.layout, block_m)
        out = varlen_structured_attention(
            *(packed.pack(t) for t in (q, k, v)), prepared.table, packed.plan,
            block_n=self.block_n, deterministic=self.deterministic,
        )
        return packed.unpack(out)


def saicl_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: EncoderLayout,
    table: torch.Tensor,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """Encoder attention of a layout (``saicl``, ``fid`` or ``full``) with the Triton kernels.

    Args:
        q, k, v: ``(batch, length, heads, head_dim)`` with ``(batch, length)`` the layout's shape
            (for ``fid`` the expanded pair sequence).
        layout: :func:`saicl.layout.build_layout` output (its packed form is cached on it).
        table: ``(heads, 2M+1)`` per-distance bias table.
        block_m, block_n, deterministic: see :class:`TritonBackend`.
    Returns:
        ``(batch, length, heads, head_dim)``; padding rows are zero.
    """
    backend = TritonBackend(block_m=block_m, block_n=block_n, deterministic=deterministic)
    return backend.attend(q, k, v, backend.prepare(layout, table))
