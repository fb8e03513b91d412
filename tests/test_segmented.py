"""Edge cases of the segment-batched ``torch`` backend beyond the shared backend tests."""

import pytest
import torch

from saicl.attention import get_backend
from saicl.attention.segmented import SegmentedBackend, SegmentPlan
from saicl.layout import build_layout
from saicl.testing import random_qkv, random_table, segment_batch

HEADS, HEAD_DIM, MAX_DISTANCE = 2, 8, 16
EPISODES = {
    "zero-demos": ([[]], [7]),
    "one-demo": ([[63]], [1]),
    "uniform": ([[5, 5, 5, 5]], [3]),
    "ragged": ([[1, 7, 63, 129, 7, 1, 63]], [63]),
    "mixed-batch": ([[], [7], [63, 1], [1, 7, 1, 129, 7, 1, 7]], [1, 129, 7, 63]),
    "uniform-batch": ([[4, 4, 4], [4, 4, 4]], [5, 5]),
    "padded-batch": ([[4, 4], [4, 4]], [5, 2]),
}
STRUCTURES = ["saicl", "full", "fid"]


def _layout(episodes, structure, pad_to=None):
    demos, queries = EPISODES[episodes]
    mask, seg = segment_batch(demos, queries, pad_to=pad_to)
    return build_layout(mask, seg, structure)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("episodes", list(EPISODES))
def test_inference_path_matches_eager(episodes, structure):
    """Without gradients the backend takes the fused flash + log-sum-exp path; it must agree too."""
    layout = _layout(episodes, structure, pad_to=None if episodes != "padded-batch" else 40)
    q, k, v = random_qkv(layout.batch_size, layout.length, HEADS, HEAD_DIM)
    table = random_table(HEADS, MAX_DISTANCE)
    with torch.no_grad():
        expected = get_backend("eager")(q, k, v, layout, table)
        got = get_backend("torch")(q, k, v, layout, table)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    assert bool((got[~layout.valid] == 0).all()), "padding rows must be exactly zero"


@pytest.mark.parametrize("structure", STRUCTURES)
def test_training_path_with_padding_and_batch(structure):
    """Gradients with right padding beyond the longest episode and several episodes per batch."""
    layout = _layout("padded-batch", structure, pad_to=40)
    eager, torch_backend = get_backend("eager"), get_backend("torch")
    grads = []
    out = None
    for backend in (eager, torch_backend):
        q, k, v = random_qkv(layout.batch_size, layout.length, HEADS, HEAD_DIM, requires_grad=True)
        table = random_table(HEADS, MAX_DISTANCE).requires_grad_(True)
        result = backend(q, k, v, layout, table)
        result.backward(torch.arange(result.numel(), dtype=result.dtype).view_as(result).sin())
        grads.append([t.grad for t in (q, k, v, table)])
        out = result if out is None else (out, result)
    torch.testing.assert_close(out[1], out[0], rtol=1e-9, atol=1e-9)
    for ref, got in zip(*grads):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("structure", ["saicl", "fid"])
def test_plan_holds_no_length_squared_tensor(structure):
    """Memory linear in the demonstrations: no tensor of the plan is anywhere near ``L x L``."""
    # 60 ragged demonstrations of 3..7 tokens: the padded grid costs N * Ls * (Ls + Lq) per head.
    mask, seg = segment_batch([[3 + i % 5 for i in range(60)]], [6])
    layout = build_layout(mask, seg, structure)
    plan = SegmentedBackend().prepare(layout, random_table(HEADS, MAX_DISTANCE))
    length = layout.length
    biggest = max(t.numel() for t in vars(plan).values() if isinstance(t, torch.Tensor))
    assert biggest <= HEADS * 60 * 13 * 13, (biggest, length)
    assert biggest < HEADS * length * length / 20, (biggest, length)


def test_fp32_training_and_bf16_inference_run():
    layout = _layout("ragged", "saicl")
    backend = get_backend("torch")
    q, k, v = random_qkv(1, layout.length, HEADS, HEAD_DIM, dtype=torch.float32, requires_grad=True)
    table = random_table(HEADS, MAX_DISTANCE, dtype=torch.float32).requires_grad_(True)
    out = backend(q, k, v, layout, table)
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, table))
    with torch.no_grad():
        low = backend(*(t.detach().bfloat16() for t in (q, k, v)), layout, table.detach())  # fp32 table
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()


def test_plan_reused_across_layers_and_dtypes():
    """One plan serves several layers (and casts its bias once per dtype)."""
    layout = _layout("mixed-batch", "saicl")
    backend = get_backend("torch")
    table = random_table(HEADS, MAX_DISTANCE)
    plan = backend.prepare(layout, table)
    assert isinstance(plan, SegmentPlan)
    eager = get_backend("eager")
    for seed in range(3):
        q, k, v = random_qkv(layout.batch_size, layout.length, HEADS, HEAD_DIM, seed=seed)
        with torch.no_grad():
            torch.testing.assert_close(
                backend.attend(q, k, v, plan), eager(q, k, v, layout, table), rtol=1e-9, atol=1e-9
            )


def test_clear_errors_on_bad_shapes():
    layout = _layout("uniform", "saicl")
    backend = get_backend("torch")
    table = random_table(HEADS, MAX_DISTANCE)
    plan = backend.prepare(layout, table)
    q, k, v = random_qkv(1, layout.length, HEADS, HEAD_DIM)
    with pytest.raises(ValueError, match="q, k, v"):
        backend.attend(q, k[:, :-1], v, plan)
    with pytest.raises(ValueError, match="layout"):
        backend.attend(q[:, :-1], k[:, :-1], v[:, :-1], plan)
    with pytest.raises(ValueError, match="heads"):
        q3, k3, v3 = random_qkv(1, layout.length, HEADS + 1, HEAD_DIM)
        backend.attend(q3, k3, v3, plan)
    with pytest.raises(ValueError, match="table"):
        backend.prepare(layout, table[:, :-1])
