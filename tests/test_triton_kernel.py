"""The Triton structured-attention kernels against the float64 eager oracle.

On CPU the kernels run in the Triton interpreter (conftest sets ``TRITON_INTERPRET=1``); tests
marked ``gpu`` (half precision, autotuning, large head dims at speed) run only with CUDA.
"""

import os
import subprocess
import sys

import pytest
import torch

from saicl.attention import get_backend
from saicl.attention.eager import dense_bias, eager_attention
from saicl.attention.registry import unavailable_reason
from saicl.kernels import _common
from saicl.kernels.attention import saicl_attention, varlen_structured_attention
from saicl.kernels.attention_bwd import attention_backward
from saicl.kernels.attention_fwd import attention_forward
from saicl.kernels.varlen import build_plan
from saicl.layout import build_layout
from saicl.testing import random_qkv, random_table, segment_batch

HEADS, MAX_DISTANCE = 2, 16
DEVICE = "cuda" if torch.cuda.is_available() and not _common.INTERPRETED else "cpu"

# (demo lengths per episode, query lengths): 0, 1, 3 and 9 demonstrations of lengths 1, 5, 16, 33.
EPISODES = {
    "zero-demos": ([[]], [5]),
    "one-demo": ([[33]], [1]),
    "three-demos": ([[1, 5, 16]], [33]),
    "nine-demos": ([[1, 5, 16, 33, 1, 5, 16, 33, 1]], [16]),
    "mixed-batch": ([[], [5], [16, 1, 33], [1, 5, 16, 33, 1, 5, 16, 33, 1]], [16, 1, 5, 33]),
}
STRUCTURES = ["saicl", "fid", "full"]


def _layout(episodes, structure):
    return build_layout(*segment_batch(*EPISODES[episodes]), structure)


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


def _check_against_oracle(layout, head_dim, dtype, block_m, block_n, fwd_factor=2.0, grad_factor=3.0):
    """Kernel at ``dtype`` vs the float64 oracle, within a multiple of eager's own error at ``dtype``.

    The launchers get NaN-filled output buffers, so an element the kernels fail to write fails.
    """
    q, k, v = random_qkv(layout.batch_size, layout.length, HEADS, head_dim, seed=3)
    table = random_table(HEADS, MAX_DISTANCE, seed=4)
    grad_out = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    exact_out, exact_grads = _oracle(layout, q, k, v, table, grad_out)
    eager_out, eager_grads = _oracle(layout, *(t.to(dtype) for t in (q, k, v, table)), grad_out)

    plan = build_plan(layout, block_m)
    packed = [plan.pack(t.to(dtype)).to(DEVICE).contiguous() for t in (q, k, v)]
    low_table = table.to(dtype).to(DEVICE)
    nan = float("nan")
    out = torch.full_like(packed[0], nan)
    lse = torch.full(packed[0].shape[:2], nan, dtype=_common.torch_acc_dtype(dtype), device=DEVICE)
    attention_forward(*packed, low_table, plan_to(plan, DEVICE), block_n=block_n, out=out, lse=lse)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all(), "forward left elements unwritten"
    dq, dk, dv = (torch.full_like(packed[0], nan) for _ in range(3))
    packed_grad_out = plan.pack(grad_out.to(dtype)).to(DEVICE).contiguous()
    _, _, _, dtable = attention_backward(
        packed_grad_out, *packed, low_table, out, lse, plan_to(plan, DEVICE),
        block_n=block_n, dq=dq, dk=dk, dv=dv,
    )
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv), ("dtable", dtable)):
        assert torch.isfinite(g).all(), f"{name}: backward left elements unwritten"

    valid = layout.valid
    got_out = plan.unpack(out.cpu())
    err, eager_err = _max_err(got_out, exact_out, valid), _max_err(eager_out, exact_out, valid)
    assert err <= fwd_factor * eager_err + 1e-6, f"forward: {err:.3g} vs eager {eager_err:.3g}"
    got_grads = [plan.unpack(g.cpu()) for g in (dq, dk, dv)] + [dtable.cpu()]
    for name, g, e, r in zip(("q", "k", "v", "table"), got_grads, eager_grads, exact_grads):
        mask = valid if name != "table" else None
        err, eager_err = _max_err(g, r, mask), _max_err(e, r, mask)
        assert err <= grad_factor * eager_err + 1e-5, f"grad {name}: {err:.3g} vs eager {eager_err:.3g}"
    # Padding rows: the unpacked output and input gradients are exactly zero.
    assert (got_out[~valid] == 0).all()


