"""Ahead-of-time compile report: registers, spills and shared memory of every kernel variant, no GPU needed.

Triton compiles for a real NVIDIA target on any machine: ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`` runs the whole pipeline to PTX and a cubin with the ptxas bundled
in the triton wheel, and the bundled ``cuobjdump -res-usage`` reads registers per thread and stack
bytes (spills) from the cubin; ``shared_bytes`` is the compiled kernel's ``metadata.shared`` (what a
launch requests). Run::

    python -m saicl.kernels.aot --arch 80,90 --dtypes bf16,fp16,fp32 --head-dims 32,64,128 \\
        --json aot.json --cubin-dir cubins

Variants: every config the autotuner may pick (:mod:`kernels.configs`) x dtype x head dim x arch, for
the forward, dQ, dK/dV without the bias gradient, with the atomic bias gradient (``dkdv+dbias``, the
default) and with the deterministic one (``dkdv+dbias-det``); where the launcher splits the dK/dV
kernel into two launches (large head dims, fp32: :func:`kernels.configs.dkdv_launches`), the rows are
``dv`` and ``dk*``. Each dtype and head dim compiles at the plan tile the launcher uses
(:func:`kernels.configs.block_m_for`, or ``--block-m``). Arguments are specialised as a launch
specialises them: pointers 16-byte aligned, strides multiples of 16 (head dims 32/64/128). A row fails
when its shared memory exceeds the arch's per-block limit or it spills (any stack bytes); the exit code
is then 1. ``--candidates`` compiles the wider grid the config table was chosen from (failures expected
there). User mistakes exit with 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# Opt-in maximum of dynamic shared memory per block (bytes): sm_80 A100, sm_86/89 consumer Ampere/Ada,
# sm_90 H100.
SHARED_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# What the launchers run: name -> (DBIAS mode, whether it is the dK/dV kernel).
KERNELS = {"forward": (0, False), "dq": (0, False), "dkdv": (0, True), "dkdv+dbias": (1, True),
           "dkdv+dbias-det": (2, True)}
_TRITON_TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


@dataclass
class Row:
    """One compiled variant."""

    kernel: str
    arch: str
    dtype: str
    head_dim: int
    config: str
    registers: int
    stack_bytes: int
    shared_bytes: int
    compile_s: float
    cubin: str | None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def cuobjdump_path() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """``(registers per thread, stack bytes per thread)`` of the one kernel in ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(cuobjdump_path()), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if match is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no REG/STACK line:\n{out}")
    return int(match.group(1)), int(match.group(2))


def _pointer_type(name: str, dtype: torch.dtype, deterministic: bool = False) -> str:
    """Triton pointer type of a kernel argument, by its role."""
    acc = _TRITON_TYPE[torch.float64 if dtype == torch.float64 else torch.float32]
    if name in ("Q", "K", "V", "OUT", "DO", "DQ", "DK", "DV"):
        return "*" + _TRITON_TYPE[dtype]
    if name in ("TABLE", "LSE", "DELTA"):
        return "*" + acc
    if name == "DTABLE":
        return "*i64" if deterministic else "*" + acc
    if name == "SCALE":
        return "*fp32"
    if name in ("FIELDS", "RANGES", "TILES"):
        return "*i32"
    raise ValueError(f"aot: no pointer type for kernel argument {name!r}; teach _pointer_type its role")


# Integer arguments a launch specialises as multiples of 16 (divisibility hint), see the module docstring.
_ALIGNED_INTS = ("stride_tok", "stride_head")
# Scalar arguments that are not int32 (none today).
_SCALAR_TYPES: dict[str, str] = {}


def kernel_and_meta(variant: str, dtype: torch.dtype, head_dim: int, block_m: int):
    """The jit function and the constexprs (without BLOCK_N) its launcher passes for a compiled variant
    (a launch name of :mod:`kernels.configs`)."""
    from .attention_bwd import _bwd_dkdv_kernel, _bwd_dq_kernel, backward_meta
    from .attention_fwd import _fwd_kernel, forward_meta
    from .configs import DKDV_VARIANTS

    if variant == "forward":
        return _fwd_kernel, forward_meta(dtype, head_dim, block_m, interpreted=False)
    dbias, parts = DKDV_VARIANTS.get(variant, (0, 0))
    meta, dkdv_meta = backward_meta(dtype, head_dim, block_m, dbias, interpreted=False)
    if variant == "dq":
        return _bwd_dq_kernel, meta
    return _bwd_dkdv_kernel, dict(dkdv_meta, PARTS=parts)


