"""Edge cases of the segment-batched ``torch`` backend (and its grouping) beyond the shared backend tests."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from saicl.attention import get_backend, segmented
from saicl.attention.grouping import Grouping, build_grouping, extended_table, gather_bias, group_spans
from saicl.attention.segmented import SegmentedBackend
from saicl.layout import build_layout
from saicl.testing import assert_close_to_reference, random_qkv, random_table, segment_batch

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


def _count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("episodes", list(EPISODES))
def test_inference_path_matches_eager(episodes, structure, monkeypatch):
    """Without gradients the backend takes the log-sum-exp path (split keys, merged); it must agree too."""
    layout = _layout(episodes, structure, pad_to=None if episodes != "padded-batch" else 40)
    q, k, v = random_qkv(layout.batch_size, layout.length, HEADS, HEAD_DIM)
    table = random_table(HEADS, MAX_DISTANCE)
    lse_calls = _count_calls(monkeypatch, segmented, "_cpu_lse")
    with torch.no_grad():
        expected = get_backend("eager")(q, k, v, layout, table)
        got = get_backend("torch")(q, k, v, layout, table)
    assert_close_to_reference(got, expected)
    assert bool((got[~layout.valid] == 0).all()), "padding rows must be exactly zero"
    if any(layout.local_spans):
        assert lse_calls, "the no-grad path must use the log-sum-exp kernels"


@pytest.mark.parametrize("structure", STRUCTURES)
def test_training_path_with_padding_and_batch(structure):
    """Gradients with right padding beyond the longest episode and several episodes per batch."""
    layout = _layout("padded-batch", structure, pad_to=40)
    outputs, grads = [], []
    for backend in (get_backend("eager"), get_backend("torch")):
        q, k, v = random_qkv(layout.batch_size, layout.length, HEADS, HEAD_DIM, requires_grad=True)
        table = random_table(HEADS, MAX_DISTANCE).requires_grad_(True)
        result = backend(q, k, v, layout, table)
        result.backward(torch.arange(result.numel(), dtype=result.dtype).view_as(result).sin())
        grads.append([t.grad for t in (q, k, v, table)])
        outputs.append(result)
    assert_close_to_reference(outputs[1], outputs[0])
    for name, ref, got in zip("qkv", *grads):
        assert_close_to_reference(got, ref, name=f"grad {name}")
    assert_close_to_reference(grads[1][3], grads[0][3], name="grad table")


def test_mixed_lengths_are_bucketed_not_padded_to_the_longest():
    """One long demonstration among many short ones: the short spans get their own grid."""
    demos = [4] * 60 + [200] + [5, 6, 7] * 10
    mask, seg = segment_batch([demos, [9, 3]], [6, 2])
    plan = SegmentedBackend().prepare(build_layout(mask, seg, "saicl"), random_table(HEADS, MAX_DISTANCE))
    grid_pairs = sum(g.n_spans * g.width * g.width for g in plan.groups)
    own_pairs = sum(n * n for n in demos) + 9 * 9 + 3 * 3
    assert grid_pairs <= 1.6 * own_pairs + 64 * 16, (grid_pairs, own_pairs)  # padding to 200 would be 60x
    assert sorted(r for g in plan.groups for r in g.rows.scatter.tolist() if r != plan.spare_row) == sorted(
        b * plan.layout.length + t for b, row in enumerate(plan.layout.local_spans) for s, n in row
        for t in range(s, s + n)
    ), "every local token is written exactly once"


@pytest.mark.parametrize(
    ("lengths", "expected"),
    [([], []), ([5], [[0]]), ([3, 200, 4, 9, 16, 17], [[0, 2, 3], [4, 5], [1]]), ([64] * 3, [[0, 1, 2]])],
)
def test_group_spans(lengths, expected):
    assert group_spans(lengths) == expected


def test_grouping_is_built_on_the_device_in_int32():
    """Per-pair distances are int32 on the table's device; no int64 tensor grows with the pairs."""
    layout = _layout("mixed-batch", "saicl")
    table = random_table(HEADS, MAX_DISTANCE)
    biggest_long = []

    class LongWatch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.long:
                    biggest_long.append(t.numel())
            return out

    with LongWatch():
        plan = SegmentedBackend().prepare(layout, table)
    tokens = layout.batch_size * layout.length
    assert max(biggest_long) <= 2 * tokens, "an int64 tensor larger than the tokens: per-pair distances in int64"
    indices = [g.self_index.index for g in plan.groups] + [g.cross_index.index for g in plan.groups]
    indices.append(plan.glob.index.index)
    assert all(i.dtype == torch.int32 and i.device == table.device for i in indices)


