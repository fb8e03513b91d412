"""FlexAttention backend specifics: the compiled fp32 path across shapes and structures in one process,
bucketing, block-mask construction, and the warned fallbacks (tests/test_backends.py covers float64 and
gradients, which take the dense math path on CPU)."""

import warnings

import pytest
import torch

from saicl.attention import get_backend
from saicl.attention.registry import unavailable_reason
from saicl.layout import build_layout
from saicl.testing import random_qkv, random_table, segment_batch

if unavailable_reason("flex", "cpu") is not None:
    pytest.skip(f"flex unavailable: {unavailable_reason('flex', 'cpu')}", allow_module_level=True)

from torch.nn.attention.flex_attention import create_block_mask  # noqa: E402

from saicl.attention import flex  # noqa: E402

HEADS, HEAD_DIM, MAX_DISTANCE = 2, 16, 16
FP32_TOL = dict(rtol=1e-4, atol=2e-5)  # vs the float64 oracle; fp32 eager itself is ~1e-6 here


def _inputs(demos, queries, structure, seed=0):
    mask, seg = segment_batch(demos, queries)
    layout = build_layout(mask, seg, structure)
    q, k, v = random_qkv(layout.batch_size, layout.length, HEADS, HEAD_DIM, seed=seed)
    table = random_table(HEADS, MAX_DISTANCE)
    return layout, (q, k, v), table


def _compiled_vs_oracle(backend, demos, queries, structure):
    layout, qkv, table = _inputs(demos, queries, structure)
    with torch.no_grad():
        expected = get_backend("eager")(*qkv, layout, table)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # any fallback warning fails the test
            got = backend(*(t.float() for t in qkv), layout, table.float())
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, **FP32_TOL)
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


def test_same_closure_code_reuses_the_compile():
    """A new prepare (new closures and tensors) of the same bucket must not recompile: time the second call."""
    import time

    backend = flex.FlexBackend()
    _compiled_vs_oracle(backend, [[3, 5]], [4], "saicl")
    start = time.perf_counter()
    _compiled_vs_oracle(backend, [[4, 4, 1]], [2], "saicl")  # same (batch, bucket, heads, dim)
    assert time.perf_counter() - start < 2.0, "a same-bucket call recompiled"


def test_padded_length_buckets():
    assert [flex.padded_length(n) for n in (1, 127, 128, 129, 2048)] == [128, 128, 128, 256, 2048]
    for n in range(1, 20000, 37):
        p = flex.padded_length(n)
        assert p >= n and p % flex.BLOCK_SIZE == 0
        assert p - n <= max(flex.BLOCK_SIZE - 1, n // 8)  # at most 12.5% padding beyond one block


@pytest.mark.parametrize("structure", ["saicl", "full", "fid"])
def test_block_mask_equals_create_block_mask(structure):
    backend = flex.FlexBackend()
    layout, _, table = _inputs([[5, 17, 3], [9], [1] * 40], [6, 11, 129], structure)
    prepared = backend.prepare(layout, table)
    ours = backend.block_mask(prepared)
    ref = create_block_mask(prepared.mask_mod, layout.batch_size, None, prepared.padded, prepared.padded, "cpu")
    torch.testing.assert_close(ours.to_dense(), ref.to_dense())
    dense = ours.to_dense()  # sanity: the mask itself is the oracle's, up to the padding
    assert dense.shape[-1] == prepared.padded // flex.BLOCK_SIZE


@pytest.mark.parametrize("structure", ["saicl", "full", "fid"])
def test_span_block_mask_equals_dense_evaluation(structure):
    """The linear-memory block mask (from key ranges) equals the dense evaluation, full/partial split included."""
    backend = flex.FlexBackend()
    layout, _, table = _inputs([[30] * 20, [9], [1] * 40, [128, 128]], [6, 11, 129, 64], structure)
    prepared = backend.prepare(layout, table)
    ours = flex.block_mask_from_key_ranges(layout.key_ranges(), prepared.padded, prepared.mask_mod, 1 << 12)
    ref = flex.block_mask_from_mask_mod(prepared.mask_mod, layout.batch_size, prepared.padded, "cpu")
    for name in ("kv_num_blocks", "full_kv_num_blocks"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name
    torch.testing.assert_close(ours.to_dense(), ref.to_dense())


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


def test_compile_failure_falls_back_once(monkeypatch):
    monkeypatch.setattr(flex, "_WARNED", set())
    backend = flex.FlexBackend()
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("simulated C++ compile error")

    backend._compiled = broken
    layout, qkv, table = _inputs([[3, 5]], [4], "fid")
    low = [t.float() for t in qkv]
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="simulated C\\+\\+ compile error"):
            got = backend(*low, layout, table.float())
        again = backend(*low, layout, table.float())
        expected = get_backend("eager")(*qkv, layout, table)
    assert len(calls) == 1, "a failed compile key must not be retried"
    torch.testing.assert_close(got.double(), expected, **FP32_TOL)
    torch.testing.assert_close(again, got)


def test_unavailable_reason():
    assert flex.FlexBackend().unavailable_reason(torch.device("cpu")) is None
    assert "not on meta" in flex.FlexBackend().unavailable_reason(torch.device("meta"))
