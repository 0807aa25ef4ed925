"""Method-specific properties: the equations of docs/algorithms.md, checked exactly."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_inputs
from hypothesis import given, settings
from hypothesis import strategies as st

from keepkv_vllm.attention.reference import vote_attention
from keepkv_vllm.methods import CaM, KVCompressionMethod, KVMerger, get_method
from keepkv_vllm.methods.base import log_window_probability
from keepkv_vllm.methods.keepkv import newest_share

# -- KeepKV ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    h_kv=st.integers(1, 4),
    t=st.integers(24, 160),
    budget_frac=st.floats(0.15, 0.9),
    votes=st.sampled_from(["ones", "merged"]),
)
def test_zip_merge_leaves_the_observed_query_output_unchanged(seed, h_kv, t, budget_frac, votes):
    """KeepKV's central claim: for one observed query, merging (exact votes) is lossless."""
    keys, values, vts, queries = make_inputs(
        h_kv=h_kv, group=1, t=t, window=1, dtype=torch.float64, seed=seed, votes=votes
    )
    budget = max(8, int(budget_frac * t))
    # merge every evicted slot: no key test, no value gate
    method = get_method("keepkv", similarity_threshold=-1.0, value_threshold=None, sink=2, recent=3)
    res = method.compress(keys, values, vts, queries, budget)
    assert (res.num_dropped == 0).all() and (res.num_merged == t - min(t, budget)).all()
    before = vote_attention(queries, keys, values, vts)
    after = vote_attention(queries, res.keys, res.values, res.votes)
    rel = (after - before).norm() / before.norm()
    assert rel < 1e-10, rel


def test_zip_merge_is_not_exact_when_tokens_are_dropped():
    """Control for the test above: the same data with drops does perturb the output."""
    keys, values, vts, queries = make_inputs(h_kv=2, group=1, t=100, window=1, dtype=torch.float64)
    res = get_method("keepkv", similarity_threshold=1.0, sink=2, recent=3).compress(
        keys, values, vts, queries, 20
    )
    before = vote_attention(queries, keys, values, vts)
    after = vote_attention(queries, res.keys, res.values, res.votes)
    assert (after - before).norm() / before.norm() > 1e-3


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), t=st.integers(30, 150), votes=st.sampled_from(["ones", "merged"]))
def test_count_vote_rule_conserves_total_vote_mass(seed, t, votes):
    keys, values, vts, queries = make_inputs(
        h_kv=3, group=2, t=t, dtype=torch.float64, seed=seed, votes=votes
    )
    res = get_method("keepkv", similarity_threshold=-1.0, value_threshold=None, vote_rule="count").compress(
        keys, values, vts, queries, 24
    )
    torch.testing.assert_close(res.votes.sum(dim=1), vts.sum(dim=1), rtol=1e-12, atol=0)


def test_exact_vote_equals_count_vote_for_identical_tokens():
    """Merging exact copies of a token: both vote rules give vote = number of copies."""
    keys, values, vts, queries = make_inputs(h_kv=1, group=1, t=40, window=2, dtype=torch.float64)
    q = queries[0].mean(dim=0)
    keys[0, 2:38] = -q + 0.1 * keys[0, 2:38]  # every middle slot scores low ...
    keys[0, 10:20] = q  # ... but ten exact copies of one token, which score high
    values[0, 10:20] = values[0, 10]
    for rule in ("exact", "count"):
        method = get_method(
            "keepkv", similarity_threshold=0.999999, vote_rule=rule, sink=2, recent=2, pool_kernel=1
        )
        res = method.compress(keys, values, vts, queries, 5)  # one heavy slot: the oldest copy
        assert res.kept_index[0].tolist() == [0, 1, 10, 38, 39]
        assert res.num_merged.item() == 9
        torch.testing.assert_close(res.votes[0, 2], torch.tensor(10.0, dtype=torch.float64))
        torch.testing.assert_close(res.keys[0, 2], keys[0, 10], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res.values[0, 2], values[0, 10], rtol=1e-12, atol=1e-12)


