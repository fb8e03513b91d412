"""The Triton structured-attention kernels against the float64 eager oracle.

Without CUDA the kernels run in the Triton interpreter (conftest sets ``TRITON_INTERPRET=1`` only
then); tests marked ``gpu`` run the compiled, autotuned kernels on a CUDA device.
"""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from saicl.attention import get_backend
from saicl.attention.eager import dense_bias, eager_attention
from saicl.attention.registry import unavailable_reason
from saicl.attention.triton import pack_layout, saicl_attention
from saicl.kernels import _common, attention_bwd, build_plan, varlen_structured_attention
from saicl.kernels.attention_bwd import attention_backward
from saicl.kernels.attention_fwd import attention_forward
from saicl.layout import build_layout
from saicl.testing import random_qkv, random_table, segment_batch

HEADS, MAX_DISTANCE = 2, 16
CUDA = torch.cuda.is_available() and not _common.INTERPRETED
DEVICE = "cuda" if CUDA else "cpu"
KERNELS_DIR = Path(__file__).resolve().parents[1] / "kernels"
# float64 and launch-recording tests run the kernels on CPU tensors: interpreter only (CUDA machines
# leave the interpreter off and run the gpu tests).
interpreter_only = pytest.mark.skipif(not _common.INTERPRETED, reason="needs the Triton interpreter (no CUDA)")

# (demo lengths per episode, query lengths): 0, 1, 3 and 9 demonstrations of lengths 1, 5, 16, 33.
EPISODES = {
    "zero-demos": ([[]], [5]),
    "one-demo": ([[33]], [1]),
    "three-demos": ([[1, 5, 16]], [33]),
    "nine-demos": ([[1, 5, 16, 33, 1, 5, 16, 33, 1]], [16]),
    "mixed-batch": ([[], [5], [16, 1, 33], [1, 5, 16, 33, 1, 5, 16, 33, 1]], [16, 1, 5, 33]),
}
STRUCTURES = ["saicl", "fid", "full"]


def _layout(episodes, structure, device=DEVICE):
    mask, seg = segment_batch(*EPISODES[episodes])
    return build_layout(mask.to(device), seg.to(device), structure)


def _oracle(layout, q, k, v, table, grad_out):
    """Output and gradients (q, k, v, table) of the eager oracle, in the inputs' dtype."""
    inputs = [t.detach().clone().requires_grad_() for t in (q, k, v, table)]
    out = eager_attention(*inputs[:3], dense_bias(layout, inputs[3]))
    grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
    return out.detach(), grads


def _max_err(got, exact, valid=None):
    diff = (got.double() - exact.double()).abs()
    if valid is not None:
        diff = diff[valid]
    return diff.max().item()


