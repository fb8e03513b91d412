"""Property-based test of the processor and the layout with random episodes (hypothesis).

Random batches of 1-3 episodes with 0-64 demonstrations, texts of 0-300 characters of any unicode, random
token caps and templates, now and then an empty query. Every batch either raises a clear ``ValueError``
naming the first bad episode, or gives a batch that follows the segment-id contract (demonstrations
``0..k-1`` in order, then the query ``-1``, padding on the right) and whose layout, for every structure,
equals the structure's predicate computed here independently (dense mask, span form and key ranges agree).
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saicl import ICLProcessor
from saicl.layout import build_layout
from saicl.structures import QUERY_SEGMENT

# "{input}{output}" renders an empty demonstration to no tokens: one of the errors under test.
TEMPLATES = ("{input} {output}", "Q: {input} A: {output}", "{input}\n{output}", "{input}{output}")
texts = st.text(max_size=300)  # any unicode (surrogates excluded: they cannot be encoded)
queries = st.text(min_size=1, max_size=300).filter(str.strip)
BAD_QUERIES = ("", " ", "\t\n")


@st.composite
def episodes(draw):
    k = draw(st.integers(0, 64))
    demonstrations = draw(st.lists(st.tuples(texts, texts), min_size=k, max_size=k))
    return {"demonstrations": demonstrations, "query": draw(queries)}


@st.composite
def batches(draw):
    batch = draw(st.lists(episodes(), min_size=1, max_size=3))
    if draw(st.integers(0, 7)) == 0:  # now and then an empty query, somewhere in the batch
        batch[draw(st.integers(0, len(batch) - 1))]["query"] = draw(st.sampled_from(BAD_QUERIES))
    # Caps keep the dense (length x length) checks small: ~250 tokens per episode, unless the texts are
    # short enough to go uncut (ByT5: one token per UTF-8 byte), so both paths are exercised.
    k_max = max(len(e["demonstrations"]) for e in batch)
    limit = max(2, 256 // (k_max + 1))
    longest = max(sum(len((x + y).encode()) + 8 for x, y in e["demonstrations"]) + len(e["query"].encode())
                  for e in batch)
    uncut = [4096] if longest <= 512 else []
    caps = {name: draw(st.sampled_from(uncut) | st.integers(1, limit)) if uncut else draw(st.integers(1, limit))
            for name in ("max_demo_tokens", "max_query_tokens")}
    return batch, caps, draw(st.sampled_from(TEMPLATES))


def _first_error(tokenizer, episodes, template):
    """The message prefix the processor must raise for these episodes (``None`` if they are valid)."""
    for i, episode in enumerate(episodes):
        if not episode["query"].strip():
            return f"episode {i}: field 'query' is empty"
        for d, (x, y) in enumerate(episode["demonstrations"]):
            if not tokenizer(template.format(input=x, output=y), add_special_tokens=False)["input_ids"]:
                return f"episode {i}, demonstration {d}: renders to no tokens"
    return None


def _expected_rows(tokenizer, episodes, caps, template):
    """Per episode: the token ids, the segment ids, and the truncation counts, computed independently."""
    rows, counts = [], {"demonstrations": 0, "demonstrations_total": 0, "queries": 0, "queries_total": 0,
                        "tokens_dropped": 0}
    for episode in episodes:
        ids, segments = [], []
        for d, (x, y) in enumerate(episode["demonstrations"]):
            tokens = tokenizer(template.format(input=x, output=y), add_special_tokens=False)["input_ids"]
            kept = tokens[: caps["max_demo_tokens"]]
            counts["demonstrations_total"] += 1
            counts["demonstrations"] += len(kept) < len(tokens)
            counts["tokens_dropped"] += len(tokens) - len(kept)
            ids += kept
            segments += [d] * len(kept)
        tokens = tokenizer(episode["query"], add_special_tokens=False)["input_ids"]
        kept = tokens[: caps["max_query_tokens"] - 1]  # room for EOS
        counts["queries_total"] += 1
        counts["queries"] += len(kept) < len(tokens)
        counts["tokens_dropped"] += len(tokens) - len(kept)
        ids += kept + [tokenizer.eos_token_id]
        segments += [QUERY_SEGMENT] * (len(kept) + 1)
        rows.append((ids, segments, [min(len(tokenizer(template.format(input=x, output=y),
                                                        add_special_tokens=False)["input_ids"]),
                                         caps["max_demo_tokens"]) for x, y in episode["demonstrations"]]))
    return rows, counts


def _block_mask(blocks, length):
    """``(length, length)``: tokens see each other iff they lie in the same block (blocks: list of token lists)."""
    mask = torch.zeros(length, length, dtype=torch.bool)
    for block in blocks:
        index = torch.tensor(block, dtype=torch.long)
        mask[index[:, None], index[None, :]] = True
    return mask


def _expected_mask(structure, demo_lengths, query_length, length):
    """The structure's mask for one episode, from its definition (not from saicl.structures/layout)."""
    starts = [sum(demo_lengths[:i]) for i in range(len(demo_lengths))]
    n_demo = sum(demo_lengths)
    query = list(range(n_demo, n_demo + query_length))
    if structure == "full":
        return _block_mask([list(range(n_demo + query_length))], length)
    if structure == "saicl":  # each demonstration with the query; the query sees everything
        mask = _block_mask([list(range(s, s + n)) + query for s, n in zip(starts, demo_lengths)] + [query], length)
        mask[n_demo:n_demo + query_length, :n_demo + query_length] = True
        return mask
    # fid: the encoder sequence is the pairs (d_i, q) one after another; each pair sees only itself
    pairs = [n + query_length for n in demo_lengths] or [query_length]
    offsets = [sum(pairs[:i]) for i in range(len(pairs))]
    return _block_mask([list(range(o, o + n)) for o, n in zip(offsets, pairs)], length)