def plan_to(plan, device):
    """The plan with its tensors on ``device`` (tests build plans on CPU)."""
    if str(device) == "cpu":
        return plan
    return type(plan)(
        flat_index=plan.flat_index.to(device), cu_seqlens=plan.cu_seqlens.to(device),
        fields=plan.fields.to(device), tiles=plan.tiles.to(device),
        block_m=plan.block_m, batch=plan.batch, length=plan.length,
    )


# --- plan (host) -----------------------------------------------------------------------------------


@pytest.mark.parametrize("block_m", [1, 4, 16, 64])
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("episodes", list(EPISODES))
def test_plan_covers_exactly_the_allowed_pairs(episodes, structure, block_m):
    """Per-row ranges equal the structure predicate; tile ranges are disjoint and cover every pair."""
    layout = _layout(episodes, structure)
    plan = build_plan(layout, block_m)
    allowed = layout.allowed_mask()
    n = plan.total_tokens
    # Dense packed mask from the per-row ranges.
    b_of = torch.repeat_interleave(torch.arange(layout.batch_size), layout.valid.sum(1))
    pos_in_row = plan.flat_index % layout.length
    same_episode = b_of[:, None] == b_of[None, :]
    expected = allowed[b_of[:, None], pos_in_row[:, None], pos_in_row[None, :]] & same_episode
    f = plan.fields.long()
    y = torch.arange(n)[None, :]
    from_ranges = ((y >= f[3][:, None]) & (y < f[4][:, None])) | ((y >= f[5][:, None]) & (y < f[6][:, None]))
    assert torch.equal(from_ranges, expected)
    assert torch.equal(expected, expected.t()), "the backward pass relies on symmetric visibility"
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
    demos, query = [[16] * 32], [16]
    layout = build_layout(*segment_batch(demos, query), "saicl")
    plan = build_plan(layout, 16)
    allowed = int(layout.allowed_mask().sum())
    assert plan.visited_pairs() == allowed
    assert plan.visited_pairs() * 10 < layout.length**2
    # Straddling tiles (demonstrations of 5 tokens, tiles of 16) cost at most a few times more.
    layout = build_layout(*segment_batch([[5] * 40], [16]), "saicl")
    plan = build_plan(layout, 16)
    assert plan.visited_pairs() <= 4 * int(layout.allowed_mask().sum())


# --- kernels against the oracle ---------------------------------------------------------------------


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("episodes", list(EPISODES))
def test_kernel_fp32_matches_oracle(episodes, structure):
    """Default interpreter blocks (tiles straddle demonstrations), head dim 16."""
    _check_against_oracle(_layout(episodes, structure), 16, torch.float32, _common.default_block_m(), None)


@pytest.mark.parametrize(
    "head_dim,block_m,block_n",
    [(32, 32, 16), (8, 16, 32)],
    ids=["d32-tile32-keys16", "d8-padded-tile16-keys32"],
)
@pytest.mark.parametrize("structure", ["saicl", "fid"])
def test_kernel_fp32_blocks_and_head_dims(structure, head_dim, block_m, block_n):
    """Small tiles: many tiles per span, tiles walking keys in several steps, tile != key block."""
    _check_against_oracle(_layout("mixed-batch", structure), head_dim, torch.float32, block_m, block_n)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernel_large_head_dims(head_dim):
    layout = build_layout(*segment_batch([[3, 7], [1]], [5, 2]), "saicl")
    _check_against_oracle(layout, head_dim, torch.float32, 16, 16)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_public_function_float64_exact(structure):
    """End to end through autograd and packing, float64 (the interpreter computes in float64)."""
    layout = _layout("mixed-batch", structure)
    q, k, v = random_qkv(layout.batch_size, layout.length, HEADS, 16, requires_grad=True)
    table = random_table(HEADS, MAX_DISTANCE).requires_grad_()
    got = saicl_attention(q, k, v, layout, table)
    expected = eager_attention(q, k, v, dense_bias(layout, table))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(expected)
    grads = torch.autograd.grad(got, (q, k, v, table), grad_out)
    ref_grads = torch.autograd.grad(expected, (q, k, v, table), grad_out)
    for name, g, r in zip("qkvt", grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"grad {name}: {m}")


