"""Oracles that do not read our layout: Hugging Face T5 itself, on the text each demonstration should see.

Every backend and the eager oracle read the same :class:`saicl.layout.EncoderLayout`, so comparing them
with each other cannot catch a wrong layout. Here the expected frames come from the episode's token
counts alone and from Hugging Face's own position arithmetic (``T5Attention.compute_bias``, the plain
``T5EncoderModel``):

* ``saicl``: demonstration ``i`` and the query see each other at the distances of the text ``d_i q``; so
  the bias of every pair (demonstration ``i`` or query token, demonstration ``i`` or query token) is HF's
  bias on ``d_i q``, and in a one-layer encoder (where the query's own output cannot leak other
  demonstrations back) demonstration ``i``'s output is HF's encoder on ``d_i q``;
* ``fid``: pair ``i`` of the expanded sequence is HF's whole encoder on ``d_i q``;
* ``full``: the episode is HF's encoder on the concatenation.

Episodes are ragged (3-5 demonstrations of different lengths, padding) and reach past T5's
``relative_attention_max_distance`` of 128, where distances saturate.
"""

import pytest
import torch
from transformers import T5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention

from saicl import SAICLForConditionalGeneration
from saicl.attention.eager import dense_bias
from saicl.layout import build_layout
from saicl.positions import bias_table, table_index
from saicl.testing import assert_close_to_reference, save_tiny_t5, segment_batch, tiny_t5_config

# Per episode: demonstration token counts, query token count. Distances past 128 occur in the first
# episode (a 140-token demonstration before a 12-token query) and the third.
DEMOS = [[3, 17, 9, 140], [5, 1, 30], [60, 61, 2, 8, 20], [4, 11, 7]]
QUERIES = [12, 4, 33, 1]


def _hf_bias_module(num_buckets: int = 32, max_distance: int = 128, seed: int = 0) -> T5Attention:
    torch.manual_seed(seed)
    config = tiny_t5_config(relative_attention_num_buckets=num_buckets, relative_attention_max_distance=max_distance)
    attention = T5Attention(config, has_relative_attention_bias=True).double()
    with torch.no_grad():  # distinct values per bucket, so a wrong bucket shows
        attention.relative_attention_bias.weight.normal_()
    return attention


def _starts(lengths: list[int]) -> list[int]:
    return [sum(lengths[:i]) for i in range(len(lengths))]


def _frame_tokens(demos: list[int], query: int, i: int) -> torch.Tensor:
    """Input positions of the text ``d_i q`` in the episode's concatenation ``d_0 ... d_k-1 q``."""
    start, query_start = _starts(demos)[i], sum(demos)
    return torch.cat([torch.arange(start, start + demos[i]), torch.arange(query_start, query_start + query)])


def _our_bias(structure: str, attention: T5Attention) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager path's dense ``(batch, heads, L, L)`` bias (mask folded in) and its ``allowed`` mask."""
    mask, seg = segment_batch(DEMOS, QUERIES)
    layout = build_layout(mask, seg, structure)
    table = bias_table(attention.relative_attention_bias.weight, attention.relative_attention_num_buckets,
                       attention.relative_attention_max_distance)
    return dense_bias(layout, table).bias, layout.allowed_mask()


@pytest.mark.parametrize("buckets, max_distance", [(32, 128), (8, 20)])
def test_bias_table_equals_hf_compute_bias_beyond_max_distance(buckets, max_distance):
    """Every distance in -300..300 (saturated past ``max_distance``) gets HF's bias, bit for bit."""
    attention = _hf_bias_module(buckets, max_distance)
    n = 301
    expected = attention.compute_bias(n, n)[0]  # (H, n, n), entry [h, x, y] for distance y - x
    table = bias_table(attention.relative_attention_bias.weight, buckets, max_distance)
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    assert torch.equal(table[:, table_index(rel, max_distance)], expected)


def test_saicl_bias_of_every_demonstration_and_query_pair_equals_hf_on_its_text():
    """For each demonstration ``i``: every pair among ``d_i`` and ``q`` has HF's bias on the text ``d_i q``;
    pairs of two different demonstrations are masked."""
    attention = _hf_bias_module()
    bias, allowed = _our_bias("saicl", attention)
    for b, (demos, query) in enumerate(zip(DEMOS, QUERIES)):
        for i in range(len(demos)):
            tokens = _frame_tokens(demos, query, i)
            expected = attention.compute_bias(len(tokens), len(tokens))[0]
            got = bias[b][:, tokens][:, :, tokens]
            assert torch.equal(got, expected), f"episode {b}, demonstration {i} (lengths {demos}, query {query})"
        starts = _starts(demos)
        for i in range(len(demos)):
            for j in range(len(demos)):
                block = allowed[b, starts[i]:starts[i] + demos[i], starts[j]:starts[j] + demos[j]]
                assert bool(block.all()) if i == j else not bool(block.any()), (b, i, j)


