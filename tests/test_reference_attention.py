"""Vote-weighted attention: the oracle every kernel is checked against."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keepkv_vllm.attention.reference import vote_attention


def _rand(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    h_kv=st.integers(1, 3),
    group=st.integers(1, 4),
    t=st.integers(1, 40),
    q=st.integers(1, 5),
)
def test_unit_votes_equal_plain_softmax_attention(seed, h_kv, group, t, q):
    d = 8
    queries, keys, values = (
        _rand(seed, h_kv * group, q, d),
        _rand(seed + 1, h_kv, t, d),
        _rand(seed + 2, h_kv, t, d),
    )
    out = vote_attention(queries, keys, values, torch.ones(h_kv, t, dtype=torch.float64))
    expanded_k = keys.repeat_interleave(group, dim=0)
    expanded_v = values.repeat_interleave(group, dim=0)
    expected = torch.nn.functional.scaled_dot_product_attention(queries, expanded_k, expanded_v)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    t=st.integers(2, 30),
    reps=st.lists(st.integers(1, 4), min_size=2, max_size=30),
)
def test_a_slot_with_vote_p_acts_as_p_identical_tokens(seed, t, reps):
    reps = torch.tensor((reps * t)[:t])
    d = 8
    queries, keys, values = _rand(seed, 2, 3, d), _rand(seed + 1, 1, t, d), _rand(seed + 2, 1, t, d)
    voted = vote_attention(queries, keys, values, reps.to(torch.float64).unsqueeze(0))
    dup = vote_attention(queries, keys.repeat_interleave(reps, dim=1), values.repeat_interleave(reps, dim=1))
    torch.testing.assert_close(voted, dup, rtol=1e-12, atol=1e-12)


def test_causal_window_queries_see_only_their_past():
    keys, values = _rand(0, 1, 10, 4), _rand(1, 1, 10, 4)
    queries = _rand(2, 1, 3, 4)
    out = vote_attention(queries, keys, values, causal=True)
    for i in range(3):
        visible = 10 - 3 + i + 1
        alone = vote_attention(queries[:, i : i + 1], keys[:, :visible], values[:, :visible])
        torch.testing.assert_close(out[:, i : i + 1], alone, rtol=1e-12, atol=1e-12)
    assert math.isfinite(out.abs().max().item())


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    lens=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    h_kv=st.integers(1, 3),
    group=st.integers(1, 3),
)
def test_batched_decode_equals_vote_attention_per_request(seed, lens, h_kv, group):
    from keepkv_vllm.attention.paged_torch import batched_vote_decode

    r, width, d = len(lens), max(lens) + 3, 8
    keys, values = _rand(seed, r, h_kv, width, d), _rand(seed + 1, r, h_kv, width, d)
    votes = 0.5 + _rand(seed + 2, r, h_kv, width).abs()
    query = _rand(seed + 3, r, h_kv * group, d)
    valid = torch.arange(width) < torch.tensor(lens).view(-1, 1)
    got = batched_vote_decode(query, keys, values, votes.log(), valid, d**-0.5)
    for i, n in enumerate(lens):
        want = vote_attention(
            query[i].unsqueeze(1), keys[i, :, :n], values[i, :, :n], votes[i, :, :n], scale=d**-0.5
        )
        torch.testing.assert_close(got[i], want[:, 0], rtol=1e-12, atol=1e-12)