def _check_against_oracle(layout, head_dim, dtype, block_m, block_n, deterministic=False, fwd_factor=2.0,
                          grad_factor=3.0):
    """Kernel at ``dtype`` vs the float64 oracle, within a multiple of eager's own error at ``dtype``.

    The launchers get NaN-filled output buffers, so an element the kernels fail to write fails; the
    floor of the tolerance is the dtype's epsilon times the reference's magnitude.
    """
    device = layout.device
    q, k, v = (t.to(device) for t in random_qkv(layout.batch_size, layout.length, HEADS, head_dim, seed=3))
    table = random_table(HEADS, MAX_DISTANCE, seed=4).to(device)
    gen = torch.Generator().manual_seed(5)
    grad_out = torch.randn(q.shape, dtype=torch.float64, generator=gen).to(device)
    exact_out, exact_grads = _oracle(layout, q, k, v, table, grad_out)
    eager_out, eager_grads = _oracle(layout, *(t.to(dtype) for t in (q, k, v, table)), grad_out)

    packed_layout = pack_layout(layout, block_m)
    plan = packed_layout.plan
    packed = [packed_layout.pack(t.to(dtype)) for t in (q, k, v)]
    low_table = table.to(dtype)
    nan = float("nan")
    out = torch.full_like(packed[0], nan)
    lse = torch.full(packed[0].shape[:2], nan, dtype=_common.torch_acc_dtype(dtype), device=device)
    attention_forward(*packed, low_table, plan, block_n=block_n, out=out, lse=lse)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all(), "forward left elements unwritten"
    dq, dk, dv = (torch.full_like(packed[0], nan) for _ in range(3))
    _, _, _, dtable = attention_backward(
        packed_layout.pack(grad_out.to(dtype)), *packed, low_table, out, lse, plan,
        block_n=block_n, deterministic=deterministic, dq=dq, dk=dk, dv=dv,
    )
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv), ("dtable", dtable)):
        assert torch.isfinite(g).all(), f"{name}: backward left elements unwritten"

    valid = layout.valid
    eps = torch.finfo(dtype).eps
    got_out = packed_layout.unpack(out)
    err, eager_err = _max_err(got_out, exact_out, valid), _max_err(eager_out, exact_out, valid)
    floor = 32 * eps * exact_out.abs().max().item()
    assert err <= fwd_factor * eager_err + floor, f"forward: {err:.3g} vs eager {eager_err:.3g}"
    got_grads = [packed_layout.unpack(g) for g in (dq, dk, dv)] + [dtable]
    for name, g, e, r in zip(("q", "k", "v", "table"), got_grads, eager_grads, exact_grads):
        mask = valid if name != "table" else None
        err, eager_err = _max_err(g, r, mask), _max_err(e, r, mask)
        floor = 64 * eps * r.abs().max().item()
        assert err <= grad_factor * eager_err + floor, f"grad {name}: {err:.3g} vs eager {eager_err:.3g}"
    # Padding rows: the unpacked output is exactly zero.
    assert (got_out[~valid] == 0).all()