def test_gradcheck_float64():
    """torch.autograd.gradcheck on a tiny straddling case (the interpreter supports float64 dots)."""
    layout = build_layout(*segment_batch([[2, 1, 3], [1]], [2, 3]), "saicl")
    plan = build_plan(layout, 4)  # tiles of 4 rows straddle the 1-3 token demonstrations
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(plan.total_tokens, 1, 3, dtype=torch.float64, generator=gen).requires_grad_()
               for _ in range(3))
    table = torch.randn(1, 2 * 3 + 1, dtype=torch.float64, generator=gen).requires_grad_()  # M = 3: clamps

    def fn(q, k, v, table):
        return varlen_structured_attention(q, k, v, table, plan, block_n=4)

    # fast_mode checks random projections of the Jacobian: few interpreted launches, same rigour per
    # direction; the full-Jacobian comparison against the oracle is test_public_function_float64_exact.
    assert torch.autograd.gradcheck(fn, (q, k, v, table), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_bias_gradient_is_deterministic():
    layout = _layout("nine-demos", "saicl")
    q, k, v = random_qkv(1, layout.length, HEADS, 16, dtype=torch.float32, device=DEVICE, requires_grad=True)
    table = random_table(HEADS, MAX_DISTANCE, dtype=torch.float32).to(DEVICE).requires_grad_()
    grads = []
    for _ in range(2):
        out = saicl_attention(q, k, v, layout, table)
        grads.append(torch.autograd.grad(out.square().sum(), table)[0])
    assert torch.equal(grads[0], grads[1])


def test_table_without_grad_skips_bias_gradient():
    layout = _layout("three-demos", "saicl")
    q, k, v = random_qkv(1, layout.length, HEADS, 16, dtype=torch.float32, requires_grad=True)
    table = random_table(HEADS, MAX_DISTANCE, dtype=torch.float32)
    out = saicl_attention(q, k, v, layout, table)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


def test_backend_matches_eager_and_reuses_plan():
    backend = get_backend("triton", "cpu")
    layout = _layout("mixed-batch", "saicl")
    q, k, v = random_qkv(layout.batch_size, layout.length, HEADS, 16)
    table = random_table(HEADS, MAX_DISTANCE)
    prepared = backend.prepare(layout, table)
    assert backend.prepare(layout, table).plan is prepared.plan
    got = backend.attend(q, k, v, prepared)
    expected = eager_attention(q, k, v, dense_bias(layout, table))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="batch, length"):
        backend.attend(q[:, :-1], k[:, :-1], v[:, :-1], prepared)


def test_availability_and_no_cuda_at_import():
    """Available on CPU under the interpreter; without it a clear reason; importing never touches CUDA."""
    assert unavailable_reason("triton", "cpu") is None
    code = (
        "import torch\n"
        "def boom(*a, **k): raise AssertionError('CUDA queried at import')\n"
        "torch.cuda.is_available = torch.cuda.device_count = torch.cuda.current_device = boom\n"
        "torch.cuda.init = torch.cuda.get_device_capability = boom\n"
        "import saicl.kernels.backend, saicl.kernels.attention, saicl.kernels.benchmark\n"
        "from saicl.attention.registry import unavailable_reason\n"
        "print(unavailable_reason('triton', 'cpu'))\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "TRITON_INTERPRET=1" in result.stdout


# --- GPU only ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"]
)
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_gpu_dtypes_autotuned(structure, head_dim, dtype):
    """Autotuned blocks, every dtype, against the float64 oracle (eager's own error as the yardstick)."""
    _check_against_oracle(_layout("mixed-batch", structure), head_dim, dtype, _common.GPU_BLOCK_M, None)


@pytest.mark.gpu
def test_gpu_bias_gradient_deterministic_many_programs():
    layout = build_layout(*segment_batch([[64] * 64, [17] * 100], [64, 9]), "saicl")
    q, k, v = random_qkv(2, layout.length, 4, 64, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    table = random_table(4, 128, dtype=torch.float32).cuda().requires_grad_()
    grads = []
    for _ in range(3):
        out = saicl_attention(q, k, v, layout, table)
        grads.append(torch.autograd.grad(out.float().square().sum(), table)[0])
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])
