"""Small exact checks of the core that mutation testing showed were missing (docs/testing.md).

Each test pins one behaviour of structures, positions, layout, processing or the span grouping that the
larger oracle tests did not single out; the mutant each one kills is named in its docstring.
"""

import pytest
import torch
from transformers.models.t5.modeling_t5 import T5Attention

from saicl import ICLProcessor, positions
from saicl.attention import segmented
from saicl.attention.grouping import (
    bias_index,
    build_grouping,
    extended_table,
    gather_bias,
    glob_slice,
    group_spans,
    make_grid,
)
from saicl.attention.segmented import SegmentedBackend
from saicl.layout import build_layout
from saicl.testing import random_qkv, random_table, segment_batch


def test_bucket_defaults_are_t5_encoder_defaults():
    """``relative_position_bucket``'s defaults are T5's encoder bucketing (bidirectional, 32, 128).

    Kills: a changed default (``bidirectional=False``, 33 buckets, max distance 129)."""
    rel = torch.arange(-300, 301)
    expected = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
    assert torch.equal(positions.relative_position_bucket(rel), expected)
    # One direction (the decoder's) uses all 32 buckets: a default of 33 or a dropped ``bidirectional`` shows.
    expected = T5Attention._relative_position_bucket(rel, bidirectional=False, num_buckets=32, max_distance=128)
    assert torch.equal(positions.relative_position_bucket(rel, bidirectional=False), expected)


def test_distance_buckets_are_placed_on_the_requested_device():
    """Kills a dropped ``device`` argument (checked on the ``meta`` device: no accelerator needed)."""
    assert positions.distance_buckets(32, 128).device.type == "cpu"
    assert positions.distance_buckets(32, 128, "meta").device.type == "meta"


def test_distance_buckets_are_recomputed_not_only_cached():
    """The per-distance buckets, computed afresh (the cache emptied), are HF's buckets of ``-M..M``.

    Kills: any change inside ``relative_position_bucket`` / ``_distance_buckets`` that an already filled
    ``lru_cache`` would hide from the model-level tests."""
    positions._distance_buckets.cache_clear()
    try:
        for buckets, max_distance in ((32, 128), (8, 20)):
            rel = torch.arange(-max_distance, max_distance + 1)
            expected = T5Attention._relative_position_bucket(rel, True, buckets, max_distance)
            got = positions.distance_buckets(buckets, max_distance)
            assert got.dtype == torch.long and got.device.type == "cpu"
            assert torch.equal(got, expected)
    finally:
        positions._distance_buckets.cache_clear()


# ---------------------------------------------------------------------------------------------------
# processing