def compile_variant(
    variant: str, arch: int, dtype: torch.dtype, head_dim: int, block_m: int, config: tuple[int, int, int],
    cubin_dir: Path | None = None,
) -> Row:
    """Compile one variant for ``sm_<arch>`` and measure it (no GPU involved)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    block_n, num_warps, num_stages = config
    fn, meta = kernel_and_meta(variant, dtype, head_dim, block_m)
    constexprs = dict(meta, BLOCK_N=block_n)
    signature, attrs = {}, {}
    for index, param in enumerate(fn.params):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
        elif param.name.isupper():
            signature[param.name] = _pointer_type(param.name, dtype, constexprs.get("DBIAS") == 2)
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[param.name] = _SCALAR_TYPES.get(param.name, "i32")
            if param.name in _ALIGNED_INTS:
                attrs[(index,)] = [["tt.divisibility", 16]]
    missing = set(constexprs) ^ {p.name for p in fn.params if p.is_constexpr}
    if missing:
        raise ValueError(f"aot: constexprs of {fn.__name__} and its launcher's meta differ: {sorted(missing)}")
    start = time.perf_counter()
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages},
    )
    seconds = time.perf_counter() - start
    cubin = compiled.asm["cubin"]
    registers, stack = resource_usage(cubin)
    name = None
    if cubin_dir is not None:
        dt = _TRITON_TYPE[dtype]
        name = f"{variant}-sm{arch}-{dt}-d{head_dim}-m{block_m}-n{block_n}-w{num_warps}-s{num_stages}.cubin"
        (cubin_dir / name).write_bytes(cubin)
    row = Row(
        kernel=variant, arch=f"sm_{arch}", dtype=_TRITON_TYPE[dtype], head_dim=head_dim,
        config=f"BLOCK_M={block_m} BLOCK_N={block_n} warps={num_warps} stages={num_stages}",
        registers=registers, stack_bytes=stack, shared_bytes=int(compiled.metadata.shared),
        compile_s=round(seconds, 2), cubin=name,
    )
    row.problems.extend(problems(arch, stack, row.shared_bytes))
    return row


def problems(arch: int, stack_bytes: int, shared_bytes: int) -> list[str]:
    """Why a compiled variant is not acceptable: shared memory over the arch's limit, or any spill."""
    found = []
    if shared_bytes > SHARED_LIMIT[arch]:
        found.append(f"shared memory {shared_bytes} B > {SHARED_LIMIT[arch]} B limit of sm_{arch}")
    if stack_bytes:
        found.append(f"spills: {stack_bytes} stack bytes per thread")
    return found


def compiled_variants(kernel: str, block_d: int, arch: int, dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """The launches (:data:`kernels.configs.LAUNCHES`) a launcher-level kernel (:data:`KERNELS`) runs at a
    head dim on ``sm_<arch>`` for inputs of ``dtype``."""
    from .configs import dkdv_launches

    dbias, is_dkdv = KERNELS[kernel]
    return dkdv_launches(block_d, dbias, arch, dtype) if is_dkdv else [kernel]


def enumerate_variants(
    kernels: Iterable[str], archs: Iterable[int], dtypes: Iterable[torch.dtype], head_dims: Iterable[int],
    block_m: int | None = None, candidates: bool = False,
) -> list[tuple[str, int, torch.dtype, int, int, tuple[int, int, int]]]:
    """Every (variant, arch, dtype, head dim, block_m, config) the launchers can select (or the candidate
    grid); ``block_m`` ``None``: the launcher's tile for the dtype and head dim."""
    from . import _common as C
    from .configs import block_m_for, candidates_for, configs_for

    out, seen = [], set()
    for kernel in kernels:
        for dtype in dtypes:
            for head_dim in head_dims:
                for arch in archs:
                    for variant in compiled_variants(kernel, C.block_d(head_dim), arch, dtype):
                        configs = candidates_for(variant, dtype) if candidates else configs_for(
                            variant, dtype, C.block_d(head_dim), arch)
                        for config in configs:
                            item = (variant, arch, dtype, head_dim, block_m or block_m_for(dtype, C.block_d(head_dim)),
                                    config)
                            if item not in seen:
                                seen.add(item)
                                out.append(item)
    return out


def run_report(
    variants: Iterable[str], archs: Iterable[int], dtypes: Iterable[torch.dtype], head_dims: Iterable[int],
    block_m: int | None = None, candidates: bool = False, cubin_dir: Path | None = None, progress=None,
    fresh_cache: bool = True,
) -> list[Row]:
    """Compile every selected variant; ``fresh_cache`` keeps Triton's cache from hiding compile times."""
    import triton

    todo = enumerate_variants(variants, archs, dtypes, head_dims, block_m, candidates)
    rows: list[Row] = []
    old_cache = triton.knobs.cache.dir
    with tempfile.TemporaryDirectory(prefix="saicl-aot-cache-") as cache, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
        if fresh_cache:
            triton.knobs.cache.dir = cache
        try:
            for i, (variant, arch, dtype, head_dim, tile, config) in enumerate(todo):
                row = compile_variant(variant, arch, dtype, head_dim, tile, config, cubin_dir)
                rows.append(row)
                if progress is not None:
                    progress(i + 1, len(todo), row)
        finally:
            triton.knobs.cache.dir = old_cache
    return rows


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| kernel | arch | dtype | head_dim | config | registers | stack_bytes | shared_bytes | compile_s | cubin "
        "| ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.kernel} | {r.arch} | {r.dtype} | {r.head_dim} | {r.config} | {r.registers} | {r.stack_bytes} "
            f"| {r.shared_bytes} | {r.compile_s} | {r.cubin or ''} "
            f"| {'yes' if r.ok else '**NO**: ' + '; '.join(r.problems)} |"
        )
    return "\n".join(lines)