class _LaunchRecorder:
    """Stands in for a jit kernel: records the constexprs of every launch, then launches the real one."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches: list[dict] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


# --- plan (host) -----------------------------------------------------------------------------------


@pytest.mark.parametrize("block_m", [1, 4, 16, 64])
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("episodes", list(EPISODES))
def test_plan_covers_exactly_the_allowed_pairs(episodes, structure, block_m):
    """Per-row ranges equal the structure predicate; tile ranges are disjoint and cover every pair."""
    layout = _layout(episodes, structure, "cpu")
    packed = pack_layout(layout, block_m)
    plan = packed.plan
    allowed = layout.allowed_mask()
    n = plan.total_tokens
    b_of = torch.repeat_interleave(torch.arange(layout.batch_size), layout.valid.sum(1))
    pos_in_row = packed.flat_index % layout.length
    same_episode = b_of[:, None] == b_of[None, :]
    expected = allowed[b_of[:, None], pos_in_row[:, None], pos_in_row[None, :]] & same_episode
    r = plan.ranges.long()
    y = torch.arange(n)[None, :]
    from_ranges = ((y >= r[:, 0:1]) & (y < r[:, 1:2])) | ((y >= r[:, 2:3]) & (y < r[:, 3:4]))
    assert torch.equal(from_ranges, expected)
    assert torch.equal(expected, expected.t()), "the backward pass relies on symmetric visibility"
    # The view codes reproduce the layout's relative distances.
    v0, v1 = plan.fields.long()
    isq = v0 & 1
    rel = torch.where(isq[:, None] == 1, v1[None, :] >> 1, v0[None, :] >> 1) - torch.where(
        isq[None, :] == 1, v1[:, None] >> 1, v0[:, None] >> 1)
    dense_rel = layout.relative_positions()[b_of[:, None], pos_in_row[:, None], pos_in_row[None, :]]
    assert torch.equal(rel[expected], dense_rel[expected])
    visited = torch.zeros(n, n, dtype=torch.int32)
    rows_seen = torch.zeros(n, dtype=torch.int32)
    for row0, row1, k1lo, k1hi, k2lo, k2hi in plan.tiles.tolist():
        assert 0 < row1 - row0 <= block_m
        assert k2lo == k2hi or k2lo > k1hi or k2hi < k1lo, "tile key ranges must be disjoint"
        rows_seen[row0:row1] += 1
        visited[row0:row1, k1lo:k1hi] += 1
        visited[row0:row1, k2lo:k2hi] += 1
    assert (rows_seen == 1).all()
    assert (visited <= 1).all() and (visited[expected] == 1).all()


def test_plan_visits_only_structured_blocks():
    """Block-aligned demonstrations: the kernels compute exactly the allowed pairs, far below dense."""
    layout = build_layout(*segment_batch([[16] * 32], [16]), "saicl")
    plan = pack_layout(layout, 16).plan
    allowed = int(layout.allowed_mask().sum())
    assert plan.visited_pairs() == allowed
    assert plan.visited_pairs() * 10 < layout.length**2
    # Straddling tiles (demonstrations of 5 tokens, tiles of 16) cost at most a few times more.
    layout = build_layout(*segment_batch([[5] * 40], [16]), "saicl")
    assert pack_layout(layout, 16).plan.visited_pairs() <= 4 * int(layout.allowed_mask().sum())


def _tiny_plan_inputs():
    """Two episodes of 3 and 2 tokens, full attention."""
    cu = torch.tensor([0, 3, 5])
    pos = torch.tensor([0, 1, 2, 0, 1])
    zeros = torch.zeros(5, dtype=torch.long)
    ranges = torch.tensor([[0, 3, 0, 0]] * 3 + [[0, 2, 0, 0]] * 2)
    return cu, pos, zeros, zeros, ranges


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: a.__setitem__(0, torch.tensor([1, 3, 5])), "cu_seqlens"),
        (lambda a: a.__setitem__(1, torch.tensor([0, 1, 2, 0])), "position"),
        (lambda a: a.__setitem__(3, torch.tensor([0, 0, 2, 0, 0])), "is_query"),
        (lambda a: a.__setitem__(4, a[4][:, :3]), "key_ranges"),
        (lambda a: a[4].__setitem__((4, 1), 3), r"key_ranges\[4\]"),  # past its episode of 2 tokens
        (lambda a: a[4].__setitem__(0, torch.tensor([1, 3, 0, 0])), r"key_ranges\[0\]"),  # misses itself
        (lambda a: a.__setitem__(1, a[1] * 2**29), "position"),
    ],
    ids=["cu-start", "position-length", "is-query-not-0-1", "ranges-shape", "range-past-episode",
         "range-misses-itself", "position-too-large"],
)
def test_build_plan_rejects_bad_inputs(change, match):
    args = list(_tiny_plan_inputs())
    build_plan(*args, block_m=4)  # the unchanged inputs are fine
    change(args)
    with pytest.raises(ValueError, match=match):
        build_plan(*args, block_m=4)


def test_kernels_are_a_leaf_package():
    """kernels/ imports nothing from the model side, its benchmark helper included."""
    for path in sorted(KERNELS_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                assert not name.startswith("saicl") or name.startswith("saicl.kernels"), f"{path.name}: {name}"
            assert not (isinstance(node, ast.ImportFrom) and node.level > 1), f"{path.name} leaves the package"


# --- int64 offsets --------------------------------------------------------------------------------


@triton.jit
def _offset_probe(TOKENS, STRIDES, OUT):
    tok = tl.load(TOKENS)
    stride = tl.load(STRIDES)
    tl.store(OUT, _common.token_offset(tok, stride))
    for start in range(tok, tok + 1):  # loop variables are plain ints under the interpreter
        tl.store(OUT + 1, _common.token_offset(start, stride))


@pytest.mark.parametrize("token,stride", [(2**20, 2**11), (2**20 + 3, 3 * 2**10), (5, 7)])
def test_token_offsets_are_int64(token, stride):
    """1M tokens x 2048 values per token overflow int32; the kernels' row bases are computed in int64."""
    out = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    _offset_probe[(1,)](torch.tensor([token], dtype=torch.int32, device=DEVICE),
                        torch.tensor([stride], dtype=torch.int32, device=DEVICE), out)
    assert out.tolist() == [token * stride] * 2