def test_plan_holds_no_length_squared_tensor():
    """Memory linear in the demonstrations: no tensor of the plan, biases included, is near ``L x L``."""
    # 200 ragged demonstrations of 3..7 tokens (one group): the grids cost N * S * (S + Lq) per head.
    mask, seg = segment_batch([[3 + i % 5 for i in range(200)]], [6])
    layout = build_layout(mask, seg, "saicl")
    backend = SegmentedBackend()
    plan = backend.prepare(layout, random_table(HEADS, MAX_DISTANCE))
    for requires_grad in (False, True):  # builds the split and the joint biases
        backend.attend(*random_qkv(1, layout.length, HEADS, HEAD_DIM, requires_grad=requires_grad), plan)
    tensors = [t for t in plan._cache.values() if isinstance(t, torch.Tensor)]
    for g in plan.groups:
        tensors += [g.rows.index, g.cross.index, g.self_index.index, g.cross_index.index]
    tensors.append(plan.glob.index.index)
    biggest = max(t.numel() for t in tensors)
    assert biggest <= HEADS * 200 * 7 * (7 + 6), (biggest, layout.length)
    assert biggest < HEADS * layout.length**2 / 20, (biggest, layout.length)


def test_autocast_bias_stays_finite_on_masked_keys():
    """Under bf16 autocast the mask minimum is bf16's own minimum, not fp32's cast to -inf."""
    layout = _layout("padded-batch", "saicl", pad_to=40)  # masked key slots in cross grids and global rows
    q, k, v = random_qkv(layout.batch_size, layout.length, HEADS, HEAD_DIM, dtype=torch.bfloat16)
    table = random_table(HEADS, MAX_DISTANCE, dtype=torch.float32)  # as the model passes it under autocast
    backend = SegmentedBackend()
    plan = backend.prepare(layout, table)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = backend.attend(q, k, v, plan)
    biases = [t for key, t in plan._cache.items() if key[0] == "bias"]
    assert biases and all(b.dtype == torch.bfloat16 for b in biases)
    assert not any(bool(torch.isinf(b).any()) for b in biases), "mask minimum became -inf in bf16"
    assert any(bool((b == torch.finfo(torch.bfloat16).min).any()) for b in biases), "nothing was masked"
    expected = get_backend("eager")(*(t.double() for t in (q, k, v)), layout, table.double())
    assert_close_to_reference(out, expected, dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fully_masked_row_under_autocast_is_finite(dtype):
    """A row whose keys are all masked: finite output (uniform weights), never NaN, forward and backward."""
    table = random_table(HEADS, MAX_DISTANCE, dtype=torch.float32).requires_grad_(True)
    index = torch.randint(0, 2 * MAX_DISTANCE + 1, (1, 3, 5), dtype=torch.int32)
    index[0, 1] = 2 * MAX_DISTANCE + 1  # row 1 sees no key
    q, k, v = (t.requires_grad_(True) for t in random_qkv(1, 5, HEADS, HEAD_DIM, dtype=dtype))
    with torch.autocast("cpu", dtype=dtype):
        bias = gather_bias(extended_table(table, dtype), index)
        out = F.scaled_dot_product_attention(q[:, :3].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=bias, scale=1.0)
    assert not torch.isinf(bias).any()
    assert torch.isfinite(out).all()
    out.float().square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, table))


def test_aligned_bias_rows():
    """Memory-efficient kernels get bias rows whose stride is a multiple of the alignment."""
    layout = _layout("ragged", "saicl")
    q, k, v = random_qkv(1, layout.length, HEADS, HEAD_DIM)
    table = random_table(HEADS, MAX_DISTANCE)
    plan = build_grouping(layout, table, align=16)
    with torch.no_grad():
        out = SegmentedBackend().attend(q, k, v, plan)
    biases = [t for key, t in plan._cache.items() if key[0] == "bias"]
    assert biases and all(b.stride(-2) % 16 == 0 and b.stride(-1) == 1 for b in biases)
    assert_close_to_reference(out, get_backend("eager")(q, k, v, layout, table))