def _word_tokenizer():
    """A real ``tokenizers`` word-level tokenizer with neither a pad nor an EOS token (unlike ByT5)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate("a b c d e f g h".split())}}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    assert fast.pad_token_id is None and fast.eos_token_id is None
    return fast


def test_encode_targets_appends_eos_caps_and_pads_with_minus_100(tokenizer):
    """Kills every encode_targets mutant (no other fast test calls it): EOS, the cap, -100 padding, dtype."""
    processor = ICLProcessor(tokenizer)
    eos = tokenizer.eos_token_id
    labels = processor.encode_targets(["ab", "c"])
    a, b, c = (tokenizer(x, add_special_tokens=False)["input_ids"][0] for x in "abc")
    assert labels.dtype == torch.long
    assert labels.tolist() == [[a, b, eos], [c, eos, -100]]
    assert processor.encode_targets(["abcdef"], max_tokens=3).tolist() == [[a, b, eos]]
    assert processor.encode_targets(["x" * 100]).shape == (1, 64)  # the default cap counts the EOS
    no_eos = ICLProcessor(tokenizer, add_eos=False)
    assert no_eos.encode_targets(["ab", "abc"], max_tokens=2).tolist() == [[a, b], [a, b]]
    with pytest.raises(ValueError, match=r"^outputs\[1\] must be a string, got int$"):
        processor.encode_targets(["a", 3])


def test_processor_defaults_and_cap_of_one(tokenizer):
    """Kills: default caps other than 256, a cap of 1 refused, a query cut below its EOS."""
    processor = ICLProcessor(tokenizer)
    batch = processor([{"demonstrations": [("x" * 300, "y")], "query": "q" * 300}])
    assert batch["segment_ids"][0].tolist() == [0] * 256 + [-1] * 256
    tiny = ICLProcessor(tokenizer, max_demo_tokens=1, max_query_tokens=1)
    batch = tiny([{"demonstrations": [("ab", "c")], "query": "de"}])
    assert batch["input_ids"][0].tolist() == [tokenizer("a", add_special_tokens=False)["input_ids"][0],
                                              tokenizer.eos_token_id]
    assert not ICLProcessor(tokenizer).last_truncation.any and ICLProcessor(tokenizer).last_truncation.counts() == {
        "demonstrations": 0, "demonstrations_total": 0, "queries": 0, "queries_total": 0, "tokens_dropped": 0}


def test_processor_eos_and_pad_come_from_the_tokenizer():
    """Kills: EOS added despite ``add_eos=False``, a pad id not taken from the tokenizer, a changed message."""
    words = _word_tokenizer()
    with pytest.raises(ValueError, match=r"^add_eos=True but the tokenizer has no eos_token_id$"):
        ICLProcessor(words)
    batch = ICLProcessor(words, add_eos=False)([{"demonstrations": [("a b", "c")], "query": "d"},
                                                {"demonstrations": [], "query": "e"}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [5, 0, 0, 0]]  # no EOS; pad id 0 without a pad token
    from transformers import ByT5Tokenizer

    padded_with_eos = ByT5Tokenizer(pad_token="</s>")  # pad id 1
    batch = ICLProcessor(padded_with_eos)([{"demonstrations": [("ab", "c")], "query": "d"},
                                           {"demonstrations": [], "query": "e"}])
    assert batch["input_ids"][1, 2:].tolist() == [1] * 4


def test_processor_template_errors_name_the_argument(tokenizer):
    """Kills a changed argument name in the template error."""
    with pytest.raises(ValueError, match=r"^query_template='\{query\}' may only use the fields \['input'\]"):
        ICLProcessor(tokenizer, query_template="{query}")


def test_processor_episode_forms_and_messages(tokenizer, caplog):
    """Kills: a missing ``demonstrations`` key refused, a single episode dict not wrapped, counts assigned
    instead of summed, wrong indices or types in messages, the batch tensors' dtype."""
    processor = ICLProcessor(tokenizer, max_demo_tokens=2, max_query_tokens=2)
    single = processor({"query": "ab"})  # one episode, no demonstrations key
    assert single["segment_ids"].tolist() == [[-1, -1]]
    episodes = [{"demonstrations": [("abc", "d"), ("efg", "h")], "query": "ijk"} for _ in range(12)]
    with caplog.at_level("WARNING"):
        batch = processor(episodes)
    assert {name: batch[name].dtype for name in batch} == dict.fromkeys(batch, torch.long)
    report = batch.truncation
    assert (report.demonstrations, report.queries) == (24, 12)
    assert report.tokens_dropped == 12 * (2 * (5 - 2) + (3 - 1))
    assert caplog.records[-1].getMessage() == f"ICLProcessor: {report} (episodes {list(range(10))})"
    with pytest.raises(ValueError, match=r"^episode 1, demonstration 0: field 'input' must be a string, got int$"):
        processor([{"query": "a"}, {"demonstrations": [(3, "b")], "query": "a"}])
    with pytest.raises(ValueError, match=r"^episode 1, demonstration 0: renders to no tokens$"):
        ICLProcessor(tokenizer, template="")([{"query": "a"}, {"demonstrations": [("a", "b")], "query": "a"}])
    with pytest.raises(ValueError, match=r"^episode 0: field 'query' renders to no tokens$"):
        ICLProcessor(tokenizer, query_template="")([{"query": "a"}])
    with pytest.raises(ValueError, match=r"^return_tensors='np': only 'pt' is supported$"):
        processor([{"query": "a"}], return_tensors="np")
    with pytest.raises(ValueError, match=r"^episodes is empty: pass at least one episode$"):
        processor([])


# ---------------------------------------------------------------------------------------------------
# layout