def test_row_offsets_in_kernels_go_through_token_offset():
    """Every ``* stride_tok`` in a kernel is a tile-local int32 offset of an ``arange`` or the int64 helper."""
    local = re.compile(r"\b(rows|cols|keys)\[:, None\] \* stride_tok")
    for name in ("attention_fwd.py", "attention_bwd.py"):
        for line in (KERNELS_DIR / name).read_text().splitlines():
            if "* stride_tok" in line and not line.strip().startswith("#"):
                assert local.search(line), f"{name}: token offset not via token_offset: {line.strip()}"


# --- kernels against the oracle ---------------------------------------------------------------------


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("episodes", list(EPISODES))
def test_kernel_fp32_matches_oracle(episodes, structure):
    """Default interpreter blocks (tiles straddle demonstrations), head dim 16, atomic table gradient."""
    _check_against_oracle(_layout(episodes, structure), 16, torch.float32, _common.default_block_m(), None)


@pytest.mark.parametrize(
    "head_dim,block_m,block_n",
    [(32, 32, 16), (8, 16, 32)],
    ids=["d32-tile32-keys16", "d8-padded-tile16-keys32"],
)
@pytest.mark.parametrize("structure", ["saicl", "fid"])
def test_kernel_fp32_blocks_and_head_dims(structure, head_dim, block_m, block_n):
    """Small tiles: many tiles per span, tiles walking keys in several steps, tile != key block."""
    mask, seg = segment_batch([[16, 1, 33], [5]], [5, 16])
    layout = build_layout(mask.to(DEVICE), seg.to(DEVICE), structure)
    _check_against_oracle(layout, head_dim, torch.float32, block_m, block_n)


@interpreter_only
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize(
    "head_dim,dtype,parts",
    [(16, torch.float64, [3]), (128, torch.float64, [1, 2]), (16, torch.float32, [1, 2])],
    ids=["fused-dkdv", "split-dv-dk", "fp32-split"],
)
def test_bias_gradient_paths_match_oracle(monkeypatch, head_dim, dtype, parts, deterministic):
    """Both table-gradient paths, with the fused dK/dV launch and the split one (large head dims, fp32)."""
    recorder = _LaunchRecorder(attention_bwd._bwd_dkdv_kernel)
    monkeypatch.setattr(attention_bwd, "_bwd_dkdv_kernel", recorder)
    layout = build_layout(*segment_batch([[3, 7, 2], [1]], [5, 2]), "saicl")
    _check_against_oracle(layout, head_dim, dtype, 16, 16, deterministic=deterministic)
    assert [launch["PARTS"] for launch in recorder.launches] == parts


@pytest.mark.parametrize("head_dim", [64])
def test_kernel_large_head_dims(head_dim):
    layout = build_layout(*(t.to(DEVICE) for t in segment_batch([[3, 7], [1]], [5, 2])), "saicl")
    _check_against_oracle(layout, head_dim, torch.float32, 16, 16)


@interpreter_only
@pytest.mark.parametrize(
    "structure,deterministic", [("saicl", False), ("saicl", True), ("fid", False), ("full", False)],
    ids=["saicl-atomic", "saicl-deterministic", "fid-atomic", "full-atomic"],
)
def test_public_function_float64_exact(structure, deterministic):
    """End to end through autograd and packing, float64 (the interpreter computes in float64)."""
    layout = _layout("mixed-batch", structure, "cpu")
    q, k, v = random_qkv(layout.batch_size, layout.length, HEADS, 16, requires_grad=True)
    table = random_table(HEADS, MAX_DISTANCE).requires_grad_()
    got = saicl_attention(q, k, v, layout, table, deterministic=deterministic)
    expected = eager_attention(q, k, v, dense_bias(layout, table))
    tol = dict(rtol=64 * torch.finfo(torch.float64).eps, atol=64 * torch.finfo(torch.float64).eps)
    torch.testing.assert_close(got, expected, **tol)
    grad_out = torch.randn_like(expected)
    grads = torch.autograd.grad(got, (q, k, v, table), grad_out)
    ref_grads = torch.autograd.grad(expected, (q, k, v, table), grad_out)
    for name, g, r in zip("qkvt", grads, ref_grads):
        scale = r.abs().max().item()
        torch.testing.assert_close(g, r, rtol=tol["rtol"], atol=tol["atol"] * scale * layout.length,
                                   msg=lambda m, name=name: f"grad {name}: {m}")