def test_full_bias_is_hf_on_the_concatenation():
    attention = _hf_bias_module()
    bias, allowed = _our_bias("full", attention)
    for b, (demos, query) in enumerate(zip(DEMOS, QUERIES)):
        n = sum(demos) + query
        assert torch.equal(bias[b][:, :n, :n], attention.compute_bias(n, n)[0]), f"episode {b}"
        assert bool(allowed[b, :n, :n].all()) and not bool(allowed[b, n:].any())


def test_fid_bias_of_each_pair_is_hf_on_its_text():
    """The expanded ``fid`` sequence holds ``d_0 q, d_1 q, ...`` in order, each pair HF's bias on its text."""
    attention = _hf_bias_module()
    bias, allowed = _our_bias("fid", attention)
    for b, (demos, query) in enumerate(zip(DEMOS, QUERIES)):
        pair_lengths = [d + query for d in demos]
        for i, (start, n) in enumerate(zip(_starts(pair_lengths), pair_lengths)):
            assert torch.equal(bias[b][:, start:start + n, start:start + n], attention.compute_bias(n, n)[0]), (b, i)
            assert bool(allowed[b, start:start + n, start:start + n].all())
            assert int(allowed[b, start:start + n].sum()) == n * n, f"pair {i} of episode {b} sees another pair"


@pytest.fixture(scope="module")
def one_layer_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("t5-one-layer")
    save_tiny_t5(path, gated=True, seed=5, num_layers=1)
    return path


@pytest.fixture(scope="module")
def two_layer_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("t5-two-layers")
    save_tiny_t5(path, gated=False, seed=6)
    return path


def _random_episodes(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mask, seg = segment_batch(DEMOS, QUERIES)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 384, mask.shape, generator=gen) * mask  # pad id 0 on padding
    return ids, mask, seg


def _hf_encode(hf: T5EncoderModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=ids[None]).last_hidden_state[0]


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_saicl_one_layer_demonstration_states_equal_hf_on_each_demonstration_and_query(backend, one_layer_checkpoint):
    """One encoder layer: demonstration ``i``'s tokens see exactly ``d_i`` and ``q`` at the distances of ``d_i q``,
    so their outputs are HF T5's encoder outputs on that text."""
    hf = T5EncoderModel.from_pretrained(one_layer_checkpoint).double().eval()
    ours = SAICLForConditionalGeneration.from_pretrained(one_layer_checkpoint, structure="saicl",
                                                         attn_backend=backend).double().eval()
    ids, mask, seg = _random_episodes()
    with torch.no_grad():
        states = ours.encoder(input_ids=ids, attention_mask=mask, segment_ids=seg).last_hidden_state
    for b, (demos, query) in enumerate(zip(DEMOS, QUERIES)):
        for i, (start, n) in enumerate(zip(_starts(demos), demos)):
            expected = _hf_encode(hf, ids[b, _frame_tokens(demos, query, i)])[:n]
            assert_close_to_reference(states[b, start:start + n], expected, name=f"episode {b}, demonstration {i}")


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_fid_pairs_equal_hf_encoder_on_each_text(backend, two_layer_checkpoint):
    """Every layer: the ``fid`` encoder's pair ``i`` is HF T5's whole encoder on ``d_i q``."""
    hf = T5EncoderModel.from_pretrained(two_layer_checkpoint).double().eval()
    ours = SAICLForConditionalGeneration.from_pretrained(two_layer_checkpoint, structure="fid",
                                                         attn_backend=backend).double().eval()
    ids, mask, seg = _random_episodes(seed=1)
    with torch.no_grad():
        out = ours.encoder(input_ids=ids, attention_mask=mask, segment_ids=seg)
    for b, (demos, query) in enumerate(zip(DEMOS, QUERIES)):
        pair_lengths = [d + query for d in demos]
        assert int(out.attention_mask[b].sum()) == sum(pair_lengths)
        for i, (start, n) in enumerate(zip(_starts(pair_lengths), pair_lengths)):
            expected = _hf_encode(hf, ids[b, _frame_tokens(demos, query, i)])
            got = out.last_hidden_state[b, start:start + n]
            assert_close_to_reference(got, expected, name=f"episode {b}, pair {i}")


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_full_equals_hf_encoder_on_each_concatenation(backend, two_layer_checkpoint):
    hf = T5EncoderModel.from_pretrained(two_layer_checkpoint).double().eval()
    ours = SAICLForConditionalGeneration.from_pretrained(two_layer_checkpoint, structure="full",
                                                         attn_backend=backend).double().eval()
    ids, mask, seg = _random_episodes(seed=2)
    with torch.no_grad():
        states = ours.encoder(input_ids=ids, attention_mask=mask, segment_ids=seg).last_hidden_state
    for b, (demos, query) in enumerate(zip(DEMOS, QUERIES)):
        n = sum(demos) + query
        assert_close_to_reference(states[b, :n], _hf_encode(hf, ids[b, :n]), name=f"episode {b}")