def test_layout_fields_exactly_for_a_ragged_batch():
    """Every per-token field and its dtype, written out by hand for ``saicl`` and ``fid``.

    Kills: fid's first query copy not flagged as a query, an episode without demonstrations ending the fid
    loop (``break``) or getting segment 0 instead of the query's -1, float masks, lengths not recorded."""
    mask, seg = segment_batch([[], [2, 1]], [2, 1])  # episode 0: query only; episode 1: d0 d0 d1 q
    saicl = build_layout(mask, seg, "saicl")
    assert (saicl.valid.dtype, saicl.is_query.dtype) == (torch.bool, torch.bool)
    assert {t.dtype for t in (saicl.segment, saicl.position, saicl.shift)} == {torch.long}
    assert saicl.demo_lengths == [[], [2, 1]] and saicl.query_lengths == [2, 1]
    assert saicl.segment.tolist() == [[-1, -1, -2, -2], [0, 0, 1, -1]]
    assert saicl.position.tolist() == [[0, 1, 0, 0], [0, 1, 0, 0]]
    assert saicl.shift.tolist() == [[0, 0, 0, 0], [2, 2, 1, 0]]
    assert saicl.is_query.tolist() == [[True, True, False, False], [False, False, False, True]]

    fid = build_layout(mask, seg, "fid")  # episode 1 expands to d0 d0 q | d1 q
    assert (fid.valid.dtype, fid.is_query.dtype) == (torch.bool, torch.bool)
    assert fid.demo_lengths == [[], [2, 1]] and fid.query_lengths == [2, 1]
    assert fid.segment.tolist() == [[-1, -1, -2, -2, -2], [0, 0, 0, 1, 1]]
    assert fid.position.tolist() == [[0, 1, 0, 0, 0], [0, 1, 2, 0, 1]]
    assert fid.is_query.tolist() == [[True, True, False, False, False], [False, False, True, False, True]]
    assert fid.source_index[1].tolist() == [0, 1, 3, 2, 3]
    assert fid.local_spans == [[(0, 2)], [(0, 3), (3, 2)]] and fid.global_spans == [None, None]


@pytest.mark.parametrize("structure", ["saicl", "full", "fid"])
def test_key_ranges_and_span_mask_exact_values(structure):
    """Kills: a non-empty second range for global rows or for ``fid`` (``[1, 0)``, ``[0, 1)``), float dtypes."""
    mask, seg = segment_batch([[2, 1]], [2])  # d0 d0 d1 q q
    layout = build_layout(mask, seg, structure)
    spans_mask = layout.allowed_mask_from_spans()
    assert spans_mask.dtype == torch.bool and torch.equal(spans_mask, layout.allowed_mask())
    ranges = layout.key_ranges()
    assert ranges.dtype == torch.long
    expected = {
        "saicl": [[0, 2, 3, 5], [0, 2, 3, 5], [2, 3, 3, 5], [0, 5, 0, 0], [0, 5, 0, 0]],
        "full": [[0, 5, 0, 0]] * 5,
        "fid": [[0, 4, 0, 0]] * 4 + [[4, 7, 0, 0]] * 3,  # d0 d0 q q | d1 q q
    }[structure]
    assert ranges[0].tolist() == expected


def test_layout_messages_name_the_shapes_and_the_last_segment():
    """Kills: ``or`` -> ``and`` in the 2-D check, shapes missing from the message, the wrong last id."""
    with pytest.raises(ValueError, match=r"^attention_mask and segment_ids must be \(batch, length\); got shapes "
                                         r"\(1, 3\) and \(1, 3, 1\)$"):
        build_layout(torch.ones(1, 3, dtype=torch.long), torch.zeros(1, 3, 1, dtype=torch.long), "saicl")
    with pytest.raises(ValueError, match="the last non-padding token has segment id 2$"):
        build_layout(torch.ones(1, 3, dtype=torch.long), torch.tensor([[0, 1, 2]]), "saicl")


# ---------------------------------------------------------------------------------------------------
# span grouping (saicl.attention.grouping) and the torch backend's plumbing (saicl.attention.segmented)

HEADS, MAX_DISTANCE = 2, 16


def _grouping(demos, queries, structure="saicl"):
    mask, seg = segment_batch(demos, queries)
    return build_grouping(build_layout(mask, seg, structure), random_table(HEADS, MAX_DISTANCE))


def test_group_spans_joins_at_exactly_the_slack():
    """A span exactly ``slack`` longer than the group's first joins it. Kills ``>`` -> ``>=``."""
    assert group_spans([1, 9]) == [[0, 1]] and group_spans([1, 10]) == [[0], [1]]


