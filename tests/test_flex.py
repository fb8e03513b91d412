"""FlexAttention backend specifics: the compiled fp32 path across shapes and structures in one process,
bucketing, block-mask construction and its memory, bounded and loud compiles (counted with dynamo's
``CompileCounter``, no Inductor), and the warned CPU fallbacks (tests/test_backends.py covers float64 and
gradients, which take the dense math path on CPU).

A test meant to exercise compiled FlexAttention fails on any fallback warning (ours, or FlexAttention's own
"called without torch.compile"), so it never passes on the dense path by accident."""

import contextlib
import itertools
import types
import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch._inductor.exc import CppCompileError
from torch.utils._python_dispatch import TorchDispatchMode

from saicl.attention import get_backend
from saicl.attention.registry import resolve_backend_name, unavailable_reason
from saicl.layout import build_layout
from saicl.testing import assert_close_to_reference, random_qkv, random_table, segment_batch

if unavailable_reason("flex", "cpu") is not None:
    pytest.skip(f"flex backend unavailable on CPU, so nothing here can run: {unavailable_reason('flex', 'cpu')}",
                allow_module_level=True)

from torch.nn.attention.flex_attention import create_block_mask  # noqa: E402

from saicl.attention import flex  # noqa: E402

HEADS, HEAD_DIM, MAX_DISTANCE = 2, 16, 16
_FRESH = itertools.count()


def _inputs(demos, queries, structure, seed=0):
    mask, seg = segment_batch(demos, queries)
    layout = build_layout(mask, seg, structure)
    q, k, v = random_qkv(layout.batch_size, layout.length, HEADS, HEAD_DIM, seed=seed)
    table = random_table(HEADS, MAX_DISTANCE)
    return layout, (q, k, v), table


@contextlib.contextmanager
def _no_fallback():
    """Any fallback to a dense path fails: our RuntimeWarnings and FlexAttention's unfused-path warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        warnings.filterwarnings("error", message=".*without torch.compile.*")
        yield


@pytest.fixture
def fresh_call(monkeypatch):
    """A compiled call with its own code object, so compile counts and limits see only this test's entries."""
    def call(q, k, v, score_mod, block_mask):
        return flex.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=1.0)

    code = call.__code__.replace(co_name=f"call_{next(_FRESH)}")
    monkeypatch.setattr(flex, "_flex_call", types.FunctionType(code, call.__globals__))


def _compiled_vs_oracle(backend, demos, queries, structure):
    layout, qkv, table = _inputs(demos, queries, structure)
    with torch.no_grad():
        expected = get_backend("eager")(*qkv, layout, table)
        with _no_fallback():
            got = backend(*(t.float() for t in qkv), layout, table.float())
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert_close_to_reference(got, expected, dtype=torch.float32)
    assert not backend._failed, backend._failed


def test_compiled_fp32_many_shapes_one_process():
    """Shapes, batch sizes and structures change between calls; every call stays on the compiled path.

    Automatic dynamic shapes miscompile here (batch > 1 fails at run time), so this is the regression test
    for the static, bucketed compiles. The cases share padded lengths where they can, to bound compiles.
    """
    backend = flex.FlexBackend()
    cases = [
        ([[3, 5]], [4], "saicl"),
        ([[2], [9, 1, 1]], [3, 2], "saicl"),  # batch 2, same bucket (128)
        ([[1, 7, 63, 129]], [7], "saicl"),  # crosses a block boundary: bucket 256
        ([[63, 1], [7], []], [1, 129, 7], "saicl"),  # batch 3, bucket 256
        ([[]], [1], "saicl"),  # one token
    ]
    for demos, queries, structure in cases:
        _compiled_vs_oracle(backend, demos, queries, structure)


@pytest.mark.parametrize("structure", ["full", "fid"])
def test_compiled_fp32_other_structures(structure):
    backend = flex.FlexBackend()
    _compiled_vs_oracle(backend, [[2], [9, 1, 1]], [3, 2], structure)


def test_same_closure_code_reuses_the_compile(fresh_call):
    """A new prepare (new closures and tensors) of the same bucket must not recompile: count the compiles."""
    counter = CompileCounter()
    backend = flex.FlexBackend(compile_backend=counter)
    for demos in ([[3, 5]], [[4, 4, 1]]):  # same (batch, bucket, heads, dim)
        layout, qkv, table = _inputs(demos, [4], "saicl")
        with torch.no_grad(), _no_fallback():
            backend(*(t.float() for t in qkv), layout, table.float())
    assert counter.frame_count == 1


