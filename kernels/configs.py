"""Autotune configurations of the kernels, pruned by what the AOT report measured.

Every config the autotuner may pick is listed in :data:`TABLE`, per launch, dtype class, padded head
dim (``BLOCK_D``) and architecture family, and was compiled by ``python -m saicl.kernels.aot`` with
zero stack (spill) bytes and shared memory within the arch's limit. :data:`CANDIDATES` is the wider
grid the report compiles with ``--candidates`` to re-derive the table after a kernel change.

Launches (``TABLE`` keys): ``forward``, ``dq``; the dK/dV kernel runs fused (``dkdv``) for small head
dims and split into a dV pass and a dK pass (``dv``, ``dk``) for large ones (:data:`SPLIT_BLOCK_D`: 128
on Hopper, 64 on Ampere), where the fused kernel spills; ``-det`` marks the deterministic bias
gradient.
"""

from __future__ import annotations

import itertools

import torch
import triton

# Launches: the forward, dQ, and the dK/dV kernel as it runs (PARTS 3: fused "dkdv*"; 1: "dv"; 2: "dk*"),
# with no table gradient, the atomic one ("+dbias") or the deterministic one ("+dbias-det").
DKDV_VARIANTS = {  # name -> (DBIAS, PARTS)
    "dkdv": (0, 3), "dkdv+dbias": (1, 3), "dkdv+dbias-det": (2, 3),
    "dv": (0, 1), "dk": (0, 2), "dk+dbias": (1, 2), "dk+dbias-det": (2, 2),
}
LAUNCHES = ("forward", "dq", *DKDV_VARIANTS)
# (BLOCK_N, num_warps, num_stages) grids the table below was chosen from, per dtype class. fp32 inputs
# (three tf32 dots per product) need far more registers: a smaller grid.
_BWD_GRID = list(itertools.product((16, 32, 64), (4, 8), (1, 2)))
CANDIDATES: dict[str, dict[str, list[tuple[int, int, int]]]] = {
    "half": {"forward": list(itertools.product((32, 64, 128), (4, 8), (2, 3))),
             **{name: _BWD_GRID for name in LAUNCHES[1:]}},
    "fp32": {"forward": list(itertools.product((16, 32, 64), (4, 8), (2,))),
             **{name: [(16, 4, 1), (16, 8, 1), (32, 4, 1), (32, 8, 1), (64, 8, 1)] for name in LAUNCHES[1:]}},
}
# From this padded head dim on (per arch family), dK and dV are computed by two launches of the dK/dV
# kernel: the fused kernel spills there (measured with the AOT report).
SPLIT_BLOCK_D = {80: 64, 90: 128}
ARCH_FAMILIES = (80, 90)
# The interpreter (no GPU) follows the Hopper schedule.
DEFAULT_CAPABILITY = 90


def dtype_class(dtype: torch.dtype) -> str:
    """``"half"`` (fp16/bf16: tensor-core dots in the input dtype) or ``"fp32"`` (tf32x3 dots)."""
    return "half" if dtype in (torch.float16, torch.bfloat16) else "fp32"


def arch_family(capability: int) -> int:
    """Table column of a compute capability (``major * 10 + minor``): 90 for Hopper and later, else 80."""
    return 90 if capability >= 90 else 80


def head_bucket(block_d: int) -> int:
    """The measured head-dim bucket a padded head dim falls in (16 uses the 32 list)."""
    return max(32, block_d)


def device_capability(device: torch.device) -> int:
    """``major * 10 + minor`` of a CUDA device; :data:`DEFAULT_CAPABILITY` for anything else."""
    if device.type != "cuda":
        return DEFAULT_CAPABILITY
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def dkdv_launches(
    block_d: int, dbias: int, capability: int = DEFAULT_CAPABILITY, dtype: torch.dtype = torch.bfloat16
) -> list[str]:
    """Names (:data:`DKDV_VARIANTS`) of the dK/dV launches for this head dim, bias-gradient mode, GPU and
    input dtype (fp32 inputs always split: their tf32x3 dots need twice the operand registers)."""
    suffix = {0: "", 1: "+dbias", 2: "+dbias-det"}[dbias]
    if dtype == torch.float32 or block_d >= SPLIT_BLOCK_D[arch_family(capability)]:
        return ["dv", "dk" + suffix]
    return ["dkdv" + suffix]