def test_make_grid_exact_indices_views_and_fill():
    """Kills: empty slots pointing elsewhere than token 0 of their episode, ``start`` or ``full`` lost or
    wrong (the view of a regular grid), a wrong regularity test."""
    ragged = make_grid([(0, 2, 3), (1, 0, 1)], width=3, length=5, spare=10, device=torch.device("cpu"))
    assert ragged.index.tolist() == [[2, 3, 4], [5, 5, 5]]
    assert ragged.filled.tolist() == [[True, True, True], [True, False, False]]
    assert ragged.scatter.tolist() == [2, 3, 4, 5, 10, 10]
    assert (ragged.start, ragged.full) == (None, False)
    regular = make_grid([(1, 0, 2), (1, 2, 2)], width=2, length=6, spare=12, device=torch.device("cpu"))
    assert (regular.start, regular.full) == (6, True) and regular.index.tolist() == [[6, 7], [8, 9]]
    gap = make_grid([(0, 0, 2), (0, 3, 2)], width=2, length=6, spare=12, device=torch.device("cpu"))
    assert (gap.start, gap.full) == (None, True)


def test_extended_table_has_one_masked_column_at_the_dtype_minimum():
    """Kills a second masked column or a minimum taken from the wrong dtype."""
    table = random_table(HEADS, MAX_DISTANCE)
    for dtype in (torch.float32, torch.bfloat16):
        ext = extended_table(table, dtype)
        assert ext.shape == (HEADS, 2 * MAX_DISTANCE + 2) and ext.dtype == dtype
        assert torch.equal(ext[:, :-1], table.to(dtype)) and bool((ext[:, -1] == torch.finfo(dtype).min).all())


def test_bias_index_shares_identical_rows_only_when_nothing_is_masked():
    """Kills every change to the sharing test: rows with identical fields collapse to one copy (``R`` of 2,
    spans of width 1, an all-true mask counting as none), a partly masked grid never does."""
    pos, shift, isq = (torch.tensor(v, dtype=torch.int32) for v in ([0, 1, 0, 1], [2, 2, 0, 0], [0, 0, 1, 1]))
    rows, keys = torch.tensor([[0, 1], [0, 1]]), torch.tensor([[2, 3], [2, 3]])
    fields = (pos, shift, isq)
    assert bias_index(fields, rows, keys, None, MAX_DISTANCE).shared
    assert bias_index(fields, rows, keys, torch.ones(2, 2, dtype=torch.bool), MAX_DISTANCE).shared
    assert bias_index(fields, torch.tensor([[0], [0], [0]]), torch.tensor([[2], [2], [2]]), None, MAX_DISTANCE).shared
    masked = bias_index(fields, rows, keys, torch.tensor([[True, False], [True, True]]), MAX_DISTANCE)
    assert not masked.shared and masked.index.shape == (2, 2, 2)
    assert bool((masked.index[0, :, 1] == 2 * MAX_DISTANCE + 1).all())
    # distance of key y from row x: 2 + pos[y] - pos[x] (the demonstration's shift of 2 puts the query after it)
    assert masked.index[1].tolist() == [[MAX_DISTANCE + 2, MAX_DISTANCE + 3], [MAX_DISTANCE + 1, MAX_DISTANCE + 2]]
    different = bias_index(fields, torch.tensor([[0, 1], [1, 0]]), keys, None, MAX_DISTANCE)
    assert not different.shared


def test_gather_bias_default_rows_are_dense():
    """Kills a default alignment other than 1 (rows padded to a stride the CPU path never asked for)."""
    index = torch.zeros(2, 3, 5, dtype=torch.int32)
    bias = gather_bias(extended_table(random_table(HEADS, MAX_DISTANCE), torch.float32), index)
    assert bias.shape == (2, HEADS, 3, 5) and bias.is_contiguous()


def test_grouping_attributes_for_one_and_several_episodes():
    """Kills: a default alignment other than 1, ``cross_shared`` lost, every change to :func:`glob_slice`,
    and a changed message for global spans of mixed kinds."""
    one = _grouping([[3, 3]], [2])
    assert one.align == 1 and [g.cross_shared for g in one.groups] == [True]
    assert glob_slice(one) == (6, 2)
    two = _grouping([[3, 3], [3]], [2, 2])
    assert [g.cross_shared for g in two.groups] == [False] and glob_slice(two) is None
    assert glob_slice(_grouping([[2], [3]], [2, 1], "full")) == (0, 4)  # equal lengths, one slice
    assert glob_slice(_grouping([[2], [3]], [2, 2], "full")) is None  # ragged: not one full slice
    assert glob_slice(_grouping([[2], [3]], [2, 2], "fid")) is None  # no global rows
    mask, seg = segment_batch([[2], [2]], [1, 1])
    layout = build_layout(mask, seg, "saicl")
    layout.global_spans[1] = None
    with pytest.raises(ValueError, match=r"^layout.global_spans mixes episodes with and without a global span$"):
        build_grouping(layout, random_table(HEADS, MAX_DISTANCE))


