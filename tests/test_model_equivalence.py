"""The model against Hugging Face T5 itself, and the structures' defining properties.

Tolerances are relative to float32's epsilon and the reference's magnitude
(:func:`saicl.testing.assert_close_to_reference`), so they hold on any CPU; the inputs include episodes
longer than T5's ``relative_attention_max_distance`` (128), where distances saturate.
"""

import pytest
import torch
from transformers import T5ForConditionalGeneration

from saicl import ICLProcessor, SAICLForConditionalGeneration
from saicl.testing import assert_close_to_reference

# ByT5 tokens are bytes: 176 tokens, so distances to and within it pass max_distance = 128.
LONG_TEXT = "the quick brown fox jumps over the lazy dog " * 4
LONG_EPISODE = {"demonstrations": [("one", "1"), (LONG_TEXT, "long"), ("three", "3")], "query": "four"}

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
    batch = processor([*episodes, LONG_EPISODE])
    assert batch["attention_mask"].sum(1).max() > 128, "one episode must be longer than max_distance"
    labels = processor.encode_targets(["color", "y", "ok", "6", "4"])
    hf, ours = _hf(path), _load(path, "full", backend)
    with torch.no_grad():
        ref = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        out = ours(**batch, labels=labels)
    assert_close_to_reference(out.logits, ref.logits, name="logits")
    assert_close_to_reference(out.loss, ref.loss, name="loss")
    ref_tokens = _generate(hf, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    tokens = _generate(ours, **batch)
    assert torch.equal(tokens, ref_tokens)
    assert len(set(tokens[:, 1:].flatten().tolist())) > 1, "degenerate generation cannot show equality"


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
@pytest.mark.parametrize("structure", ["saicl", "fid"])
@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_one_demonstration_equals_hf_on_concatenation(checkpoint, structure, backend, request, tokenizer):
    """With one demonstration, saicl and fid are T5 on the text ``d q``, also past 128 tokens."""
    path = request.getfixturevalue(checkpoint)
    processor = ICLProcessor(tokenizer)
    episodes = [
        {"demonstrations": [("the cat sat", "animal")], "query": "deep blue"},
        {"demonstrations": [("a much longer demonstration input " * 3, "label")], "query": "q"},
        {"demonstrations": [(LONG_TEXT, "label")], "query": "a query of about forty bytes, ok?"},
    ]
    batch = processor(episodes)
    labels = processor.encode_targets(["color", "x", "y"])
    hf, ours = _hf(path), _load(path, structure, backend)
    with torch.no_grad():
        ref = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        out = ours(**batch, labels=labels)
    assert_close_to_reference(out.logits, ref.logits, name="logits")
    assert_close_to_reference(out.loss, ref.loss, name="loss")
    ref_tokens = _generate(hf, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert torch.equal(_generate(ours, **batch), ref_tokens)


@pytest.mark.parametrize("structure", ["saicl", "full", "fid"])
def test_no_demonstrations_is_plain_t5(structure, t5_checkpoint, tokenizer):
    processor = ICLProcessor(tokenizer)
    queries = ["just a query", "q", LONG_TEXT]  # the last is longer than max_distance
    batch = processor([{"demonstrations": [], "query": q} for q in queries])
    hf, ours = _hf(t5_checkpoint), _load(t5_checkpoint, structure)
    labels = processor.encode_targets(["a", "bc", "d"])
    with torch.no_grad():
        ref = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        out = ours(**batch, labels=labels)
        plain = ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
    assert_close_to_reference(out.logits, ref.logits, name="logits")
    assert_close_to_reference(plain.logits, ref.logits, name="logits without segment_ids")


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
        assert_close_to_reference(perm, base, name="logits under a permutation")


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
