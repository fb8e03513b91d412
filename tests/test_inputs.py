"""The processor's batch format and every bad input: clear errors that name the problem."""

import pytest
import torch

from saicl import ICLProcessor, SAICLConfig, SAICLForConditionalGeneration
from saicl.attention import BackendUnavailableError, get_backend
from saicl.attention.registry import available_backends, unavailable_reason
from saicl.layout import build_layout
from saicl.testing import segment_batch


def test_processor_batch_format(tokenizer):
    processor = ICLProcessor(tokenizer)
    batch = processor([
        {"demonstrations": [("ab", "c"), {"input": "d", "output": "ef"}], "query": "gh"},
        {"demonstrations": [], "query": "i"},
    ])
    assert set(batch) == {"input_ids", "attention_mask", "segment_ids"}
    # ByT5: one token per byte; template "{input} {output}"; the query ends with EOS (id 1).
    assert batch["segment_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, -1, -1, -1]
    assert batch["attention_mask"][1].tolist() == [1, 1] + [0] * 9
    assert batch["segment_ids"][1, :2].tolist() == [-1, -1]
    assert batch["input_ids"][0, -1].item() == tokenizer.eos_token_id
    assert batch["input_ids"][0, :4].tolist() == tokenizer("ab c", add_special_tokens=False)["input_ids"]
    assert not batch.truncation.any


def test_processor_counts_truncation(tokenizer, caplog):
    processor = ICLProcessor(tokenizer, max_demo_tokens=3, max_query_tokens=4)
    with caplog.at_level("WARNING"):
        batch = processor([{"demonstrations": [("abcdef", "g"), ("a", "b")], "query": "long query"}])
    report = batch.truncation
    assert (report.demonstrations, report.demonstrations_total) == (1, 2)
    assert (report.queries, report.queries_total) == (1, 1)
    assert report.tokens_dropped == (8 - 3) + (10 - 3)
    assert processor.last_truncation is report
    assert "truncated 1/2 demonstrations" in caplog.text
    assert batch["segment_ids"][0].tolist() == [0, 0, 0, 1, 1, 1, -1, -1, -1, -1]


@pytest.mark.parametrize(
    "episode, message",
    [
        ({"demonstrations": []}, "episode 0: missing field 'query'"),
        ({"demonstrations": [], "query": ""}, "episode 0: field 'query' is empty"),
        ({"demonstrations": [], "query": "   "}, "episode 0: field 'query' is empty"),
        ({"demonstrations": [], "query": 3}, "episode 0: field 'query' must be a string, got int"),
        ({"demonstrations": [("a", 1)], "query": "q"}, "demonstration 0: field 'output' must be a string"),
        ({"demonstrations": [(None, "b")], "query": "q"}, "demonstration 0: field 'input' must be a string"),
        ({"demonstrations": [("a", "b", "c")], "query": "q"}, "demonstration 0: expected an"),
        ({"demonstrations": [{"input": "a"}], "query": "q"}, "needs 'input' and 'output'"),
        ({"demonstrations": "ab", "query": "q"}, "'demonstrations' must be a list"),
        ("just text", "episode 0: expected a dict"),
    ],
)
def test_processor_bad_episodes(tokenizer, episode, message):
    with pytest.raises(ValueError, match=message):
        ICLProcessor(tokenizer)([episode])


def test_processor_bad_episode_is_named_by_index(tokenizer):
    good = {"demonstrations": [], "query": "fine"}
    with pytest.raises(ValueError, match="episode 2: field 'query' is empty"):
        ICLProcessor(tokenizer)([good, good, {"demonstrations": [], "query": ""}])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_demo_tokens=0), "max_demo_tokens must be an integer >= 1"),
        (dict(max_query_tokens=-3), "max_query_tokens must be an integer >= 1"),
        (dict(max_demo_tokens=2.5), "max_demo_tokens must be an integer >= 1"),
        (dict(template="{input} -> {label}"), "template='{input} -> {label}' may only use"),
    ],
)
def test_processor_bad_settings(tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ICLProcessor(tokenizer, **kwargs)


def test_processor_empty_batch(tokenizer):
    with pytest.raises(ValueError, match="episodes is empty"):
        ICLProcessor(tokenizer)([])


def test_unknown_structure_and_backend():
    with pytest.raises(ValueError, match="structure='ring' is not a known structure"):
        SAICLConfig(structure="ring")
    with pytest.raises(ValueError, match="attn_backend='cuda-magic' is not a known backend"):
        SAICLConfig(attn_backend="cuda-magic")
    model = SAICLForConditionalGeneration(SAICLConfig(d_model=16, d_kv=4, num_heads=2, d_ff=16, num_layers=1,
                                                      vocab_size=32))
    with pytest.raises(ValueError, match="structure='ring' is not a known structure"):
        model.set_structure("ring")
    with pytest.raises(ValueError, match="attn_backend='nope' is not a known backend"):
        model.set_attn_backend("nope")


def test_unavailable_backend_names_the_reason():
    reasons = available_backends("cpu")
    assert reasons["eager"] is None
    assert reasons["xformers"] is not None
    with pytest.raises(BackendUnavailableError, match="attn_backend='xformers' cannot run on cpu"):
        get_backend("xformers", "cpu")
    assert unavailable_reason("auto", "cpu") is None


def test_model_with_unavailable_backend_fails_clearly(tokenizer):
    model = SAICLForConditionalGeneration(SAICLConfig(d_model=16, d_kv=4, num_heads=2, d_ff=16, num_layers=1,
                                                      vocab_size=384, attn_backend="xformers"))
    batch = ICLProcessor(tokenizer)([{"demonstrations": [("a", "b")], "query": "c"}])
    with pytest.raises(BackendUnavailableError, match="xformers"):
        model(**batch, decoder_input_ids=torch.zeros(1, 1, dtype=torch.long))


@pytest.mark.parametrize(
    "segment_ids, mask, message",
    [
        ([[0, 0, 1, 1]], [[1, 1, 1, 1]], "must end with the query"),
        ([[1, 1, -1, -1]], [[1, 1, 1, 1]], "must be 0, 1, ..., k-1 in order"),
        ([[0, 1, 0, -1]], [[1, 1, 1, 1]], "must be 0, 1, ..., k-1 in order"),
        ([[0, -1, 0, -1]], [[1, 1, 1, 1]], "must be 0, 1, ..., k-1 in order"),
        ([[0, -1, -1, -1]], [[1, 0, 1, 0]], "padding on the right"),
        ([[-1, -1]], [[0, 0]], "attention_mask is all zeros"),
    ],
)
def test_layout_rejects_malformed_segments(segment_ids, mask, message):
    with pytest.raises(ValueError, match=message):
        build_layout(torch.tensor(mask), torch.tensor(segment_ids), "saicl")


def test_layout_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="segment_ids shape"):
        build_layout(torch.ones(2, 5), torch.zeros(2, 4, dtype=torch.long), "saicl")