@pytest.mark.parametrize("requires_grad", [False, True], ids=["split", "joint"])
def test_grouped_attention_reads_regular_grids_as_views(requires_grad, monkeypatch):
    """The documented no-copy reads: a regular local grid and the shared global slice are views.

    Kills: ``start`` dropped for local or global rows, the shared global slice not used."""
    from saicl.attention import grouping as grouping_module

    reads = []  # (grid shape, start) of every gather of query rows
    original = grouping_module.gather_rows

    def spy(flat, grid, start, heads):
        if flat.data_ptr() == q.data_ptr():
            reads.append((tuple(grid.shape), start))
        return original(flat, grid, start, heads)

    monkeypatch.setattr(grouping_module, "gather_rows", spy)
    monkeypatch.setattr(segmented, "gather_rows", spy)
    backend = SegmentedBackend()
    # one episode, equal spans back to back: the local grid is the slice [0, 6); the query is one slice of q
    plan = _grouping([[3, 3]], [2])
    q, k, v = random_qkv(1, 8, HEADS, 4, requires_grad=requires_grad)
    backend.attend(q, k, v, plan)
    assert reads == [((2, 3), 0)]
    # queries at different places (no common slice) but back to back in the flat rows: a view from token 2
    reads.clear()
    plan = _grouping([[2], []], [2, 2])
    assert glob_slice(plan) is None and plan.glob.rows.start == 2
    q, k, v = random_qkv(2, 4, HEADS, 4, requires_grad=requires_grad)
    backend.attend(q, k, v, plan)
    assert ((2, 2), 2) in reads


def test_grouped_attention_names_a_head_mismatch():
    """Kills the wrong dimension in the head-count message."""
    plan = _grouping([[2]], [2])
    with pytest.raises(ValueError, match=r"^q has 3 heads but the bias table has 2$"):
        SegmentedBackend().attend(*random_qkv(1, 4, 3, 4), plan)


def test_pinned_ops_are_found_and_a_schema_change_is_refused(monkeypatch):
    """Kills every ``_pinned_op`` mutant (it runs at import time, before any mutant is switched on)."""
    cpu = segmented._pinned_op("cpu")
    assert cpu is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    name, schema = segmented.PINNED_SCHEMAS["cpu"]
    monkeypatch.setitem(segmented.PINNED_SCHEMAS, "cpu", (name, schema.replace("float? scale", "float? scal")))
    assert segmented._pinned_op("cpu") is None
    monkeypatch.setitem(segmented.PINNED_SCHEMAS, "cpu", ("no_such_op_anywhere", schema))
    assert segmented._pinned_op("cpu") is None


def test_lse_attention_choice_by_device_and_dtype():
    """Kills every change to the kernel choice: the CUDA branch is plain Python on ``device.type``, so it is
    checked here too, without a GPU."""
    assert segmented.lse_attention(torch.device("cpu"), torch.float64) is segmented._cpu_lse
    cuda = torch.device("cuda")
    expected = segmented._cuda_lse if segmented._CUDA_OP is not None else None
    assert segmented.lse_attention(cuda, torch.float16) is expected
    assert segmented.lse_attention(cuda, torch.bfloat16) is expected
    assert segmented.lse_attention(cuda, torch.float64) is None


def test_cpu_plan_is_unaligned_and_grad_mode_alone_does_not_force_the_joint_path(monkeypatch):
    """Kills: a CPU plan aligned for CUDA kernels, and ``needs_grad`` true whenever grad mode is on."""
    plan = _grouping([[2, 3]], [2])
    mask, seg = segment_batch([[2, 3]], [2])
    assert SegmentedBackend().prepare(build_layout(mask, seg, "saicl"), random_table(HEADS, MAX_DISTANCE)).align == 1
    calls = []
    original = segmented._local_split
    monkeypatch.setattr(segmented, "_local_split", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.enable_grad():  # nothing requires a gradient: the split (inference) path
        SegmentedBackend().attend(*random_qkv(1, 7, HEADS, 4), plan)
    assert calls
