"""The model against Hugging Face T5 itself, and the structures' defining properties."""

import pytest
import torch
from transformers import T5ForConditionalGeneration

from saicl import ICLProcessor, SAICLForConditionalGeneration

CHECKPOINTS = ["t5_checkpoint", "t5_v1_1_checkpoint"]
# A random tiny model decodes greedily to one repeated token; seeded sampling shows far more.
GEN_KWARGS = dict(max_new_tokens=6, do_sample=True, top_k=0, suppress_tokens=[0, 1])


def _generate(model, **inputs):
    torch.manual_seed(1234)
    return model.generate(**inputs, **GEN_KWARGS)


def _load(path, structure, backend="eager", dtype=torch.float32):
    model = SAICLForConditionalGeneration.from_pretrained(path, structure=structure, attn_backend=backend)
    return model.to(dtype).eval()


def _hf(path, dtype=torch.float32):
    return T5ForConditionalGeneration.from_pretrained(path).to(dtype).eval()


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_full_equals_hf_t5(checkpoint, backend, request, tokenizer, episodes):
    path = request.getfixturevalue(checkpoint)
    processor = ICLProcessor(tokenizer)
    batch = processor(episodes)
    labels = processor.encode_targets(["color", "y", "ok", "6"])
    hf, ours = _hf(path), _load(path, "full", backend)
    with torch.no_grad():
        ref = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        out = ours(**batch, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-5)
    ref_tokens = _generate(hf, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    tokens = _generate(ours, **batch)
    assert torch.equal(tokens, ref_tokens)
    assert len(set(tokens[:, 1:].flatten().tolist())) > 1, "degenerate generation cannot show equality"


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
@pytest.mark.parametrize("structure", ["saicl", "fid"])
@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_one_demonstration_equals_hf_on_concatenation(checkpoint, structure, backend, request, tokenizer):
    """With one demonstration, saicl and fid are T5 on the text ``d q`` (DESIGN §3)."""
    path = request.getfixturevalue(checkpoint)
    processor = ICLProcessor(tokenizer)
    episodes = [
        {"demonstrations": [("the cat sat", "animal")], "query": "deep blue"},
        {"demonstrations": [("a much longer demonstration input " * 3, "label")], "query": "q"},
    ]
    batch = processor(episodes)
    labels = processor.encode_targets(["color", "x"])
    hf, ours = _hf(path), _load(path, structure, backend)
    with torch.no_grad():
        ref = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        out = ours(**batch, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-5)
    ref_tokens = _generate(hf, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert torch.equal(_generate(ours, **batch), ref_tokens)


@pytest.mark.parametrize("structure", ["saicl", "full", "fid"])
def test_no_demonstrations_is_plain_t5(structure, t5_checkpoint, tokenizer):
    processor = ICLProcessor(tokenizer)
    batch = processor([{"demonstrations": [], "query": "just a query"}, {"demonstrations": [], "query": "q"}])
    hf, ours = _hf(t5_checkpoint), _load(t5_checkpoint, structure)
    labels = processor.encode_targets(["a", "bc"])
    with torch.no_grad():
        ref = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        out = ours(**batch, labels=labels)
        plain = ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(plain.logits, ref.logits, rtol=0, atol=1e-5)


def _permuted(episode, order):
    demos = episode["demonstrations"]
    return {"demonstrations": [demos[i] for i in order], "query": episode["query"]}


@pytest.mark.parametrize("backend", ["eager", "torch"])
@pytest.mark.parametrize("structure", ["saicl", "fid", "full"])
def test_permutation_invariance(structure, backend, t5_checkpoint, tokenizer, episodes):
    processor = ICLProcessor(tokenizer)
    model = _load(t5_checkpoint, structure, backend)
    orders = {0: [2, 0, 1], 3: [4, 2, 0, 3, 1]}
    permuted = [_permuted(ep, orders.get(i, range(len(ep["demonstrations"])))) for i, ep in enumerate(episodes)]
    labels = processor.encode_targets(["color", "y", "ok", "6"])
    with torch.no_grad():
        base = model(**processor(episodes), labels=labels).logits
        perm = model(**processor(permuted), labels=labels).logits
    if structure == "full":
        assert (base - perm).abs().max() > 1e-3, "full attention must depend on demonstration order"
    else:
        torch.testing.assert_close(perm, base, rtol=0, atol=1e-5)


def test_structures_differ(t5_checkpoint, tokenizer, episodes):
    """The config switch really changes the computation (same weights)."""
    batch = ICLProcessor(tokenizer)(episodes[:1])
    model = _load(t5_checkpoint, "saicl")
    logits = {}
    for structure in ("saicl", "full", "fid"):
        model.set_structure(structure)
        with torch.no_grad():
            logits[structure] = model(**batch, decoder_input_ids=torch.zeros(1, 2, dtype=torch.long)).logits
    assert (logits["saicl"] - logits["full"]).abs().max() > 1e-4
    assert (logits["saicl"] - logits["fid"]).abs().max() > 1e-4