def test_threshold_one_is_pure_eviction_of_the_lowest_scores():
    keys, values, vts, queries = make_inputs(t=80, window=4)
    res = get_method("keepkv", similarity_threshold=1.0).compress(keys, values, vts, queries, 30)
    assert (res.num_merged == 0).all()
    idx = res.kept_index.unsqueeze(-1).expand(-1, -1, 16)
    assert torch.equal(res.keys, keys.gather(1, idx)) and torch.equal(
        res.votes, vts.gather(1, res.kept_index)
    )


def test_value_gate_merges_a_subset_of_what_the_key_test_admits():
    keys, values, vts, queries = make_inputs(h_kv=2, group=2, t=120, window=4, dtype=torch.float64)
    keys = keys[:, :1] + 0.3 * keys  # similar keys, so the key test alone merges nearly everything

    def run(**options):
        method = get_method("keepkv", similarity_threshold=0.0, **options)
        return method.compress(keys, values, vts, queries, 30)

    full = run(value_threshold=None)
    assert torch.equal(run(value_threshold=-1.0).keys, full.keys)  # an open gate changes nothing
    some = run(value_threshold=0.2)
    assert (0 < some.num_merged).all() and (some.num_merged < full.num_merged).all()
    closed = run(value_threshold=1.0)  # random values are never parallel: selection only
    selection_only = get_method("keepkv", similarity_threshold=1.0).compress(keys, values, vts, queries, 30)
    assert (closed.num_merged == 0).all()
    assert torch.equal(closed.keys, selection_only.keys) and torch.equal(closed.votes, selection_only.votes)


def test_value_threshold_out_of_range_is_a_value_error():
    with pytest.raises(ValueError, match="value_threshold"):
        get_method("keepkv", value_threshold=1.5)


def test_keepkv_keeps_the_slot_the_window_attends_to():
    keys, values, vts, queries = make_inputs(h_kv=1, group=1, t=120, window=4, dtype=torch.float64)
    keys[0, 50] = queries[0, -1] * 3  # a needle every window query attends to
    res = get_method("keepkv").compress(keys, values, vts, queries, 30)
    assert 50 in res.kept_index[0].tolist()


def _local_and_retrieval_heads() -> tuple[torch.Tensor, ...]:
    """Head 0's window reads the newest middle slots, head 1's a needle far back (t=200)."""
    keys, values, vts, queries = make_inputs(h_kv=2, group=1, t=200, window=4, dtype=torch.float64, seed=7)
    queries[:] = queries[:, -1:]  # every window query alike, so each head reads one place
    keys[0, 170:196] = queries[0, -1] * 2  # local: attention on its neighbourhood
    keys[1, 40] = queries[1, -1] * 3  # retrieval: attention on one old slot
    return keys, values, vts, queries


def test_newest_share_is_the_window_attention_on_the_newest_middle_slots():
    keys, values, vts, queries = _local_and_retrieval_heads()
    method = get_method("keepkv")
    budget = 40
    span = method.protected_span(budget, queries.shape[1])
    log_p = log_window_probability(keys, vts, queries, method.distance_weight)
    share = newest_share(log_p, budget, span)
    middle = log_p.exp()[:, span.sink : 200 - span.recent]
    reach = budget - span.sink - span.recent
    torch.testing.assert_close(share, middle[:, -reach:].sum(1) / middle.sum(1), rtol=1e-12, atol=0)
    assert share[0] > 0.9 and share[1] < 0.1


def test_local_share_keeps_a_local_heads_newest_slots_and_leaves_a_retrieval_head_alone():
    keys, values, vts, queries = _local_and_retrieval_heads()
    budget, sink = 40, 4
    local = get_method("keepkv", sink=sink).compress(keys, values, vts, queries, budget)
    plain = get_method("keepkv", sink=sink, local_share=False).compress(keys, values, vts, queries, budget)
    span = get_method("keepkv", sink=sink).protected_span(budget, queries.shape[1])
    n_heavy = budget - sink - span.recent
    log_p = log_window_probability(keys, vts, queries, 1.2)
    n_newest = (newest_share(log_p, budget, span) * n_heavy).round().long()
    for head in range(2):
        newest = list(range(200 - span.recent - int(n_newest[head]), 200))
        assert set(newest) <= set(local.kept_index[head].tolist())
    # the local head holds what a recency cache would hold; the retrieval head keeps its needle
    assert local.kept_index[0].tolist()[sink:] == list(range(200 - budget + sink, 200))
    assert 40 in local.kept_index[1].tolist() and 40 in plain.kept_index[1].tolist()


