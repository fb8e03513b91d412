"""Every attention backend against the eager oracle: forward and gradients, float64, ragged episodes."""

import pytest
import torch

from saicl.attention import get_backend
from saicl.attention.registry import unavailable_reason
from saicl.layout import build_layout
from saicl.testing import assert_close_to_reference, random_qkv, random_table, reference_tolerance, segment_batch

HEADS, HEAD_DIM, MAX_DISTANCE = 2, 8, 16

# (demo lengths per episode, query lengths): 0, 1, 2 and 17 demonstrations of lengths 1, 7, 63, 129.
EPISODES = {
    "zero-demos": ([[]], [7]),
    "one-demo": ([[63]], [1]),
    "two-demos": ([[1, 129]], [7]),
    "seventeen": ([[1, 7, 63, 129, 7, 1, 63, 7, 1, 1, 7, 63, 7, 1, 7, 1, 63]], [63]),
    "mixed-batch": ([[], [7], [63, 1], [1, 7, 1, 129, 7, 1, 7, 63, 1, 7, 1, 7, 1, 1, 7, 1, 7]], [1, 129, 7, 63]),
}
BACKENDS = ["torch", "flex"]
STRUCTURES = ["saicl", "full", "fid"]


def _backend_or_skip(name):
    reason = unavailable_reason(name, "cpu")
    if reason is not None:
        pytest.skip(f"{name} unavailable on CPU: {reason}")
    return get_backend(name, "cpu")


def _run(backend, layout, requires_grad, seed=0):
    q, k, v = random_qkv(layout.batch_size, layout.length, HEADS, HEAD_DIM, seed=seed, requires_grad=requires_grad)
    table = random_table(HEADS, MAX_DISTANCE).requires_grad_(requires_grad)
    out = backend(q, k, v, layout, table)
    return out, (q, k, v, table)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("episodes", list(EPISODES), ids=list(EPISODES))
@pytest.mark.parametrize("name", BACKENDS)
def test_backend_matches_eager(name, episodes, structure):
    backend = _backend_or_skip(name)
    mask, seg = segment_batch(*EPISODES[episodes])
    layout = build_layout(mask, seg, structure)
    expected, ref_inputs = _run(get_backend("eager"), layout, requires_grad=True)
    got, inputs = _run(backend, layout, requires_grad=True)
    assert_close_to_reference(got, expected, name=f"{name} output")
    grad_out = torch.randn_like(expected)
    ref_grads = torch.autograd.grad(expected, ref_inputs, grad_out)
    grads = torch.autograd.grad(got, inputs, grad_out)
    for label, g, r in zip(("q", "k", "v", "bias table"), grads, ref_grads):
        assert_close_to_reference(g, r, name=f"{name} grad {label}")


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("name", BACKENDS)
def test_backend_survives_shape_changes(name, structure):
    backend = _backend_or_skip(name)
    for demos, queries in (([[3, 5]], [4]), ([[2], [9, 1, 1]], [3, 2]), ([[]], [5])):
        mask, seg = segment_batch(demos, queries)
        layout = build_layout(mask, seg, structure)
        with torch.no_grad():
            got, _ = _run(backend, layout, requires_grad=False)
            expected, _ = _run(get_backend("eager"), layout, requires_grad=False)
        assert_close_to_reference(got, expected, name=f"{name} output for {demos}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", BACKENDS)
def test_backend_low_precision(name, dtype):
    """Error against the float64 oracle stays within 2x the eager backend's own error at this dtype
    (plus one rounding unit of the dtype at the output's magnitude, for when eager happens to be exact)."""
    backend = _backend_or_skip(name)
    mask, seg = segment_batch([[5, 17, 3], [9]], [6, 11])
    layout = build_layout(mask, seg, "saicl")
    q, k, v = random_qkv(2, layout.length, HEADS, HEAD_DIM)
    table = random_table(HEADS, MAX_DISTANCE)
    eager = get_backend("eager")
    with torch.no_grad():
        exact = eager(q, k, v, layout, table)
        low = [t.to(dtype) for t in (q, k, v, table)]
        eager_err = (eager(*low[:3], layout, low[3]).double() - exact).abs().max()
        err = (backend(*low[:3], layout, low[3]).double() - exact).abs().max()
    assert err <= 2 * eager_err + reference_tolerance(exact, dtype, ulps=1), (err, eager_err)
