"""The whole model with ``attn_backend="triton"`` equals ``"eager"`` (interpreted on CPU, float64)."""

import pytest
import torch

from saicl import SAICLConfig, SAICLForConditionalGeneration
from saicl.testing import segment_batch


def _tiny(structure: str, backend: str) -> SAICLForConditionalGeneration:
    config = SAICLConfig(
        vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_heads=2, num_layers=1, num_decoder_layers=1,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, structure=structure, attn_backend=backend,
    )
    torch.manual_seed(0)
    return SAICLForConditionalGeneration(config).double().eval()


@pytest.mark.parametrize("structure", ["saicl", "fid", "full"])
def test_triton_model_equals_eager(structure):
    # 0, 1 and 4 demonstrations of lengths 1..9: tiles straddle demonstrations and episodes differ.
    mask, seg = segment_batch([[], [3], [1, 9, 2, 5]], [4, 2, 3])
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, 64, mask.shape, generator=gen) * mask
    labels = torch.randint(2, 64, (3, 4), generator=gen)
    batch = dict(input_ids=input_ids, attention_mask=mask, segment_ids=seg, labels=labels)

    results = {}
    for backend in ("eager", "triton"):
        model = _tiny(structure, backend)
        out = model(**batch)
        grads = torch.autograd.grad(out.loss, [p for p in model.parameters()], allow_unused=True)
        names = [n for n, _ in model.named_parameters()]
        results[backend] = (out.logits.detach(), out.loss.detach(), dict(zip(names, grads)))

    logits, loss, grads = results["triton"]
    ref_logits, ref_loss, ref_grads = results["eager"]
    torch.testing.assert_close(logits, ref_logits, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-9)
    for name, ref in ref_grads.items():
        if ref is None:
            assert grads[name] is None, name
            continue
        torch.testing.assert_close(
            grads[name], ref, rtol=1e-8, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}"
        )
    # The relative-attention bias embedding is trained through the kernel's table gradient.
    bias_grads = [g for n, g in grads.items() if "encoder" in n and "relative_attention_bias" in n]
    assert bias_grads and all(g is not None and g.abs().sum() > 0 for g in bias_grads)
