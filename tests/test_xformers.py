"""The ``xformers`` backend: availability, the grouped computation on CPU (a plain SDPA in place of xFormers'
CUDA-only operator), the tensors it hands xFormers checked by xFormers' own input checks, and on CUDA the
real operator against eager (``gpu``)."""

import importlib.util

import pytest
import torch

from saicl.attention import BackendUnavailableError, get_backend
from saicl.attention.registry import available_backends
from saicl.attention.segmented import sdpa_grid
from saicl.attention.xformers_backend import BIAS_ALIGN, XFormersBackend, full_bias
from saicl.layout import build_layout
from saicl.testing import assert_close_to_reference, random_qkv, random_table, segment_batch

HEADS, HEAD_DIM, MAX_DISTANCE = 2, 8, 16
CASES = {
    "ragged": ([[1, 7, 63, 20, 7, 1, 63]], [9]),
    "mixed-batch": ([[], [7], [63, 1], [1, 7, 1, 29, 7, 1, 7]], [1, 29, 7, 13]),
    "uniform-batch": ([[4, 4, 4], [4, 4, 4]], [5, 5]),
}


def _layout(case, structure, device="cpu", pad_to=None):
    mask, seg = segment_batch(*CASES[case], pad_to=pad_to)
    return build_layout(mask.to(device), seg.to(device), structure)


def test_unavailable_without_cuda_names_the_reason():
    reason = available_backends("cpu")["xformers"]
    assert reason is not None and "CUDA" in reason
    with pytest.raises(BackendUnavailableError, match="xformers.*CUDA"):
        get_backend("xformers", "cpu")


def test_reports_a_missing_package_on_cuda(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "xformers" else real(name, *a))
    assert "not installed" in XFormersBackend().unavailable_reason(torch.device("cuda"))


@pytest.mark.parametrize("structure", ["saicl", "full", "fid"])
@pytest.mark.parametrize("case", list(CASES))
def test_grouped_computation_equals_eager_with_gradients(case, structure):
    """The backend's grouping and tensor biases, with torch SDPA standing in for xFormers' operator."""
    layout = _layout(case, structure, pad_to=None if case != "mixed-batch" else 90)
    grad_out = torch.randn(layout.batch_size, layout.length, HEADS, HEAD_DIM, dtype=torch.float64)
    results = []
    for backend in (get_backend("eager"), XFormersBackend(attention=sdpa_grid)):
        q, k, v = random_qkv(layout.batch_size, layout.length, HEADS, HEAD_DIM, requires_grad=True)
        table = random_table(HEADS, MAX_DISTANCE).requires_grad_(True)
        out = backend(q, k, v, layout, table)
        out.backward(grad_out)
        results.append([out, q.grad, k.grad, v.grad, table.grad])
    for name, ref, got in zip(["output", "grad q", "grad k", "grad v", "grad table"], *results):
        assert_close_to_reference(got, ref, name=name)


def test_tensors_handed_to_xformers_pass_its_own_checks():
    """Shapes, BMHK layout and the 128-bit aligned bias rows, checked by xFormers' CUTLASS operators on CPU:
    the only reasons they give for not running are the device (they need CUDA)."""
    pytest.importorskip("xformers.ops", reason="xformers is not installed (pip install 'saicl[xformers]')")
    from xformers.ops import fmha
    from xformers.ops.fmha import cutlass

    calls = []

    def recording(q, k, v, bias):
        calls.append((q, k, v, bias))
        return sdpa_grid(q, k, v, bias)

    for structure in ("saicl", "full", "fid"):
        for case in CASES:
            layout = _layout(case, structure)
            q, k, v = random_qkv(layout.batch_size, layout.length, HEADS, HEAD_DIM, dtype=torch.float16,
                                 requires_grad=True)
            table = random_table(HEADS, MAX_DISTANCE, dtype=torch.float32).requires_grad_(True)
            XFormersBackend(attention=recording)(q, k, v, layout, table)
    assert calls
    for q, k, v, bias in calls:
        assert bias.requires_grad and bias.dtype == q.dtype and bias.stride(-2) % BIAS_ALIGN == 0
        inputs = fmha.Inputs(query=q, key=k, value=v, attn_bias=full_bias(q, bias), scale=1.0)
        inputs.validate_inputs()
        for op in (cutlass.FwOp, cutlass.BwOp):
            reasons = [r for r in op.not_supported_reasons(inputs) if not r.startswith("device=")]
            assert not reasons, (op.__name__, tuple(q.shape), tuple(bias.shape), bias.stride(), reasons)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("structure", ["saicl", "full", "fid"])
def test_cuda_equals_eager_with_gradients(structure, dtype):
    pytest.importorskip("xformers.ops", reason="xformers is not installed (pip install 'saicl[xformers]')")
    layout = _layout("mixed-batch", structure)
    layout_cuda = _layout("mixed-batch", structure, device="cuda")
    grad_out = torch.randn(layout.batch_size, layout.length, HEADS, 16, dtype=torch.float64)
    qkv = random_qkv(layout.batch_size, layout.length, HEADS, 16, requires_grad=True)
    table = random_table(HEADS, MAX_DISTANCE).requires_grad_(True)
    expected = get_backend("eager")(*qkv, layout, table)
    expected.backward(grad_out)
    cq, ck, cv = (t.detach().to("cuda", dtype).requires_grad_(True) for t in qkv)
    ct = table.detach().to("cuda", dtype).requires_grad_(True)
    out = get_backend("xformers", "cuda")(cq, ck, cv, layout_cuda, ct)
    out.backward(grad_out.to("cuda", dtype))
    assert_close_to_reference(out, expected, dtype=dtype)
    for name, got, ref in zip(["q", "k", "v", "table"], (cq, ck, cv, ct), (*qkv, table)):
        assert_close_to_reference(got.grad, ref.grad, dtype=dtype, ulps=256, name=f"grad {name}")