def summary_table(rows: list[Row]) -> str:
    """One markdown line per (kernel, arch, dtype, head dim): how many configs, worst registers, stack,
    shared memory and compile time among them."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.kernel, r.arch, r.dtype, r.head_dim), []).append(r)
    lines = [
        "| kernel | arch | dtype | head_dim | configs | max registers | configs spilling (max stack B) "
        "| max shared_bytes | max compile_s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (kernel, arch, dtype, head_dim), group in groups.items():
        spilling = [r.stack_bytes for r in group if r.stack_bytes]
        spill = f"{len(spilling)} ({max(spilling)})" if spilling else "0"
        shared = max(r.shared_bytes for r in group)
        over = " **over limit**" if shared > SHARED_LIMIT[int(arch[3:])] else ""
        lines.append(
            f"| {kernel} | {arch} | {dtype} | {head_dim} | {len(group)} | {max(r.registers for r in group)} "
            f"| {spill} | {shared}{over} | {max(r.compile_s for r in group)} |"
        )
    return "\n".join(lines)


def _int_list(flag: str, text: str, allowed: Iterable[int] | None = None) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag} expects comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{flag} expects at least one value")
    if allowed is not None:
        bad = [v for v in values if v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{flag}: {bad} not supported; expected some of {sorted(allowed)}")
    return values


def _name_list(flag: str, text: str, allowed: Iterable[str]) -> list[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"{flag}: {bad or text!r} not supported; expected some of {list(allowed)}")
    return values


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line on stderr, exit 2, no usage dump
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m saicl.kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="80,90", type=lambda s: _int_list("--arch", s, SHARED_LIMIT),
                        help="compute capabilities, e.g. 80,90")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32", type=lambda s: _name_list("--dtypes", s, DTYPES))
    parser.add_argument("--head-dims", default="32,64,128",
                        type=lambda s: _int_list("--head-dims", s, range(1, 257)))
    parser.add_argument("--kernels", default=",".join(KERNELS),
                        type=lambda s: _name_list("--kernels", s, KERNELS),
                        help="launcher-level kernels; dkdv* compile as dv + dk* from head dim 128 on")
    parser.add_argument("--block-m", type=int, default=None,
                        help="the plan's tile size (default: the launcher's, 64 or smaller for fp32)")
    parser.add_argument("--candidates", action="store_true",
                        help="compile the wider candidate grid instead of the autotuner's configs")
    parser.add_argument("--json", type=Path, help="write the rows as a JSON list here")
    parser.add_argument("--cubin-dir", type=Path, help="save every cubin here (created if missing)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table instead of plain rows")
    parser.add_argument("--summary", action="store_true",
                        help="print one markdown line per kernel, arch, dtype and head dim")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.block_m is not None and args.block_m not in (16, 32, 64, 128):
        print(f"--block-m must be one of 16, 32, 64, 128; got {args.block_m}", file=sys.stderr)
        return 2
    if args.json is not None and not args.json.parent.is_dir():
        print(f"--json {args.json}: folder {args.json.parent} does not exist", file=sys.stderr)
        return 2
    if args.cubin_dir is not None:
        try:
            args.cubin_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            print(f"--cubin-dir {args.cubin_dir}: cannot create it ({err.strerror})", file=sys.stderr)
            return 2
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on"):
        # The interpreter replaces the jit functions at import: compile from a clean process.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "saicl.kernels.aot", *argv], env=env).returncode
    if not cuobjdump_path().exists():
        print(f"cuobjdump not found at {cuobjdump_path()} (it ships with the triton wheel on Linux)",
              file=sys.stderr)
        return 2

    def progress(i: int, n: int, row: Row) -> None:
        if not (args.markdown or args.summary):
            flag = "ok" if row.ok else "FAIL: " + "; ".join(row.problems)
            print(f"[{i}/{n}] {row.kernel:15s} {row.arch} {row.dtype} d{row.head_dim:<3d} {row.config:42s} "
                  f"regs {row.registers:3d} stack {row.stack_bytes:5d} shared {row.shared_bytes:6d} "
                  f"{row.compile_s:6.2f}s {row.cubin or ''} {flag}", flush=True)

    start = time.perf_counter()
    rows = run_report(args.kernels, args.arch, [DTYPES[d] for d in args.dtypes], args.head_dims, args.block_m,
                      args.candidates, args.cubin_dir, progress)
    if args.markdown:
        print(markdown_table(rows))
    if args.summary:
        print(summary_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps([dict(asdict(r), ok=r.ok) for r in rows], indent=1) + "\n")
    failed = [r for r in rows if not r.ok]
    print(f"{len(rows)} variants, {len(failed)} failing, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
