"""Settings shared by the forward and backward kernels: interpreter detection, dtypes, block sizes.

Nothing here touches CUDA at import time: only the ``TRITON_INTERPRET`` flag is read, and it has to
be read now, because ``triton.jit`` decides between compiling and interpreting when the kernel
module is imported.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# True when the kernels were defined under the Triton interpreter (CPU, numpy semantics).
INTERPRETED: bool = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")

LOG2E = 1.4426950408889634
# Row maximum a row starts from; finite, so a block in which a row sees no key yields p = 0, not NaN.
NEG_INIT = -1.0e30

# Tile sizes. Under the interpreter large blocks are much faster (fewer numpy calls; FINDINGS.md).
INTERPRETER_BLOCK_M = 64
INTERPRETER_BLOCK_N = 64
GPU_BLOCK_M = 64
# Bias-gradient histogram: column index ``c`` of the bias table is split as ``c = hi * LO + lo``
# so the weighted histogram of a block is one small matmul of two one-hot matrices.
HIST_LO = 32

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def default_block_m() -> int:
    """Tile size of the plan: large under the interpreter, 64 on GPUs."""
    return INTERPRETER_BLOCK_M if INTERPRETED else GPU_BLOCK_M


def acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 for everything else."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def torch_acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def upcast_inputs(dtype: torch.dtype) -> bool:
    """Whether to cast loaded q/k/v/dO to the accumulation dtype before the dots.

    Always under the interpreter (its bf16 arithmetic is wrong, FINDINGS.md); on GPUs half
    precision inputs stay in their dtype so the dots run on tensor cores.
    """
    return INTERPRETED or dtype in (torch.float32, torch.float64)


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of fp32 dots: ``tf32x3`` keeps fp32 accuracy on tensor cores."""
    return "ieee" if INTERPRETED or dtype == torch.float64 else "tf32x3"


def block_d(head_dim: int) -> int:
    """Head dimension padded to a power of two >= 16 (tl.dot's minimum); extra lanes are masked."""
    return max(16, triton.next_power_of_2(head_dim))


def hist_shape(num_columns: int) -> tuple[int, int]:
    """``(HIST_HI, HIST_LO)`` with ``HIST_HI * HIST_LO >= num_columns``, both >= 16 (tl.dot)."""
    hi = max(16, triton.next_power_of_2(triton.cdiv(num_columns, HIST_LO)))
    return hi, HIST_LO


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor) -> None:
    """Raise ValueError naming the problem if packed q/k/v and the table do not fit together."""
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            "q, k, v must all be (total_tokens, heads, head_dim); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q, k, v must share one of {SUPPORTED_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] > 256:
        raise ValueError(f"head_dim must be <= 256, got {q.shape[-1]}")
    if table.dim() != 2 or table.shape[0] != q.shape[1] or table.shape[1] % 2 != 1:
        raise ValueError(
            f"table must be (heads, 2 * max_distance + 1) with heads={q.shape[1]}; got {tuple(table.shape)}"
        )