def test_cuda_settings_bound_compiles_over_variable_k(fresh_call):
    """The CUDA settings (dynamic shapes, lengths padded to >= 2 blocks) compile at most twice for a run whose
    number of demonstrations changes every batch (the block mask's lengths are plain ints: the first compile
    specialises them, the second makes them dynamic); static shapes would compile once per padded length."""
    counter = CompileCounter()
    backend = flex.FlexBackend(compile_backend=counter, settings=flex.compile_settings("cuda"))
    lengths = set()
    for step, k in enumerate([1, 5, 2, 17, 9, 30, 3, 40, 24, 11, 60]):
        demos = [[17 + (step + i) % 9 for i in range(k)] for _ in range(2)]
        layout, qkv, table = _inputs(demos, [6, 3], "saicl", seed=step)
        lengths.add(backend.prepare(layout, table).padded)
        with torch.no_grad(), _no_fallback():
            backend(*(t.float() for t in qkv), layout, table.float())
    assert len(lengths) >= 5, lengths  # the run really changed shapes
    assert counter.frame_count <= 2, f"{counter.frame_count} compiles for {len(lengths)} lengths"


def test_recompile_limit_is_scoped_and_loud(fresh_call):
    """Past the limit the backend raises instead of running the unfused (quadratic) kernel; dynamo's global
    recompile limit is never touched."""
    before = (torch._dynamo.config.recompile_limit, torch._dynamo.config.fail_on_recompile_limit_hit)
    settings = flex.CompileSettings(dynamic=False, pad=flex.padded_length, recompile_limit=2,
                                    fallback_on_compile_error=True)
    backend = flex.FlexBackend(compile_backend=CompileCounter(), settings=settings)
    for batch in (1, 2):
        layout, qkv, table = _inputs([[3]] * batch, [4] * batch, "saicl")
        with torch.no_grad(), _no_fallback():
            backend(*(t.float() for t in qkv), layout, table.float())
        assert (torch._dynamo.config.recompile_limit, torch._dynamo.config.fail_on_recompile_limit_hit) == before
    layout, qkv, table = _inputs([[3]] * 3, [4] * 3, "saicl")
    with torch.no_grad(), pytest.raises(flex.FlexRecompileLimitError, match="limit of 2 compiles"):
        backend(*(t.float() for t in qkv), layout, table.float())
    assert (torch._dynamo.config.recompile_limit, torch._dynamo.config.fail_on_recompile_limit_hit) == before