# (launch, head bucket, arch family) -> "BLOCK_Nxwarpsxstages ...": for fp16/bf16, up to six of the
# configs the AOT report compiled with zero stack bytes and shared memory within the arch's limit
# (BLOCK_M 64; BLOCK_N >= 32, largest first; measured in bf16, fp16 checked by the full report).
# Launches a head dim does not use on an arch are absent.
_HALF = {
    ("forward", 32, 80): "64x8x2 64x8x3 64x4x2 64x4x3 32x8x2 32x8x3",
    ("forward", 32, 90): "128x8x2 128x8x3 64x8x2 64x8x3 64x4x2 64x4x3",
    ("forward", 64, 80): "64x8x2 64x8x3 64x4x2 64x4x3 32x8x2 32x8x3",
    ("forward", 64, 90): "128x8x2 128x8x3 64x8x2 64x8x3 64x4x2 64x4x3",
    ("forward", 128, 80): "128x8x2 128x8x3 64x8x2 64x8x3 32x8x2 32x8x3",
    ("forward", 128, 90): "128x8x2 128x8x3 64x8x2 64x8x3 64x4x2 64x4x3",
    ("dq", 32, 80): "64x8x1 64x8x2 64x4x1 64x4x2 32x8x1 32x8x2",
    ("dq", 32, 90): "64x8x1 64x8x2 64x4x1 64x4x2 32x8x1 32x8x2",
    ("dq", 64, 80): "64x8x1 64x4x1 32x8x1 32x8x2 32x4x1 32x4x2",
    ("dq", 64, 90): "64x8x1 64x8x2 64x4x1 64x4x2 32x8x1 32x8x2",
    ("dq", 128, 80): "64x8x1 64x8x2 32x8x1 32x8x2 32x4x1 32x4x2",
    ("dq", 128, 90): "64x8x1 64x8x2 32x8x1 32x8x2 32x4x1 32x4x2",
    ("dkdv", 32, 80): "64x8x1 64x8x2 64x4x1 64x4x2 32x8x1 32x8x2",
    ("dkdv", 32, 90): "64x8x1 64x8x2 64x4x1 64x4x2 32x8x1 32x8x2",
    ("dkdv", 64, 90): "64x8x1 64x8x2 64x4x1 32x8x1 32x8x2 32x4x1",
    ("dkdv+dbias", 32, 80): "64x8x1 64x8x2 64x4x1 32x8x1 32x8x2 32x4x1",
    ("dkdv+dbias", 32, 90): "64x8x1 64x8x2 64x4x1 64x4x2 32x8x1 32x8x2",
    ("dkdv+dbias", 64, 90): "64x8x1 64x8x2 32x8x1 32x8x2 32x4x1",
    ("dkdv+dbias-det", 32, 80): "64x8x1 64x8x2 64x4x1 32x8x1 32x8x2 32x4x1",
    ("dkdv+dbias-det", 32, 90): "64x8x1 64x8x2 64x4x1 64x4x2 32x8x1 32x8x2",
    ("dkdv+dbias-det", 64, 90): "64x8x1 64x8x2 32x8x1 32x8x2 32x4x1",
    ("dv", 64, 80): "64x8x1 64x8x2 64x4x1 64x4x2 32x8x1 32x8x2",
    ("dv", 128, 80): "64x8x1 64x8x2 64x4x1 32x8x1 32x8x2 32x4x1",
    ("dv", 128, 90): "64x8x1 64x8x2 64x4x2 32x8x1 32x8x2 32x4x1",
    ("dk", 64, 80): "64x8x1 32x8x1",
    ("dk", 128, 80): "64x8x1 64x4x1 32x8x1 32x8x2 32x4x1",
    ("dk", 128, 90): "64x8x1 64x8x2 32x8x1 32x8x2 32x4x1",
    ("dk+dbias", 64, 80): "64x8x2 32x4x2",
    ("dk+dbias", 128, 80): "64x8x1 32x8x1 32x8x2 32x4x1",
    ("dk+dbias", 128, 90): "64x8x1 32x8x1 32x8x2 32x4x1",
    ("dk+dbias-det", 64, 80): "64x8x2 32x8x1 32x8x2",
    ("dk+dbias-det", 128, 80): "64x8x1 32x8x1 32x8x2 32x4x1",
    ("dk+dbias-det", 128, 90): "32x8x1 32x8x2 32x4x1",
}
# The same for fp32 inputs (tf32x3 dots: twice the operand registers), measured at the smaller tiles of
# FP32_BLOCK_M (at BLOCK_M 64 every config spills from head dim 64 on A100 and 128 on H100).
FP32_BLOCK_M = {32: 64, 64: 32, 128: 16}
_FP32 = {
    ("forward", 32, 80): "32x8x2 16x8x2",
    ("forward", 32, 90): "32x8x2 16x8x2",
    ("forward", 64, 80): "32x8x2 16x8x2",
    ("forward", 64, 90): "32x8x2 16x8x2",
    ("forward", 128, 80): "32x8x2 16x8x2",
    ("forward", 128, 90): "32x8x2 16x8x2",
    ("dq", 32, 80): "32x8x1 16x8x1",
    ("dq", 32, 90): "32x8x1 16x8x1",
    ("dq", 64, 80): "32x8x1 16x8x1",
    ("dq", 64, 90): "16x8x1 16x4x1",
    ("dq", 128, 80): "32x8x1 16x8x1",
    ("dq", 128, 90): "32x8x1 16x8x1",
    ("dv", 32, 80): "32x8x1 16x8x1",
    ("dv", 32, 90): "32x8x1 16x8x1",
    ("dv", 64, 80): "32x8x1 16x8x1",
    ("dv", 64, 90): "32x8x1 16x8x1",
    ("dv", 128, 80): "32x8x1 16x8x1",
    ("dv", 128, 90): "32x8x1 16x8x1",
    ("dk", 32, 80): "32x8x1 16x8x1",
    ("dk", 32, 90): "32x8x1 16x8x1",
    ("dk", 64, 80): "32x8x1 16x8x1",
    ("dk", 64, 90): "32x8x1 16x8x1",
    ("dk", 128, 80): "16x8x1 16x4x1",
    ("dk", 128, 90): "16x4x1",
    ("dk+dbias", 32, 80): "32x8x1 16x8x1",
    ("dk+dbias", 32, 90): "32x8x1 16x8x1",
    ("dk+dbias", 64, 80): "32x8x1 16x8x1",
    ("dk+dbias", 64, 90): "32x8x1 16x8x1",
    ("dk+dbias", 128, 80): "16x8x1 16x4x1",
    ("dk+dbias", 128, 90): "16x8x1 16x4x1",
    ("dk+dbias-det", 32, 80): "16x8x1 16x4x1",
    ("dk+dbias-det", 32, 90): "32x8x1 16x8x1",
    ("dk+dbias-det", 64, 80): "32x8x1 16x8x1",
    ("dk+dbias-det", 64, 90): "32x8x1 16x8x1",
    ("dk+dbias-det", 128, 80): "16x8x1 16x4x1",
    ("dk+dbias-det", 128, 90): "16x8x1",
}
# Head dims above 128 were not measured: the leanest configs of the 128 lists (not AOT-verified).
_UNMEASURED_256 = {"forward": [(32, 8, 2)]}