def test_local_share_must_be_a_bool():
    with pytest.raises(ValueError, match="local_share"):
        get_method("keepkv", local_share="yes")


def test_keepkv_bf16_matches_float64_closely():
    k, v, p, q = make_inputs(t=200, window=8, dtype=torch.float64, seed=3)
    exact = get_method("keepkv").compress(k, v, p, q, 60)
    low = get_method("keepkv").compress(k.float(), v.float(), p.float(), q.float(), 60)
    assert torch.equal(exact.kept_index, low.kept_index)
    torch.testing.assert_close(low.values.double(), exact.values, rtol=1e-4, atol=1e-4)


# -- baselines ------------------------------------------------------------------------


def test_streamingllm_keeps_first_sinks_and_newest_slots():
    keys, values, vts, queries = make_inputs(t=100, window=8)
    res = get_method("streamingllm", sink=4).compress(keys, values, vts, queries, 30)
    expected = torch.cat([torch.arange(4), torch.arange(74, 100)])
    assert torch.equal(res.kept_index, expected.expand(2, -1))


@pytest.mark.parametrize("name", ["h2o", "snapkv", "keepkv", "kvmerger", "cam"])
def test_attention_scored_methods_keep_a_planted_needle(name):
    keys, values, vts, queries = make_inputs(h_kv=2, group=2, t=200, window=8, dtype=torch.float64, seed=5)
    keys[:, 77] = queries.reshape(2, 2, 8, 16).mean(dim=(1, 2)) * 4
    res = get_method(name).compress(keys, values, vts, queries, 40)
    for h in range(2):
        assert 77 in res.kept_index[h].tolist(), name


def with_priority(cls: type, scores: torch.Tensor) -> type:
    """``cls`` ranking slots by fixed ``scores`` (the template's one step a method must write)."""
    return type(f"Fixed{cls.__name__}", (cls,), {"priority": lambda self, *args: scores})


def test_a_method_that_writes_only_a_priority_keeps_sinks_recent_and_its_top_slots():
    keys, values, vts, queries = make_inputs(t=60, window=4)
    scores = torch.zeros(2, 60)
    scores[:, 10:20] = 5.0  # heavy hitters by this ranking, whatever the window says
    res = with_priority(KVCompressionMethod, scores)(sink=2, recent=4).compress(
        keys, values, vts, queries, 16
    )
    assert torch.equal(
        res.kept_index, torch.cat([torch.arange(2), torch.arange(10, 20), torch.arange(56, 60)]).expand(2, -1)
    )
    assert torch.equal(res.keys, keys.gather(1, res.kept_index.unsqueeze(-1).expand(-1, -1, 16)))
    assert (res.num_merged == 0).all() and (res.num_dropped == 60 - 16).all()


def test_snapkv_pooling_keeps_the_neighbours_of_a_hit():
    keys, values, vts, queries = make_inputs(h_kv=1, group=1, t=200, window=8, dtype=torch.float64, seed=2)
    keys[0, 100] = queries[0].mean(dim=0) * 5
    res = get_method("snapkv", kernel_size=7, sink=0, recent=8).compress(keys, values, vts, queries, 15)
    assert set(range(97, 104)) <= set(res.kept_index[0].tolist())


def test_cam_merges_values_only_and_adds_each_evicted_value_times_its_gate():
    keys, values, vts, queries = make_inputs(t=120, window=8, dtype=torch.float64)
    cam = get_method("cam", merge_window=4)
    res = cam.compress(keys, values, vts, queries, 40)
    idx = res.kept_index.unsqueeze(-1).expand(-1, -1, 16)
    assert torch.equal(res.keys, keys.gather(1, idx)) and torch.equal(
        res.votes, vts.gather(1, res.kept_index)
    )
    assert not torch.equal(res.values, values.gather(1, idx))
    assert (res.num_merged > 0).all()
    # value mass: the heavy slots gained exactly sum_i prob_i V_i (each evicted value is spread
    # as prob_i V_i / m over m targets)
    selection = cam.select(keys, values, vts, queries, 40, cam.protected_span(40, 8))
    _, prob = cam._gates(selection)
    evicted = values.gather(1, selection.evicted.unsqueeze(-1).expand(-1, -1, 16))
    pos = selection.heavy_positions
    gained = res.values[:, pos].sum(dim=1) - values.gather(1, idx)[:, pos].sum(dim=1)
    torch.testing.assert_close(gained, (evicted * prob[..., None]).sum(dim=1), rtol=1e-12, atol=1e-12)