@interpreter_only
def test_gradcheck_float64():
    """torch.autograd.gradcheck on a tiny straddling case (the interpreter supports float64 dots)."""
    layout = build_layout(*segment_batch([[2, 1, 3], [1]], [2, 3]), "saicl")
    plan = pack_layout(layout, 4).plan  # tiles of 4 rows straddle the 1-3 token demonstrations
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(plan.total_tokens, 1, 3, dtype=torch.float64, generator=gen).requires_grad_()
               for _ in range(3))
    table = torch.randn(1, 2 * 3 + 1, dtype=torch.float64, generator=gen).requires_grad_()  # M = 3: clamps

    def fn(q, k, v, table):
        return varlen_structured_attention(q, k, v, table, plan, block_n=4)

    # fast_mode checks random projections of the Jacobian: few interpreted launches, same rigour per
    # direction; the full-Jacobian comparison against the oracle is test_public_function_float64_exact.
    assert torch.autograd.gradcheck(fn, (q, k, v, table), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@interpreter_only
@pytest.mark.parametrize(
    "table_requires_grad,deterministic,torch_deterministic,expected_dbias",
    [
        (False, None, False, _common.DBIAS_NONE),
        (True, None, False, _common.DBIAS_ATOMIC),
        (True, True, False, _common.DBIAS_DETERMINISTIC),
        (True, None, True, _common.DBIAS_DETERMINISTIC),
    ],
    ids=["no-table-grad", "atomic-default", "deterministic-flag", "torch-deterministic"],
)
def test_table_gradient_work_follows_requires_grad_and_mode(
    monkeypatch, table_requires_grad, deterministic, torch_deterministic, expected_dbias
):
    """No table-gradient work unless the table requires grad; the mode follows the flag or torch's setting."""
    recorder = _LaunchRecorder(attention_bwd._bwd_dkdv_kernel)
    monkeypatch.setattr(attention_bwd, "_bwd_dkdv_kernel", recorder)
    layout = _layout("three-demos", "saicl", "cpu")
    q, k, v = random_qkv(1, layout.length, HEADS, 16, dtype=torch.float32, requires_grad=True)
    table = random_table(HEADS, MAX_DISTANCE, dtype=torch.float32).requires_grad_(table_requires_grad)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(torch_deterministic)
    try:
        out = saicl_attention(q, k, v, layout, table, deterministic=deterministic)
        inputs = (q, k, v, table) if table_requires_grad else (q, k, v)
        grads = torch.autograd.grad(out.sum(), inputs)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert all(torch.isfinite(g).all() for g in grads)
    # fp32 runs dV and dK as two launches: the table gradient belongs to the dK part (PARTS & 2).
    assert {launch["DBIAS"] for launch in recorder.launches if launch["PARTS"] & 2} == {expected_dbias}
    assert all(launch["DBIAS"] == _common.DBIAS_NONE for launch in recorder.launches if launch["PARTS"] == 1)
    if table_requires_grad:
        assert grads[3].abs().sum() > 0


def test_bias_gradient_is_reproducible():
    layout = _layout("three-demos", "saicl")
    q, k, v = random_qkv(1, layout.length, HEADS, 16, dtype=torch.float32, device=DEVICE, requires_grad=True)
    table = random_table(HEADS, MAX_DISTANCE, dtype=torch.float32).to(DEVICE).requires_grad_()
    grads = []
    for _ in range(2):
        out = saicl_attention(q, k, v, layout, table, deterministic=True)
        grads.append(torch.autograd.grad(out.square().sum(), table)[0])
    assert torch.equal(grads[0], grads[1])


def test_backend_matches_eager_and_reuses_plan():
    backend = get_backend("triton", DEVICE)
    layout = _layout("mixed-batch", "saicl")
    q, k, v = (t.to(DEVICE) for t in random_qkv(layout.batch_size, layout.length, HEADS, 16,
                                                 dtype=torch.float32 if CUDA else torch.float64))
    table = random_table(HEADS, MAX_DISTANCE, dtype=q.dtype).to(DEVICE)
    prepared = backend.prepare(layout, table)
    got = backend.attend(q, k, v, prepared)
    packed = [id(value) for key, value in layout.cache.items() if key[0] == "triton_packed"]
    backend.attend(q, k, v, backend.prepare(layout, table))  # a second layer: the packed form is reused
    assert len(packed) == 1
    assert [id(value) for key, value in layout.cache.items() if key[0] == "triton_packed"] == packed
    expected = eager_attention(q, k, v, dense_bias(layout, table))
    eps = torch.finfo(q.dtype).eps
    torch.testing.assert_close(got, expected, rtol=64 * eps, atol=64 * eps * expected.abs().max().item())
    with pytest.raises(ValueError, match="batch, length"):
        backend.attend(q[:, :-1], k[:, :-1], v[:, :-1], prepared)


def test_plan_on_another_device_or_size_is_rejected():
    layout = _layout("one-demo", "saicl", "cpu")
    plan = pack_layout(layout, 16).plan
    q = torch.zeros(plan.total_tokens + 1, HEADS, 16)
    with pytest.raises(ValueError, match="packed tokens"):
        varlen_structured_attention(q, q, q, random_table(HEADS, MAX_DISTANCE, dtype=torch.float32), plan)


def test_availability_and_no_cuda_at_import():
    """Available on CPU under the interpreter; without it a clear reason; importing never touches CUDA."""
    if not CUDA:
        assert unavailable_reason("triton", "cpu") is None
    code = (
        "import torch\n"
        "def boom(*a, **k): raise AssertionError('CUDA queried at import')\n"
        "torch.cuda.is_available = torch.cuda.device_count = torch.cuda.current_device = boom\n"
        "torch.cuda.init = torch.cuda.get_device_capability = boom\n"
        "import saicl.attention.triton, saicl.kernels, saicl.kernels.aot, saicl.kernels.benchmark\n"
        "from saicl.attention.registry import unavailable_reason\n"
        "print(unavailable_reason('triton', 'cpu'))\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "TRITON_INTERPRET=1" in result.stdout


# --- GPU only: compiled, autotuned kernels ------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"]
)
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_gpu_dtypes_autotuned(structure, head_dim, dtype):
    """Autotuned blocks, every dtype, against the float64 oracle (eager's own error as the yardstick)."""
    assert CUDA and not _common.INTERPRETED, "gpu tests must run the compiled kernels"
    # The plan tile the autotuner's configs were verified at (smaller for fp32).
    block_m = _common.default_block_m(dtype, head_dim)
    _check_against_oracle(_layout("mixed-batch", structure, "cuda"), head_dim, dtype, block_m, None)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_deterministic_and_atomic_bias_gradients(head_dim):
    """Many programs: the deterministic path is bitwise reproducible, the atomic one agrees within fp32."""
    mask, seg = segment_batch([[64] * 64, [17] * 100], [64, 9])
    layout = build_layout(mask.cuda(), seg.cuda(), "saicl")
    q, k, v = random_qkv(2, layout.length, 4, head_dim, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    table = random_table(4, 128, dtype=torch.float32).cuda().requires_grad_()
    grads = {}
    for deterministic in (True, True, False):
        out = saicl_attention(q, k, v, layout, table, deterministic=deterministic)
        grads.setdefault(deterministic, []).append(torch.autograd.grad(out.float().square().sum(), table)[0])
    assert torch.equal(grads[True][0], grads[True][1])
    scale = grads[True][0].abs().max().item()
    torch.testing.assert_close(grads[False][0], grads[True][0], rtol=1e-4, atol=1e-5 * scale)