def test_pinned_private_op_schemas():
    """The log-sum-exp kernels are private ATen ops: their schemas are pinned, and a change fails here."""
    for device_type, (name, schema) in segmented.PINNED_SCHEMAS.items():
        op = getattr(torch.ops.aten, name)
        assert str(op.default._schema) == schema, f"{device_type}: {name} changed its schema"
    assert segmented.lse_attention(torch.device("cpu"), torch.float32) is not None
    assert segmented.lse_attention(torch.device("meta"), torch.float32) is None


@pytest.mark.parametrize("structure", ["saicl", "fid"])
def test_cuda_lse_wrapper_logic(structure, monkeypatch):
    """The CUDA path's wrapper (expanded bias, log-sum-exp padded to 32 rows) with a CPU stand-in for the op."""

    def fake_efficient(q, k, v, bias, compute_log_sumexp, dropout_p, is_causal, scale):
        assert compute_log_sumexp and bias.shape[0] == q.shape[0] and bias.stride(-1) == 1
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=scale)
        rows = -(-q.shape[2] // 32) * 32
        return out, F.pad(lse, (0, rows - q.shape[2]), value=float("nan")), None, None

    monkeypatch.setattr(segmented, "_CUDA_OP", fake_efficient)
    monkeypatch.setattr(segmented, "lse_attention", lambda device, dtype: segmented._cuda_lse)
    layout = _layout("mixed-batch", structure)
    q, k, v = random_qkv(layout.batch_size, layout.length, HEADS, HEAD_DIM)
    table = random_table(HEADS, MAX_DISTANCE)
    with torch.no_grad():
        got = SegmentedBackend().attend(q, k, v, build_grouping(layout, table, align=16))
    assert_close_to_reference(got, get_backend("eager")(q, k, v, layout, table))


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
    """One plan serves several layers (and builds its bias once per dtype)."""
    layout = _layout("mixed-batch", "saicl")
    backend = get_backend("torch")
    table = random_table(HEADS, MAX_DISTANCE)
    plan = backend.prepare(layout, table)
    assert isinstance(plan, Grouping)
    eager = get_backend("eager")
    for seed in range(3):
        q, k, v = random_qkv(layout.batch_size, layout.length, HEADS, HEAD_DIM, seed=seed)
        with torch.no_grad():
            assert_close_to_reference(backend.attend(q, k, v, plan), eager(q, k, v, layout, table))
    n_biases = len([key for key in plan._cache if key[0] == "bias"])
    with torch.no_grad():
        backend.attend(q.float(), k.float(), v.float(), plan)
    assert len([key for key in plan._cache if key[0] == "bias"]) == 2 * n_biases


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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_cuda_matches_eager(structure, dtype):
    """On CUDA: the no-grad (memory-efficient log-sum-exp) and the training path against eager, grads included."""
    layout = _layout("mixed-batch", structure)
    layout_cuda = build_layout(*(t.cuda() for t in segment_batch(*EPISODES["mixed-batch"])), structure)
    qkv = random_qkv(layout.batch_size, layout.length, HEADS, 16)
    table = random_table(HEADS, MAX_DISTANCE)
    expected = get_backend("eager")(*qkv, layout, table)
    backend = get_backend("torch", "cuda")
    with torch.no_grad():
        got = backend(*(t.to("cuda", dtype) for t in qkv), layout_cuda, table.to("cuda", torch.float32))
    assert_close_to_reference(got, expected, dtype=dtype)
    cq, ck, cv = (t.to("cuda", dtype).requires_grad_(True) for t in qkv)
    ct = table.to("cuda", torch.float32).requires_grad_(True)
    out = backend(cq, ck, cv, layout_cuda, ct)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out.backward(grad_out.to("cuda", dtype))
    ref_inputs = [t.clone().requires_grad_(True) for t in (*qkv, table)]
    get_backend("eager")(*ref_inputs[:3], layout, ref_inputs[3]).backward(grad_out)
    for name, got_t, ref_t in zip(["q", "k", "v", "table"], (cq, ck, cv, ct), ref_inputs):
        assert_close_to_reference(got_t.grad, ref_t.grad, dtype=dtype, ulps=256, name=f"grad {name}")