def test_model_rejects_bad_segment_ids(t5_checkpoint, tokenizer):
    model = SAICLForConditionalGeneration.from_pretrained(t5_checkpoint).eval()
    batch = ICLProcessor(tokenizer)([{"demonstrations": [("a", "b")], "query": "c"}])
    batch["segment_ids"] = batch["segment_ids"].flip(1)
    with pytest.raises(ValueError, match="episode 0: segment_ids"):
        model(**batch, decoder_input_ids=torch.zeros(1, 1, dtype=torch.long))


@pytest.mark.parametrize("structure", ["saicl", "full", "fid"])
def test_predicate_and_span_forms_agree(structure):
    mask, seg = segment_batch([[3, 1, 4], [], [2], [1, 1, 1, 1, 5]], [2, 3, 1, 4])
    layout = build_layout(mask, seg, structure)
    assert torch.equal(layout.allowed_mask(), layout.allowed_mask_from_spans())


def test_saicl_positions_are_those_of_each_demo_followed_by_the_query():
    mask, seg = segment_batch([[2, 3]], [2])
    layout = build_layout(mask, seg, "saicl")
    rel = layout.relative_positions()[0]
    allowed = layout.allowed_mask()[0]
    # Demo 1 (tokens 2..4) followed by the query (tokens 5, 6) reads as one 5-token text.
    frame = [2, 3, 4, 5, 6]
    expected = torch.arange(5)[None, :] - torch.arange(5)[:, None]
    assert torch.equal(rel[frame][:, frame], expected)
    assert not allowed[0, 2] and not allowed[2, 0] and allowed[5, 0] and allowed[0, 5]


