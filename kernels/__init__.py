"""Triton kernels of structured encoder attention (``saicl.kernels``): a leaf package on plain tensors.

Inputs are packed tokens ``(total_tokens, heads, head_dim)``, per-token fields and key ranges and
``cu_seqlens`` (:func:`build_plan`); nothing here imports the model side. The backend adapter that
packs an ``EncoderLayout`` is ``saicl.attention.triton``. Importing this package imports Triton but
never queries CUDA.
"""

from .attention import StructuredAttentionFunction, varlen_structured_attention
from .varlen import VarlenPlan, build_plan

__all__ = ["StructuredAttentionFunction", "VarlenPlan", "build_plan", "varlen_structured_attention"]