def _decode(configs: str) -> list[tuple[int, int, int]]:
    return [tuple(int(x) for x in config.split("x")) for config in configs.split()]  # type: ignore[misc]


TABLE: dict[tuple[str, str, int, int], list[tuple[int, int, int]]] = {
    **{(launch, "half", bd, arch): _decode(c) for (launch, bd, arch), c in _HALF.items()},
    **{(launch, "fp32", bd, arch): _decode(c) for (launch, bd, arch), c in _FP32.items()},
}


def candidates_for(launch: str, dtype: torch.dtype) -> list[tuple[int, int, int]]:
    """The candidate grid of a launch for this dtype (what ``--candidates`` compiles)."""
    return CANDIDATES[dtype_class(dtype)][launch]


def block_m_for(dtype: torch.dtype, block_d: int) -> int:
    """The plan tile (``BLOCK_M``) the tables were measured at: 64, or :data:`FP32_BLOCK_M` for fp32."""
    if dtype == torch.float32:
        return FP32_BLOCK_M.get(head_bucket(block_d), 16)
    return 64


def configs_for(launch: str, dtype: torch.dtype, block_d: int, capability: int) -> list[tuple[int, int, int]]:
    """``(BLOCK_N, num_warps, num_stages)`` the autotuner may try for a launch on this GPU."""
    bucket, arch, cls = head_bucket(block_d), arch_family(capability), dtype_class(dtype)
    if bucket > 128:
        return _UNMEASURED_256.get(launch, [(16, 8, 1)])
    key = (launch, cls, bucket, arch)
    if key not in TABLE:
        raise KeyError(f"no AOT-measured configs for {key} (launch, dtype class, head dim, arch family)")
    return TABLE[key]