def test_padded_length_buckets():
    assert [flex.padded_length(n) for n in (1, 127, 128, 129, 2048)] == [128, 128, 128, 256, 2048]
    for n in range(1, 20000, 37):
        p = flex.padded_length(n)
        assert p >= n and p % flex.BLOCK_SIZE == 0
        assert p - n <= max(flex.BLOCK_SIZE - 1, n // 8)  # at most 12.5% padding beyond one block
    assert [flex.cuda_padded_length(n) for n in (1, 256, 257, 5000)] == [256, 256, 384, 5120]


def _listed(num, idx, blocks):
    """Dense ``(..., rows, blocks)`` bool of the first ``num`` entries of each row of ``idx``."""
    first = torch.arange(idx.shape[-1]) < num[..., None]
    dense = torch.zeros(*idx.shape[:-1], blocks + 1, dtype=torch.bool)
    dense.scatter_(-1, torch.where(first, idx.long(), blocks), True)
    return dense[..., :blocks]


@pytest.mark.parametrize("structure", ["saicl", "full", "fid"])
def test_block_mask_equals_create_block_mask(structure):
    """Both halves (kv-major for the forward, q-major for the backward) equal FlexAttention's own builder."""
    backend = flex.FlexBackend()
    layout, _, table = _inputs([[5, 17, 3], [9], [1] * 40], [6, 11, 129], structure)
    prepared = backend.prepare(layout, table)
    ours = backend.block_mask(prepared, with_q_blocks=True)
    ref = create_block_mask(prepared.mask_mod, layout.batch_size, None, prepared.padded, prepared.padded, "cpu")
    torch.testing.assert_close(ours.to_dense(), ref.to_dense())
    blocks = prepared.padded // flex.BLOCK_SIZE
    for num, idx in (("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices"),
                     ("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
        assert torch.equal(getattr(ours, num), getattr(ref, num)), num
        assert torch.equal(_listed(getattr(ours, num), getattr(ours, idx), blocks),
                           _listed(getattr(ref, num), getattr(ref, idx), blocks)), idx


@pytest.mark.parametrize("structure", ["saicl", "full", "fid"])
def test_span_block_mask_equals_dense_evaluation(structure):
    """The block mask from key ranges (small chunks) equals the dense evaluation, full/partial split included."""
    backend = flex.FlexBackend()
    layout, _, table = _inputs([[30] * 20, [9], [1] * 40, [128, 128]], [6, 11, 129, 64], structure)
    prepared = backend.prepare(layout, table)
    ours = flex.block_mask_from_key_ranges(layout.key_ranges(), prepared.padded, prepared.mask_mod, 1 << 12)
    ref = flex.block_mask_from_mask_mod(prepared.mask_mod, layout.batch_size, prepared.padded, "cpu")
    for name in ("kv_num_blocks", "full_kv_num_blocks"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name
    torch.testing.assert_close(ours.to_dense(), ref.to_dense())


def test_block_mask_memory_is_counted_and_has_no_quadratic_temporaries():
    """The block lists are the only quadratic tensors: no int64 temporary grows with (blocks)^2, and
    :func:`flex.block_mask_bytes` (what the memory estimate uses) equals the bytes actually held."""
    mask, seg = segment_batch([[64] * 512], [64])  # 32,832 tokens: 288 blocks of 128 after bucketing
    layout = build_layout(mask, seg, "saicl")
    backend = flex.FlexBackend()
    prepared = backend.prepare(layout, random_table(HEADS, MAX_DISTANCE))
    ranges = layout.key_ranges()
    blocks = prepared.padded // flex.BLOCK_SIZE
    assert blocks * blocks > 2 * prepared.padded  # so a quadratic temporary would stand out
    sizes = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    sizes.append((t.dtype, t.numel()))
            return out

    with Watch():
        built = flex.block_mask_from_key_ranges(ranges, prepared.padded, prepared.mask_mod, 1 << 16)
    assert max(n for dtype, n in sizes if dtype == torch.long) <= 2 * prepared.padded
    assert max(n for _, n in sizes) <= max(blocks * blocks, 4 * prepared.padded)  # the lists; the padded ranges
    assert flex.block_mask_nbytes(built) == flex.block_mask_bytes(1, prepared.padded, with_q_blocks=True)
    kv_only = flex.block_mask_from_key_ranges(ranges, prepared.padded, prepared.mask_mod, with_q_blocks=False)
    assert flex.block_mask_nbytes(kv_only) == flex.block_mask_bytes(1, prepared.padded, with_q_blocks=False)


def test_gradients_on_cpu_warn_once_and_reach_the_table(monkeypatch):
    monkeypatch.setattr(flex, "_WARNED", set())
    backend = flex.FlexBackend()
    layout, qkv, table = _inputs([[3, 5]], [4], "saicl")
    table.requires_grad_(True)  # only the table: the CPU restriction must still be detected
    with pytest.warns(RuntimeWarning, match="no backward on CPU"):
        out = backend(*qkv, layout, table)
    (grad,) = torch.autograd.grad(out.square().sum(), table)
    assert grad.abs().sum() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # once per process
        backend(*qkv, layout, table)


def _broken_backend(error, settings=None):
    backend = flex.FlexBackend(settings=settings)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise error

    dynamic = (settings or flex.compile_settings("cpu")).dynamic
    backend._compiled[dynamic] = broken
    return backend, calls


def test_compile_failure_falls_back_once_on_cpu(monkeypatch):
    monkeypatch.setattr(flex, "_WARNED", set())
    backend, calls = _broken_backend(CppCompileError(["g++"], "simulated C++ compile error"))
    layout, qkv, table = _inputs([[3, 5]], [4], "fid")
    low = [t.float() for t in qkv]
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="CppCompileError"):
            got = backend(*low, layout, table.float())
        again = backend(*low, layout, table.float())
        expected = get_backend("eager")(*qkv, layout, table)
    assert len(calls) == 1, "a failed compile key must not be retried"
    assert_close_to_reference(got, expected, dtype=torch.float32)
    torch.testing.assert_close(again, got)


@pytest.mark.parametrize(
    "error",
    [torch.OutOfMemoryError("simulated out of memory"), RuntimeError("simulated kernel bug"),
     ValueError("simulated bad argument")],
    ids=["oom", "runtime", "value"],
)
def test_errors_other_than_compile_errors_propagate(error):
    backend, calls = _broken_backend(error)
    layout, qkv, table = _inputs([[3, 5]], [4], "saicl")
    with torch.no_grad(), pytest.raises(type(error), match="simulated"):
        backend(*(t.float() for t in qkv), layout, table.float())
    assert not backend._failed


def test_compile_error_propagates_with_cuda_settings():
    """On CUDA a compile error is not turned into the quadratic math path."""
    backend, _ = _broken_backend(CppCompileError(["nvcc"], "simulated compile error"), flex.compile_settings("cuda"))
    layout, qkv, table = _inputs([[3, 5]], [4], "saicl")
    with torch.no_grad(), pytest.raises(CppCompileError):
        backend(*(t.float() for t in qkv), layout, table.float())


def test_unavailable_reason():
    assert flex.FlexBackend().unavailable_reason(torch.device("cpu")) is None
    assert "not on meta" in flex.FlexBackend().unavailable_reason(torch.device("meta"))


def test_small_heads_unavailable_on_cuda_so_auto_skips_flex():
    """The CUDA template needs head_dim >= 16 (the tiny configs use d_kv 8): auto must not pick flex."""
    reason = unavailable_reason("flex", "cuda", head_dim=8)
    assert reason is not None and "head_dim >= 16" in reason
    assert unavailable_reason("flex", "cuda", head_dim=16) is None
    assert unavailable_reason("flex", "cpu", head_dim=8) is None  # the CPU template has no such limit
    assert resolve_backend_name("auto", "cuda", head_dim=8) != "flex"
    assert resolve_backend_name("auto", "cuda", head_dim=64) == "flex"