def test_cam_gate_is_relative_attention_clamped():
    """An evicted slot with more attention than its targets adds its full value / m."""
    keys, values, vts, queries = make_inputs(h_kv=1, group=1, t=40, window=2, dtype=torch.float64)
    scores = torch.ones(1, 40, dtype=torch.float64)
    scores[0, 2:30] = torch.linspace(0.5, 0.9, 28, dtype=torch.float64)  # all middle < targets
    scores[0, 30:34] = 1.0
    cam = with_priority(CaM, scores)(merge_window=4, sink=2, recent=6)
    res = cam.compress(keys, values, vts, queries, 12)  # heavy = 30..33
    assert torch.equal(res.kept_index[0], torch.tensor([0, 1, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39]))
    prob = (scores[0, 2:30] / 1.0).clamp(0, 1)
    expected = values[0, 30:34] + (values[0, 2:30] * prob[:, None]).sum(0) / 4
    torch.testing.assert_close(res.values[0, 2:6], expected, rtol=1e-12, atol=1e-12)


def test_kvmerger_merges_consecutive_similar_runs_with_gaussian_weights():
    keys, values, vts, queries = make_inputs(h_kv=1, group=1, t=60, window=2, dtype=torch.float64, seed=4)
    direction = torch.randn(16, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    keys[0, 20:26] = direction + 0.01 * torch.randn(
        6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    scores = torch.ones(1, 60, dtype=torch.float64)
    scores[0, 23] = 9.0  # pivot
    m = with_priority(KVMerger, scores)(
        similarity_threshold=0.99, heavy_fraction=0.0, sink=2, recent=2, sigma=0.05
    )
    res = m.compress(keys, values, vts, queries, 60 - 5)
    # exactly the run 20..25 collapses into its pivot slot 23; nothing else is touched
    kept = res.kept_index[0].tolist()
    assert 23 in kept and not ({20, 21, 22, 24, 25} & set(kept))
    j = kept.index(23)
    d2 = (keys[0, 20:26] - keys[0, 23]).pow(2).sum(-1)
    g = torch.exp(-d2 / (2 * 0.05**2))
    torch.testing.assert_close(
        res.keys[0, j], (g[:, None] * keys[0, 20:26]).sum(0) / g.sum(), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(
        res.values[0, j], (g[:, None] * values[0, 20:26]).sum(0) / g.sum(), rtol=1e-12, atol=1e-12
    )
    assert res.votes[0, j] == 1.0 and res.num_merged.item() == 5


def test_kvmerger_count_votes_conserve_mass_when_nothing_is_dropped():
    keys, values, vts, queries = make_inputs(h_kv=2, t=80, window=4, dtype=torch.float64)
    m = get_method("kvmerger", similarity_threshold=-1.0, heavy_fraction=0.0, count_votes=True)
    res = m.compress(keys, values, vts, queries, 30)
    assert (res.num_dropped == 0).all()
    torch.testing.assert_close(res.votes.sum(dim=1), vts.sum(dim=1))


def test_kvmerger_budget_exact_when_threshold_makes_too_few_sets():
    """Nearly identical keys form one run; it is cut at its weakest links into exactly as many
    sets as the budget has room for, so every slot is merged and none dropped."""
    g = torch.Generator().manual_seed(0)
    keys = torch.ones(1, 50, 8, dtype=torch.float64) + 1e-3 * torch.randn(
        1, 50, 8, dtype=torch.float64, generator=g
    )
    values, vts = (
        torch.randn(1, 50, 8, dtype=torch.float64, generator=g),
        torch.ones(1, 50, dtype=torch.float64),
    )
    res = get_method("kvmerger", similarity_threshold=0.0).compress(
        keys, values, vts, keys[:, -2:].clone(), 25
    )
    assert res.keys.shape == (1, 25, 8) and res.kept_index.shape == (1, 25)
    assert (res.kept_index.diff(dim=1) > 0).all() and math.isfinite(res.keys.sum().item())
    assert res.num_merged.item() == 25 and res.num_dropped.item() == 0