def _launch_of(kernel: str, kwargs: dict) -> str:
    if kernel != "dkdv":
        return kernel
    return next(name for name, key in DKDV_VARIANTS.items() if key == (kwargs["DBIAS"], kwargs["PARTS"]))


def _prune(kernel: str):
    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        capability = device_capability(q.device)
        allowed = set(configs_for(_launch_of(kernel, kwargs), q.dtype, kwargs["BLOCK_D"], capability))
        expected_block_m = block_m_for(q.dtype, kwargs["BLOCK_D"])
        if kwargs["BLOCK_M"] != expected_block_m:
            raise ValueError(
                f"the plan's block_m is {kwargs['BLOCK_M']}, but the {kernel} kernel's configs for {q.dtype} at "
                f"head dim {kwargs['HEAD_DIM']} were verified at block_m={expected_block_m}: build the plan with "
                f"block_m=kernels.configs.block_m_for(dtype, block_d) (or pass block_n to skip autotuning)"
            )
        kept = [c for c in configs if (c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]
        if not kept:
            raise RuntimeError(f"no AOT-verified config for the {kernel} kernel at {kwargs} on sm_{capability}")
        return kept

    return prune


_tuned: dict[str, object] = {}


def autotuned(kernel: str, fn):
    """The autotuned variant of the jit function ``fn`` (built lazily; autotuning needs a GPU).

    The key holds the constexprs that change the code (the autotuner adds the dtypes itself); the
    bias-gradient buffer is zeroed before every benchmarking run, as its atomics accumulate.
    """
    if kernel not in _tuned:
        grid = sorted({c for per_launch in CANDIDATES.values() for cs in per_launch.values() for c in cs})
        configs = [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s) for bn, w, s in grid]
        key = ["HEAD_DIM", "BLOCK_M"] + (["DBIAS", "PARTS"] if kernel == "dkdv" else [])
        _tuned[kernel] = triton.autotune(
            configs=configs, key=key, prune_configs_by={"early_config_prune": _prune(kernel)},
            reset_to_zero=["DTABLE"] if kernel == "dkdv" else None,
        )(fn)
    return _tuned[kernel]