@pytest.mark.parametrize("structure", ["saicl", "full", "fid"])
def test_key_ranges_agree_with_the_predicate(structure):
    mask, seg = segment_batch([[3, 1, 4], [], [2], [1, 1, 1, 1, 5]], [2, 3, 1, 4])
    layout = build_layout(mask, seg, structure)
    ranges = layout.key_ranges()
    keys = torch.arange(layout.length)
    in_range = torch.zeros_like(layout.allowed_mask())
    for lo, hi in ((0, 1), (2, 3)):
        in_range |= (keys >= ranges[..., lo, None]) & (keys < ranges[..., hi, None])
    assert torch.equal(in_range, layout.allowed_mask())


@pytest.mark.parametrize("structure", ["saicl", "full", "fid"])
@pytest.mark.parametrize("change", ["longer", "shorter", "batch"])
def test_input_ids_must_match_mask_and_segments_under_every_structure(t5_checkpoint, tokenizer, structure, change):
    """fid gathers input_ids by the layout's indices: a mismatch must not be silently cropped (or crash in torch)."""
    model = SAICLForConditionalGeneration.from_pretrained(t5_checkpoint, structure=structure).eval()
    batch = ICLProcessor(tokenizer)([{"demonstrations": [("a", "b"), ("cd", "e")], "query": "f"}])
    ids = batch["input_ids"]
    ids = {"longer": torch.cat([ids, ids[:, :2]], 1), "shorter": ids[:, :-1], "batch": ids.repeat(2, 1)}[change]
    size, length = ids.shape
    expected = rf"attention_mask shape \(1, 9\) does not match input_ids / inputs_embeds shape \({size}, {length}\)"
    with pytest.raises(ValueError, match=expected):
        model(input_ids=ids, attention_mask=batch["attention_mask"], segment_ids=batch["segment_ids"],
              decoder_input_ids=torch.zeros(ids.shape[0], 1, dtype=torch.long))


def test_segment_ids_shape_is_checked_against_input_ids(t5_checkpoint, tokenizer):
    model = SAICLForConditionalGeneration.from_pretrained(t5_checkpoint, structure="fid").eval()
    batch = ICLProcessor(tokenizer)([{"demonstrations": [("a", "b")], "query": "c"}])
    with pytest.raises(ValueError, match=r"segment_ids shape \(1, 4\) does not match input_ids"):
        model.encoder(input_ids=batch["input_ids"], segment_ids=batch["segment_ids"][:, :-1])


@pytest.mark.parametrize("value", [0, -1, 2.0, True])
def test_score_options_rejects_a_bad_batch_limit(t5_checkpoint, tokenizer, value):
    model = SAICLForConditionalGeneration.from_pretrained(t5_checkpoint).eval()
    batch = ICLProcessor(tokenizer)([{"demonstrations": [("a", "b")], "query": "c"}])
    with pytest.raises(ValueError, match=r"max_options_per_batch must be an integer >= 1, got"):
        model.score_options(**batch, options=[["x", "y"]], tokenizer=tokenizer, max_options_per_batch=value)
