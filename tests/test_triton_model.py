"""The whole model with ``attn_backend="triton"`` equals ``"eager"``: float64 in the Triton interpreter on
CPU; float32 with the compiled kernels on CUDA (``gpu``)."""

import pytest
import torch

from saicl import SAICLConfig, SAICLForConditionalGeneration
from saicl.kernels import _common
from saicl.testing import segment_batch


def _tiny(structure: str, backend: str, dtype: torch.dtype, device: str) -> SAICLForConditionalGeneration:
    config = SAICLConfig(
        vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_heads=2, num_layers=1, num_decoder_layers=1,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, structure=structure, attn_backend=backend,
    )
    torch.manual_seed(0)
    return SAICLForConditionalGeneration(config).to(device=device, dtype=dtype).eval()


def _compare(structure: str, dtype: torch.dtype, device: str, rtol: float) -> None:
    # 0, 1 and 4 demonstrations of lengths 1..9: tiles straddle demonstrations and episodes differ.
    mask, seg = segment_batch([[], [3], [1, 9, 2, 5]], [4, 2, 3])
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, 64, mask.shape, generator=gen) * mask
    labels = torch.randint(2, 64, (3, 4), generator=gen)
    batch = {key: t.to(device) for key, t in dict(input_ids=input_ids, attention_mask=mask, segment_ids=seg,
                                                   labels=labels).items()}

    results = {}
    for backend in ("eager", "triton"):
        model = _tiny(structure, backend, dtype, device)
        out = model(**batch)
        grads = torch.autograd.grad(out.loss, [p for p in model.parameters()], allow_unused=True)
        names = [n for n, _ in model.named_parameters()]
        results[backend] = (out.logits.detach(), out.loss.detach(), dict(zip(names, grads)))

    logits, loss, grads = results["triton"]
    ref_logits, ref_loss, ref_grads = results["eager"]

    def close(got, ref, what):
        # Relative to the dtype (rtol) and to the reference's magnitude (atol floor).
        atol = rtol * ref.abs().max().item()
        torch.testing.assert_close(got, ref, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")

    close(logits, ref_logits, "logits")
    close(loss, ref_loss, "loss")
    for name, ref in ref_grads.items():
        if ref is None:
            assert grads[name] is None, name
            continue
        close(grads[name], ref, name)
    # The relative-attention bias embedding is trained through the kernel's table gradient.
    bias_grads = [g for n, g in grads.items() if "encoder" in n and "relative_attention_bias" in n]
    assert bias_grads and all(g is not None and g.abs().sum() > 0 for g in bias_grads)


@pytest.mark.skipif(not _common.INTERPRETED, reason="CPU runs of the kernels need the Triton interpreter (no CUDA)")
@pytest.mark.parametrize("structure", ["saicl", "fid", "full"])
def test_triton_model_equals_eager(structure):
    _compare(structure, torch.float64, "cpu", rtol=1e6 * torch.finfo(torch.float64).eps)


@pytest.mark.gpu
@pytest.mark.parametrize("structure", ["saicl", "fid", "full"])
def test_gpu_triton_model_equals_eager(structure):
    assert not _common.INTERPRETED, "gpu tests must run the compiled kernels"
    # fp32 inputs: the kernels' dots run in tf32x3, eager's in fp32; both accumulate in fp32.
    _compare(structure, torch.float32, "cuda", rtol=1e3 * torch.finfo(torch.float32).eps)