def _key_range_mask(layout):
    ranges = layout.key_ranges()
    keys = torch.arange(layout.length)
    mask = torch.zeros(layout.batch_size, layout.length, layout.length, dtype=torch.bool)
    for lo, hi in ((0, 1), (2, 3)):
        mask |= (keys >= ranges[..., lo, None]) & (keys < ranges[..., hi, None])
    return mask


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batches())
def test_random_episodes_give_a_clear_error_or_a_batch_whose_layout_is_the_predicate(tokenizer, case):
    episodes, caps, template = case
    processor = ICLProcessor(tokenizer, template=template, **caps)
    error = _first_error(tokenizer, episodes, template)
    if error is not None:
        with pytest.raises(ValueError) as raised:
            processor(episodes)
        assert str(raised.value).startswith(error), (str(raised.value), error)
        return
    batch = processor(episodes)
    rows, counts = _expected_rows(tokenizer, episodes, caps, template)
    assert batch.truncation.counts() == counts

    # The segment-id contract: demonstrations 0..k-1 in order, then the query (-1), padding on the right.
    length = max(len(ids) for ids, _, _ in rows)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["segment_ids"].shape
    assert batch["input_ids"].shape == (len(episodes), length)
    for b, (ids, segments, _) in enumerate(rows):
        pad = length - len(ids)
        assert batch["input_ids"][b].tolist() == ids + [processor.pad_id] * pad
        assert batch["attention_mask"][b].tolist() == [1] * len(ids) + [0] * pad
        assert batch["segment_ids"][b].tolist() == segments + [QUERY_SEGMENT] * pad

    for structure in ("saicl", "full", "fid"):
        layout = build_layout(batch["attention_mask"], batch["segment_ids"], structure)
        dense = layout.allowed_mask()
        assert torch.equal(dense, layout.allowed_mask_from_spans()), structure
        assert torch.equal(dense, _key_range_mask(layout)), structure
        for b, (ids, segments, demo_lengths) in enumerate(rows):
            query_length = segments.count(QUERY_SEGMENT)
            assert layout.demo_lengths[b] == demo_lengths and layout.query_lengths[b] == query_length
            expected = _expected_mask(structure, demo_lengths, query_length, layout.length)
            assert torch.equal(dense[b], expected), (structure, b)
            if structure == "fid":  # the pairs are the demonstration's tokens followed by the query's
                n_demo = sum(demo_lengths)
                gathered = torch.tensor(ids)[layout.source_index[b, : int(layout.valid[b].sum())]].tolist()
                pairs = [ids[s:s + n] + ids[n_demo:] for s, n in
                         zip([sum(demo_lengths[:i]) for i in range(len(demo_lengths))], demo_lengths)]
                assert gathered == ([t for pair in pairs for t in pair] if pairs else ids[n_demo:])
